"""Heads: scikit-learn classifiers fitted on a feature cache (``fxtl fit-head``).

Modules, by concern: :mod:`~fxtl.heads.registry` (names, estimators, search spaces),
:mod:`~fxtl.heads.config` (:class:`HeadConfig`: what to fit), :mod:`~fxtl.heads.planning`
(which rows select, fit and report), :mod:`~fxtl.heads.search` (how the search scales with
rows), :mod:`~fxtl.heads.grid` (scoring candidates), :mod:`~fxtl.heads.streaming` (caches too
large for memory), :mod:`~fxtl.heads.dask_backend` (where candidate fits run),
:mod:`~fxtl.heads.persistence` (head.skops + head.json), :mod:`~fxtl.heads.result`
(:class:`FitResult`), :mod:`~fxtl.heads.runs` (where and how a run folder is saved) and
:mod:`~fxtl.heads.fitting` (:func:`fit_head` / :func:`fit_heads`).
"""
import importlib

# public name -> submodule (imported on first use: ``import fxtl.heads.registry``, which the CLI
# does for --model's choices, must not pull in the search and its estimators)
_API = {"FitResult": "result", "fit_head": "fitting", "fit_heads": "fitting",
        "HeadConfig": "config", "parse_budget": "config", "Head": "model",
        "load_head": "persistence", "save_head": "persistence", "HeadPlan": "planning",
        "plan_head": "planning", "destination": "runs", "save_run": "runs", "save_runs": "runs",
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
