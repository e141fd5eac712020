"""A LinearSVC that solves its dual in the span of the training rows when they are fewer than
the features.

liblinear's dual coordinate descent touches every feature of a row at each update, so on 600
rows of 1280-d features most of its work is spent in dimensions the solution never uses: the
weights it returns are a combination of the (bias-augmented) training rows. With
``Q R = [X, s]^T`` (``s`` the intercept scaling), the rows ``R^T`` have only ``n`` columns and
the same inner products, so the dual problem, its iterates and its stopping test are the same;
:class:`LinearSVC` solves it on ``R^T`` and maps the weights back (``w = Q w_r``). The fitted
state is scikit-learn's ``LinearSVC``'s (``coef_``, ``intercept_``), so predicting, skops and
the ONNX export read it as the parent. :func:`row_space` is the projection, shared with
:mod:`fxtl.heads.grid`, which projects each fold once for all its candidates.

Examples
--------
>>> import numpy as np
>>> from sklearn.svm import LinearSVC as Parent
>>> rng = np.random.default_rng(0); X = rng.normal(size=(40, 100)); y = np.arange(40) % 3
>>> ours = LinearSVC(C=0.1, random_state=0).fit(X, y)
>>> theirs = Parent(C=0.1, random_state=0).fit(X, y)
>>> bool(np.allclose(ours.decision_function(X), theirs.decision_function(X), atol=1e-6))
True
"""
from __future__ import annotations

import numpy as np
import scipy.sparse as sp
from sklearn.svm import LinearSVC as _SklearnLinearSVC
from sklearn.utils.validation import validate_data

__all__ = ["LinearSVC", "row_space", "to_row_space", "projects"]


def projects(est, shape: tuple[int, int]) -> bool:
    """Whether ``est`` (a LinearSVC) solves its dual in the training rows' span on data of
    ``shape``: an L2, one-vs-rest dual (``dual="auto"`` resolves to it on fewer rows than
    features, as scikit-learn decides) with fewer rows than (augmented) features."""
    n, d = shape
    if est.penalty != "l2" or est.multi_class != "ovr" or n >= d + bool(est.fit_intercept):
        return False
    return est.dual is True or (est.dual == "auto" and (n < d or est.loss == "hinge"))


def row_space(X: np.ndarray, *, intercept_scaling: float | None) -> tuple[np.ndarray, np.ndarray]:
    """``(Q, R_t)``: orthonormal columns ``Q`` (d', n) spanning the rows of ``X`` (with a constant
    column ``intercept_scaling`` appended when not None) and the rows in that basis, ``R_t`` (n, n),
    so that ``R_t @ R_t.T == A @ A.T`` for the (augmented) rows ``A``."""
    A = np.asarray(X, dtype=np.float64)
    if intercept_scaling is not None:
        A = np.c_[A, np.full(len(A), float(intercept_scaling))]
    Q, R = np.linalg.qr(A.T, mode="reduced")
    return Q, np.ascontiguousarray(R.T)


def to_row_space(X: np.ndarray, Q: np.ndarray, *, intercept_scaling: float | None) -> np.ndarray:
    """Rows ``X`` in the basis ``Q`` of :func:`row_space` (augmented the same way)."""
    A = np.asarray(X, dtype=np.float64)
    if intercept_scaling is not None:
        A = np.c_[A, np.full(len(A), float(intercept_scaling))]
    return A @ Q


class LinearSVC(_SklearnLinearSVC):
    """scikit-learn's ``LinearSVC`` (same parameters, fitted attributes and predictions) whose
    dual is solved on the training rows' coordinates in their own span when there are fewer
    rows than features (see the module docstring); otherwise the parent's fit as it is."""

    def fit(self, X, y, sample_weight=None):
        shape = getattr(X, "shape", None)  # array-likes without one: the parent's fit
        if sp.issparse(X) or shape is None or len(shape) != 2 or not projects(self, shape):
            return super().fit(X, y, sample_weight)
        self._validate_params()
        X, y = validate_data(self, X, y, dtype=np.float64, order="C")
        scaling = float(self.intercept_scaling) if self.fit_intercept else None
        Q, Z = row_space(X, intercept_scaling=scaling)
        inner = _SklearnLinearSVC(**{**self.get_params(), "dual": True, "fit_intercept": False})
        inner.fit(Z, y, sample_weight)
        W = inner.coef_ @ Q.T  # (k, d [+ 1]): the weights on the original (augmented) rows
        self.classes_ = inner.classes_
        self.coef_ = np.ascontiguousarray(W[:, :X.shape[1]])
        self.intercept_ = scaling * W[:, -1] if scaling is not None else 0.0  # as the parent
        self.n_iter_ = inner.n_iter_
        return self
