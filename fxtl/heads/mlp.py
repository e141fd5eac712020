"""scikit-learn's ``MLPClassifier``, with early stopping that ends once nothing can improve.

With ``early_stopping=True`` scikit-learn trains until the validation score has not risen by
``tol`` for ``n_iter_no_change`` epochs, then restores the weights of the best epoch. Once the
validation accuracy is 1.0 no later epoch can beat it (an improvement must be strictly
higher), so every epoch after that is spent only to be thrown away. A small hold-out on
well-separated features is often classified perfectly within a few epochs, after which
scikit-learn would still run ``n_iter_no_change`` more.

:class:`MLPClassifier` stops at that point. The fitted weights, and so every prediction, are
the ones scikit-learn's estimator returns (a test checks it); only ``n_iter_``,
``loss_curve_`` and ``validation_scores_`` are shorter. It is a plain subclass: ``clone``,
``GridSearchCV``, skops (listed in :data:`fxtl.heads.persistence.TRUSTED_TYPES`) and the ONNX
export (:func:`fxtl.deploy.heads_onnx.register_torch_heads`) treat it as its parent.
"""
from __future__ import annotations

from sklearn.neural_network import MLPClassifier as _SklearnMLPClassifier

__all__ = ["MLPClassifier"]


class MLPClassifier(_SklearnMLPClassifier):
    """``sklearn.neural_network.MLPClassifier`` whose early stopping ends at a perfect
    validation score (see the module docstring); parameters and attributes are the parent's.

    Examples
    --------
    >>> import numpy as np
    >>> y = np.arange(80) % 2
    >>> X = 4.0 * np.c_[y, 1 - y] + np.random.default_rng(0).normal(size=(80, 2))
    >>> clf = MLPClassifier(hidden_layer_sizes=(8,), early_stopping=True, learning_rate_init=0.01,
    ...                     random_state=0).fit(X, y)
    >>> float(clf.best_validation_score_), clf.n_iter_ == len(clf.validation_scores_) < 11
    (1.0, True)
    """

    def _update_no_improvement_count(self, early_stopping, *args, **kwargs):
        super()._update_no_improvement_count(early_stopping, *args, **kwargs)
        if early_stopping and self.best_validation_score_ >= 1.0:
            self._no_improvement_count = self.n_iter_no_change + 1  # nothing can beat it
