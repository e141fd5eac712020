"""An RBF-kernel SVC whose kernel is computed with BLAS, in fit and in predict.

libsvm evaluates an RBF kernel one pair of rows at a time, in plain loops: on a few thousand
1280-d feature rows that is most of an SVM's cost, in the fit and again in every prediction.
:class:`RBFSVC` is scikit-learn's :class:`~sklearn.svm.SVC` that hands libsvm a kernel matrix
computed as one matrix product (``exp(-gamma * ||x - x'||^2)``), then keeps the fitted state an
``SVC(kernel="rbf")`` has (support vectors, dual coefficients, intercepts), so everything that
reads an SVC (skops, skl2onnx, ``CalibratedClassifierCV``) reads it. Its decisions and
predictions are libsvm's one-vs-one rule, evaluated with BLAS.

Examples
--------
>>> import numpy as np
>>> X = np.array([[0., 0.], [0., 1.], [3., 3.], [3., 4.]]); y = [0, 0, 1, 1]
>>> RBFSVC(gamma=0.5).fit(X, y).predict([[0., 0.5], [3., 3.5]]).tolist()
[0, 1]
"""
from __future__ import annotations

import numpy as np
import scipy.sparse as sp
from sklearn.svm import SVC
from sklearn.utils.validation import validate_data

__all__ = ["RBFSVC", "sq_distances", "rbf_gamma"]

# Rows of a prediction's kernel block (rows x support vectors float64) at a time.
PREDICT_BLOCK = 2048


def sq_distances(A: np.ndarray, B: np.ndarray) -> np.ndarray:
    """Squared Euclidean distances between the rows of ``A`` and ``B`` (float64, >= 0)."""
    A = np.asarray(A, dtype=np.float64)
    B = np.asarray(B, dtype=np.float64)
    d = A @ B.T
    d *= -2.0
    d += (A * A).sum(1)[:, None]
    d += (B * B).sum(1)[None, :]
    return np.maximum(d, 0.0, out=d)


def rbf_gamma(gamma, X: np.ndarray) -> float:
    """``gamma`` as scikit-learn's SVC resolves it on training rows ``X`` ("scale", "auto" or a
    number)."""
    if gamma == "scale":
        var = float(X.var())
        return 1.0 / (X.shape[1] * var) if var > 0 else 1.0
    if gamma == "auto":
        return 1.0 / X.shape[1]
    return float(gamma)


def _rbf(A: np.ndarray, B: np.ndarray, gamma: float) -> np.ndarray:
    k = sq_distances(A, B)
    k *= -gamma
    return np.exp(k, out=k)


class RBFSVC(SVC):
    """:class:`~sklearn.svm.SVC` with the RBF kernel computed by BLAS (same parameters).

    Other kernels, ``probability=True`` and sparse ``X`` fall back to scikit-learn's own code
    (so sparse input is accepted, as the inherited ``input_tags.sparse`` says).
    """

    def _fast(self) -> bool:
        return self.kernel == "rbf" and self.probability in (False, "deprecated")

    def fit(self, X, y, sample_weight=None):
        if not self._fast() or sp.issparse(X):
            return super().fit(X, y, sample_weight)
        X, y = validate_data(self, X, y, dtype=np.float64, order="C", accept_sparse=False)
        gamma = rbf_gamma(self.gamma, X)
        inner = SVC(kernel="precomputed", C=self.C, tol=self.tol, shrinking=self.shrinking,
                    cache_size=self.cache_size, class_weight=self.class_weight,
                    max_iter=self.max_iter, decision_function_shape=self.decision_function_shape,
                    break_ties=self.break_ties, random_state=self.random_state)
        inner.fit(_rbf(X, X, float(gamma)), y, sample_weight)
        for name in ("support_", "_n_support", "dual_coef_", "intercept_", "_dual_coef_",
                     "_intercept_", "_probA", "_probB", "fit_status_", "_num_iter", "n_iter_",
                     "classes_", "class_weight_", "_sparse", "_effective_probability"):
            if hasattr(inner, name):
                setattr(self, name, getattr(inner, name))
        self.support_vectors_ = X[self.support_]
        self.shape_fit_ = X.shape
        self._gamma = float(gamma)
        return self

    def _pairwise(self, X) -> np.ndarray:
        """libsvm's one-vs-one decision values (pair order (0,1), (0,2), ..., (1,2), ...)."""
        n_class = len(self.classes_)
        starts = np.r_[0, np.cumsum(self._n_support)]
        pairs = [(i, j) for i in range(n_class) for j in range(i + 1, n_class)]
        W = np.zeros((len(self.support_vectors_), len(pairs)))
        for p, (i, j) in enumerate(pairs):
            si, sj = slice(starts[i], starts[i + 1]), slice(starts[j], starts[j + 1])
            W[si, p] = self._dual_coef_[j - 1, si]
            W[sj, p] = self._dual_coef_[i, sj]
        out = np.empty((len(X), len(pairs)))
        for a in range(0, len(X), PREDICT_BLOCK):
            out[a:a + PREDICT_BLOCK] = _rbf(X[a:a + PREDICT_BLOCK], self.support_vectors_,
                                            self._gamma) @ W
        out += self._intercept_[None, :]
        return out

    def _dense_decision_function(self, X):
        if not self._fast():
            return super()._dense_decision_function(X)
        return self._pairwise(np.asarray(X, dtype=np.float64))

    def _dense_predict(self, X):
        if not self._fast():
            return super()._dense_predict(X)
        dec = self._pairwise(np.asarray(X, dtype=np.float64))
        n_class = len(self.classes_)
        votes = np.zeros((len(X), n_class), dtype=np.int64)
        p = 0
        for i in range(n_class):
            for j in range(i + 1, n_class):
                win = dec[:, p] > 0  # libsvm: a positive value votes for the first class
                votes[:, i] += win
                votes[:, j] += ~win
                p += 1
        return votes.argmax(axis=1).astype(np.float64)  # ties: the lowest class, as libsvm
