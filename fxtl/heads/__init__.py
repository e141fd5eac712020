"""Heads: scikit-learn classifiers fitted on a feature cache (``fxtl fit-head``).

Modules, by concern: :mod:`~fxtl.heads.registry` (names, estimators, search spaces),
:mod:`~fxtl.heads.planning` (which rows select, fit and report), :mod:`~fxtl.heads.search`
(how the search scales with rows), :mod:`~fxtl.heads.streaming` (caches too large for memory),
:mod:`~fxtl.heads.dask_backend` (where candidate fits run), :mod:`~fxtl.heads.persistence`
(head.skops + head.json), :mod:`~fxtl.heads.runs` (the run folder) and
:mod:`~fxtl.heads.fitting` (:func:`fit_head` / :func:`fit_heads`).
"""
from .fitting import FitResult, fit_head, fit_heads, parse_budget
from .model import Head
from .persistence import load_head, save_head
from .planning import SplitPlan, plan_splits
from .registry import HeadSpec, build_pipeline, get_head, head_names, list_heads, register_head
from .search import choose_strategy

__all__ = ["FitResult", "fit_head", "fit_heads", "parse_budget", "Head", "load_head", "save_head",
           "SplitPlan", "plan_splits", "HeadSpec", "build_pipeline", "get_head", "head_names",
           "list_heads", "register_head", "choose_strategy"]
