"""Saving and loading heads without pickle.

A head is ``head.skops`` (:mod:`skops.io`: a zip of JSON and arrays that names every type it
holds; loading builds only types on an explicit allow-list, so a forged file cannot run code)
and its JSON sidecar ``head.json`` (provenance, class names, the file's sha256).

Heads written by older fxtl are ``head.joblib`` pickles: unpickling can run arbitrary code, so
:func:`load_head` reads them only with ``trust=True``.

Examples
--------
>>> from fxtl.heads import load_head
>>> head = load_head("cache/runs/hymenoptera-lite0-logreg-20260101-000000")  # doctest: +SKIP
>>> head.estimator.predict_proba(features)                                    # doctest: +SKIP
"""
from __future__ import annotations

import functools
import importlib
import logging
import sys
import threading
import warnings
from pathlib import Path
from typing import Any

from .._util import (atomic_path, atomic_write_json, meaning_sha256, now_iso, read_json, sha256_file,
                     versions)
from ..errors import ParameterError, ProvenanceError
from .model import Head, class_positions

__all__ = ["save_head", "load_head", "resolve_head_path", "skops_io", "HEAD_FORMAT", "HEAD_FORMAT_VERSION",
           "TRUSTED_TYPES", "SKLEARN_CLASSES", "trusted_types"]

logger = logging.getLogger(__name__)

# The payload and its sidecar say what they are and which version (readers check).
HEAD_FORMAT = "fxtl-head"
# 1: joblib pickle (read only with trust=True); 2: skops.
HEAD_FORMAT_VERSION = 2
# Types a head may hold beyond what skops trusts by default (scikit-learn estimators, numpy):
# the helpers inside fitted calibrators, kNN trees and MLP optimisers, and fxtl's torch-fitted
# estimators, its BLAS-kernel SVC and its early-ending MLP (numpy state only; loading them
# imports scikit-learn, not torch). Nothing here runs code.
TRUSTED_TYPES = (
    "fxtl.heads.kernel_svm.RBFSVC",
    "fxtl.heads.linear_svm.LinearSVC",
    "fxtl.heads.mlp.MLPClassifier",
    "fxtl.heads.torch_heads.TorchLinearSVC",
    "fxtl.heads.torch_heads.TorchLogisticRegression",
    "fxtl.heads.torch_heads.TorchMLPClassifier",
    "sklearn.calibration._CalibratedClassifier",
    "sklearn.calibration._SigmoidCalibration",
    "sklearn.metrics._dist_metrics.EuclideanDistance64",
    "sklearn.model_selection._split.StratifiedKFold",
    "sklearn.neighbors._kd_tree.KDTree",
    "sklearn.neighbors._ball_tree.BallTree",
    "sklearn.neural_network._stochastic_optimizers.AdamOptimizer",
    "sklearn.neural_network._stochastic_optimizers.SGDOptimizer",
)
# scikit-learn estimators a head may hold, this fxtl's or an older one's ("module:Class"): skops
# no longer trusts every scikit-learn estimator by default here (see :func:`skops_io`), and their
# type names are read from the classes, so they follow scikit-learn's module layout.
SKLEARN_CLASSES = (
    "sklearn.pipeline:Pipeline",
    "sklearn.preprocessing:StandardScaler",
    "sklearn.preprocessing:Normalizer",
    "sklearn.preprocessing:LabelBinarizer",
    "sklearn.decomposition:PCA",
    "sklearn.linear_model:LogisticRegression",
    "sklearn.linear_model:SGDClassifier",
    "sklearn.svm:SVC",
    "sklearn.svm:LinearSVC",
    "sklearn.neural_network:MLPClassifier",
    "sklearn.neighbors:KNeighborsClassifier",
    "sklearn.calibration:CalibratedClassifierCV",
    "sklearn.frozen:FrozenEstimator",  # the calibrated SVMs' fitted estimator
)
# Sidecar fields that change a head's answers; ``meaning_sha256`` covers them (the file's own
# ``sha256`` covers only the estimator, not the names its columns are given or the features
# it must be applied to).
MEANING_KEYS = ("model", "file", "sha256", "class_names", "feature_dim", "scores", "backbone",
                "architecture", "weights_sha256", "preprocessing", "layer", "precision", "graph")
_PROVENANCE_KEYS = ("backbone", "architecture", "weights_sha256", "preprocessing", "layer", "layers",
                    "precision", "graph", "feature_dim", "cache_fingerprint", "dataset", "cache")


def _meaning_keys(sidecar: dict) -> tuple[str, ...]:
    """MEANING_KEYS, and ``layers`` for a head on several layers (only then: a plain head's
    sidecar, written before heads had layers, keeps its meaning_sha256)."""
    return MEANING_KEYS + (("layers",) if "layers" in sidecar else ())


def skops_io():
    """:mod:`skops.io`, imported without its walk over scikit-learn.

    At import, skops lists every scikit-learn estimator as trusted by default, and to list them
    it imports every scikit-learn module (and dask, pandas and torch through scikit-learn's
    array-API shim): seconds of CPU in every command that saves or loads a head. fxtl loads
    only the types its heads hold (:func:`trusted_types`: :data:`TRUSTED_TYPES` and
    :data:`SKLEARN_CLASSES`), so it needs no such list: ``all_estimators`` answers nothing while
    skops imports (under a lock, put back at once). Where skops was imported before fxtl, its list is there and changes
    nothing here: a type is loaded only when :func:`trusted_types` or skops trusts it.
    """
    if "skops.io" in sys.modules:
        import skops.io as sio

        return sio
    import sklearn.utils
    import sklearn.utils.discovery

    with _SKOPS_IMPORT:
        saved = sklearn.utils.all_estimators, sklearn.utils.discovery.all_estimators
        sklearn.utils.all_estimators = sklearn.utils.discovery.all_estimators = _no_estimators
        try:
            import skops.io as sio
        finally:
            sklearn.utils.all_estimators, sklearn.utils.discovery.all_estimators = saved
    return sio


_SKOPS_IMPORT = threading.Lock()


@functools.cache
def _sklearn_type_names() -> tuple[str, ...]:
    names = []
    for dotted in SKLEARN_CLASSES:
        module, _, name = dotted.partition(":")
        try:
            cls = getattr(importlib.import_module(module), name)
        except (ImportError, AttributeError):  # an older scikit-learn: no head can hold it
            continue
        names.append(f"{cls.__module__}.{cls.__name__}")
    return tuple(names)


def trusted_types() -> list[str]:
    """Every type name :func:`load_head` loads without ``trust=True``: :data:`TRUSTED_TYPES` and
    the scikit-learn estimators of :data:`SKLEARN_CLASSES` (named as this scikit-learn names them)."""
    return list(TRUSTED_TYPES) + list(_sklearn_type_names())


def _no_estimators(*args: Any, **kwargs: Any) -> list:
    return []


def save_head(head: Head, path: str | Path) -> Path:
    """Write ``head`` as ``path`` (skops) and its sidecar ``path`` with ``.json``.

    The sidecar holds the provenance and the file's sha256; :func:`load_head` checks both.
    """
    import sklearn

    sio = skops_io()
    path = Path(path)
    with atomic_path(path, suffix=".tmp") as tmp:
        sio.dump(head.pipeline, tmp)
    sidecar = {"format": HEAD_FORMAT, "format_version": HEAD_FORMAT_VERSION, "model": head.model,
               "file": path.name, "sha256": sha256_file(path), "serialization": "skops",
               "class_names": list(head.class_names), "feature_dim": head.feature_dim,
               "scores": "probability" if head.calibrated else "softmax of decision margins",
               "sklearn_version": sklearn.__version__, "versions": versions(), "created": now_iso(),
               **{k: v for k, v in head.provenance.items() if k != "feature_dim"}}
    sidecar["meaning_sha256"] = meaning_sha256(sidecar, _meaning_keys(sidecar))
    atomic_write_json(path.with_suffix(".json"), sidecar)
    head.path = path
    return path


def resolve_head_path(path: Path) -> Path:
    """The head file of a run folder (``head.skops``, else an old ``*.joblib``), or ``path``."""
    if path.is_dir():
        found = sorted(path.glob("*.skops")) or sorted(path.glob("*.joblib"))
        if not found:
            raise ProvenanceError(f"{path} holds no head (head.skops); pass a run folder written "
                                  "by `fxtl fit-head` or its head.skops")
        return found[0]
    if not path.exists():
        raise ProvenanceError(f"{path}: no such head; pass a run folder or head.skops from `fxtl fit-head`")
    return path


def _read_sidecar(side_path: Path) -> dict[str, Any] | None:
    if not side_path.is_file():
        return None
    try:
        sidecar = read_json(side_path)
    except (OSError, ValueError) as exc:
        raise ProvenanceError(f"{side_path} is unreadable ({exc}); refit the head") from None
    if not isinstance(sidecar, dict):
        raise ProvenanceError(f"{side_path} is not an fxtl head sidecar (a JSON "
                              f"{type(sidecar).__name__}, not an object); refit the head")
    return sidecar


def load_head(path: str | Path, *, trust: bool = False) -> Head:
    """Load a head saved by :func:`save_head` (``path``: the head file or its run folder).

    A skops head is checked against its sidecar (format, version, sha256) and loaded with
    :func:`trusted_types` only; ``trust=True`` skips the sidecar checks and also accepts other
    types the file names. An old joblib
    head is a pickle: it is refused (:class:`ParameterError` on ``trust``) unless ``trust=True``,
    which unpickles it (only for files you made yourself).

    Raises
    ------
    ProvenanceError
        A damaged, forged or mismatched head or sidecar.
    ParameterError
        A pickle-based head without ``trust=True``.
    """
    path = resolve_head_path(Path(path))
    side_path = path.with_suffix(".json")
    if path.suffix != ".skops":
        return _load_joblib(path, side_path, trust=trust)
    sidecar = _read_sidecar(side_path)
    if sidecar is None:
        raise ProvenanceError(f"{path} has no sidecar {side_path.name} (class names, provenance); "
                              "refit the head")
    if not trust:
        _check_sidecar(path, side_path, sidecar)
    sio = skops_io()

    try:
        trusted = trusted_types()
        untrusted = [t for t in sio.get_untrusted_types(file=path) if t not in trusted]
        if untrusted and not trust:
            raise ProvenanceError(f"{path} holds types fxtl does not trust ({', '.join(untrusted[:3])}); "
                                  "refit the head, or load it with trust=True if you made it yourself",
                                  param="trust")
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # version notes are reported from the sidecar
            estimator = sio.load(path, trusted=trusted + untrusted)
    except ProvenanceError:
        raise
    except Exception as exc:  # a damaged zip or member: one line, never a traceback
        first = str(exc).splitlines()[0][:120] if str(exc) else ""
        raise ProvenanceError(f"{path} cannot be loaded ({type(exc).__name__}: {first}); "
                              "refit the head") from None
    return _head(path, sidecar, estimator, sidecar.get("class_names"))


def _check_sidecar(path: Path, side_path: Path, sidecar: dict) -> None:
    if sidecar.get("format") != HEAD_FORMAT:
        raise ProvenanceError(f"{side_path} is not an fxtl head sidecar (format="
                              f"{sidecar.get('format')!r}); refit with `fxtl fit-head`")
    version = sidecar.get("format_version")
    if not isinstance(version, int) or isinstance(version, bool) or version > HEAD_FORMAT_VERSION:
        raise ProvenanceError(f"{side_path} has head format_version {version!r}, this fxtl reads "
                              f"up to {HEAD_FORMAT_VERSION}; upgrade fxtl")
    if sha256_file(path) != sidecar.get("sha256"):
        raise ProvenanceError(f"{path} does not match the sha256 in {side_path.name} (modified or "
                              "replaced); refit the head, or load it with trust=True if you "
                              "changed it yourself", param="trust")
    # Heads written before fxtl recorded it have no meaning_sha256: their lists are still
    # cross-checked against the estimator on load (_head).
    recorded = sidecar.get("meaning_sha256")
    if recorded is not None and recorded != meaning_sha256(sidecar, _meaning_keys(sidecar)):
        changed = "class_names, preprocessing, backbone or weights_sha256"
        raise ProvenanceError(f"{side_path} was edited after the head was saved (its {changed} no "
                              "longer match its meaning_sha256), so the head would answer with "
                              "other names or on other features; restore the file or refit the "
                              "head", param="trust")


def _head(path: Path, sidecar: dict, estimator: Any, class_names: Any) -> Head:
    import sklearn

    if not isinstance(class_names, list) or not all(isinstance(c, str) for c in class_names) \
            or not hasattr(estimator, "predict"):
        raise ProvenanceError(f"{path} is not an fxtl head (no estimator or class names); refit "
                              "with `fxtl fit-head`")
    _check_class_lists(path, estimator, class_names, sidecar.get("feature_dim"))
    if sidecar.get("sklearn_version") and sidecar["sklearn_version"] != sklearn.__version__:
        warnings.warn(f"{path.name} was saved with scikit-learn {sidecar['sklearn_version']}, this "
                      f"is {sklearn.__version__}; predictions may differ slightly", stacklevel=3)
    provenance = {k: sidecar[k] for k in _PROVENANCE_KEYS if k in sidecar}
    return Head(model=str(sidecar.get("model", "?")), pipeline=estimator,
                class_names=list(class_names), provenance=provenance, path=path)


def _check_class_lists(path: Path, estimator: Any, class_names: list[str], feature_dim: Any) -> None:
    """The sidecar's class names must name the estimator's classes, once each, and its width."""
    side = path.with_suffix(".json").name
    if len(set(class_names)) != len(class_names):
        dup = next(c for c in class_names if class_names.count(c) > 1)
        raise ProvenanceError(f"{path.parent / side} lists class {dup!r} twice; restore the file or "
                              "refit the head")
    classes = getattr(estimator, "classes_", None)
    if classes is not None:
        try:
            class_positions(classes, class_names)
        except ProvenanceError:
            shown = [str(c) for c in list(classes)[:4]]
            raise ProvenanceError(f"{path.parent / side} names classes {class_names[:4]} but the "
                                  f"head was fitted on {shown}; restore the file or refit the "
                                  "head") from None
        if len(classes) > len(class_names):
            raise ProvenanceError(f"{path.parent / side} names {len(class_names)} classes but the "
                                  f"head predicts {len(classes)}; restore the file or refit the head")
    width = getattr(estimator, "n_features_in_", None)
    if width is not None and isinstance(feature_dim, int) and int(width) != feature_dim:
        raise ProvenanceError(f"{path.parent / side} says {feature_dim}-d features but the head "
                              f"takes {int(width)}; restore the file or refit the head")


def _load_joblib(path: Path, side_path: Path, *, trust: bool) -> Head:
    """An fxtl < skops head: a pickle, loaded only when the caller trusts it."""
    if not trust:
        raise ParameterError("trust", f"{path} is a pickle (a head saved by an older fxtl): loading "
                             "it can run code, so it is read only with trust=True; trust it only "
                             "if you made it yourself, or refit the head")
    import joblib

    try:
        sidecar = _read_sidecar(side_path) or {}
    except ProvenanceError:
        sidecar = {}
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            payload = joblib.load(path)
    except Exception as exc:
        raise ProvenanceError(f"{path} cannot be loaded ({type(exc).__name__}: "
                              f"{str(exc).splitlines()[0][:120] if str(exc) else ''}); refit the head") from None
    if not isinstance(payload, dict) or payload.get("format") != HEAD_FORMAT or \
            not {"pipeline", "class_names"} <= payload.keys():
        raise ProvenanceError(f"{path} is not an fxtl head; refit with `fxtl fit-head`")
    sidecar = {**sidecar, "model": payload.get("model", sidecar.get("model", "?"))}
    return _head(path, sidecar, payload["pipeline"], payload["class_names"])
