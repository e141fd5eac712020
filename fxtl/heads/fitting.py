"""Fit heads on a feature cache and evaluate them honestly; saving runs is a separate step.

A head is a plain scikit-learn estimator: a :class:`~sklearn.pipeline.Pipeline` of optional L2
normalisation, ``StandardScaler``, optional PCA and the estimator named in the registry
(:mod:`fxtl.heads.registry`), fitted on class names. What to fit is one value, a
:class:`~fxtl.heads.config.HeadConfig`. :func:`fit_heads` returns a :class:`FitResult` per head:
``.estimator`` is the Pipeline, ``.metrics`` say what was done: which rows chose the
hyper-parameters and which were reported on (:mod:`fxtl.heads.planning`), how the search scaled
(:mod:`fxtl.heads.search`), how long it took, and the config. :func:`fxtl.heads.runs.save_runs`
writes the run folders.

Examples
--------
>>> from fxtl.heads import HeadConfig, fit_heads, save_runs, destination
>>> cfg = HeadConfig(models=("logreg", "svm"), seed=1)
>>> results = fit_heads("cache/hymenoptera-lite0-1e2b80d0e2303460.h5", config=cfg)  # doctest: +SKIP
>>> results[0].metrics["split"], round(results[0].metrics["accuracy"], 3)          # doctest: +SKIP
('val', 0.948)
>>> save_runs(results, destination(runs_dir="runs"))                               # doctest: +SKIP
"""
from __future__ import annotations

import contextlib
import sys
import time
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence

import numpy as np

from .._util import now_iso, versions
from ..data.splits import RunRows, run_rows
from ..errors import ParameterError
from ..features.cache_guard import guarded
from ..features.store import FeatureCache, load_features
from ..report.metrics import classification_metrics
from ..runtime import release_freed_memory
from .config import HeadConfig, parse_budget
from .dask_backend import SearchBackend
from .grid import borrow_cores
from .layers import LayerChoice, choose_layers, features_name, layer_matrix
from .model import Head
from .persistence import load_head
from .planning import HeadPlan, plan_head
from . import side_by_side
from .registry import HEADS, TORCH_MIN_VALUES, HeadSpec, get_head
from .result import FitResult
from .runs import Destination, check_destination, destination, save_runs
from .search import Progress, fit_in_memory, preload, workers_for
from .source import LARGE_ROWS, RowSource, open_source
from .streaming import fit_streaming

__all__ = ["FitResult", "HeadConfig", "fit_head", "fit_heads", "parse_budget", "stop_workers",
           "load_head", "LARGE_ROWS"]

# The "where to write" keywords fit_head and fit_heads still take (see fxtl.heads.runs.destination).
_WHERE = ("run_dir", "runs_dir", "cache_dir", "run_name", "save")


def stop_workers() -> None:
    """Stop joblib's reusable loky worker processes now (they outlive a search otherwise).

    fxtl's own search runs in threads; a loky pool exists only if something in this process
    started one (scikit-learn with ``n_jobs``), and importing loky just to find none costs time.
    """
    if "joblib.externals.loky.reusable_executor" not in sys.modules:
        return
    from joblib.externals.loky import get_reusable_executor

    with contextlib.suppress(Exception):
        get_reusable_executor().shutdown(wait=False, kill_workers=True)


def fit_heads(cache: str | Path | FeatureCache, *, config: HeadConfig | None = None,
              progress: Progress | None = None, log: Callable[[str], None] | None = None,
              **options: Any) -> list[FitResult]:
    """Fit every head of ``config.models`` on one cache (read once, its rows planned once).

    Parameters
    ----------
    cache : path or FeatureCache
        A cache written by ``fxtl extract``.
    config : HeadConfig, optional
        What to fit (default ``HeadConfig()``: logreg with a search).
    progress : callable, optional
        ``progress(done, total, model)`` after each candidate.
    log : callable, optional
        Receives one-line notes (a skipped head, the rows fitted).
    **options
        Fields of :class:`HeadConfig` (``models=["all"]``, ``seed=1``...), overriding ``config``;
        and, to save as the fit ends, the keywords of :func:`fxtl.heads.runs.destination`
        (``runs_dir``, ``cache_dir``, ``run_name``, ``save``): a named folder that is taken is
        refused before the fit starts.

    ``budget`` is shared by the heads: each gets the time left divided by the heads left. For
    caches above ``large_threshold`` rows, heads without a scalable form (kNN) are skipped with a
    note.

    Returns
    -------
    list of FitResult
        One per head, in ``config.models`` order; ``.run_dir`` is set when saved.
    """
    where = _destination(options)
    return _fit_all(cache, _config(config, options), where, progress=progress, log=log)


def fit_head(cache: str | Path | FeatureCache, *, config: HeadConfig | None = None,
             model: str | None = None, progress: Progress | None = None,
             log: Callable[[str], None] | None = None, **options: Any) -> FitResult:
    """Fit one head on a feature cache and evaluate it honestly.

    Parameters
    ----------
    cache : path or FeatureCache
        A cache written by ``fxtl extract``.
    config : HeadConfig, optional
        What to fit (default ``HeadConfig()``).
    model : str, optional
        A registered head (``logreg``, ``svm``, ``linear-svm``, ``mlp``, ``knn``), overriding
        ``config.models``; ``"all"`` fits every head and returns the one with the best
        selection score (the reported split chooses nothing, so its score stays honest).
    progress, log : callable, optional
        As for :func:`fit_heads`.
    **options
        Fields of :class:`HeadConfig` (``params``, ``search``, ``seed``, ``jobs``,
        ``test_size``, ``cv_folds``, ``l2_normalize``, ``pca``, ``large_threshold``,
        ``backend``, ``scheduler``, ``budget``, ``solver``), and the "where to write" keywords
        of :func:`fxtl.heads.runs.destination`: nothing is written unless ``run_dir`` (this
        exact folder), ``runs_dir`` or ``cache_dir`` (a new folder in it, or in its ``runs/``,
        named ``run_name`` if given) is passed.

    Returns
    -------
    FitResult
        ``.estimator`` (the fitted Pipeline), ``.head`` (it plus class names and provenance),
        ``.metrics`` (the ``metrics.json`` content, with the ``config``), ``.rows``
        (``rows.json``), ``.run_dir`` and ``.head_path`` once saved.

    Examples
    --------
    >>> res = fit_head("cache/hymenoptera-lite0-1e2b80d0e2303460.h5", model="svm")  # doctest: +SKIP
    >>> res.metrics["best_params"]                                                  # doctest: +SKIP
    {'C': 10.0, 'gamma': 2.34375e-05}
    """
    where = _destination(options)
    if model is not None:
        options["models"] = (model,)
    results = _fit_all(cache, _config(config, options), where, progress=progress, log=log)
    return results[0] if len(results) == 1 else _best(results)


def _destination(options: dict[str, Any]) -> Destination | None:
    """Take the "where to write" keywords out of ``options``; the rule is in fxtl.heads.runs."""
    return destination(**{k: options.pop(k) for k in _WHERE if k in options})


def _config(config: HeadConfig | None, options: Mapping[str, Any]) -> HeadConfig:
    if config is not None and not isinstance(config, HeadConfig):
        raise ParameterError("config", f"config must be a HeadConfig, got {type(config).__name__}")
    return (config or HeadConfig()).replace(**options)


def _best(results: Sequence[FitResult]) -> FitResult:
    """The result with the best selection score (ties: the first in registry order)."""
    scored = [r for r in results if r.metrics.get("selection_score") is not None]
    if not scored:
        raise ParameterError("model", "several heads were fitted but none was selected by a "
                             "search (search=False), so nothing honest chooses among them; use "
                             "fit_heads to get them all")
    best = max(scored, key=lambda r: r.metrics["selection_score"])
    others = ", ".join(f"{r.metrics['model']} {r.metrics['selection_score']:.4f}" for r in scored)
    best.metrics["notes"].append(f"chosen among {len(results)} heads by selection score "
                                 f"({others}); the reported split chose nothing")
    return best


@guarded()  # each cache probed once for the call, not once per streamed pass
def _fit_all(cache: str | Path | FeatureCache, cfg: HeadConfig, where: Destination | None, *,
             progress: Progress | None, log: Callable[[str], None] | None) -> list[FitResult]:
    check_destination(where, cfg.models)
    log = log or (lambda msg: None)
    runner = SearchBackend(cfg.backend, cfg.scheduler, log=log)
    source = open_source(cache, large_threshold=cfg.large_threshold)
    names = list(cfg.models)
    if source.large:
        names = _scalable(names, source, log)
        if cfg.pca:
            raise ParameterError("pca", f"pca is not supported for caches above large_threshold "
                                 f"({source.n:,} rows); drop pca")
    plan = plan_head(source.labels, source.split, paths=source.paths, seed=cfg.seed,
                     test_size=cfg.test_size, cv_folds=cfg.cv_folds, search=cfg.search,
                     source=str(source.path) if source.path else "the cache",
                     class_names=source.class_names)
    source, choice = _choose_layers(cache, source, plan, cfg, log)

    def started(name: str) -> None:
        log(f"fxtl: fitting {name} on {len(plan.fit_rows)} rows (report: {plan.eval_split})")

    def finish(res: FitResult) -> FitResult:
        res.metrics["layers"] = choice.layers
        res.metrics["layer_selection"] = dict(choice)
        return res

    t_start = time.perf_counter()
    results = []
    workers = _side_by_side(cfg, names, source, plan, runner)
    with contextlib.closing(runner):
        if workers > 1:
            def work(name: str, report: Progress | None, spare) -> FitResult:
                own = cfg.for_model(name)
                borrow_cores(spare)  # threads beyond the first only on cores left idle
                res = _fit_one(source, name, plan=plan, config=own.replace(jobs=workers),
                               runner=runner, budget=None, progress=report)
                # the config as asked, not the worker's jobs
                res.config, res.metrics["config"] = own, own.to_dict()
                res.metrics["notes"].append(f"fitted in a worker process, {workers} heads at a "
                                            "time on a core each (more once others finish)")
                return finish(res)

            preload([get_head(n) for n in names])  # shared by the workers, not each one's
            order = sorted(names, key=lambda n: (_SLOWEST_FIRST.index(n)
                                                 if n in _SLOWEST_FIRST else -1))
            done = side_by_side.run(order, work, workers=workers, progress=progress,
                                    on_start=started)
            results = [done[name] for name in names]
        else:
            for i, name in enumerate(names):
                share = None
                if cfg.budget is not None:
                    left = max(0.0, cfg.budget - (time.perf_counter() - t_start))
                    share = left / (len(names) - i)
                started(name)
                results.append(finish(_fit_one(source, name, plan=plan, config=cfg.for_model(name),
                                               runner=runner, budget=share, progress=progress)))
                release_freed_memory()  # the next head starts from what is in use, not the peak
    if where is not None:
        save_runs(results, where)
    return results


# Below this many fit rows every head takes a second or so and heads run one at a time: forking
# the workers costs about what it saves (hymenoptera, 245 rows: 8.6-9.0 s side by side against
# 6.7-8.7 s; digits, 1,000 rows: 18.9-20.4 s against 27.8-29.8 s; benchmarks/heads_classes.py).
SIDE_BY_SIDE_ROWS = 500
# Heads fitted side by side start in this order, so that the slowest do not start last (measured
# at 1,000 rows of 10 classes: linear-svm, logreg and mlp take 5-7 s, svm 2 s, knn 0.2 s on one
# core); heads not named here (registered by a user) start first.
_SLOWEST_FIRST = ("linear-svm", "logreg", "mlp", "svm", "knn")


def _side_by_side(cfg: HeadConfig, names: Sequence[str], source: RowSource, plan: HeadPlan,
                  runner: SearchBackend) -> int:
    """How many heads are fitted at a time in worker processes (1: one after another here).

    Side by side where that only fills idle cores: several heads, ``jobs`` allowing several
    cores, forking available, at least :data:`SIDE_BY_SIDE_ROWS` fit rows, rows few enough that
    BLAS runs on one core anyway (below
    :data:`~fxtl.heads.registry.TORCH_MIN_VALUES` values, so no torch solver either), the
    searches in this process (not a Dask cluster), and no time budget to share out in order.
    """
    n_values = len(plan.fit_rows) * source.dim
    if (len(names) < 2 or len(plan.fit_rows) < SIDE_BY_SIDE_ROWS or source.large
            or cfg.budget is not None or runner.name != "loky"
            or cfg.solver == "torch" or n_values >= TORCH_MIN_VALUES
            or not side_by_side.available()):
        return 1
    return min(len(names), workers_for(cfg.jobs))


def _choose_layers(cache: str | Path | FeatureCache, source: RowSource, plan: HeadPlan,
                   cfg: HeadConfig, log: Callable[[str], None]) -> tuple[RowSource, LayerChoice]:
    """The layers the heads are fitted on, and a source whose features are their concatenation
    (``source`` itself when that is ``/features`` alone)."""
    first = features_name(source.attrs)
    plain = LayerChoice(layers=[first], steps=[], selection="none", candidates=[first])
    stored = list(source.attrs.get("layers") or [])
    if cfg.layers == "penultimate" or (cfg.layers == "auto" and not stored):
        return source, plain
    if source.large:
        if cfg.layers == "auto":
            plan.notes.append(f"{source.n:,} rows > large_threshold: fitted on /features only "
                              "(layer choice needs the rows in memory)")
            return source, plain
        raise ParameterError("layers", f"{source.path} has {source.n:,} rows, above "
                             "large_threshold: heads on several layers need them in memory; "
                             "pass layers='penultimate' or raise large_threshold")
    fc = cache if isinstance(cache, FeatureCache) else load_features(source.path)
    choice = choose_layers(fc, plan, layers=cfg.layers, seed=cfg.seed)
    log(f"fxtl: layers {', '.join(choice.layers)} (chosen on {choice['selection']})")
    if choice.layers == [first]:
        return source, choice
    plan.notes.append(f"fitted on layers {', '.join(choice.layers)} "
                      f"({'chosen by a probe on ' + choice['selection'] if cfg.layers == 'auto' else 'as given'})")
    X = layer_matrix(fc, choice.layers)
    attrs = {**source.attrs, "head_layers": choice.layers}
    return RowSource(path=source.path, attrs=attrs, labels=source.labels, split=source.split,
                     class_names=source.class_names, dim=int(X.shape[1]), paths=source.paths,
                     features=X, large=False), choice


def _scalable(names: list[str], source: RowSource, log: Callable[[str], None]) -> list[str]:
    skipped = [n for n in names if HEADS[n].stream is None]
    if skipped and len(skipped) == len(names):
        raise ParameterError("large_threshold", f"{source.path} has {source.n:,} rows; "
                             f"{', '.join(skipped)} does not scale to that, use logreg, linear-svm "
                             "or mlp (or raise large_threshold)")
    if skipped:
        log(f"fxtl: skipping {', '.join(skipped)}: no scalable form for {source.n:,} rows")
    return [n for n in names if n not in skipped]


def _provenance(source: RowSource) -> dict[str, Any]:
    a = source.attrs
    return {"backbone": a.get("backbone"), "architecture": a.get("architecture"),
            "weights_sha256": a.get("weights_sha256"), "preprocessing": a.get("preprocessing"),
            "layer": a.get("layer"), "precision": a.get("precision"), "graph": a.get("graph"),
            **({"layers": list(a["head_layers"])} if a.get("head_layers") else {}),
            "feature_dim": source.dim, "cache_fingerprint": a.get("fingerprint"),
            "dataset": source.dataset, "cache": str(source.path) if source.path else None}


def _fit_one(source: RowSource, name: str, *, plan: HeadPlan, config: HeadConfig,
             runner: SearchBackend, budget: float | None, progress: Progress | None) -> FitResult:
    spec = get_head(name)
    notes = list(plan.notes)
    t0 = time.perf_counter()
    if source.large:
        notes.append(f"{source.n:,} rows > large_threshold: {spec.stream.description} instead of "
                     f"{spec.estimator.split(':')[1]}")
        pipeline, info = fit_streaming(source, spec, plan=plan, params=dict(config.params),
                                       search=config.search, seed=config.seed,
                                       l2_normalize=config.l2_normalize, notes=notes)
        info["search_backend"] = "streamed in this process"
        if runner.name != "loky":
            notes.append(f"backend {runner.name} does not apply to a streamed fit (one pass over "
                         "the file updates every candidate); fitted in this process")
    else:
        # The search may use about two thirds of the head's share; the final fit takes the rest.
        deadline = t0 + 0.65 * budget if budget is not None else None
        pipeline, info = fit_in_memory(source, spec, plan=plan, config=config, notes=notes,
                                       runner=runner, deadline=deadline, progress=progress)
    head = Head(model=name, pipeline=pipeline, class_names=list(source.class_names),
                provenance=_provenance(source))
    t1 = time.perf_counter()
    y_true, scores = source.scores_on(head, plan.eval_rows)
    predict_seconds = time.perf_counter() - t1
    metrics = _metrics(source, head, spec, plan=plan, info=info, y_true=y_true, scores=scores,
                       config=config, runner=runner, notes=notes, predict_seconds=predict_seconds)
    metrics["budget_seconds"] = round(budget, 3) if budget is not None else None
    paths = source.paths if source.paths is not None else [""] * source.n
    return FitResult(head=head, metrics=metrics, config=config,
                     rows=_rows(source, plan, metrics["selection"]),
                     predictions={"rows": np.asarray(plan.eval_rows),
                                  "paths": [paths[int(r)] for r in plan.eval_rows],
                                  "y_true": y_true, "y_pred": scores.argmax(axis=1),
                                  "scores": scores})


def _rows(source: RowSource, plan: HeadPlan, selection: str) -> RunRows:
    """Which images the head learned from, selected on and is reported on (``rows.json``)."""
    paths = source.paths if source.paths is not None else [""] * source.n
    fit_split = ("train" if plan.eval_split == "holdout"
                 else "+".join(sorted(set(source.split[plan.fit_rows].tolist()))))
    if selection == "none":
        sel = None
    elif selection == "val" and plan.val_fold is not None:
        sel = ("val", plan.search_rows[plan.val_fold == 0])
    else:  # k-fold CV or a held-out part: rows of the fit set
        sel = (selection, plan.fit_rows)
    fp = source.attrs.get("data_fingerprint") or f"cache:{source.attrs.get('fingerprint')}"
    return run_rows(paths, data_fingerprint=str(fp), train=(fit_split, plan.fit_rows),
                    selection=sel, report=(plan.eval_split, plan.eval_rows))


def _metrics(source: RowSource, head: Head, spec: HeadSpec, *, plan: HeadPlan, info: dict,
             y_true, scores, config: HeadConfig, runner: SearchBackend, notes: list[str],
             predict_seconds: float) -> dict[str, Any]:
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
        "n_fit": int(len(plan.fit_rows)), "seed": int(config.seed), "scalable": source.large,
        "l2_normalize": bool(config.l2_normalize), "pca": config.pca,
        "backend": runner.name, "search_backend": info.get("search_backend", "none"),
        "dask": dict(runner.info) if info.get("search_backend") == "dask" else None,
        "solver": info.get("solver", "sklearn"), "notes": notes,
        "scores": "probability" if head.calibrated else "softmax of decision margins",
        "config": config.to_dict(), "created": now_iso(), "versions": versions(),
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
