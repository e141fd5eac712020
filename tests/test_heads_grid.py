"""The in-process search engine (fxtl.heads.grid) scores candidates exactly as scikit-learn's
GridSearchCV does, only faster: preprocessing once per fold, the RBF kernel from cached
distances, fits side by side in threads, a budget between rounds."""
from __future__ import annotations

import time
from pathlib import Path

import numpy as np
import pytest
from sklearn.datasets import load_digits
from sklearn.model_selection import GridSearchCV, ParameterGrid, StratifiedKFold

from fxtl.heads.grid import map_threads, pick_best, prepare_folds, score_grid, uses_kernel_cache
from fxtl.heads.registry import DataShape, build_pipeline, get_head, head_names

DOCS = Path(__file__).resolve().parents[1] / "docs"


@pytest.fixture(scope="module")
def digits():
    X, y = load_digits(return_X_y=True)
    rng = np.random.default_rng(0)
    keep = rng.choice(len(y), 400, replace=False)
    X = X[keep].astype(np.float32) + rng.normal(0, 0.5, (400, 64)).astype(np.float32)
    folds = list(StratifiedKFold(4, shuffle=True, random_state=0).split(X, y[keep]))
    return X, y[keep], folds


@pytest.mark.parametrize("model, workers", [("svm", 1), ("svm", 2), ("linear-svm", 2),
                                            ("knn", 1), ("mlp", 2)])
def test_scores_equal_grid_search_cv(digits, model, workers):
    X, y, folds = digits
    spec = get_head(model)
    grid = spec.space(DataShape(n_fit=300, dim=64, n_classes=10))
    if model == "mlp":
        grid = {"alpha": grid["alpha"][:2]}
    cands = list(ParameterGrid(grid))
    fixed = {"max_iter": 20} if model == "mlp" else {}

    def factory():
        return build_pipeline(model, params=fixed, seed=0, calibrate=False)

    template = factory().steps[-1][1]
    prepared = prepare_folds(factory, X=X, y=y, folds=folds,
                             kernel=uses_kernel_cache(template, cands))
    assert (prepared[0].d_train is not None) == (model == "svm")
    out = score_grid(model, prepared, cands, workers=workers)
    gs = GridSearchCV(factory(), [{f"est__{k}": [v] for k, v in c.items()} for c in cands],
                      cv=folds, scoring="accuracy").fit(X, y)
    np.testing.assert_allclose(out.scores, gs.cv_results_["mean_test_score"], atol=1e-12)
    assert out.tried == len(cands) and not out.stopped_by_budget


def test_warm_started_path_scores_like_cold_fits(digits):
    X, y, folds = digits
    cands = [{"C": c} for c in (1e-3, 1e-2, 1e-1, 1.0)]

    def factory():
        return build_pipeline("logreg", params={"max_iter": 5000, "tol": 1e-8}, calibrate=False)

    prepared = prepare_folds(factory, X=X, y=y, folds=folds)
    warm = score_grid("logreg", prepared, cands, warm=True)
    cold = score_grid("logreg", prepared, cands, warm=False, workers=2)
    np.testing.assert_allclose(warm.scores, cold.scores, atol=1.5 / len(y))


def test_budget_stops_between_rounds_and_keeps_what_was_scored(digits):
    X, y, folds = digits
    cands = list(ParameterGrid(get_head("svm").space(DataShape(300, 64, 10))))
    prepared = prepare_folds(lambda: build_pipeline("svm", calibrate=False), X=X, y=y, folds=folds,
                             kernel=True)
    seen = []
    out = score_grid("svm", prepared, cands, deadline=time.perf_counter() - 1,
                     progress=lambda done, total, name: seen.append((done, total, name)))
    assert out.stopped_by_budget and out.tried == 1 == len(out.scores)
    assert seen == [(1, len(cands), "svm")]
    assert out.best == cands[0]


def test_ties_go_to_the_lowest_log_loss_else_the_first():
    assert pick_best([0.5, 0.9, 0.9, 0.9], [0.1, 0.4, 0.2, 0.3]) == 2
    assert pick_best([0.5, 0.9, 0.9], [0.1, None, 0.2]) == 1
    assert pick_best([0.9], [None]) == 0


def test_map_threads_keeps_order_and_raises_in_the_caller():
    assert map_threads(lambda t: t * t, list(range(7)), 3) == [t * t for t in range(7)]

    def boom(t):
        if t == 3:
            raise ValueError("bad candidate")
        return t

    with pytest.raises(ValueError, match="bad candidate"):
        map_threads(boom, list(range(6)), 2)


def test_a_path_stops_once_its_scores_fall_past_the_best(monkeypatch):
    import fxtl.heads.grid as grid

    acc = {0: 0.5, 1: 0.7, 2: 0.9, 3: 0.8, 4: 0.9, 5: 0.85, 6: 0.8, 7: 0.7, 8: 0.99}
    fitted = []

    def fake(est, fold, cand):
        fitted.append(cand["C"])
        return acc[cand["C"]], None

    monkeypatch.setattr(grid, "_fit_score", fake)
    fold = grid.PreparedFold(np.zeros((2, 1)), np.zeros(2), np.zeros((2, 1)), np.zeros(2),
                             estimator=get_head("svm").space)  # never fitted: _fit_score is fake
    cands = [{"C": c} for c in range(9)]
    monkeypatch.setattr("sklearn.base.clone", lambda e: e)
    out = score_grid("x", [fold], cands, patience=3)
    # a tie with the best (C=4) restarts the count; C=5, 6, 7 fall below 0.9: stop before C=8
    assert out.path_stopped and out.tried == 8 and fitted == list(range(8))
    assert out.best == {"C": 2} and not out.stopped_by_budget
    fitted.clear()
    assert score_grid("x", [fold], cands).tried == 9  # no patience: every candidate


def test_candidate_counts_are_the_documented_ones():
    """Each candidate costs a fit per fold (5 on hymenoptera-sized data): a grid that grows is a
    decision about speed, so its size is the one docs/scaling.md states."""
    shape = DataShape(n_fit=196, dim=1280, n_classes=2)  # hymenoptera's CV folds
    counts = {name: len(ParameterGrid(get_head(name).space(shape))) for name in head_names()}
    assert counts == {"logreg": 13, "svm": 16, "linear-svm": 9, "mlp": 3, "knn": 16}
    stated = (f"{sum(counts.values())} candidates, "
              + ", ".join(f"{name} {n}" for name, n in counts.items()))
    assert stated in " ".join((DOCS / "scaling.md").read_text().split())
