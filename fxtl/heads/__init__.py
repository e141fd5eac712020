"""Heads: scikit-learn classifiers fitted on a feature cache (``fxtl fit-head``).

Modules, by concern: :mod:`~fxtl.heads.registry` (names, estimators, search spaces),
:mod:`~fxtl.heads.planning` (which rows select, fit and report), :mod:`~fxtl.heads.search`
(how the search scales with rows), :mod:`~fxtl.heads.streaming` (caches too large for memory),
:mod:`~fxtl.heads.dask_backend` (where candidate fits run), :mod:`~fxtl.heads.persistence`
(head.skops + head.json), :mod:`~fxtl.heads.runs` (the run folder) and
:mod:`~fxtl.heads.fitting` (:func:`fit_head` / :func:`fit_heads`).
"""
import importlib

# public name -> submodule (imported on first use: ``import fxtl.heads.registry``, which the CLI
# does for --model's choices, must not pull in the search and its estimators)
_API = {"FitResult": "fitting", "fit_head": "fitting", "fit_heads": "fitting",
        "parse_budget": "fitting", "Head": "model", "load_head": "persistence",
        "save_head": "persistence", "SplitPlan": "planning", "plan_splits": "planning",
        "HeadSpec": "registry", "build_pipeline": "registry", "get_head": "registry",
        "head_names": "registry", "list_heads": "registry", "register_head": "registry",
        "choose_strategy": "search"}

__all__ = list(_API)


def __getattr__(name: str):
    if name in _API:
        return getattr(importlib.import_module(f".{_API[name]}", __name__), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_API))
