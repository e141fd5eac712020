"""fxtl's LinearSVC (the linear-svm head's estimator) is scikit-learn's, its dual solved in the
span of the training rows when they are fewer than the features: the same weights, decisions
and iterations, and the search scores the same as GridSearchCV with scikit-learn's LinearSVC."""
from __future__ import annotations

import numpy as np
import pytest
from sklearn.datasets import load_digits
from sklearn.model_selection import GridSearchCV, StratifiedKFold
from sklearn.pipeline import make_pipeline
from sklearn.preprocessing import StandardScaler
from sklearn.svm import LinearSVC as SklearnLinearSVC

from fxtl.heads.grid import prepare_folds, score_grid
from fxtl.heads.linear_svm import LinearSVC, projects
from fxtl.heads.registry import build_pipeline


@pytest.fixture(scope="module")
def wide():
    """90 digits, each 8x8 image upsampled to 256 noisy features: fewer rows than features."""
    X, y = load_digits(return_X_y=True)
    rng = np.random.default_rng(0)
    X = np.repeat(X[:90], 4, axis=1) + rng.normal(0, 1.0, (90, 256))
    return StandardScaler().fit_transform(X), y[:90]


@pytest.mark.parametrize("labels", ["multiclass", "binary", "strings"])
@pytest.mark.parametrize("params", [{}, {"C": 1.0}, {"fit_intercept": False},
                                    {"intercept_scaling": 3.0}, {"class_weight": "balanced"},
                                    {"loss": "hinge", "dual": True}])
def test_same_model_as_sklearn_linear_svc(wide, labels, params):
    X, y = wide
    y = {"multiclass": y, "binary": y % 2, "strings": np.array(["a", "b c", "é"])[y % 3]}[labels]
    params = {"C": 0.01, "random_state": 0, **params}
    ours, theirs = LinearSVC(**params), SklearnLinearSVC(**params)
    assert projects(ours, X[:60].shape)
    ours.fit(X[:60], y[:60])
    theirs.fit(X[:60], y[:60])
    # the same dual iterations on other coordinates: equal to rounding
    assert ours.n_iter_ == theirs.n_iter_
    np.testing.assert_allclose(ours.coef_, theirs.coef_, atol=1e-9)
    np.testing.assert_allclose(ours.intercept_, theirs.intercept_, atol=1e-9)
    np.testing.assert_allclose(ours.decision_function(X[60:]), theirs.decision_function(X[60:]),
                               atol=1e-9)
    assert (ours.predict(X[60:]) == theirs.predict(X[60:])).all()
    assert ours.coef_.shape == theirs.coef_.shape and ours.n_features_in_ == 256


def test_sample_weight_reaches_the_row_space_fit(wide):
    X, y = wide
    w = np.random.default_rng(1).integers(1, 4, size=60).astype(float)
    ours = LinearSVC(C=0.01, random_state=0).fit(X[:60], y[:60], sample_weight=w)
    theirs = SklearnLinearSVC(C=0.01, random_state=0).fit(X[:60], y[:60], sample_weight=w)
    np.testing.assert_allclose(ours.coef_, theirs.coef_, atol=1e-9)
    plain = LinearSVC(C=0.01, random_state=0).fit(X[:60], y[:60])
    assert np.abs(plain.coef_ - ours.coef_).max() > 1e-3  # the weights matter here


@pytest.mark.parametrize("rows, params, expected", [
    (60, {}, True),                       # fewer rows than features: the dual, in the row span
    (60, {"dual": False}, False),         # the primal asked for: scikit-learn's own fit
    (300, {}, False),                     # more rows than features: the primal, as sklearn's auto
    (60, {"penalty": "l1", "dual": False}, False),
    (60, {"multi_class": "crammer_singer"}, False),
])
def test_projects_only_an_l2_dual_on_fewer_rows_than_features(rows, params, expected):
    assert projects(LinearSVC(**params), (rows, 256)) is expected


def test_falls_back_to_sklearn_bit_for_bit(wide):
    X, y = wide
    Xl = np.tile(X[:, :40], (4, 1))  # 360 rows of 40 features
    yl = np.tile(y, 4)
    ours = LinearSVC(C=0.1, random_state=0).fit(Xl, yl)
    theirs = SklearnLinearSVC(C=0.1, random_state=0).fit(Xl, yl)
    np.testing.assert_array_equal(ours.coef_, theirs.coef_)


def test_search_projects_each_fold_once_and_scores_like_grid_search_cv(wide):
    X, y = wide
    folds = list(StratifiedKFold(3, shuffle=True, random_state=0).split(X, y % 3))
    cands = [{"C": c} for c in (1e-4, 1e-3, 1e-2, 1e-1)]

    def factory():
        return build_pipeline("linear-svm", seed=0, calibrate=False)

    prepared = prepare_folds(factory, X=X, y=y % 3, folds=folds)
    # each fold's 60 training rows (+ the intercept column) become 60 coordinates
    assert prepared[0].X_train.shape == (60, 60) and prepared[0].X_test.shape == (30, 60)
    assert prepared[0].estimator.get_params()["fit_intercept"] is False
    out = score_grid("linear-svm", prepared, cands, workers=2)
    gs = GridSearchCV(make_pipeline(StandardScaler(), SklearnLinearSVC(random_state=0, max_iter=2000)),
                      [{"linearsvc__C": [c["C"]]} for c in cands], cv=folds,
                      scoring="accuracy").fit(X, y % 3)
    np.testing.assert_allclose(out.scores, gs.cv_results_["mean_test_score"], atol=1e-12)
    assert len(set(out.scores)) > 1  # the candidates differ: the comparison means something
