"""A fitted head as fxtl keeps it: the scikit-learn estimator plus what it must be applied to.

The estimator (``Head.estimator``, a :class:`~sklearn.pipeline.Pipeline`) is fitted on class
*names*, so its ``classes_``, ``predict`` and ``predict_proba`` speak the dataset's labels and it
can be cloned, cross-validated or exported like any scikit-learn model. The provenance (backbone,
weights hash, layer, preprocessing) travels beside it, never inside it.
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping

import numpy as np

from ..errors import ProvenanceError

__all__ = ["Head", "softmax", "MATCH_KEYS", "score_matrix", "class_positions"]

# Provenance keys a head must share with the features it is applied to.
MATCH_KEYS = ("backbone", "weights_sha256", "layer", "preprocessing")


def softmax(z: np.ndarray) -> np.ndarray:
    """Row-wise softmax, stable for large margins."""
    z = z - z.max(axis=1, keepdims=True)
    e = np.exp(z)
    return e / e.sum(axis=1, keepdims=True)


def score_matrix(estimator: Any, X: np.ndarray, class_names: list[str]) -> np.ndarray:
    """``(n, len(class_names))`` scores of a fitted ``estimator``, columns in ``class_names`` order.

    Probabilities when the estimator has ``predict_proba``, else a softmax of its decision
    margins. ``classes_`` may be class names or, in heads saved by older fxtl, indices.
    """
    from sklearn.utils.validation import check_is_fitted

    check_is_fitted(estimator)
    X = np.asarray(X, dtype=np.float32)
    if hasattr(estimator, "predict_proba"):
        s = estimator.predict_proba(X)
    else:
        d = estimator.decision_function(X)
        s = softmax(np.c_[-d, d] if d.ndim == 1 else d)
    cols = class_positions(estimator.classes_, class_names)
    out = np.zeros((len(X), len(class_names)), dtype=np.float64)
    out[:, cols] = s
    return out


def class_positions(classes: Any, class_names: list[str]) -> list[int]:
    """Column of each of an estimator's ``classes_`` in ``class_names``.

    Heads are fitted on class *names* (``"ants"``, ``"5"``); heads saved by older fxtl hold
    integer indices. A name is looked up first, so a class named ``"5"`` among three names
    is its position, not index 5. Raises :class:`ProvenanceError` for a class that is not listed.
    """
    index = {name: i for i, name in enumerate(class_names)}
    cols = []
    for c in np.asarray(classes).tolist():
        if isinstance(c, str) and c in index:
            cols.append(index[c])
        elif isinstance(c, int) and not isinstance(c, bool) and 0 <= c < len(class_names):
            cols.append(c)
        else:
            raise ProvenanceError(f"the head's class {c!r} is not among its {len(class_names)} "
                                  f"class names {class_names[:5]}...; refit the head")
    return cols


@dataclass
class Head:
    """A fitted head with its class names and the provenance of the features it expects.

    ``estimator`` (also ``pipeline``) is the plain scikit-learn estimator. The head itself
    answers like a fitted classifier over *every* class of its dataset: ``classes_`` is
    ``class_names`` (a class without training rows included, with probability 0), the columns
    of ``predict_proba``/``scores`` follow it, and ``predict`` returns labels from it, so
    ``head.classes_[head.scores(X).argmax(1)] == head.predict(X)``. The estimator's own
    ``classes_`` lists only the classes it was fitted on. ``scores`` is probabilities, or for
    heads without ``predict_proba`` a softmax of decision margins; its row-wise argmax is the
    one rule used both by ``fit-head``'s evaluation and by ``fxtl predict``.

    Examples
    --------
    >>> from sklearn.linear_model import LogisticRegression
    >>> X = np.array([[0.0], [1.0], [5.0], [6.0]])
    >>> est = LogisticRegression().fit(X, ["ants", "ants", "wasps", "wasps"])
    >>> head = Head(model="logreg", pipeline=est, class_names=["ants", "bees", "wasps"],
    ...             provenance={})
    >>> head.classes_.tolist(), head.predict([[0.5], [5.5]]).tolist()
    (['ants', 'bees', 'wasps'], ['ants', 'wasps'])
    >>> head.predict_proba([[0.5]])[:, 1].tolist()
    [0.0]
    """

    model: str
    pipeline: Any
    class_names: list[str]
    provenance: dict[str, Any]
    path: Path | None = None

    @property
    def estimator(self) -> Any:
        """The fitted scikit-learn estimator (a Pipeline)."""
        return self.pipeline

    @property
    def classes_(self) -> np.ndarray:
        """Every class name, in the order of the score columns (see the class docstring)."""
        return np.asarray(self.class_names)

    @property
    def feature_dim(self) -> int:
        return int(getattr(self.pipeline, "n_features_in_", self.provenance.get("feature_dim", 0)))

    @property
    def calibrated(self) -> bool:
        return hasattr(self.pipeline, "predict_proba")

    def scores(self, X: np.ndarray) -> np.ndarray:
        """``(n, len(classes_))`` scores, columns in ``classes_`` order."""
        return score_matrix(self.pipeline, X, self.class_names)

    def predict_proba(self, X: np.ndarray) -> np.ndarray:
        """Scores with columns in ``classes_`` order (every class, seen in training or not)."""
        return self.scores(X)

    def predict(self, X: np.ndarray) -> np.ndarray:
        """The label of each row: the entry of ``classes_`` with the highest score."""
        return self.classes_[self.scores(X).argmax(axis=1)]

    def check_features(self, provenance: Mapping[str, Any], dim: int, *, source: str) -> None:
        """Refuse features from another backbone, weights, layer, preprocessing or width."""
        where = self.path or f"head {self.model}"
        if dim != self.feature_dim:
            raise ProvenanceError(f"{where} expects {self.feature_dim}-d features but {source} has "
                                  f"{dim}-d; fit a head on features of the same backbone and layer")
        for key in MATCH_KEYS:
            mine, theirs = self.provenance.get(key), provenance.get(key)
            if mine is None or theirs is None:
                continue
            if _canon(mine) != _canon(theirs):
                if key == "preprocessing":  # name only what differs, not both whole recipes
                    what = (f"other preprocessing than {source} (head vs features: "
                            f"{_recipe_difference(mine, theirs)})")
                else:
                    what = f"{key} {mine!r} but {source} has {theirs!r}"
                raise ProvenanceError(f"{where} was fitted on features with {what}; "
                                      "use features of the same backbone (or refit with fxtl fit-head)")


def _as_recipe(value: Any) -> Any:
    if isinstance(value, str):
        try:
            return json.loads(value)
        except ValueError:
            return value
    return value


def _recipe_difference(mine: Any, theirs: Any) -> str:
    """``crop 224 vs 192; resize 256 vs (absent)``: each field of two recipes that differs, once."""
    mine, theirs = _as_recipe(mine), _as_recipe(theirs)
    if not (isinstance(mine, Mapping) and isinstance(theirs, Mapping)):
        return f"{_show(mine)} vs {_show(theirs)}"
    parts = [f"{field} {_show(mine.get(field, _ABSENT))} vs {_show(theirs.get(field, _ABSENT))}"
             for field in sorted(set(mine) | set(theirs), key=str)
             if _canon(mine.get(field, _ABSENT)) != _canon(theirs.get(field, _ABSENT))]
    return "; ".join(parts) or f"{_show(mine)} vs {_show(theirs)}"


_ABSENT = object()


def _show(value: Any) -> str:
    return "(absent)" if value is _ABSENT else json.dumps(value, sort_keys=True, default=str)


def _canon(value: Any) -> str:
    if isinstance(value, str):
        try:
            value = json.loads(value)
        except ValueError:
            return value
    return json.dumps(value, sort_keys=True, default=str)
