"""fxtl's MLPClassifier: scikit-learn's, ending early stopping at a perfect validation score."""
from __future__ import annotations

import numpy as np
import pytest
from sklearn.neural_network import MLPClassifier as SklearnMLP

from fxtl.heads.mlp import MLPClassifier

PARAMS = dict(hidden_layer_sizes=(32,), alpha=1e-2, batch_size=16, learning_rate_init=3e-3,
              early_stopping=True, validation_fraction=0.2, n_iter_no_change=10, max_iter=200,
              random_state=0)


def _blobs(sep: float, n: int = 120, seed: int = 0):
    rng = np.random.default_rng(seed)
    y = np.arange(n) % 3
    X = rng.normal(size=(n, 6)) + sep * np.eye(6)[y]
    return X.astype(np.float32), y


@pytest.mark.parametrize("sep", [8.0, 0.7])  # the hold-out is classified perfectly / never
def test_same_weights_and_predictions_as_scikit_learn(sep):
    X, y = _blobs(sep)
    ours, theirs = MLPClassifier(**PARAMS).fit(X, y), SklearnMLP(**PARAMS).fit(X, y)
    for a, b in zip(ours.coefs_ + ours.intercepts_, theirs.coefs_ + theirs.intercepts_):
        np.testing.assert_array_equal(a, b)
    np.testing.assert_array_equal(ours.predict_proba(X), theirs.predict_proba(X))
    assert ours.best_validation_score_ == theirs.best_validation_score_
    if sep > 1:  # perfect early: scikit-learn runs n_iter_no_change more epochs for nothing
        assert ours.best_validation_score_ == 1.0
        assert ours.n_iter_ == int(np.argmax(theirs.validation_scores_)) + 1
        assert theirs.n_iter_ == ours.n_iter_ + PARAMS["n_iter_no_change"] + 1
    else:
        assert theirs.best_validation_score_ < 1.0 and ours.n_iter_ == theirs.n_iter_


def test_is_the_fitted_mlp_head_and_round_trips(tmp_path):
    from sklearn.base import clone

    from fxtl.heads.persistence import TRUSTED_TYPES
    from fxtl.heads.registry import build_pipeline

    est = build_pipeline("mlp", params={}, seed=0, solver="sklearn").steps[-1][1]
    assert type(est) is MLPClassifier and isinstance(clone(est), MLPClassifier)
    assert "fxtl.heads.mlp.MLPClassifier" in TRUSTED_TYPES
    sio = pytest.importorskip("skops.io")
    X, y = _blobs(8.0)
    fitted = MLPClassifier(**PARAMS).fit(X, y)
    back = sio.loads(sio.dumps(fitted), trusted=list(TRUSTED_TYPES) + sio.get_untrusted_types(
        data=sio.dumps(fitted)))
    np.testing.assert_array_equal(back.predict_proba(X), fitted.predict_proba(X))
