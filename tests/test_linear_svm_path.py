"""The linear SVM's C grid is walked as a path that stops once it falls (issue 23 item 5): the
weakly regularised end is the slowest for liblinear and, on standardised features, never the best."""
from __future__ import annotations

import numpy as np
import pytest
from sklearn.datasets import load_digits
from sklearn.model_selection import StratifiedKFold

import fxtl.heads.search as search
from fxtl.heads.config import HeadConfig
from fxtl.heads.grid import PATH_PATIENCE
from fxtl.heads.registry import DataShape, get_head


@pytest.fixture(scope="module")
def digits():
    X, y = load_digits(return_X_y=True)
    rng = np.random.default_rng(0)
    keep = rng.choice(len(y), 300, replace=False)
    X = X[keep].astype(np.float32) + rng.normal(0, 4.0, (300, 64)).astype(np.float32)
    folds = list(StratifiedKFold(3, shuffle=True, random_state=0).split(X, y[keep]))
    return X, y[keep], folds


def _search(digits, path_param):
    X, y, folds = digits
    spec = get_head("linear-svm")
    grid = spec.space(DataShape(n_fit=200, dim=64, n_classes=10))["C"]
    assert grid == sorted(grid)  # a path: ascending C
    grid = grid + [10 ** -0.5, 1.0]  # walked further than the head's own, past its best
    return search.run_search(spec, X=X, y=y, folds=folds, candidates=[{"C": c} for c in grid],
                             fixed={}, config=HeadConfig(models=("linear-svm",), seed=0, jobs=1,
                                                         solver="sklearn"),
                             parallel=None, deadline=None, progress=None, path_param=path_param)


def test_linear_svm_path_stops_where_the_full_grid_agrees(digits, monkeypatch):
    calls = []
    real = search.score_grid

    def spy(*args, **kwargs):
        calls.append(kwargs)
        return real(*args, **kwargs)

    monkeypatch.setattr(search, "score_grid", spy)
    path = _search(digits, "C")
    full = _search(digits, None)
    # LinearSVC has no warm start: the path is cold, but it stops once it falls.
    assert calls[0]["warm"] is False and calls[0]["patience"] == PATH_PATIENCE
    assert calls[1]["patience"] is None and full.tried == len(full.scores) == 11
    assert path.path_stopped and path.tried < full.tried
    assert path.scores == full.scores[:path.tried]  # the same fits, fewer of them
    assert path.best == full.best
