"""The head registry: each name maps to an estimator, its defaults and its search space.

Entries are frozen :class:`HeadSpec` values; :data:`HEADS` is a read-only view and
:func:`get_head` returns a copy, so no caller can change what another one gets.

Examples
--------
>>> get_head("logreg").estimator
'sklearn.linear_model:LogisticRegression'
>>> "knn" in head_names()
True
"""
from __future__ import annotations

import ast
import importlib
import re
from dataclasses import dataclass, field, replace
from types import MappingProxyType
from typing import Any, Callable, Mapping, Sequence

import numpy as np

from ..errors import ParameterError
from .params import check_values

__all__ = ["DataShape", "StreamSpec", "HeadSpec", "HEADS", "register_head", "get_head",
           "head_names", "list_heads", "build_pipeline", "parse_params", "check_params",
           "accepted_params", "import_estimator", "estimator_params", "resolve_solver",
           "SOLVERS", "TORCH_MIN_VALUES"]

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
    ``search_rows``, ``max_fit_rows``, ``path_param``, ``scale_up``, ``search_params`` and
    ``plenty_per_class`` tell :mod:`fxtl.heads.search` how the head scales with rows.
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
    # Candidates are compared on at most this many training rows (then refitted on all).
    search_rows: int = 4_000
    # The final fit uses at most this many rows (None: all); for kernels whose cost is ~n^2.
    max_fit_rows: int | None = None
    # A parameter whose grid is walked warm-started (ascending), when it is the only one searched.
    path_param: str | None = None
    # Adjusts the final fit's parameters to its row count; returns notes.
    scale_up: Callable[[dict, int], list[str]] | None = None
    # The same model solved in torch ("module:Class", a subclass of ``estimator``), used on large
    # data (see :func:`resolve_solver`).
    torch_estimator: str | None = None
    # scikit-learn estimator parameters of the search's candidates only (never the final fit),
    # unless the caller fixed them: candidates are compared on predictions, which settle long
    # before the weights do (e.g. a looser tolerance).
    search_params: Mapping[str, Any] = field(default_factory=dict)
    # k-fold CV gives way to one held-out split once every class has this many fit rows
    # (None: fxtl.heads.search.PLENTY_PER_CLASS); lower for heads whose every fit is costly.
    plenty_per_class: int | None = None


# name -> spec; `fxtl fit-head --model` choices in this order. Private: HEADS is its read-only view.
_REGISTRY: dict[str, HeadSpec] = {}
HEADS: Mapping[str, HeadSpec] = MappingProxyType(_REGISTRY)


def register_head(spec: HeadSpec) -> HeadSpec:
    """Add ``spec`` to :data:`HEADS`; refuses a name that is already taken."""
    if spec.name in _REGISTRY or spec.name == "all":
        raise ValueError(f"head {spec.name!r} is already registered")
    _REGISTRY[spec.name] = replace(spec, defaults=MappingProxyType(dict(spec.defaults)),
                                   search_params=MappingProxyType(dict(spec.search_params)))
    return spec


def get_head(name: str) -> HeadSpec:
    """The spec for ``name`` (a copy; registry entries are never mutated)."""
    if name not in _REGISTRY:
        raise ParameterError("model", f"unknown head model {name!r}; choose one of "
                             f"{', '.join(_REGISTRY)} or all")
    spec = _REGISTRY[name]
    return replace(spec, defaults=dict(spec.defaults))


def head_names() -> list[str]:
    """Registered head names, in registration order."""
    return list(_REGISTRY)


def list_heads() -> list[dict[str, Any]]:
    return [{"name": s.name, "estimator": s.estimator.split(":")[1], "description": s.description,
             "scalable": s.stream.estimator.split(":")[1] if s.stream else None}
            for s in HEADS.values()]


def _logreg_space(shape: DataShape) -> dict[str, list]:
    # Half-decade steps; on standardised features the optimum is well inside this range.
    return {"C": [float(c) for c in np.logspace(-4, 2, 13)]}


def _svm_space(shape: DataShape) -> dict[str, list]:
    # gamma relative to 1/dim (sklearn's "scale" on standardised features is exactly 1/dim).
    return {"C": [1.0, 3.0, 10.0, 30.0],
            "gamma": [f / shape.dim for f in (0.03, 0.1, 0.3, 1.0)]}


def _linear_svm_space(shape: DataShape) -> dict[str, list]:
    # On standardised wide features the hinge optimum sits at small C. Above 0.1 the fits only
    # slow liblinear down: with fewer rows than features the classes are separable and the
    # solution is already the hard-margin one, with more rows the optimum is far below.
    return {"C": [float(c) for c in np.logspace(-5, -1, 9)]}


def _mlp_space(shape: DataShape) -> dict[str, list]:
    # No alpha 100: so heavy a penalty never won on the measured caches, and each MLP candidate
    # costs a fit per fold.
    return {"alpha": [10.0, 1.0, 1e-2], "hidden_layer_sizes": [(256,)]}


def _mlp_scale_up(params: dict, n_rows: int) -> list[str]:
    # Many rows: bigger mini-batches and a shorter patience keep epochs few and cheap. Applied to
    # every fit on that many rows: the final fit, and search candidates when the subsample cap
    # is raised (an exhaustive reference).
    if n_rows > 8_000 and params.get("batch_size") == 64:
        params.update(batch_size=256, n_iter_no_change=5)
        return [f"mlp: batch_size 256, n_iter_no_change 5 for fits on {n_rows:,} rows (over 8,000)"]
    return []


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
    description="multinomial logistic regression, L2, C swept log-spaced (warm-started path)",
    stream=_SGD_LOG, path_param="C",
    # Its warm-started path is the cheapest search per row, so it searches twice the default
    # subsample: the best C grows with the rows, and one chosen on too few is too weak for the
    # refit on all of them (measured in benchmarks/heads_scale.py).
    search_rows=8_000,
    torch_estimator="fxtl.heads.torch_heads:TorchLogisticRegression"))
register_head(HeadSpec(
    name="svm", estimator="fxtl.heads.kernel_svm:RBFSVC",
    defaults={"kernel": "rbf", "C": 1.0, "gamma": "scale", "cache_size": 500},
    space=_svm_space, calibrate=True,
    description="RBF-kernel SVM, C and gamma searched (Platt-calibrated probabilities)",
    stream=_SGD_HINGE, search_rows=3_000, max_fit_rows=6_000))
register_head(HeadSpec(
    # scikit-learn's, its dual solved in the training rows' span when they are fewer than features
    name="linear-svm", estimator="fxtl.heads.linear_svm:LinearSVC",
    # dual="auto": the primal when rows outnumber features (fast, converges), the dual otherwise.
    defaults={"C": 1e-3, "dual": "auto", "tol": 1e-4, "max_iter": 2000}, space=_linear_svm_space,
    calibrate=True,
    description="linear SVM (liblinear, primal/dual from the shape), C searched (Platt-calibrated)",
    stream=_SGD_HINGE, search_rows=2_000, path_param="C",
    # Candidates at tol 1e-2: the head takes 25-40% less CPU and every measured cache chose the
    # same C, with the same accuracy, as at the final fit's 1e-4 (benchmarks/search_shortcuts.py).
    # 1e-1 chose the same C on the five real caches (fewer rows than features: the dual) but not
    # on 400 rows of 24 features (the primal), so it was not kept (benchmarks/path_rules.py).
    search_params={"tol": 1e-2},
    torch_estimator="fxtl.heads.torch_heads:TorchLinearSVC"))
register_head(HeadSpec(
    name="mlp", estimator="fxtl.heads.mlp:MLPClassifier",  # sklearn's, ends at a perfect val score
    # Mini-batches of 64 at a 3e-3 step: sklearn's default batch of 200 is the whole of a small
    # training set, so early stopping would end after a dozen gradient steps.
    defaults={"hidden_layer_sizes": (256,), "alpha": 1e-4, "batch_size": 64,
              "learning_rate_init": 3e-3, "early_stopping": True, "validation_fraction": 0.1,
              "n_iter_no_change": 10, "max_iter": 300},
    space=_mlp_space, adapt=_mlp_adapt, search_rows=2_000, scale_up=_mlp_scale_up,
    # Every candidate is a network trained per fold, and 5-fold CV told the alphas apart by at
    # most a few rows on the measured caches (omniglot: 0.7098 vs 0.7078 of 982): one held-out
    # split from 50 rows per class (10 held out per class) on (benchmarks/search_shortcuts.py).
    plenty_per_class=50,
    description="one-hidden-layer MLP with early stopping, width and alpha searched",
    stream=StreamSpec("sklearn.neural_network:MLPClassifier",
                      {"hidden_layer_sizes": (256,), "alpha": 1e-4},
                      {"alpha": [1e-2, 1e-4]}, "MLPClassifier.partial_fit, streamed"),
    torch_estimator="fxtl.heads.torch_heads:TorchMLPClassifier"))
register_head(HeadSpec(
    name="knn", estimator="sklearn.neighbors:KNeighborsClassifier",
    defaults={"n_neighbors": 5}, space=_knn_space, adapt=_knn_adapt, seeded=False,
    description="k nearest neighbours (Euclidean on standardised features), k searched"))


def import_estimator(dotted: str):
    """The class named by ``"module:Class"`` (imported on use so ``import fxtl`` stays light)."""
    module, _, name = dotted.partition(":")
    return getattr(importlib.import_module(module), name)


def estimator_params(estimator: str) -> set[str]:
    """Parameter names of the estimator class ``"module:Class"``."""
    return set(import_estimator(estimator)().get_params())


def build_pipeline(name: str, *, params: Mapping[str, Any] | None = None, seed: int = 0,
                   l2_normalize: bool = False, pca: int | float | None = None,
                   stream: bool = False, calibrate: bool | None = None, calibration_cv: int = 5,
                   solver: str = "sklearn"):
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
    solver : {"sklearn", "torch"}
        ``"torch"``: the head's torch estimator (when it has one), given the registry defaults
        it accepts.
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
            raise ParameterError("large_threshold", f"head {name!r} has no scalable form for large "
                                 "caches; use logreg, linear-svm or mlp, or raise large_threshold")
        dotted, kwargs = spec.stream.estimator, dict(spec.stream.defaults)
    elif solver == "torch" and spec.torch_estimator:
        dotted = spec.torch_estimator
        own = estimator_params(dotted)
        kwargs = {k: v for k, v in spec.defaults.items() if k in own}
    else:
        dotted, kwargs = spec.estimator, dict(spec.defaults)
    kwargs.update(params or {})
    cls = import_estimator(dotted)
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


SOLVERS = ("auto", "sklearn", "torch")
# With solver "auto", heads that have a torch estimator use it from this many feature values
# (rows x dims) on: below, importing torch costs more than it saves.
TORCH_MIN_VALUES = 3_000_000


def resolve_solver(spec: HeadSpec, *, requested: str, n_values: int,
                   params: Mapping[str, Any], distributed: bool = False) -> tuple[str, list[str]]:
    """``("sklearn" | "torch", notes)``: which estimator of ``spec`` fits ``n_values`` values.

    ``"auto"`` takes torch from :data:`TORCH_MIN_VALUES` values (or when ``params`` holds one
    only the torch estimator has, e.g. ``device``) when every parameter in ``params`` is one the
    torch estimator accepts and the search is not handed to a Dask cluster.
    ``"torch"`` forces it where the head has one (others keep scikit-learn, with a note).

    Examples
    --------
    >>> resolve_solver(get_head("knn"), requested="auto", n_values=10**8, params={})
    ('sklearn', [])
    """
    if requested not in SOLVERS:
        raise ParameterError("solver", f"unknown solver {requested!r}; choose one of "
                             f"{', '.join(SOLVERS)}")
    if requested == "sklearn" or spec.torch_estimator is None:
        notes = [f"{spec.name}: no torch solver, fitted with scikit-learn"] if requested == "torch" else []
        return "sklearn", notes
    foreign = sorted(set(params) - estimator_params(spec.torch_estimator))
    if requested == "torch":
        if foreign:
            raise ParameterError("params", f"{', '.join(foreign)} is not a parameter of the torch "
                                 f"solver of {spec.name}; drop it or use solver sklearn")
        return "torch", []
    torch_only = sorted(set(params) - estimator_params(spec.estimator))  # e.g. device
    if (n_values < TORCH_MIN_VALUES and not torch_only) or distributed or foreign:
        return "sklearn", []
    try:
        import torch  # noqa: F401
    except ImportError:
        return "sklearn", [f"{spec.name}: torch is not installed, fitted with scikit-learn"]
    return "torch", []


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
            raise ParameterError("params", f"{item!r} is not KEY=VALUE (e.g. C=0.1)")
        raw = raw.strip()
        try:
            out[key] = ast.literal_eval(raw)
        except (ValueError, SyntaxError):
            out[key] = raw
    return out


def accepted_params(name: str) -> set[str]:
    """Parameters of head ``name``'s estimator or of its scalable stand-in (large caches)."""
    spec = get_head(name)
    accepted = estimator_params(spec.estimator)
    for other in (spec.stream.estimator if spec.stream else None, spec.torch_estimator):
        if other:
            accepted |= estimator_params(other)
    return accepted


def check_params(models: Sequence[str], params: Mapping[str, Any]) -> None:
    """Raise :class:`ParameterError` (``params``) if a parameter is accepted by none of
    ``models``' estimators, or has a value the estimators that accept it refuse (``C=-1``)."""
    accepted: set[str] = set()
    for m in models:
        accepted |= accepted_params(m)
    unknown = sorted(set(params) - accepted)
    if unknown:
        raise ParameterError("params", f"{unknown[0]} is not a parameter of {', '.join(models)}; "
                             f"valid: {', '.join(sorted(accepted))}")
    for m in models:
        spec = get_head(m)
        for dotted in [spec.estimator] + ([spec.stream.estimator] if spec.stream else []):
            own = {k: v for k, v in params.items() if k in estimator_params(dotted)}
            if own:
                check_values(own, estimator=dotted, model=m)  # what the toy fit lets through
                _check_values(import_estimator(dotted), own, m)
        if spec.torch_estimator:  # checked without a fit: a fit would import torch
            own = {k: v for k, v in params.items() if k in estimator_params(spec.torch_estimator)}
            try:
                import_estimator(spec.torch_estimator)(**own)._validate_params()
            except (TypeError, ValueError) as exc:
                raise _invalid(own, m, exc) from None


def _check_values(cls, params: Mapping[str, Any], model: str) -> None:
    """Let scikit-learn's own parameter validation judge the values, on a 6-row toy fit."""
    import warnings

    X = np.array([[0.0, 1.0], [1.0, 0.0], [0.1, 0.9], [0.9, 0.1], [0.2, 0.8], [0.8, 0.2]])
    y = np.array([0, 1, 0, 1, 0, 1])
    try:
        est = cls(**params)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            est.fit(X, y)
    except (TypeError, ValueError) as exc:
        if type(exc).__name__ != "InvalidParameterError" and not isinstance(exc, TypeError):
            return  # a valid value the toy data cannot take (e.g. more neighbours than rows)
        raise _invalid(params, model, exc) from None


def _invalid(params: Mapping[str, Any], model: str, exc: Exception) -> ParameterError:
    """The one-line usage error for ``params`` that ``model``'s estimator refused."""
    first = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
    shown = ", ".join(f"{k}={v!r}" for k, v in params.items())
    return ParameterError("params", f"{shown} is not valid for {model}: {first[:200]}")
