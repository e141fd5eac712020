"""Fit heads on a feature cache, evaluate them honestly, and (when told where) save run folders.

A head is a plain scikit-learn estimator: a :class:`~sklearn.pipeline.Pipeline` of optional L2
normalisation, ``StandardScaler``, optional PCA and the estimator named in the registry
(:mod:`fxtl.heads.registry`), fitted on class names. :func:`fit_head` returns a
:class:`FitResult` whose ``.estimator`` is that Pipeline and whose ``.metrics`` say what was done:
which rows chose the hyper-parameters and which were reported on (:mod:`fxtl.heads.planning`),
how the search scaled (:mod:`fxtl.heads.search`), and how long it took.

Nothing is written unless the caller names a place: ``run_dir`` (this exact folder),
``runs_dir`` (a new folder inside it) or ``cache_dir`` (its ``runs/``), as ``fxtl fit-head`` does.

Examples
--------
>>> from fxtl.heads import fit_head
>>> res = fit_head("cache/hymenoptera-lite0-1e2b80d0e2303460.h5", model="logreg")  # doctest: +SKIP
>>> res.metrics["split"], res.metrics["selection"], round(res.metrics["accuracy"], 3)  # doctest: +SKIP
('val', 'cv5', 0.948)
>>> res.estimator.predict_proba(X)                                                # doctest: +SKIP
"""
from __future__ import annotations

import contextlib
import re
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence

import numpy as np

from .._util import now_iso, slug, versions
from ..errors import FxtlError, ParameterError
from ..features.store import FeatureCache
from ..runtime import release_freed_memory
from .dask_backend import BACKENDS, SearchBackend
from .model import Head
from .persistence import HEAD_FORMAT, HEAD_FORMAT_VERSION, load_head, save_head
from .planning import SplitPlan, plan_splits
from .registry import (HEADS, HeadSpec, accepted_params, build_pipeline, check_params, get_head,
                       head_names, list_heads, parse_params, register_head, SOLVERS)
from .runs import claim_run_dir, new_run_dir, write_run
from .search import Progress, fit_in_memory
from .source import LARGE_ROWS, RowSource, open_source
from .streaming import fit_streaming

__all__ = ["FitResult", "fit_head", "fit_heads", "parse_budget", "stop_workers", "LARGE_ROWS",
           # also here, so code importing the head API from this module keeps working
           "HEADS", "BACKENDS", "HEAD_FORMAT", "HEAD_FORMAT_VERSION", "Head", "HeadSpec",
           "SplitPlan", "build_pipeline", "check_params", "get_head", "head_names", "list_heads",
           "load_head", "parse_params", "plan_splits", "register_head", "save_head"]



@dataclass
class FitResult:
    """What :func:`fit_head` returns: the fitted :class:`Head` and its metrics (``metrics.json``).

    ``estimator`` is the fitted scikit-learn Pipeline (``classes_`` are class names).
    """

    head: Head
    metrics: dict[str, Any]
    run_dir: Path | None = None
    head_path: Path | None = None
    # Rows of the reported split with true/predicted class indices and the score matrix.
    predictions: dict[str, np.ndarray] = field(default_factory=dict, repr=False)

    @property
    def estimator(self):
        return self.head.pipeline

    @property
    def pipeline(self):
        return self.head.pipeline

    def to_dict(self) -> dict[str, Any]:
        """One entry of ``fxtl fit-head --json``'s ``runs``."""
        keys = ("model", "split", "accuracy", "balanced_accuracy", "macro_f1", "n", "fit_seconds",
                "search_seconds", "predict_seconds", "selection", "selection_score", "best_params",
                "n_candidates", "trainable_params", "n_fit", "scalable", "estimator", "backend",
                "search_backend", "solver", "strategy", "budget_seconds", "notes")
        d = {k: self.metrics.get(k) for k in keys}
        d["head"] = str(self.head_path) if self.head_path else None
        d["run_dir"] = str(self.run_dir) if self.run_dir else None
        return d


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
        m = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*(s|sec|m|min|h)?\s*", str(text))
        if not m:
            raise ParameterError("budget", f"budget {text!r} is not a duration; use e.g. 60s, 2m or 1h")
        value = float(m.group(1)) * {None: 1, "s": 1, "sec": 1, "m": 60, "min": 60, "h": 3600}[m.group(2)]
    if not value > 0:
        raise ParameterError("budget", f"budget must be > 0 seconds, got {text!r}")
    return value


def stop_workers() -> None:
    """Stop joblib's reusable loky worker processes now (they outlive a search otherwise).

    fxtl's own search runs in threads; a loky pool exists only if something in this process
    started one (scikit-learn with ``n_jobs``), and importing loky just to find none costs time.
    """
    import sys

    if "joblib.externals.loky.reusable_executor" not in sys.modules:
        return
    from joblib.externals.loky import get_reusable_executor

    with contextlib.suppress(Exception):
        get_reusable_executor().shutdown(wait=False, kill_workers=True)


def _resolve_names(models: Sequence[str]) -> list[str]:
    names: list[str] = []
    for m in models:
        for name in (head_names() if m == "all" else [m]):
            get_head(name)
            if name not in names:
                names.append(name)
    if not names:
        raise ParameterError("models", "no head model given; pass models=['logreg'] (or svm, "
                             "linear-svm, mlp, knn, all)")
    return names


def fit_heads(cache: str | Path | FeatureCache, *, models: Sequence[str] = ("logreg",),
              params: Mapping[str, Any] | None = None, search: bool = True, seed: int = 0,
              jobs: int | None = 1, test_size: float = 0.2, cv_folds: int = 5,
              l2_normalize: bool = False, pca: int | float | None = None,
              large_threshold: int = LARGE_ROWS, cache_dir: str | Path | None = None,
              runs_dir: str | Path | None = None, run_name: str | None = None, save: bool = True,
              backend: str = "loky", scheduler: Any = None, budget: float | str | None = None,
              progress: Progress | None = None, solver: str = "auto",
              log: Callable[[str], None] | None = None) -> list[FitResult]:
    """Fit several heads on one cache (loaded once); see :func:`fit_head` for the parameters.

    ``models`` may contain ``"all"`` (every registered head). ``budget`` (seconds, or ``"2m"``)
    is shared by the heads: each gets the time left divided by the heads left. For caches above
    ``large_threshold`` rows, heads without a scalable form (kNN) are skipped with a note.
    """
    names = _resolve_names(models)
    if solver not in SOLVERS:
        raise ParameterError("solver", f"unknown solver {solver!r}; choose one of {', '.join(SOLVERS)}")
    params = dict(params or {})
    if params:
        check_params(names, params)
    budget_s = parse_budget(budget)
    log = log or (lambda msg: None)
    runner = SearchBackend(backend, scheduler, log=log)
    source = open_source(cache, large_threshold=large_threshold)
    if source.large:
        names = _scalable(names, source, log)
        if pca:
            raise ParameterError("pca", f"pca is not supported for caches above large_threshold "
                                 f"({source.n:,} rows); drop pca")
    if runs_dir is None and cache_dir is not None:
        runs_dir = Path(cache_dir) / "runs"
    plan = plan_splits(source.labels, source.split, seed=seed, test_size=test_size,
                       cv_folds=cv_folds, search=search)
    where = Path(runs_dir) if (save and runs_dir is not None) else None
    stamp = time.strftime("%Y%m%d-%H%M%S")
    t_start = time.perf_counter()
    results = []
    with contextlib.closing(runner):
        for i, name in enumerate(names):
            share = None
            if budget_s is not None:
                share = max(0.0, budget_s - (time.perf_counter() - t_start)) / (len(names) - i)
            own = {k: v for k, v in params.items() if k in accepted_params(name)}
            log(f"fxtl: fitting {name} on {len(plan.fit_rows)} rows (report: {plan.eval_split})")
            res = _fit_one(source, name, plan=plan, params=own, search=search, seed=seed,
                           jobs=jobs, l2_normalize=l2_normalize, pca=pca, runner=runner,
                           budget=share, progress=progress, solver=solver)
            if where is not None:
                base = (f"{run_name}-{name}" if len(names) > 1 else run_name) if run_name else \
                    f"{slug(source.dataset)}-{slug(Path(str(source.attrs.get('backbone', 'x'))).name)}-{name}-{stamp}"
                write_run(res, new_run_dir(where, base, exact=bool(run_name)), source, plan)
            results.append(res)
            release_freed_memory()  # the next head starts from what is in use, not the peak
    return results


def _scalable(names: list[str], source: RowSource, log: Callable[[str], None]) -> list[str]:
    skipped = [n for n in names if HEADS[n].stream is None]
    if skipped and len(skipped) == len(names):
        raise ParameterError("large_threshold", f"{source.path} has {source.n:,} rows; "
                             f"{', '.join(skipped)} does not scale to that, use logreg, linear-svm "
                             "or mlp (or raise large_threshold)")
    if skipped:
        log(f"fxtl: skipping {', '.join(skipped)}: no scalable form for {source.n:,} rows")
    return [n for n in names if n not in skipped]


def fit_head(cache: str | Path | FeatureCache, *, model: str = "logreg",
             params: Mapping[str, Any] | None = None, search: bool = True, seed: int = 0,
             jobs: int | None = 1, test_size: float = 0.2, cv_folds: int = 5,
             l2_normalize: bool = False, pca: int | float | None = None,
             large_threshold: int = LARGE_ROWS, run_dir: str | Path | None = None,
             runs_dir: str | Path | None = None, cache_dir: str | Path | None = None,
             run_name: str | None = None, save: bool = True, backend: str = "loky",
             scheduler: Any = None, budget: float | str | None = None,
             progress: Progress | None = None, solver: str = "auto") -> FitResult:
    """Fit one head on a feature cache and evaluate it honestly; save a run folder if told where.

    Parameters
    ----------
    cache : path or FeatureCache
        A cache written by ``fxtl extract``.
    model : str
        A registered head (``logreg``, ``svm``, ``linear-svm``, ``mlp``, ``knn``).
    params : mapping, optional
        Estimator parameters (fixed; removed from the search space).
    search : bool
        Hyper-parameter search (:mod:`fxtl.heads.search` chooses how); ``False`` fits defaults.
    seed : int
        Seeds the folds, the hold-out, subsamples, PCA and the estimators.
    jobs : int, optional
        Parallel search jobs (joblib; -1 = all cores).
    test_size : float
        Hold-out fraction when the cache has only a train split.
    cv_folds : int
        k of the stratified k-fold CV used on small data (lowered when a class is smaller).
    l2_normalize : bool
        L2-normalise features before scaling.
    pca : int or float, optional
        PCA components (or variance fraction) after scaling.
    large_threshold : int
        Above this many rows, use the scalable streaming estimators.
    run_dir : path, optional
        Write the run folder here (a new or empty folder).
    runs_dir : path, optional
        Write the run folder inside this folder (named ``run_name`` or
        ``<dataset>-<backbone>-<model>-<time>``).
    cache_dir : path, optional
        Same as ``runs_dir=cache_dir/"runs"`` (what ``fxtl fit-head`` passes).
    run_name : str, optional
        The run folder's name inside ``runs_dir``; an existing folder is refused.
    save : bool
        ``False`` writes nothing even when a place is given.
    backend : {"loky", "threading", "dask"}
        Where the search's candidate fits run (see :mod:`fxtl.heads.dask_backend`).
    scheduler : str or distributed.Client, optional
        With ``backend="dask"``: the scheduler address or a connected ``Client``.
    budget : float or str, optional
        Seconds (or ``"60s"``, ``"2m"``) the search may take; it stops between candidates and
        ``metrics["strategy"]["stopped_by_budget"]`` says so.
    progress : callable, optional
        ``progress(done, total, model)`` after each candidate.
    solver : {"auto", "sklearn", "torch"}
        Which estimator solves logreg, linear-svm and mlp: scikit-learn's, or the same model in
        torch (L-BFGS or Adam, every core, CUDA when present). ``"auto"`` takes torch on large
        data (see :func:`fxtl.heads.registry.resolve_solver`); ``metrics["solver"]`` says which.

    Returns
    -------
    FitResult
        ``.estimator`` (the fitted Pipeline), ``.head`` (it plus class names and provenance),
        ``.metrics`` (the ``metrics.json`` content), ``.run_dir``, ``.head_path``.

    Examples
    --------
    >>> res = fit_head("cache/hymenoptera-lite0-1e2b80d0e2303460.h5", model="svm")  # doctest: +SKIP
    >>> res.metrics["best_params"]                                                  # doctest: +SKIP
    {'C': 10.0, 'gamma': 2.34375e-05}
    """
    if model == "all":
        raise ParameterError("model", "fit_head fits one model; use fit_heads(cache, models=['all'])")
    res = fit_heads(cache, models=[model], params=params, search=search, seed=seed, jobs=jobs,
                    test_size=test_size, cv_folds=cv_folds, l2_normalize=l2_normalize, pca=pca,
                    large_threshold=large_threshold, cache_dir=None if run_dir else cache_dir,
                    runs_dir=None if run_dir else runs_dir, run_name=run_name,
                    save=save and run_dir is None, backend=backend, scheduler=scheduler,
                    budget=budget, progress=progress, solver=solver)[0]
    if run_dir is not None and save:
        source = open_source(cache, large_threshold=large_threshold)
        plan = plan_splits(source.labels, source.split, seed=seed, test_size=test_size,
                           cv_folds=cv_folds, search=search)
        write_run(res, claim_run_dir(Path(run_dir)), source, plan)
    return res


def _provenance(source: RowSource) -> dict[str, Any]:
    a = source.attrs
    return {"backbone": a.get("backbone"), "architecture": a.get("architecture"),
            "weights_sha256": a.get("weights_sha256"), "preprocessing": a.get("preprocessing"),
            "layer": a.get("layer"), "precision": a.get("precision"), "graph": a.get("graph"),
            "feature_dim": source.dim, "cache_fingerprint": a.get("fingerprint"),
            "dataset": source.dataset, "cache": str(source.path) if source.path else None}


def _fit_one(source: RowSource, name: str, *, plan: SplitPlan, params: dict, search: bool,
             seed: int, jobs: int | None, l2_normalize: bool, pca, runner: SearchBackend,
             budget: float | None = None, progress: Progress | None = None,
             solver: str = "auto") -> FitResult:
    spec = get_head(name)
    notes = list(plan.notes)
    t0 = time.perf_counter()
    if source.large:
        notes.append(f"{source.n:,} rows > large_threshold: {spec.stream.description} instead of "
                     f"{spec.estimator.split(':')[1]}")
        pipeline, info = fit_streaming(source, spec, plan=plan, params=params, search=search,
                                       seed=seed, l2_normalize=l2_normalize, notes=notes)
        info["search_backend"] = "streamed in this process"
        if runner.name != "loky":
            notes.append(f"backend {runner.name} does not apply to a streamed fit (one pass over "
                         "the file updates every candidate); fitted in this process")
    else:
        # The search may use about two thirds of the head's share; the final fit takes the rest.
        deadline = t0 + 0.65 * budget if budget is not None else None
        pipeline, info = fit_in_memory(source, spec, plan=plan, params=params, seed=seed,
                                       jobs=jobs, l2_normalize=l2_normalize, pca=pca, notes=notes,
                                       runner=runner, deadline=deadline, progress=progress,
                                       solver=solver)
    head = Head(model=name, pipeline=pipeline, class_names=list(source.class_names),
                provenance=_provenance(source))
    t1 = time.perf_counter()
    y_true, scores = source.scores_on(head, plan.eval_rows)
    predict_seconds = time.perf_counter() - t1
    metrics = _metrics(source, head, spec, plan=plan, info=info, y_true=y_true, scores=scores,
                       seed=seed, l2_normalize=l2_normalize, pca=pca, runner=runner, notes=notes,
                       predict_seconds=predict_seconds)
    metrics["budget_seconds"] = round(budget, 3) if budget is not None else None
    return FitResult(head=head, metrics=metrics,
                     predictions={"rows": np.asarray(plan.eval_rows), "y_true": y_true,
                                  "y_pred": scores.argmax(axis=1), "scores": scores})


def _metrics(source: RowSource, head: Head, spec: HeadSpec, *, plan: SplitPlan, info: dict,
             y_true, scores, seed: int, l2_normalize: bool, pca, runner: SearchBackend,
             notes: list[str], predict_seconds: float) -> dict[str, Any]:
    from ..report.metrics import classification_metrics

    pipeline = head.pipeline
    m = classification_metrics(y_true, scores.argmax(axis=1), head.class_names)
    timings = source.attrs.get("timings") or {}
    return {
        "kind": "head", "model": spec.name, "estimator": _estimator_name(pipeline.steps[-1][1]),
        "pipeline": [n for n, _ in pipeline.steps],
        "backbone": source.attrs.get("backbone"), "dataset": source.dataset,
        "dataset_fingerprint": source.attrs.get("fingerprint"),
        "cache": str(source.path) if source.path else None,
        "split": plan.eval_split, **m,
        "fit_seconds": round(info["search_seconds"] + info["refit_seconds"], 4),
        "search_seconds": round(info["search_seconds"], 4),
        "refit_seconds": round(info["refit_seconds"], 4),
        "predict_seconds": round(predict_seconds, 4),
        "extract_seconds": timings.get("compute_seconds") if isinstance(timings, dict) else None,
        "trainable_params": _trainable_params(pipeline.steps[-1][1]),
        "best_params": info["best_params"], "selection": info["selection"],
        "selection_score": info.get("selection_score"), "n_candidates": info["n_candidates"],
        "strategy": info.get("strategy"), "search": info.get("search", []),
        "n_fit": int(len(plan.fit_rows)), "seed": int(seed), "scalable": source.large,
        "l2_normalize": bool(l2_normalize), "pca": pca,
        "backend": runner.name, "search_backend": info.get("search_backend", "none"),
        "dask": dict(runner.info) if info.get("search_backend") == "dask" else None,
        "solver": info.get("solver", "sklearn"), "notes": notes,
        "scores": "probability" if head.calibrated else "softmax of decision margins",
        "created": now_iso(), "versions": versions(),
    }


def _trainable_params(est) -> int:
    """Numbers the estimator learned (coefficients, weights, support vectors' duals)."""
    total = 0
    for cc in getattr(est, "calibrated_classifiers_", None) or []:
        inner = cc.estimator
        inner = getattr(inner, "estimator", inner) if type(inner).__name__ == "FrozenEstimator" else inner
        total += _trainable_params(inner) + 2 * len(cc.calibrators)
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
        inner = getattr(inner, "estimator", inner) if type(inner).__name__ == "FrozenEstimator" else inner
        return f"{type(inner).__name__} (Platt-calibrated)"
    return type(est).__name__
