"""RBFSVC (the svm head's estimator) is scikit-learn's RBF SVC with the kernel computed by BLAS:
same support vectors, dual coefficients, decisions and predictions."""
from __future__ import annotations

import numpy as np
import pytest
from sklearn.base import clone
from sklearn.datasets import load_digits
from sklearn.preprocessing import StandardScaler
from sklearn.svm import SVC

from fxtl.heads.kernel_svm import RBFSVC


@pytest.fixture(scope="module")
def digits():
    X, y = load_digits(return_X_y=True)
    return StandardScaler().fit_transform(X)[:900], y[:900]


@pytest.mark.parametrize("labels", ["multiclass", "binary", "strings"])
@pytest.mark.parametrize("gamma", [0.01, "scale"])
def test_same_model_as_sklearn_svc(digits, labels, gamma):
    X, y = digits
    y = {"multiclass": y, "binary": y % 2, "strings": np.array(["a", "b", "c"])[y % 3]}[labels]
    a = SVC(C=3.0, gamma=gamma).fit(X[:600], y[:600])
    b = RBFSVC(C=3.0, gamma=gamma).fit(X[:600], y[:600])
    assert b._gamma == pytest.approx(a._gamma)
    # the same problem, solved to libsvm's tolerance (1e-3) from a kernel rounded differently
    assert len(np.setxor1d(a.support_, b.support_)) <= 0.02 * len(a.support_)
    np.testing.assert_allclose(b.decision_function(X[600:]), a.decision_function(X[600:]), atol=0.02)
    assert (b.predict(X[600:]) == a.predict(X[600:])).mean() >= 0.99
    # ... and the BLAS evaluation of the fitted model is exactly libsvm's evaluation of it
    Xv = np.ascontiguousarray(X[600:], dtype=np.float64)
    np.testing.assert_allclose(b._dense_decision_function(Xv),
                               super(RBFSVC, b)._dense_decision_function(Xv), atol=1e-10)
    np.testing.assert_array_equal(b._dense_predict(Xv), super(RBFSVC, b)._dense_predict(Xv))


def test_other_kernels_fall_back_to_sklearn(digits):
    X, y = digits
    a = SVC(kernel="linear", C=0.1).fit(X[:300], y[:300])
    b = RBFSVC(kernel="linear", C=0.1).fit(X[:300], y[:300])
    np.testing.assert_allclose(b.decision_function(X[300:400]), a.decision_function(X[300:400]))
    assert clone(b).get_params() == b.get_params()


def test_round_trips_through_skops(tmp_path, digits):
    from fxtl.heads.model import Head
    from fxtl.heads.persistence import load_head, save_head
    from sklearn.pipeline import make_pipeline

    X, y = digits
    pipe = make_pipeline(StandardScaler(), RBFSVC(C=3.0, gamma=0.01)).fit(X[:300], y[:300])
    head = Head(model="svm", pipeline=pipe, class_names=[str(c) for c in range(10)], provenance={})
    back = load_head(save_head(head, tmp_path / "head.skops"))
    np.testing.assert_array_equal(back.pipeline.predict(X[300:]), pipe.predict(X[300:]))
