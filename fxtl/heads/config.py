"""The settings of a head fit: a frozen, validated :class:`HeadConfig`.

The config is the one list of what changes a head's answer (and where its search runs).
``fxtl fit-head`` builds it from its flags, :func:`fxtl.heads.fit_heads` from keyword arguments,
the search reads it, and every run folder stores the config of its own head
(``metrics.json["config"]``). Adding an option is adding a field here (and its flag in
``fxtl/cli/heads.py``). Where a run is written is not part of it: fitting returns a value, saving is a
separate step (:mod:`fxtl.heads.runs`).
"""
from __future__ import annotations

import dataclasses
import re
from dataclasses import dataclass, fields
from types import MappingProxyType
from typing import Any, Mapping

from ..errors import ParameterError
from .dask_backend import BACKENDS
from .registry import SOLVERS, accepted_params, check_params, get_head, head_names
from .source import LARGE_ROWS

__all__ = ["HeadConfig", "parse_budget", "LAYER_CHOICES"]

# The named layer choices; anything else is a tuple of layer names.
LAYER_CHOICES = ("auto", "penultimate")

_DURATION = re.compile(r"\s*([0-9]*\.?[0-9]+)\s*(s|sec|m|min|h)?\s*")
_SECONDS = {None: 1, "s": 1, "sec": 1, "m": 60, "min": 60, "h": 3600}
# numpy's and scikit-learn's seeds are unsigned 32-bit integers.
_MAX_SEED = 2**32 - 1


def parse_budget(text: str | float | int | None) -> float | None:
    """``"60s"``, ``"2m"``, ``"1.5h"`` or a number of seconds -> seconds (None stays None).

    Examples
    --------
    >>> parse_budget("2m"), parse_budget("45s"), parse_budget(10)
    (120.0, 45.0, 10.0)
    """
    if text is None:
        return None
    if isinstance(text, (int, float)) and not isinstance(text, bool):
        value = float(text)
    else:
        m = _DURATION.fullmatch(str(text))
        if not m:
            raise ParameterError("budget", f"budget {text!r} is not a duration; use e.g. 60s, 2m or 1h")
        value = float(m.group(1)) * _SECONDS[m.group(2)]
    if not value > 0 or value == float("inf"):
        raise ParameterError("budget", f"budget must be a finite number of seconds > 0, got {text!r}")
    return value


@dataclass(frozen=True)
class HeadConfig:
    """Every option of a head fit; validated on construction (and on :meth:`replace`).

    Parameters
    ----------
    models : tuple of str
        Registered heads (``logreg``, ``svm``, ``linear-svm``, ``mlp``, ``knn``); ``"all"`` is
        every one. Stored as the resolved names.
    params : mapping
        Estimator parameters, fixed (removed from the search space); each must belong to one of
        ``models``.
    search : bool
        Hyper-parameter search (:mod:`fxtl.heads.search` chooses how); ``False`` fits defaults.
    seed : int
        Seeds the folds, the hold-out, subsamples, PCA and the estimators (0 .. 2**32 - 1).
    jobs : int, optional
        Cores the fit may use (-1: every core; not 0). With several, a head's candidates run
        side by side in threads, and several heads (``models``) on a few thousand rows run side
        by side in worker processes, one core each (:mod:`fxtl.heads.side_by_side`, Linux).
    test_size : float
        Hold-out fraction when the cache has only a train split.
    cv_folds : int
        k of the stratified k-fold CV used on small data (lowered when a class is smaller).
    l2_normalize : bool
        L2-normalise features before scaling.
    pca : int or float, optional
        PCA components (>= 1), or a variance fraction in (0, 1), after scaling.
    large_threshold : int
        Above this many rows, the scalable streaming estimators are fitted.
    backend : {"loky", "threading", "dask"}
        Where the search's candidate fits run (see :mod:`fxtl.heads.dask_backend`).
    scheduler : str or distributed.Client, optional
        With ``backend="dask"``: the scheduler address or a connected ``Client``.
    budget : float or str, optional
        Seconds (or ``"60s"``, ``"2m"``) the searches may take in all; stored in seconds.
    solver : {"auto", "sklearn", "torch"}
        Which estimator solves logreg, linear-svm and mlp (see
        :func:`fxtl.heads.registry.resolve_solver`).
    layers : "auto", "penultimate" or tuple of str
        Which of the cache's layers the heads are fitted on (see :mod:`fxtl.heads.layers`):
        ``"auto"`` chooses among a multi-layer cache's layers on the selection rows (a plain
        cache: its features), ``"penultimate"`` uses ``/features`` only, a tuple names the
        layers to concatenate (the features' own layer name, e.g. ``pooled``, for ``/features``).

    Examples
    --------
    >>> cfg = HeadConfig(models=("svm",), params={"C": 0.5}, budget="2m")
    >>> cfg.models, dict(cfg.params), cfg.budget
    (('svm',), {'C': 0.5}, 120.0)
    >>> cfg.replace(test_size=1.5)
    Traceback (most recent call last):
    ...
    fxtl.errors.ParameterError: test_size must be in (0, 1), got 1.5
    """

    models: tuple[str, ...] = ("logreg",)
    params: Mapping[str, Any] = dataclasses.field(default_factory=dict)
    search: bool = True
    seed: int = 0
    jobs: int | None = 1
    test_size: float = 0.2
    cv_folds: int = 5
    l2_normalize: bool = False
    pca: int | float | None = None
    large_threshold: int = LARGE_ROWS
    backend: str = "loky"
    scheduler: Any = None
    budget: float | None = None
    solver: str = "auto"
    layers: str | tuple[str, ...] = "auto"

    def __post_init__(self) -> None:
        models = (self.models,) if isinstance(self.models, str) else tuple(self.models)
        names: list[str] = []
        for m in models:
            for name in (head_names() if m == "all" else [m]):
                get_head(name)
                if name not in names:
                    names.append(name)
        if not names:
            raise ParameterError("models", "no head model given; pass models=['logreg'] (or "
                                 f"{', '.join(head_names()[1:])}, all)")
        if not isinstance(self.params, Mapping):
            raise ParameterError("params", f"params must be a mapping of estimator parameters, "
                                 f"got {self.params!r}")
        params = dict(self.params)
        if params:
            check_params(names, params)
        # Normalised forms, so equal settings compare equal and store the same.
        object.__setattr__(self, "models", tuple(names))
        object.__setattr__(self, "params", MappingProxyType(params))
        object.__setattr__(self, "budget", parse_budget(self.budget))
        object.__setattr__(self, "layers", _layers(self.layers))
        pca = self.pca
        checks = [
            ("search", isinstance(self.search, bool), "must be True or False"),
            ("seed", _is_int(self.seed) and 0 <= self.seed <= _MAX_SEED,
             f"must be an integer in 0 .. {_MAX_SEED}"),
            ("jobs", self.jobs is None or _is_int(self.jobs) and self.jobs != 0,
             "must be a count >= 1, or -1 for every core"),
            ("test_size", _is_num(self.test_size) and 0 < self.test_size < 1, "must be in (0, 1)"),
            ("cv_folds", _is_int(self.cv_folds) and self.cv_folds >= 2, "must be an integer >= 2"),
            ("l2_normalize", isinstance(self.l2_normalize, bool), "must be True or False"),
            ("pca", pca is None or (_is_int(pca) and pca >= 1)
             or (isinstance(pca, float) and 0 < pca < 1),
             "must be a whole number of components >= 1 or a fraction in (0, 1)"),
            ("large_threshold", _is_int(self.large_threshold) and self.large_threshold >= 1,
             "must be an integer >= 1"),
            ("backend", self.backend in BACKENDS, f"must be one of {', '.join(BACKENDS)}"),
            ("solver", self.solver in SOLVERS, f"must be one of {', '.join(SOLVERS)}"),
        ]
        for name, ok, rule in checks:
            if not ok:
                raise ParameterError(name, f"{name} {rule}, got {getattr(self, name)!r}")
        if self.scheduler is not None and self.backend != "dask":
            raise ParameterError("scheduler", "a scheduler needs backend='dask'")

    def __getstate__(self) -> dict[str, Any]:
        # params is a read-only view, which pickle cannot take; a plain dict travels instead
        # (a result sent back from a worker process, fxtl.heads.side_by_side).
        return {**self.__dict__, "params": dict(self.params)}

    def __setstate__(self, state: dict[str, Any]) -> None:
        for k, v in state.items():
            object.__setattr__(self, k, MappingProxyType(v) if k == "params" else v)

    def replace(self, **changes: Any) -> "HeadConfig":
        """A copy with ``changes`` (validated); unknown names raise :class:`TypeError`."""
        unknown = sorted(set(changes) - {f.name for f in fields(self)})
        if unknown:
            raise TypeError(f"unknown head option(s) {', '.join(unknown)}; the options are "
                            f"{', '.join(f.name for f in fields(self))}")
        return dataclasses.replace(self, **changes)

    def for_model(self, name: str) -> "HeadConfig":
        """The config of one of :attr:`models`: that model, and only the params it accepts."""
        own = {k: v for k, v in self.params.items() if k in accepted_params(name)}
        return self.replace(models=(name,), params=own)

    def to_dict(self) -> dict[str, Any]:
        """The stored form (``metrics.json["config"]``): JSON values only."""
        d = {f.name: getattr(self, f.name) for f in fields(self)}
        d["models"] = list(self.models)
        d["layers"] = self.layers if isinstance(self.layers, str) else list(self.layers)
        d["params"] = {k: list(v) if isinstance(v, tuple) else v for k, v in self.params.items()}
        s = self.scheduler
        if s is not None and not isinstance(s, str):  # a distributed.Client: its address
            d["scheduler"] = getattr(getattr(s, "scheduler", None), "address", None) or str(s)
        return d

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> "HeadConfig":
        """The config :meth:`to_dict` stored (validated again)."""
        if not isinstance(d, Mapping):
            raise ParameterError("config", f"a head config is a mapping, got {type(d).__name__}")
        unknown = sorted(set(d) - {f.name for f in fields(cls)})
        if unknown:
            raise ParameterError("config", f"unknown head option(s) {', '.join(unknown)}; this "
                                 "fxtl reads " + ", ".join(f.name for f in fields(cls)))
        kw = dict(d)
        if "params" in kw and isinstance(kw["params"], Mapping):
            kw["params"] = {k: tuple(v) if isinstance(v, list) else v
                            for k, v in kw["params"].items()}
        if isinstance(kw.get("layers"), list):
            kw["layers"] = tuple(kw["layers"])
        if "models" in kw and isinstance(kw["models"], list):
            kw["models"] = tuple(kw["models"])
        return cls(**kw)


def _layers(value: Any) -> str | tuple[str, ...]:
    """``"auto"``, ``"penultimate"``, or a non-empty tuple of distinct layer names."""
    if value in LAYER_CHOICES:
        return value
    names = tuple(value) if isinstance(value, (list, tuple)) else ()
    if not names or not all(isinstance(n, str) and n for n in names) or len(set(names)) < len(names):
        raise ParameterError("layers", f"layers must be 'auto', 'penultimate' or a list of distinct "
                                       f"layer names (`fxtl info CACHE` lists them), got {value!r}")
    return names


def _is_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _is_num(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)
