"""fxtl's own estimators keep scikit-learn's estimator contract, and a Head answers like one.

Every custom estimator runs scikit-learn's ``parametrize_with_checks``. A check a model cannot
pass is listed in ``EXPECTED_FAILURES`` with why; the list is strict (a listed check that
passes fails the test), so it cannot go stale.
"""
from __future__ import annotations

import numpy as np
import pytest
import torch
from sklearn.linear_model import LogisticRegression
from sklearn.utils.estimator_checks import parametrize_with_checks
from threadpoolctl import threadpool_limits

from fxtl.heads.kernel_svm import RBFSVC
from fxtl.heads.linear_svm import LinearSVC
from fxtl.heads.mlp import MLPClassifier
from fxtl.heads.model import Head
from fxtl.heads.torch_heads import TorchLinearSVC, TorchLogisticRegression, TorchMLPClassifier

# Small iteration counts keep the torch estimators' checks quick; each still learns the
# checks' blobs (scikit-learn's own checks run LogisticRegression with max_iter=5).
ESTIMATORS = [
    RBFSVC(),
    LinearSVC(),
    LinearSVC(C=0.1, dual=True),  # the row-span dual wherever a check has fewer rows than features
    MLPClassifier(hidden_layer_sizes=(16,), learning_rate_init=0.01, max_iter=50),
    TorchLogisticRegression(device="cpu", max_iter=30),
    TorchLinearSVC(device="cpu", max_iter=30),
    TorchMLPClassifier(device="cpu", hidden_layer_sizes=(16,), learning_rate_init=0.01,
                       max_iter=50, random_state=0),
]

_SOLVER_STOPS = ("L-BFGS stops at tol: the weighted fit and the fit on repeated rows solve the "
                 "same problem and agree to about 1e-6, not the check's rtol=1e-7 "
                 "(test_sample_weights_equal_repeated_rows checks them at 1e-4)")
_LIBSVM = ("libsvm scales C per row, so a weight is not a repeated row (scikit-learn lists SVC "
           "the same way)")
_LIBLINEAR_DUAL = ("liblinear's dual visits rows in a random order, so a weight is not a repeated "
                   "row (scikit-learn lists LinearSVC the same way)")
EXPECTED_FAILURES = {
    RBFSVC: {"check_sample_weight_equivalence_on_dense_data": _LIBSVM,
             "check_sample_weight_equivalence_on_sparse_data": _LIBSVM},
    LinearSVC: {"check_sample_weight_equivalence_on_dense_data": _LIBLINEAR_DUAL,
                "check_sample_weight_equivalence_on_sparse_data": _LIBLINEAR_DUAL},
    TorchLogisticRegression: {"check_sample_weight_equivalence_on_dense_data": _SOLVER_STOPS},
    TorchLinearSVC: {"check_sample_weight_equivalence_on_dense_data": _SOLVER_STOPS},
    TorchMLPClassifier: {"check_sample_weight_equivalence_on_dense_data":
                         "mini-batch Adam is stochastic: repeated rows change the batches, "
                         "so the weights differ, as for scikit-learn's MLP with adam"},
}


def _expected_failures(estimator) -> dict[str, str]:
    return EXPECTED_FAILURES.get(type(estimator), {})


@pytest.fixture(scope="module", autouse=True)
def _one_thread():
    """The checks' problems are tiny: torch and BLAS threads only contend for shared cores."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    with threadpool_limits(limits=1):
        yield
    torch.set_num_threads(threads)


@parametrize_with_checks(ESTIMATORS, expected_failed_checks=_expected_failures, xfail_strict=True)
def test_estimator_contract(estimator, check):
    check(estimator)


@pytest.mark.parametrize("cls", [TorchLogisticRegression, TorchLinearSVC])
def test_sample_weights_equal_repeated_rows(cls):
    """An integer weight is that many copies of the row (to the solver's precision)."""
    rng = np.random.default_rng(0)
    X = rng.normal(size=(60, 4))
    y = (X[:, 0] + X[:, 1] + rng.normal(scale=0.5, size=60) > 0).astype(int) + (X[:, 2] > 1)
    w = rng.integers(0, 3, size=60)
    weighted = cls(device="cpu", tol=1e-10).fit(X, y, sample_weight=w)
    repeated = cls(device="cpu", tol=1e-10).fit(np.repeat(X, w, axis=0), np.repeat(y, w))
    unweighted = cls(device="cpu", tol=1e-10).fit(X, y)
    np.testing.assert_allclose(weighted.coef_, repeated.coef_, rtol=1e-4, atol=1e-6)
    np.testing.assert_allclose(weighted.intercept_, repeated.intercept_, rtol=1e-4, atol=1e-6)
    assert np.abs(weighted.coef_ - unweighted.coef_).max() > 1e-2  # the weights matter here


def test_torch_mlp_trains_on_whole_data_too_small_to_hold_out():
    X = np.array([[0.0, 0.0], [0.1, 0.0], [3.0, 3.0], [3.1, 3.0], [6.0, 0.0]])
    y = ["a", "a", "b", "b", "c"]  # class c has one row: no stratified hold-out exists
    clf = TorchMLPClassifier(device="cpu", hidden_layer_sizes=(8,), learning_rate_init=0.05,
                             max_iter=200, random_state=0)
    with pytest.warns(UserWarning, match="too few to hold out"):
        clf.fit(X, y)
    assert clf.validation_scores_ is None and clf.n_iter_ > 1
    assert clf.predict(X).tolist() == y
    assert not hasattr(clf, "partial_fit")


def test_head_predicts_labels_of_every_class_even_one_without_training_rows():
    """``classes_`` is every class name: a class the estimator never saw has a zero column, and
    ``classes_[argmax(scores)]`` is ``predict``."""
    X = np.array([[0.0], [1.0], [5.0], [6.0], [10.0], [11.0]])
    est = LogisticRegression().fit(X, ["ants", "ants", "bees", "bees", "wasps", "wasps"])
    names = ["ants", "bees", "flies", "wasps"]  # flies: no training row
    head = Head(model="logreg", pipeline=est, class_names=names, provenance={})
    Xq = np.array([[0.5], [5.5], [10.5]])
    assert head.classes_.tolist() == names
    assert head.predict(Xq).tolist() == ["ants", "bees", "wasps"]
    proba = head.predict_proba(Xq)
    assert proba.shape == (3, 4) and (proba[:, 2] == 0).all()
    np.testing.assert_allclose(proba[:, [0, 1, 3]], est.predict_proba(Xq))
    assert (head.classes_[proba.argmax(1)] == head.predict(Xq)).all()
