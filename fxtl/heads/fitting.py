"""Heads: scikit-learn classifiers fitted on a feature cache (``fxtl fit-head``).

A head is a plain scikit-learn :class:`~sklearn.pipeline.Pipeline`: optional L2 normalisation,
``StandardScaler``, optional PCA, then the estimator named in :data:`HEADS`. Each registry entry
carries its search space, so ``fit_head`` does what the linear-probe literature does (a
log-spaced C sweep for logistic regression as in Kornblith et al. 2019 and CLIP's linear probe;
C and gamma for the RBF SVM; width and alpha for the MLP with early stopping; k for kNN).

Honest evaluation, in one place (:func:`plan_splits`):

=======================  ======================  =================================  ===========
cache splits             hyper-parameters from   final model fitted on              reported on
=======================  ======================  =================================  ===========
train + val + test       ``val``                 train + val                        ``test``
train + test             k-fold CV on train      train                              ``test``
train + val              k-fold CV on train      train                              ``val``
train only               k-fold CV on the rest   train minus a stratified hold-out  ``holdout``
=======================  ======================  =================================  ===========

The reported split is never seen by the search nor the final fit.

The search's candidate fits run through joblib (``backend``): its default process pool
(``"loky"``; small matrices run in threads instead, see ``_SMALL_VALUES``), threads
(``"threading"``), or the workers of a Dask cluster (``"dask"``, needs ``pip install "fxtl[dask]"``;
``scheduler`` is an address such as ``tcp://host:8786``, else ``$DASK_SCHEDULER_ADDRESS``, else a
``LocalCluster`` started for the call and closed after it).

Caches above ``large_threshold`` rows (default 100,000) are fitted with estimators that scale
(``SGDClassifier`` for the linear heads and the SVMs, ``MLPClassifier.partial_fit``), fed from
the HDF5 file block by block, and the result says so. Saved heads are a joblib file plus a JSON
sidecar (:func:`save_head`); :func:`load_head` refuses a file whose sha256 or provenance does
not match, because unpickling a joblib file can run arbitrary code.

Examples
--------
>>> from fxtl.heads import fit_head
>>> res = fit_head("cache/hymenoptera-lite0-1e2b80d0e2303460.h5", model="logreg")  # doctest: +SKIP
>>> res.metrics["split"], res.metrics["selection"], round(res.metrics["accuracy"], 3)  # doctest: +SKIP
('val', 'cv5', 0.948)
"""
from __future__ import annotations

import ast
import contextlib
import importlib
import json
import logging
import os
import re
import socket
import sys
import time
import warnings
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Callable, Iterator, Mapping, Sequence

import numpy as np

from ..data.splits import stratified_holdout
from .._util import (slug, atomic_path, atomic_write_bytes, atomic_write_json, default_cache_dir,
                    ensure_dir, now_iso, sha256_file, unique_dir, versions)
from ..errors import CacheError, FxtlError, ProvenanceError
from ..features.store import FeatureCache, load_features, read_attrs

__all__ = ["HeadSpec", "StreamSpec", "HEADS", "register_head", "get_head", "list_heads",
           "build_pipeline", "parse_params", "check_params", "SplitPlan", "plan_splits",
           "Head", "FitResult", "fit_head", "fit_heads", "save_head", "load_head",
           "LARGE_ROWS", "HEAD_FORMAT", "HEAD_FORMAT_VERSION", "BACKENDS"]

# Above this many rows heads are fitted with streaming, scalable estimators.
LARGE_ROWS = 100_000
# The joblib payload and its sidecar say what they are and which version (readers check).
HEAD_FORMAT = "fxtl-head"
HEAD_FORMAT_VERSION = 1
# Below this many feature values, BLAS runs single-threaded (threads cost more than they give on
# such small matrices, and on a busy machine spinning BLAS threads slow a fit ten-fold) and the
# search runs in threads rather than processes: the fits are milliseconds, while starting loky
# workers (each importing scikit-learn) costs seconds. libsvm, liblinear and BLAS release the GIL.
_SMALL_VALUES = 5_000_000
# Where the search's candidate fits run (`fxtl fit-head --backend`); the first is the default.
BACKENDS = ("loky", "threading", "dask")
# Seconds to wait for a Dask scheduler: a wrong address should fail fast, not hang.
DASK_CONNECT_TIMEOUT = 10.0
# Provenance keys a head must share with the features it is applied to.
_MATCH_KEYS = ("backbone", "weights_sha256", "layer", "preprocessing")


# ----------------------------------------------------------------------------- registry
@dataclass(frozen=True)
class DataShape:
    """What a search space may depend on: the smallest training set any candidate sees."""

    n_fit: int
    dim: int
    n_classes: int


@dataclass(frozen=True)
class StreamSpec:
    """The scalable stand-in used for caches above ``large_threshold`` rows."""

    estimator: str  # "module:Class", must have partial_fit
    defaults: Mapping[str, Any]
    space: Mapping[str, Sequence[Any]]
    description: str


@dataclass(frozen=True)
class HeadSpec:
    """A head name: the estimator, its fixed defaults and its hyper-parameter search space.

    ``estimator`` is ``"module:Class"`` (imported on use so ``import fxtl`` stays light);
    ``space(shape)`` returns the grid of estimator parameters, ordered so that on a tie the
    first (most regularised) candidate wins; ``adapt(params, shape)`` may adjust fixed
    parameters to tiny data and return notes; ``calibrate`` wraps the final estimator in
    ``CalibratedClassifierCV(ensemble=False)`` (Platt scaling) so that it gives probabilities
    (the search itself compares uncalibrated estimators: calibration costs k extra fits).
    """

    name: str
    estimator: str
    defaults: Mapping[str, Any]
    space: Callable[[DataShape], dict[str, list]]
    description: str
    seeded: bool = True
    calibrate: bool = False
    adapt: Callable[[dict, DataShape], list[str]] | None = None
    stream: StreamSpec | None = None


# name -> spec; `fxtl fit-head --model` choices in this order.
HEADS: dict[str, HeadSpec] = {}


def register_head(spec: HeadSpec) -> HeadSpec:
    """Add ``spec`` to :data:`HEADS`; refuses a name that is already taken."""
    if spec.name in HEADS or spec.name == "all":
        raise ValueError(f"head {spec.name!r} is already registered")
    HEADS[spec.name] = spec
    return spec


def get_head(name: str) -> HeadSpec:
    """The spec for ``name`` (a copy; registry entries are never mutated)."""
    if name not in HEADS:
        raise FxtlError(f"unknown head model {name!r}; choose one of {', '.join(HEADS)} or all")
    spec = HEADS[name]
    return replace(spec, defaults=dict(spec.defaults))


def list_heads() -> list[dict[str, Any]]:
    return [{"name": s.name, "estimator": s.estimator.split(":")[1], "description": s.description,
             "scalable": s.stream.estimator.split(":")[1] if s.stream else None}
            for s in HEADS.values()]


def _logreg_space(shape: DataShape) -> dict[str, list]:
    # Half-decade steps; on standardised features the optimum is well inside this range.
    return {"C": [float(c) for c in np.logspace(-4, 2, 13)]}


def _svm_space(shape: DataShape) -> dict[str, list]:
    # gamma relative to 1/dim (sklearn's "scale" on standardised features is exactly 1/dim).
    return {"C": [0.3, 1.0, 3.0, 10.0, 30.0],
            "gamma": [f / shape.dim for f in (0.01, 0.03, 0.1, 0.3, 1.0)]}


def _linear_svm_space(shape: DataShape) -> dict[str, list]:
    return {"C": [float(c) for c in np.logspace(-5, 1, 7)]}


def _mlp_space(shape: DataShape) -> dict[str, list]:
    return {"alpha": [100.0, 10.0, 1.0, 1e-2], "hidden_layer_sizes": [(128,), (256,)]}


def _mlp_adapt(params: dict, shape: DataShape) -> list[str]:
    notes = []
    held = params.get("validation_fraction", 0.1)
    # Early stopping holds out 10% of the training rows, stratified: it needs two per class.
    if params.get("early_stopping") and shape.n_fit * held < 2 * shape.n_classes:
        params["early_stopping"] = False
        notes.append(f"mlp: early stopping off ({shape.n_fit} training rows are too few to hold "
                     f"{held:.0%} out)")
    rows = int(shape.n_fit * (1 - held)) if params.get("early_stopping") else shape.n_fit
    if isinstance(params.get("batch_size"), int):
        params["batch_size"] = max(1, min(params["batch_size"], rows))
    return notes


def _knn_space(shape: DataShape) -> dict[str, list]:
    # Largest k first: on a tie the smoother classifier wins.
    ks = [k for k in (31, 21, 15, 11, 7, 5, 3, 1) if k <= shape.n_fit]
    return {"n_neighbors": ks or [1], "weights": ["uniform", "distance"]}


def _knn_adapt(params: dict, shape: DataShape) -> list[str]:
    if params.get("n_neighbors", 5) > shape.n_fit:
        params["n_neighbors"] = max(1, shape.n_fit)
        return [f"knn: n_neighbors lowered to {params['n_neighbors']} (only {shape.n_fit} training rows)"]
    return []


_SGD_ALPHAS = {"alpha": [1e-3, 1e-4, 1e-5]}
_SGD_LOG = StreamSpec("sklearn.linear_model:SGDClassifier", {"loss": "log_loss"}, _SGD_ALPHAS,
                      "SGDClassifier(loss='log_loss'), streamed")
_SGD_HINGE = StreamSpec("sklearn.linear_model:SGDClassifier", {"loss": "hinge"}, _SGD_ALPHAS,
                        "SGDClassifier(loss='hinge'), a linear SVM, streamed")

register_head(HeadSpec(
    name="logreg", estimator="sklearn.linear_model:LogisticRegression",
    defaults={"C": 1.0, "max_iter": 2000}, space=_logreg_space,
    description="multinomial logistic regression, L2, C swept log-spaced", stream=_SGD_LOG))
register_head(HeadSpec(
    name="svm", estimator="sklearn.svm:SVC",
    defaults={"kernel": "rbf", "C": 1.0, "gamma": "scale", "cache_size": 500},
    space=_svm_space, calibrate=True,
    description="RBF-kernel SVM, C and gamma searched (Platt-calibrated probabilities)",
    stream=_SGD_HINGE))
register_head(HeadSpec(
    name="linear-svm", estimator="sklearn.svm:LinearSVC",
    defaults={"C": 1.0, "max_iter": 5000}, space=_linear_svm_space, calibrate=True,
    description="linear SVM (liblinear), C searched (Platt-calibrated probabilities)",
    stream=_SGD_HINGE))
register_head(HeadSpec(
    name="mlp", estimator="sklearn.neural_network:MLPClassifier",
    # Mini-batches of 64 at a 3e-3 step: sklearn's default batch of 200 is the whole of a small
    # training set, so early stopping would end after a dozen gradient steps.
    defaults={"hidden_layer_sizes": (256,), "alpha": 1e-4, "batch_size": 64,
              "learning_rate_init": 3e-3, "early_stopping": True, "validation_fraction": 0.1,
              "n_iter_no_change": 10, "max_iter": 300},
    space=_mlp_space, adapt=_mlp_adapt,
    description="one-hidden-layer MLP with early stopping, width and alpha searched",
    stream=StreamSpec("sklearn.neural_network:MLPClassifier",
                      {"hidden_layer_sizes": (256,), "alpha": 1e-4},
                      {"alpha": [1e-2, 1e-4]}, "MLPClassifier.partial_fit, streamed")))
register_head(HeadSpec(
    name="knn", estimator="sklearn.neighbors:KNeighborsClassifier",
    defaults={"n_neighbors": 5}, space=_knn_space, adapt=_knn_adapt, seeded=False,
    description="k nearest neighbours (Euclidean on standardised features), k searched"))


def _import(dotted: str):
    module, _, name = dotted.partition(":")
    return getattr(importlib.import_module(module), name)


def _estimator_params(estimator: str) -> set[str]:
    return set(_import(estimator)().get_params())


def build_pipeline(name: str, *, params: Mapping[str, Any] | None = None, seed: int = 0,
                   l2_normalize: bool = False, pca: int | float | None = None,
                   stream: bool = False, calibrate: bool | None = None, calibration_cv: int = 5):
    """The unfitted Pipeline for head ``name``: [l2] -> scale -> [pca] -> est.

    Parameters
    ----------
    name : str
        A key of :data:`HEADS`.
    params : mapping, optional
        Estimator parameters overriding the registry defaults.
    seed : int
        ``random_state`` of seeded estimators and of PCA.
    l2_normalize : bool
        L2-normalise each feature row first (cosine geometry).
    pca : int or float, optional
        PCA components (int) or explained-variance fraction (float in (0, 1)).
    stream : bool
        Use the scalable stand-in (``partial_fit``) instead of the registry estimator.
    calibrate : bool, optional
        Wrap the estimator in ``CalibratedClassifierCV(method="sigmoid", ensemble=False)``
        with ``calibration_cv`` stratified folds; default: the registry's choice (SVMs).

    Examples
    --------
    >>> build_pipeline("logreg", params={"C": 0.1}).named_steps["est"].C
    0.1
    """
    from sklearn.decomposition import PCA
    from sklearn.pipeline import Pipeline
    from sklearn.preprocessing import Normalizer, StandardScaler

    spec = get_head(name)
    if stream:
        if spec.stream is None:
            raise FxtlError(f"head {name!r} has no scalable form for large caches; use logreg, "
                            "linear-svm or mlp, or raise --large-threshold")
        dotted, kwargs = spec.stream.estimator, dict(spec.stream.defaults)
    else:
        dotted, kwargs = spec.estimator, dict(spec.defaults)
    kwargs.update(params or {})
    cls = _import(dotted)
    if "random_state" in cls().get_params() and (spec.seeded or stream):
        kwargs.setdefault("random_state", seed)
    steps = []
    if l2_normalize:
        steps.append(("l2", Normalizer()))
    steps.append(("scale", StandardScaler()))
    if pca:
        steps.append(("pca", PCA(n_components=pca, random_state=seed)))
    est = cls(**kwargs)
    if (spec.calibrate if calibrate is None else calibrate) and not stream:
        from sklearn.calibration import CalibratedClassifierCV
        from sklearn.model_selection import StratifiedKFold

        est = CalibratedClassifierCV(est, method="sigmoid", ensemble=False,
                                     cv=StratifiedKFold(calibration_cv, shuffle=True, random_state=seed))
    steps.append(("est", est))
    return Pipeline(steps)


def parse_params(items: Sequence[str]) -> dict[str, Any]:
    """``["C=0.1", "hidden_layer_sizes=(512,)", "gamma=scale"]`` -> a dict of Python values.

    Values are read as Python literals when they are one (numbers, tuples, True/None), else
    kept as strings.
    """
    out: dict[str, Any] = {}
    for item in items:
        key, sep, raw = item.partition("=")
        key = key.strip()
        if not sep or not re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*", key):
            raise FxtlError(f"--param {item!r} is not KEY=VALUE (e.g. --param C=0.1)")
        raw = raw.strip()
        try:
            out[key] = ast.literal_eval(raw)
        except (ValueError, SyntaxError):
            out[key] = raw
    return out


def _accepted_params(name: str) -> set[str]:
    """Parameters of head ``name``'s estimator or of its scalable stand-in (large caches)."""
    spec = get_head(name)
    accepted = _estimator_params(spec.estimator)
    if spec.stream is not None:
        accepted |= _estimator_params(spec.stream.estimator)
    return accepted


def check_params(models: Sequence[str], params: Mapping[str, Any]) -> None:
    """Raise if a parameter is accepted by none of ``models``' estimators."""
    accepted = set()
    for m in models:
        accepted |= _accepted_params(m)
    unknown = sorted(set(params) - accepted)
    if unknown:
        raise FxtlError(f"--param {unknown[0]} is not a parameter of {', '.join(models)}; "
                        f"valid: {', '.join(sorted(accepted))}")


# ----------------------------------------------------------------------------- splits
@dataclass
class SplitPlan:
    """Which rows select hyper-parameters, which fit the final head, which are reported.

    All index arrays are row numbers of the cache. ``eval_rows`` never intersect
    ``search_rows`` nor ``fit_rows`` (see :func:`plan_splits`).
    """

    fit_rows: np.ndarray  # the final model is fitted on these
    eval_rows: np.ndarray  # scores are reported on these
    eval_split: str  # "test", "val" or "holdout"
    selection: str  # "val", "cv5", ... or "none"
    search_rows: np.ndarray  # every row the search may look at
    val_fold: np.ndarray | None = None  # for selection == "val": 0 on val rows, -1 on train rows
    cv_folds: int = 0
    notes: list[str] = field(default_factory=list)


def plan_splits(labels: np.ndarray, split: np.ndarray, *, seed: int = 0, test_size: float = 0.2,
                cv_folds: int = 5, search: bool = True) -> SplitPlan:
    """Decide the selection, fit and report rows (the table in the module docstring).

    Unlabelled rows (label -1) are never used.
    """
    labels = np.asarray(labels)
    split = np.asarray(split).astype(str)
    labelled = labels >= 0
    rows = {s: np.flatnonzero((split == s) & labelled) for s in ("train", "val", "test")}
    if not len(rows["train"]):
        raise CacheError(f"the cache has no labelled train rows (splits: "
                         f"{', '.join(sorted(set(split.tolist()))) or 'none'}); extract a "
                         "dataset with a train split")
    notes: list[str] = []
    if len(rows["test"]):
        eval_rows, eval_split = rows["test"], "test"
        if len(rows["val"]) and search:
            search_rows = np.concatenate([rows["train"], rows["val"]])
            fold = np.r_[np.full(len(rows["train"]), -1), np.zeros(len(rows["val"]), dtype=int)]
            return SplitPlan(fit_rows=search_rows, eval_rows=eval_rows, eval_split="test",
                             selection="val", search_rows=search_rows, val_fold=fold, notes=notes)
        fit_rows = np.concatenate([rows["train"], rows["val"]]) if len(rows["val"]) else rows["train"]
    elif len(rows["val"]):
        eval_rows, eval_split, fit_rows = rows["val"], "val", rows["train"]
    else:
        fit_rows, eval_rows = stratified_holdout(rows["train"], labels, test_size=test_size,
                                                 seed=seed, source="the cache")
        eval_split = "holdout"
        notes.append(f"no val/test split: reporting on a stratified {test_size:.0%} hold-out of "
                     f"train (seed {int(seed)})")
    if not search:
        return SplitPlan(fit_rows=fit_rows, eval_rows=eval_rows, eval_split=eval_split,
                         selection="none", search_rows=fit_rows[:0], notes=notes)
    counts = np.bincount(labels[fit_rows])
    counts = counts[counts > 0]
    k = int(min(cv_folds, counts.min()))
    if k < 2:
        notes.append("a class has a single training image: no cross-validation possible, "
                     "fitted default parameters")
        return SplitPlan(fit_rows=fit_rows, eval_rows=eval_rows, eval_split=eval_split,
                         selection="none", search_rows=fit_rows[:0], notes=notes)
    if k < cv_folds:
        notes.append(f"{k}-fold CV (the smallest class has {k} training images)")
    return SplitPlan(fit_rows=fit_rows, eval_rows=eval_rows, eval_split=eval_split,
                     selection=f"cv{k}", search_rows=fit_rows, cv_folds=k, notes=notes)


# ----------------------------------------------------------------------------- the head
def _softmax(z: np.ndarray) -> np.ndarray:
    z = z - z.max(axis=1, keepdims=True)
    e = np.exp(z)
    return e / e.sum(axis=1, keepdims=True)


@dataclass
class Head:
    """A fitted head with its class names and the provenance of the features it expects.

    ``scores(X)`` gives an ``(n, len(class_names))`` matrix (probabilities, or for heads without
    ``predict_proba`` a softmax of decision margins); ``predict(X)`` is its row-wise argmax, the
    one rule used both by ``fit-head``'s evaluation and by ``fxtl predict``.
    """

    model: str
    pipeline: Any
    class_names: list[str]
    provenance: dict[str, Any]
    path: Path | None = None

    @property
    def feature_dim(self) -> int:
        return int(getattr(self.pipeline, "n_features_in_", self.provenance.get("feature_dim", 0)))

    @property
    def calibrated(self) -> bool:
        return hasattr(self.pipeline, "predict_proba")

    def scores(self, X: np.ndarray) -> np.ndarray:
        from sklearn.utils.validation import check_is_fitted

        check_is_fitted(self.pipeline)
        X = np.asarray(X, dtype=np.float32)
        if self.calibrated:
            s = self.pipeline.predict_proba(X)
        else:
            d = self.pipeline.decision_function(X)
            s = _softmax(np.c_[-d, d] if d.ndim == 1 else d)
        out = np.zeros((len(X), len(self.class_names)), dtype=np.float64)
        out[:, np.asarray(self.pipeline.classes_, dtype=np.int64)] = s
        return out

    def predict(self, X: np.ndarray) -> np.ndarray:
        return self.scores(X).argmax(axis=1)

    def check_features(self, provenance: Mapping[str, Any], dim: int, *, source: str) -> None:
        """Refuse features from another backbone, weights, layer, preprocessing or width."""
        where = self.path or f"head {self.model}"
        if dim != self.feature_dim:
            raise ProvenanceError(f"{where} expects {self.feature_dim}-d features but {source} has "
                                  f"{dim}-d; fit a head on features of the same backbone and layer")
        for key in _MATCH_KEYS:
            mine, theirs = self.provenance.get(key), provenance.get(key)
            if mine is None or theirs is None:
                continue
            if _canon(mine) != _canon(theirs):
                shown = (lambda v: v if key != "preprocessing" else "another recipe")
                raise ProvenanceError(f"{where} was fitted on features with {key} "
                                      f"{shown(mine)!r} but {source} has {shown(theirs)!r}; "
                                      "use features of the same backbone (or refit with fxtl fit-head)")


def _canon(value: Any) -> str:
    if isinstance(value, str):
        try:
            value = json.loads(value)
        except ValueError:
            return value
    return json.dumps(value, sort_keys=True, default=str)


@dataclass
class FitResult:
    """What :func:`fit_head` returns: the fitted :class:`Head` and its metrics (``metrics.json``)."""

    head: Head
    metrics: dict[str, Any]
    run_dir: Path | None = None
    head_path: Path | None = None
    # Rows of the reported split with true/predicted class indices and the score matrix.
    predictions: dict[str, np.ndarray] = field(default_factory=dict, repr=False)

    @property
    def pipeline(self):
        return self.head.pipeline

    def to_dict(self) -> dict[str, Any]:
        """One entry of ``fxtl fit-head --json``'s ``runs``."""
        keys = ("model", "split", "accuracy", "balanced_accuracy", "macro_f1", "n", "fit_seconds",
                "search_seconds", "predict_seconds", "selection", "selection_score", "best_params",
                "n_candidates", "trainable_params", "n_fit", "scalable", "estimator", "backend",
                "search_backend", "notes")
        d = {k: self.metrics.get(k) for k in keys}
        d["head"] = str(self.head_path) if self.head_path else None
        d["run_dir"] = str(self.run_dir) if self.run_dir else None
        return d


# ----------------------------------------------------------------------------- persistence
def save_head(head: Head, path: str | Path) -> Path:
    """Write ``head`` as ``path`` (joblib) and its sidecar ``path`` with ``.json``.

    The sidecar holds the provenance and the joblib file's sha256; :func:`load_head` checks both.
    """
    import joblib
    import sklearn

    path = Path(path)
    payload = {"format": HEAD_FORMAT, "format_version": HEAD_FORMAT_VERSION, "model": head.model,
               "class_names": list(head.class_names), "pipeline": head.pipeline}
    with atomic_path(path, suffix=".tmp") as tmp:
        joblib.dump(payload, tmp)
    sidecar = {"format": HEAD_FORMAT, "format_version": HEAD_FORMAT_VERSION, "model": head.model,
               "joblib_file": path.name, "joblib_sha256": sha256_file(path),
               "class_names": list(head.class_names), "feature_dim": head.feature_dim,
               "scores": "probability" if head.calibrated else "softmax of decision margins",
               "sklearn_version": sklearn.__version__, "versions": versions(), "created": now_iso(),
               **{k: v for k, v in head.provenance.items() if k != "feature_dim"}}
    atomic_write_json(path.with_suffix(".json"), sidecar)
    head.path = path
    return path


def _resolve_head_path(path: Path) -> Path:
    if path.is_dir():
        found = sorted(path.glob("*.joblib"))
        if not found:
            raise ProvenanceError(f"{path} holds no head (*.joblib); pass a run folder written by "
                                  "`fxtl fit-head` or its head.joblib")
        return found[0]
    if not path.exists():
        raise ProvenanceError(f"{path}: no such head; pass a run folder or head.joblib from `fxtl fit-head`")
    return path


def load_head(path: str | Path, *, trust: bool = False) -> Head:
    """Load a head saved by :func:`save_head` (``path`` is the joblib file or its run folder).

    Loading a joblib file unpickles it, which can run arbitrary code. So the file's sha256 must
    match its JSON sidecar, and the sidecar must be an fxtl head of a known version; otherwise
    a :class:`ProvenanceError` is raised. ``trust=True`` skips these checks (only for files you
    made yourself); the head then keeps whatever provenance the sidecar still gives.
    """
    import joblib

    path = _resolve_head_path(Path(path))
    side_path = path.with_suffix(".json")
    sidecar: dict[str, Any] = {}
    if side_path.is_file():
        try:
            sidecar = json.loads(side_path.read_text())
        except (OSError, ValueError) as exc:
            if not trust:
                raise ProvenanceError(f"{side_path} is unreadable ({exc}); refit the head, or pass "
                                      "--trust if you made the joblib file yourself") from None
    elif not trust:
        raise ProvenanceError(f"{path} has no sidecar {side_path.name}: loading an unverified joblib "
                              "file can run code; pass --trust only if you made it yourself")
    if not trust:
        if sidecar.get("format") != HEAD_FORMAT:
            raise ProvenanceError(f"{side_path} is not an fxtl head sidecar (format="
                                  f"{sidecar.get('format')!r}); refit with `fxtl fit-head`")
        if not isinstance(sidecar.get("format_version"), int) or sidecar["format_version"] > HEAD_FORMAT_VERSION:
            raise ProvenanceError(f"{side_path} has head format_version {sidecar.get('format_version')}, "
                                  f"this fxtl reads up to {HEAD_FORMAT_VERSION}; upgrade fxtl")
        actual = sha256_file(path)
        if actual != sidecar.get("joblib_sha256"):
            raise ProvenanceError(f"{path} does not match the sha256 in {side_path.name} (modified or "
                                  "replaced); refit the head, or pass --trust if you made it yourself")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # sklearn version notes are reported from the sidecar
            payload = joblib.load(path)
    except Exception as exc:
        raise ProvenanceError(f"{path} cannot be loaded ({type(exc).__name__}: "
                              f"{str(exc).splitlines()[0][:120] if str(exc) else ''}); refit the head") from None
    if not isinstance(payload, dict) or payload.get("format") != HEAD_FORMAT or \
            not {"pipeline", "class_names"} <= payload.keys():
        raise ProvenanceError(f"{path} is not an fxtl head; refit with `fxtl fit-head`")
    import sklearn

    if sidecar.get("sklearn_version") and sidecar["sklearn_version"] != sklearn.__version__:
        print(f"fxtl: warning: {path.name} was saved with scikit-learn {sidecar['sklearn_version']}, "
              f"this is {sklearn.__version__}; predictions may differ slightly", file=sys.stderr)
    provenance = {k: sidecar[k] for k in ("backbone", "architecture", "weights_sha256",
                                           "preprocessing", "layer", "precision", "graph", "feature_dim",
                                           "cache_fingerprint", "dataset", "cache") if k in sidecar}
    return Head(model=str(payload.get("model", sidecar.get("model", "?"))),
                pipeline=payload["pipeline"], class_names=list(payload["class_names"]),
                provenance=provenance, path=path)


# ----------------------------------------------------------------------------- fitting
@contextlib.contextmanager
def _quiet_convergence() -> Iterator[list[str]]:
    """Collect ConvergenceWarnings (reported as one note) instead of spamming stderr."""
    from sklearn.exceptions import ConvergenceWarning

    caught: list[str] = []
    with warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("always", ConvergenceWarning)
        yield caught
    for w in record:
        if issubclass(w.category, ConvergenceWarning):
            caught.append(str(w.message).splitlines()[0])
        else:
            warnings.showwarning(w.message, w.category, w.filename, w.lineno)


def _trainable_params(est) -> int:
    """Numbers the estimator learned (coefficients, weights, support vectors' duals)."""
    total = 0
    for cc in getattr(est, "calibrated_classifiers_", None) or []:
        total += _trainable_params(cc.estimator) + 2 * len(cc.calibrators)
    if total:
        return total
    for attr in ("coef_", "intercept_", "dual_coef_", "support_vectors_"):
        v = getattr(est, attr, None)
        if v is not None and hasattr(v, "size"):
            total += int(v.size)
    for attr in ("coefs_", "intercepts_"):
        for v in getattr(est, attr, None) or []:
            total += int(v.size)
    return total


def _estimator_name(est) -> str:
    inner = getattr(est, "estimator", None)
    if inner is not None and hasattr(est, "calibrated_classifiers_"):
        return f"{type(inner).__name__} (Platt-calibrated)"
    return type(est).__name__


def _jsonable(params: Mapping[str, Any]) -> dict[str, Any]:
    out = {}
    for k, v in params.items():
        k = k.removeprefix("est__")
        if isinstance(v, np.generic):
            v = v.item()
        out[k] = list(v) if isinstance(v, tuple) else v
    return out



def _new_run_dir(runs: Path, name: str, *, exact: bool) -> Path:
    ensure_dir(runs)
    candidate = runs / name
    if exact:
        if candidate.exists():
            raise FxtlError(f"run folder {candidate} already exists; choose another --run-name or "
                            "delete it")
        candidate.mkdir()
        return candidate
    return unique_dir(runs, name)


_DASK_MISSING = ('--backend dask needs dask.distributed, which is not installed; '
                 'pip install "fxtl[dask]"')


def _import_distributed():
    """The ``distributed`` package, or a one-line FxtlError naming the install command."""
    try:
        import dask  # noqa: F401
        import distributed
    except ImportError:
        raise FxtlError(_DASK_MISSING) from None
    return distributed


class _SearchBackend:
    """Where GridSearchCV's candidate fits run; one per :func:`fit_heads` call.

    ``"dask"`` connects (or starts a ``LocalCluster``) on the first search and keeps the client
    for the next heads; :meth:`close` shuts down what it started. A ``distributed.Client``
    passed as ``scheduler`` is used as it is and left open.
    """

    def __init__(self, name: str, scheduler: Any = None, *, log: Callable[[str], None]):
        if name not in BACKENDS:
            raise FxtlError(f"unknown backend {name!r}; choose one of {', '.join(BACKENDS)}")
        if scheduler is not None and name != "dask":
            raise FxtlError(f"a scheduler ({scheduler}) is only used with backend dask, "
                            f"not {name}; pass --backend dask")
        if name == "dask":
            _import_distributed()  # fail before any work when it is missing
        self.name, self.scheduler, self.log = name, scheduler, log
        self.client = None
        self.info: dict[str, Any] = {}
        self._stack = contextlib.ExitStack()

    def parallel(self, small: bool) -> tuple[contextlib.AbstractContextManager, str]:
        """``(joblib context for the search, the backend that runs it)``."""
        from joblib import parallel_config

        if self.name == "dask":
            self._connect()
            return parallel_config(backend="dask", client=self.client), "dask"
        if self.name == "threading" or small:
            return parallel_config(backend="threading"), "threading"
        return contextlib.nullcontext(), "loky"

    def _connect(self) -> None:
        if self.client is not None:
            return
        distributed = _import_distributed()
        sched = self.scheduler or os.environ.get("DASK_SCHEDULER_ADDRESS") or None
        if isinstance(sched, distributed.Client):
            self.client = sched
            origin = "client given"
        elif sched is None:
            from ..distributed import available_cores

            cores = available_cores()
            self.log(f"fxtl: starting a Dask LocalCluster ({cores} workers x 1 thread)")
            import dask

            # Dask's workers set MALLOC_TRIM_THRESHOLD_=65536 to hand memory back to the OS over
            # a long life; that also stops glibc from raising its mmap threshold, so every large
            # numpy temporary is mmapped and faulted in again (MLP fits measured 1.3-1.7x
            # slower). This cluster lives for one call: keep glibc's default.
            environ = {**dask.config.get("distributed.nanny.pre-spawn-environ", {}),
                       "MALLOC_TRIM_THRESHOLD_": None}
            try:
                with dask.config.set({"distributed.nanny.pre-spawn-environ": environ}):
                    cluster = self._stack.enter_context(distributed.LocalCluster(
                        n_workers=cores, threads_per_worker=1, dashboard_address=":0",
                        silence_logs=logging.ERROR))
            except (OSError, RuntimeError) as exc:
                raise FxtlError(f"could not start a local Dask cluster ({type(exc).__name__}: "
                                f"{str(exc).splitlines()[0] if str(exc) else ''}); start "
                                "`dask scheduler` and `dask worker` and pass --scheduler") from None
            self.client = self._stack.enter_context(distributed.Client(cluster, set_as_default=False))
            origin = "LocalCluster started by fxtl"
        else:
            address = str(sched)
            _probe_scheduler(address)
            try:
                client = distributed.Client(address, timeout=DASK_CONNECT_TIMEOUT, set_as_default=False)
            except (OSError, ValueError) as exc:
                first = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
                raise FxtlError(f"cannot connect to the Dask scheduler {address}: {first}; check "
                                "--scheduler (or DASK_SCHEDULER_ADDRESS)") from None
            self.client = self._stack.enter_context(client)
            origin = "scheduler given" if self.scheduler else "DASK_SCHEDULER_ADDRESS"
        threads = dict(self.client.nthreads())
        if not threads:
            self.log(f"fxtl: the Dask scheduler {self.client.scheduler.address} has no workers "
                     "yet; the search waits for them")
        self.info = {"scheduler": self.client.scheduler.address, "origin": origin,
                     "workers": len(threads), "threads": int(sum(threads.values()))}
        self.log(f"fxtl: search on Dask: {self.info['scheduler']} ({self.info['workers']} workers, "
                 f"{self.info['threads']} threads)")

    def close(self) -> None:
        self._stack.close()
        self.client = None


def _probe_scheduler(address: str) -> None:
    """One line naming ``address`` when nothing listens there (before a Client, whose failed
    start would wait out its timeout and print a traceback at exit)."""
    from distributed.comm import parse_address
    from distributed.comm.addressing import get_address_host_port

    try:
        scheme, _ = parse_address(address)
    except (ValueError, TypeError) as exc:
        raise FxtlError(f"{address!r} is not a Dask scheduler address ({exc}); use e.g. "
                        "tcp://host:8786") from None
    if scheme not in ("tcp", "tls"):
        return
    try:
        host, port = get_address_host_port(address)
    except ValueError as exc:
        raise FxtlError(f"{address!r} is not a Dask scheduler address ({exc}); use e.g. "
                        "tcp://host:8786") from None
    try:
        socket.create_connection((host, port), timeout=DASK_CONNECT_TIMEOUT).close()
    except OSError as exc:
        why = exc.strerror or str(exc) or type(exc).__name__
        raise FxtlError(f"cannot reach the Dask scheduler at {address} ({why}, within "
                        f"{DASK_CONNECT_TIMEOUT:g} s); start `dask scheduler` there or fix "
                        "--scheduler (or DASK_SCHEDULER_ADDRESS)") from None


def fit_heads(cache: str | Path | FeatureCache, *, models: Sequence[str] = ("logreg",),
              params: Mapping[str, Any] | None = None, search: bool = True, seed: int = 0,
              jobs: int | None = 1, test_size: float = 0.2, cv_folds: int = 5,
              l2_normalize: bool = False, pca: int | float | None = None,
              large_threshold: int = LARGE_ROWS, cache_dir: str | Path | None = None,
              run_name: str | None = None, save: bool = True, backend: str = "loky",
              scheduler: Any = None, log: Callable[[str], None] | None = None) -> list[FitResult]:
    """Fit several heads on one cache (loaded once); see :func:`fit_head` for the parameters.

    ``models`` may contain ``"all"`` (every registered head). For caches above
    ``large_threshold`` rows, heads without a scalable form (kNN) are skipped with a note.
    With ``backend="dask"`` one cluster connection serves every head's search.
    """
    names: list[str] = []
    for m in models:
        for name in (HEADS if m == "all" else [m]):
            get_head(name)
            if name not in names:
                names.append(name)
    if not names:
        raise FxtlError("no head model given; pass --model logreg (or svm, mlp, knn, all)")
    params = dict(params or {})
    if params:
        check_params(names, params)
    log = log or (lambda msg: None)
    runner = _SearchBackend(backend, scheduler, log=log)
    source = _open_source(cache, large_threshold=large_threshold)
    if source.large:
        skipped = [n for n in names if HEADS[n].stream is None]
        if skipped and len(skipped) == len(names):
            raise FxtlError(f"{source.path} has {source.n:,} rows; {', '.join(skipped)} does not "
                            "scale to that, use logreg, linear-svm or mlp (or raise --large-threshold)")
        if skipped:
            log(f"fxtl: skipping {', '.join(skipped)}: no scalable form for {source.n:,} rows")
        names = [n for n in names if n not in skipped]
        if pca:
            raise FxtlError(f"--pca is not supported for caches above --large-threshold "
                            f"({source.n:,} rows); drop --pca")
    stamp = time.strftime("%Y%m%d-%H%M%S")
    plan = plan_splits(source.labels, source.split, seed=seed, test_size=test_size,
                       cv_folds=cv_folds, search=search)
    with contextlib.closing(runner):
        return _fit_all(source, names, plan=plan, params=params, search=search, seed=seed,
                        jobs=jobs, l2_normalize=l2_normalize, pca=pca, cache_dir=cache_dir,
                        run_name=run_name, save=save, stamp=stamp, runner=runner, log=log)


def _fit_all(source: "_Source", names: list[str], *, plan: SplitPlan, params: dict, search: bool,
             seed: int, jobs: int | None, l2_normalize: bool, pca, cache_dir, run_name, save: bool,
             stamp: str, runner: _SearchBackend, log: Callable[[str], None]) -> list[FitResult]:
    results = []
    for name in names:
        own = {k: v for k, v in params.items() if k in _accepted_params(name)}
        selection = ("val" if plan.selection == "val" else "train hold-out") if source.large \
            else plan.selection
        log(f"fxtl: fitting {name} on {len(plan.fit_rows)} rows "
            f"(selection: {selection}, report: {plan.eval_split})")
        res = _fit_one(source, name, plan=plan, params=own, search=search, seed=seed, jobs=jobs,
                       l2_normalize=l2_normalize, pca=pca, runner=runner)
        if save:
            runs = Path(cache_dir) if cache_dir else default_cache_dir()
            base = (f"{run_name}-{name}" if len(names) > 1 else run_name) if run_name else \
                f"{slug(source.dataset)}-{slug(Path(str(source.attrs.get('backbone', 'x'))).name)}-{name}-{stamp}"
            _write_run(res, _new_run_dir(runs / "runs", base, exact=bool(run_name)), source, plan)
        results.append(res)
    return results


def fit_head(cache: str | Path | FeatureCache, *, model: str = "logreg",
             params: Mapping[str, Any] | None = None, search: bool = True, seed: int = 0,
             jobs: int | None = 1, test_size: float = 0.2, cv_folds: int = 5,
             l2_normalize: bool = False, pca: int | float | None = None,
             large_threshold: int = LARGE_ROWS, cache_dir: str | Path | None = None,
             run_name: str | None = None, save: bool = True, backend: str = "loky",
             scheduler: Any = None) -> FitResult:
    """Fit one head on a feature cache, evaluate it honestly and (by default) save a run folder.

    Parameters
    ----------
    cache : path or FeatureCache
        A cache written by ``fxtl extract``.
    model : str
        A key of :data:`HEADS` (``logreg``, ``svm``, ``linear-svm``, ``mlp``, ``knn``).
    params : mapping, optional
        Estimator parameters (fixed; removed from the search space).
    search : bool
        Hyper-parameter search (see :func:`plan_splits` for which rows it uses); ``False`` fits
        the registry defaults.
    seed : int
        Seeds the folds, the hold-out, PCA and the estimators.
    jobs : int, optional
        Parallel search jobs (joblib; -1 = all cores). Ignored by ``backend="dask"``, which
        uses every thread of the cluster's workers.
    test_size : float
        Hold-out fraction when the cache has only a train split.
    cv_folds : int
        k of the stratified k-fold CV (lowered when a class is smaller).
    l2_normalize : bool
        L2-normalise features before scaling.
    pca : int or float, optional
        PCA components (or variance fraction) after scaling.
    large_threshold : int
        Above this many rows, use the scalable streaming estimators.
    cache_dir : path, optional
        Home of ``runs/`` (default ``./cache`` or ``$FXTL_CACHE``).
    run_name : str, optional
        Run folder name (default ``<dataset>-<backbone>-<model>-<time>``).
    save : bool
        Write the run folder (metrics.json, confusion.png, predictions.csv, head.joblib/.json).
    backend : {"loky", "threading", "dask"}
        Where the search's candidate fits run (joblib backend). ``"loky"`` (default): worker
        processes, except that searches on small matrices (< 5M feature values) run in threads,
        which start faster. ``"threading"``: threads. ``"dask"``: the workers of a Dask cluster
        (``pip install "fxtl[dask]"``); the final refit and the evaluation stay in this process.
        Caches above ``large_threshold`` rows are streamed in this process whatever the backend.
        ``metrics["backend"]`` records the request, ``metrics["search_backend"]`` what ran.
    scheduler : str or distributed.Client, optional
        With ``backend="dask"``: the scheduler address (``tcp://host:8786``) or a connected
        ``Client`` (left open). Default: ``$DASK_SCHEDULER_ADDRESS``, else a ``LocalCluster`` of
        one single-threaded worker process per core, started for this call and closed after it
        (scripts that start one need the usual ``if __name__ == "__main__":`` guard).

    Returns
    -------
    FitResult
        ``.head`` (a :class:`Head`; ``.head.pipeline`` is the sklearn Pipeline), ``.metrics``
        (the ``metrics.json`` content), ``.run_dir``, ``.head_path``.

    Examples
    --------
    >>> res = fit_head("cache/hymenoptera-lite0-1e2b80d0e2303460.h5", model="svm")  # doctest: +SKIP
    >>> res.metrics["best_params"]                                                  # doctest: +SKIP
    {'C': 10.0, 'gamma': 2.34375e-05}
    """
    if model == "all":
        raise FxtlError("fit_head fits one model; use fit_heads(cache, models=['all'])")
    return fit_heads(cache, models=[model], params=params, search=search, seed=seed, jobs=jobs,
                     test_size=test_size, cv_folds=cv_folds, l2_normalize=l2_normalize, pca=pca,
                     large_threshold=large_threshold, cache_dir=cache_dir, run_name=run_name,
                     save=save, backend=backend, scheduler=scheduler)[0]


def _fit_one(source: "_Source", name: str, *, plan: SplitPlan, params: dict, search: bool,
             seed: int, jobs: int | None, l2_normalize: bool, pca,
             runner: _SearchBackend | None = None) -> FitResult:
    runner = runner or _SearchBackend("loky", log=lambda msg: None)
    spec = get_head(name)
    class_names = list(source.class_names)
    notes = list(plan.notes)
    if source.large:
        notes.append(f"{source.n:,} rows > --large-threshold: {spec.stream.description} instead of "
                     f"{spec.estimator.split(':')[1]}")
        fitted = _fit_streaming(source, spec, plan=plan, params=params, search=search, seed=seed,
                                l2_normalize=l2_normalize, notes=notes)
        fitted[1]["search_backend"] = "streamed in this process"
        if runner.name != "loky":
            notes.append(f"--backend {runner.name} does not apply to a streamed fit (one pass over "
                         "the file updates every candidate); fitted in this process")
    else:
        fitted = _fit_in_memory(source, spec, plan=plan, params=params, search=search, seed=seed,
                                jobs=jobs, l2_normalize=l2_normalize, pca=pca, notes=notes,
                                runner=runner)
    pipeline, info = fitted
    provenance = {"backbone": source.attrs.get("backbone"),
                  "architecture": source.attrs.get("architecture"),
                  "weights_sha256": source.attrs.get("weights_sha256"),
                  "preprocessing": source.attrs.get("preprocessing"),
                  "layer": source.attrs.get("layer"), "precision": source.attrs.get("precision"),
                  "graph": source.attrs.get("graph"),
                  "feature_dim": source.dim, "cache_fingerprint": source.attrs.get("fingerprint"),
                  "dataset": source.dataset, "cache": str(source.path) if source.path else None}
    head = Head(model=name, pipeline=pipeline, class_names=class_names, provenance=provenance)
    t0 = time.perf_counter()
    y_true, scores = source.scores_on(head, plan.eval_rows)
    predict_seconds = time.perf_counter() - t0
    y_pred = scores.argmax(axis=1)
    from ..report.metrics import classification_metrics

    m = classification_metrics(y_true, y_pred, class_names)
    timings = source.attrs.get("timings") or {}
    metrics = {
        "kind": "head", "model": name, "estimator": _estimator_name(pipeline.named_steps["est"]),
        "pipeline": [n for n, _ in pipeline.steps],
        "backbone": source.attrs.get("backbone"), "dataset": source.dataset,
        "dataset_fingerprint": source.attrs.get("fingerprint"), "cache": str(source.path) if source.path else None,
        "split": plan.eval_split, **m,
        "fit_seconds": round(info["search_seconds"] + info["refit_seconds"], 4),
        "search_seconds": round(info["search_seconds"], 4), "refit_seconds": round(info["refit_seconds"], 4),
        "predict_seconds": round(predict_seconds, 4),
        "extract_seconds": timings.get("compute_seconds") if isinstance(timings, dict) else None,
        "trainable_params": _trainable_params(pipeline.named_steps["est"]),
        "best_params": info["best_params"], "selection": info["selection"],
        "selection_score": info.get("selection_score"), "n_candidates": info["n_candidates"],
        "search": info.get("search", []),
        "n_fit": int(len(plan.fit_rows)), "seed": int(seed), "scalable": source.large,
        "l2_normalize": bool(l2_normalize), "pca": pca,
        "backend": runner.name, "search_backend": info.get("search_backend", "none"),
        "dask": dict(runner.info) if info.get("search_backend") == "dask" else None,
        "notes": notes,
        "scores": "probability" if head.calibrated else "softmax of decision margins",
        "created": now_iso(), "versions": versions(),
    }
    return FitResult(head=head, metrics=metrics,
                     predictions={"rows": np.asarray(plan.eval_rows), "y_true": y_true,
                                  "y_pred": y_pred, "scores": scores})


def _fit_in_memory(source: "_Source", spec: HeadSpec, *, plan: SplitPlan, params: dict,
                   search: bool, seed: int, jobs: int | None, l2_normalize: bool, pca, notes: list[str],
                   runner: _SearchBackend):
    X_fit, y_fit = source.features[plan.fit_rows], source.labels[plan.fit_rows]
    n_classes = len(np.unique(y_fit))
    if plan.selection.startswith("cv"):
        n_min = len(plan.fit_rows) * (plan.cv_folds - 1) // plan.cv_folds
    elif plan.selection == "val":
        n_min = int((plan.val_fold < 0).sum())
    else:
        n_min = len(plan.fit_rows)
    shape = DataShape(n_fit=int(n_min), dim=source.dim, n_classes=n_classes)
    if pca and isinstance(pca, int) and pca > min(n_min, source.dim):
        notes.append(f"--pca {pca} lowered to {min(n_min, source.dim)} (training rows/feature dim)")
        pca = min(n_min, source.dim)
    accepted = _estimator_params(spec.estimator)
    ignored = sorted(set(params) - accepted)
    if ignored:  # parameters of the scalable stand-in only
        notes.append(f"ignored --param {', '.join(ignored)}: not a parameter of "
                     f"{spec.estimator.split(':')[1]} (only of the large-cache estimator)")
    params = {k: v for k, v in params.items() if k in accepted}
    fixed = dict(spec.defaults)
    fixed.update(params)
    notes.extend(spec.adapt(fixed, shape) if spec.adapt else [])
    grid = {k: v for k, v in spec.space(shape).items() if k not in params} if plan.selection != "none" else {}
    candidates = int(np.prod([len(v) for v in grid.values()])) if grid else 1
    info: dict[str, Any] = {"selection": plan.selection if grid else "none", "n_candidates": candidates,
                            "search_seconds": 0.0, "selection_score": None}
    if plan.selection != "none" and params and not grid:
        notes.append("every searched parameter was fixed by --param: no search")
    small = X_fit.size < _SMALL_VALUES
    blas, backend = contextlib.nullcontext(), contextlib.nullcontext()
    if small:
        from threadpoolctl import threadpool_limits

        blas = threadpool_limits(limits=1)
    if grid and candidates > 1:  # a search: it runs where the backend says
        backend, info["search_backend"] = runner.parallel(small)
        if info["search_backend"] == "dask":
            jobs = -1  # every worker thread of the cluster
    with blas:
        final, info = _search_and_refit(source, spec, plan=plan, params=params, fixed=fixed,
                                        grid=grid, info=info, seed=seed, jobs=jobs,
                                        l2_normalize=l2_normalize, pca=pca, notes=notes,
                                        parallel=backend)
    return final, info


def _search_and_refit(source: "_Source", spec: HeadSpec, *, plan: SplitPlan, params: dict,
                      fixed: dict, grid: dict, info: dict, seed: int, jobs: int | None,
                      l2_normalize: bool, pca, notes: list[str],
                      parallel: contextlib.AbstractContextManager | None = None):
    """The grid search (its candidate fits inside ``parallel``, a joblib backend context),
    then the final fit in this process."""
    from sklearn.model_selection import GridSearchCV, PredefinedSplit, StratifiedKFold

    X_fit, y_fit = source.features[plan.fit_rows], source.labels[plan.fit_rows]
    best: dict[str, Any] = {}
    candidates = info["n_candidates"]
    t0 = time.perf_counter()
    if grid and candidates > 1:
        pipe = build_pipeline(spec.name, params=fixed, seed=seed, l2_normalize=l2_normalize,
                              pca=pca, calibrate=False)
        if plan.selection == "val":
            X_s, y_s = source.features[plan.search_rows], source.labels[plan.search_rows]
            cv = PredefinedSplit(plan.val_fold)
        else:
            X_s, y_s = X_fit, y_fit
            cv = StratifiedKFold(n_splits=plan.cv_folds, shuffle=True, random_state=seed)
        gs = GridSearchCV(pipe, {f"est__{k}": v for k, v in grid.items()}, cv=cv, n_jobs=jobs,
                          refit=False, scoring="accuracy", error_score="raise")
        with parallel or contextlib.nullcontext(), _quiet_convergence() as conv:
            if info.get("search_backend") == "dask":
                # scikit-learn hands the warning filters to the workers, not our recorder: on
                # worker processes every ConvergenceWarning would be printed, so none are.
                from sklearn.exceptions import ConvergenceWarning

                warnings.simplefilter("ignore", ConvergenceWarning)
            gs.fit(X_s, y_s)
        best = {k.removeprefix("est__"): v for k, v in gs.best_params_.items()}
        info["selection_score"] = round(float(gs.best_score_), 6)
        info["search"] = [{"params": _jsonable(p), "mean_score": round(float(s), 6)}
                          for p, s in zip(gs.cv_results_["params"], gs.cv_results_["mean_test_score"])]
        if conv:
            notes.append(f"{len(conv)} search fits did not fully converge ({conv[0][:80]})")
        edge = [k for k, g in grid.items()
                if len(g) > 2 and isinstance(g[0], float) and best.get(k) in (g[0], g[-1])]
        if edge:
            notes.append(f"best {', '.join(edge)} is at the edge of the search grid "
                         f"({_jsonable(best)}); try other values with --param")
    elif grid:  # a single candidate: nothing to choose
        best = {k: v[0] for k, v in grid.items()}
        info["selection"] = "none"
    info["search_seconds"] = time.perf_counter() - t0
    smallest = int(np.bincount(y_fit)[np.unique(y_fit)].min())
    calibrate = spec.calibrate and smallest >= 2
    if spec.calibrate and not calibrate:
        notes.append(f"{spec.name}: too few images per class to calibrate; scores are a softmax "
                     "of margins")
    final = build_pipeline(spec.name, params={**fixed, **best}, seed=seed, l2_normalize=l2_normalize,
                           pca=pca, calibrate=calibrate, calibration_cv=min(5, max(smallest, 2)))
    t0 = time.perf_counter()
    with _quiet_convergence() as conv:
        final.fit(X_fit, y_fit)
    info["refit_seconds"] = time.perf_counter() - t0
    if conv:
        notes.append(f"final fit did not fully converge ({conv[0][:80]}); consider --param max_iter=...")
    info["best_params"] = _jsonable({**params, **best}) if (best or params) else {}
    return final, info


# ----------------------------------------------------------------------------- data sources
class _Source:
    """Rows of a cache, in memory (small caches) or streamed from the HDF5 file (large ones)."""

    def __init__(self, *, path: Path | None, attrs: dict, labels: np.ndarray, split: np.ndarray,
                 class_names: list[str], dim: int, paths: list[str] | None,
                 features: np.ndarray | None, large: bool):
        self.path, self.attrs, self.labels, self.split = path, attrs, labels, split
        self.class_names, self.dim, self.paths = class_names, dim, paths
        self.features, self.large = features, large

    @property
    def n(self) -> int:
        return int(len(self.labels))

    @property
    def dataset(self) -> str:
        return str(self.attrs.get("dataset_name") or (Path(self.path).stem if self.path else "dataset"))

    def blocks(self, rows: np.ndarray, *, block_rows: int = 8192) -> Iterator[tuple[np.ndarray, np.ndarray, np.ndarray]]:
        """``(row_ids, X, y)`` for ``rows`` in row order, a block at a time (sequential read)."""
        rows = np.sort(np.asarray(rows, dtype=np.int64))
        if self.features is not None:
            for s in range(0, len(rows), block_rows):
                r = rows[s:s + block_rows]
                yield r, self.features[r], self.labels[r]
            return
        from ..features.store import iter_feature_chunks

        wanted = np.zeros(self.n, dtype=bool)
        wanted[rows] = True
        start = 0
        for X, _ in iter_feature_chunks(self.path, rows=block_rows):
            sel = np.flatnonzero(wanted[start:start + len(X)])
            if len(sel):
                r = start + sel
                yield r, X[sel], self.labels[r]
            start += len(X)

    def shuffled_batches(self, rows: np.ndarray, *, rng: np.random.Generator, block_rows: int = 4096,
                         mix: int = 8) -> Iterator[tuple[np.ndarray, np.ndarray]]:
        """``(X, y)`` batches of ``rows`` in random order, for ``partial_fit``.

        Caches are stored sorted by split and class, so consecutive rows are one class; SGD
        needs mixed batches. Random blocks are read (contiguous slices, cheap in HDF5), ``mix``
        at a time, and their rows shuffled together.
        """
        wanted = np.zeros(self.n, dtype=bool)
        wanted[np.asarray(rows, dtype=np.int64)] = True
        starts = np.arange(0, self.n, block_rows)
        starts = np.array([s for s in starts if wanted[s:s + block_rows].any()], dtype=np.int64)
        order = rng.permutation(len(starts))
        f = None
        if self.features is None:
            import h5py

            f = h5py.File(self.path, "r")
        try:
            for g in range(0, len(order), mix):
                parts_X, parts_y = [], []
                for s in starts[order[g:g + mix]]:
                    sel = np.flatnonzero(wanted[s:s + block_rows])
                    block = (self.features[s:s + block_rows] if f is None
                             else f["features"][s:s + block_rows])
                    parts_X.append(np.asarray(block[sel], dtype=np.float32))
                    parts_y.append(self.labels[s + sel])
                X, y = np.concatenate(parts_X), np.concatenate(parts_y)
                p = rng.permutation(len(y))
                yield X[p], y[p]
        finally:
            if f is not None:
                f.close()

    def scores_on(self, head: Head, rows: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """``(y_true, scores)`` of ``head`` on ``rows``, in the order of ``rows``."""
        rows = np.asarray(rows, dtype=np.int64)
        if self.features is not None:
            return self.labels[rows], head.scores(self.features[rows])
        order = np.argsort(rows, kind="stable")
        got_y, got_s = [], []
        for _, X, y in self.blocks(rows):
            got_y.append(y)
            got_s.append(head.scores(X))
        y_sorted, s_sorted = np.concatenate(got_y), np.concatenate(got_s)
        y_out, s_out = np.empty_like(y_sorted), np.empty_like(s_sorted)
        y_out[order], s_out[order] = y_sorted, s_sorted
        return y_out, s_out


def _open_source(cache: str | Path | FeatureCache, *, large_threshold: int) -> _Source:
    if isinstance(cache, FeatureCache):
        return _Source(path=cache.path, attrs=dict(cache.attrs), labels=cache.labels,
                       split=np.asarray(cache.split).astype(str), class_names=list(cache.class_names),
                       dim=cache.dim, paths=list(cache.paths), features=cache.features,
                       large=cache.n > large_threshold)
    path = Path(cache)
    attrs = read_attrs(path)  # validates format, version and completeness
    n = int(attrs.get("n", 0))
    if n <= large_threshold:
        c = load_features(path)
        return _open_source(c, large_threshold=large_threshold)
    import h5py

    # Labels and splits are small; the features stay on disk and are streamed.
    with h5py.File(path, "r") as f:
        labels = f["labels"][...].astype(np.int64)
        split = np.array([s.decode() if isinstance(s, bytes) else str(s) for s in f["split"][...]])
        dim = int(f["features"].shape[1])
        paths = [p.decode() if isinstance(p, bytes) else str(p) for p in f["paths"][...]]
    return _Source(path=path, attrs=attrs, labels=labels, split=split,
                   class_names=[str(c) for c in attrs.get("class_names", [])], dim=dim,
                   paths=paths, features=None, large=True)


# ----------------------------------------------------------------------------- large caches
_STREAM_EPOCHS = 5


def _fit_streaming(source: _Source, spec: HeadSpec, *, plan: SplitPlan, params: dict, search: bool,
                   seed: int, l2_normalize: bool, notes: list[str]):
    """Fit the scalable stand-in with ``partial_fit``, reading the cache block by block.

    Selection: on ``val`` when the plan selects on val, else on a stratified 10% of the fit rows
    (k-fold CV would multiply the passes over a large file). The reported rows are never read
    before the final evaluation.
    """
    from sklearn.model_selection import train_test_split
    from sklearn.pipeline import Pipeline
    from sklearn.preprocessing import Normalizer, StandardScaler

    classes = np.unique(source.labels[plan.fit_rows])
    accepted = _estimator_params(spec.stream.estimator)
    ignored = sorted(set(params) - accepted)
    if ignored:
        notes.append(f"ignored --param {', '.join(ignored)}: not a parameter of "
                     f"{spec.stream.estimator.split(':')[1]}")
    params = {k: v for k, v in params.items() if k in accepted}
    fixed = {**spec.stream.defaults, **params}
    grid = {k: v for k, v in spec.stream.space.items() if k not in params}
    from sklearn.model_selection import ParameterGrid

    candidates = list(ParameterGrid(grid)) if (search and plan.selection != "none" and grid) else [{}]
    l2 = Normalizer() if l2_normalize else None

    def prep(X):
        return l2.transform(X) if l2 is not None else X

    def fit_on(rows: np.ndarray, cands: list[dict], rng_seed: int):
        scaler = StandardScaler()
        for _, X, _ in source.blocks(rows):
            scaler.partial_fit(prep(X))
        ests = [build_pipeline(spec.name, params={**fixed, **c}, seed=seed, stream=True)
                .named_steps["est"] for c in cands]
        rng = np.random.default_rng(rng_seed)
        with _quiet_convergence():
            for _ in range(_STREAM_EPOCHS):
                for X, y in source.shuffled_batches(rows, rng=rng):
                    Xs = scaler.transform(prep(X))
                    for e in ests:
                        e.partial_fit(Xs, y, classes=classes)
        return scaler, ests

    info: dict[str, Any] = {"n_candidates": len(candidates), "selection_score": None}
    t0 = time.perf_counter()
    best: dict[str, Any] = {}
    if len(candidates) > 1:
        if plan.selection == "val":
            tr = plan.search_rows[plan.val_fold < 0]
            sel = plan.search_rows[plan.val_fold == 0]
            info["selection"] = "val"
        else:
            tr, sel = train_test_split(plan.fit_rows, test_size=0.1, random_state=seed,
                                       stratify=source.labels[plan.fit_rows])
            info["selection"] = "train-holdout10"
        scaler, ests = fit_on(tr, candidates, seed)
        correct = np.zeros(len(candidates))
        total = 0
        for _, X, y in source.blocks(sel):
            Xs = scaler.transform(prep(X))
            for i, e in enumerate(ests):
                correct[i] += int((e.predict(Xs) == y).sum())
            total += len(y)
        i_best = int(np.argmax(correct))  # first of the ties: the most regularised
        best = candidates[i_best]
        info["selection_score"] = round(float(correct[i_best] / max(total, 1)), 6)
        info["search"] = [{"params": _jsonable(c), "mean_score": round(float(k / max(total, 1)), 6)}
                          for c, k in zip(candidates, correct)]
    else:
        info["selection"] = "none"
        best = candidates[0]
    info["search_seconds"] = time.perf_counter() - t0
    t0 = time.perf_counter()
    scaler, (est,) = fit_on(plan.fit_rows, [best], seed + 1)
    info["refit_seconds"] = time.perf_counter() - t0
    steps = ([("l2", l2)] if l2 is not None else []) + [("scale", scaler), ("est", est)]
    info["best_params"] = _jsonable({**params, **best})
    notes.append(f"streamed {_STREAM_EPOCHS} epochs of partial_fit over {len(plan.fit_rows):,} rows")
    return Pipeline(steps), info


# ----------------------------------------------------------------------------- run folder
def _write_run(res: FitResult, run_dir: Path, source: _Source, plan: SplitPlan) -> None:
    from ..report.metrics import plot_confusion

    head_path = save_head(res.head, run_dir / "head.joblib")
    res.run_dir, res.head_path = run_dir, head_path
    res.metrics["run_dir"] = str(run_dir)
    res.metrics["head"] = str(head_path)
    p = res.predictions
    rows, y_true, y_pred, scores = p["rows"], p["y_true"], p["y_pred"], p["scores"]
    names = res.head.class_names
    lines = ["row,path,split,label,predicted,probability"]
    for r, t, p, s in zip(rows, y_true, y_pred, scores):
        path = source.paths[r] if source.paths is not None else ""
        lines.append(f"{int(r)},{_csv(path)},{source.split[r]},{_csv(names[t])},{_csv(names[p])},"
                     f"{s[p]:.6f}")
    atomic_write_bytes(run_dir / "predictions.csv", ("\n".join(lines) + "\n").encode())
    m = res.metrics
    plot_confusion(m["confusion_matrix"], names, run_dir / "confusion.png",
                   title=f"{m['model']} on {m['split']}: accuracy {m['accuracy']:.3f}")
    m["confusion_png"] = str(run_dir / "confusion.png")
    m["predictions_csv"] = str(run_dir / "predictions.csv")
    atomic_write_json(run_dir / "metrics.json", m)


def _csv(text: str) -> str:
    text = str(text)
    return '"' + text.replace('"', '""') + '"' if any(c in text for c in ',"\n') else text
