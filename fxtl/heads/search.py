"""Hyper-parameter search that scales with rows, and the final fit.

:func:`choose_strategy` picks, from the number of rows and of rows per class:

* ``cv``: stratified k-fold over every selection row (small data: every row counts);
* ``holdout`` / ``val``: one held-out split (a stratified 20% of the fit rows, or the cache's
  ``val`` split) once every class has plenty of rows, so k-fold would only multiply the cost;
* with ``subsample``: candidates are compared on a stratified subsample of at most the head's
  ``search_rows`` training rows; the chosen candidate is then refitted on every fit row.

Logistic regression walks its C grid as a warm-started regularisation path (each fit starts from
the previous solution). The RBF SVM's final fit uses at most :data:`SVM_FIT_ROWS` rows (the kernel
costs grow with the square of the rows) and, like the linear SVM, is Platt-calibrated once, on
rows it was not fitted on. An optional time budget stops the search between candidates.
"""
from __future__ import annotations

import contextlib
import importlib
import os
import time
from dataclasses import dataclass
from typing import Any, Callable, Mapping

import numpy as np

from .grid import (GIL_BOUND, PATH_PATIENCE, SINGLE_THREADED, GridOutcome, fit_pipeline,
                   pick_best, prepare_folds, quiet_convergence, score_grid, uses_kernel_cache)
from .config import HeadConfig
from .dask_backend import SearchBackend
from .planning import HeadPlan
from .registry import (DataShape, HeadSpec, build_pipeline, estimator_params, import_estimator,
                       resolve_solver)
from .source import RowSource

__all__ = ["Strategy", "choose_strategy", "search_folds", "run_search", "fit_final",
           "quiet_convergence", "jsonable", "workers_for", "preload", "CV_MAX_ROWS", "PLENTY_PER_CLASS", "SVM_FIT_ROWS",
           "CALIBRATION_ROWS", "SMALL_VALUES", "Progress"]

# Up to this many fit rows, k-fold CV (every row helps choose); above, one held-out split.
CV_MAX_ROWS = 2_000
# ... or as soon as every class has this many fit rows.
PLENTY_PER_CLASS = 300
# Fraction of the fit rows held out to select on when there is no val split.
HOLDOUT_FRACTION = 0.2
# The RBF SVM's final fit sees at most this many rows.
SVM_FIT_ROWS = 6_000
# Above this many fit rows, SVMs are calibrated on held-out rows (one fit) instead of by k-fold.
CALIBRATION_SPLIT_ROWS = 2_000
# Rows held out for that calibration, at most.
CALIBRATION_ROWS = 2_000
# Below this many feature values, BLAS runs single-threaded and the search runs in threads:
# starting loky workers costs more than such fits, and spinning BLAS threads slow a busy machine.
SMALL_VALUES = 5_000_000

# run_search's path_param for kNN: every candidate from one neighbour query per fold.
KNN_VOTES = "knn-votes"
# (done, total, head name) -> None; called after every candidate.
Progress = Callable[[int, int, str], None]


@dataclass(frozen=True)
class Strategy:
    """How a head's candidates are compared: ``kind`` in ``cv``, ``holdout``, ``val``, ``none``;
    ``subsample`` is the number of training rows searched when it is below the available rows."""

    kind: str
    folds: int
    subsample: int | None

    @property
    def selection(self) -> str:
        """The ``selection`` value of ``metrics.json``."""
        return {"cv": f"cv{self.folds}", "holdout": "holdout20", "val": "val",
                "none": "none"}[self.kind]

    def describe(self, rows_searched: int) -> str:
        how = {"cv": f"{self.folds}-fold CV", "holdout": "one stratified 20% held-out split",
               "val": "the val split", "none": "no search"}[self.kind]
        if self.kind == "none":
            return how
        sub = f" on a stratified subsample of {rows_searched:,} rows, refit on all" if self.subsample else ""
        return f"grid, selected on {how}{sub}"


def choose_strategy(*, n_fit: int, min_class: int, selection: str, search_rows: int,
                    n_train: int | None = None,
                    plenty_per_class: int = PLENTY_PER_CLASS) -> Strategy:
    """The search for ``n_fit`` fit rows whose smallest class has ``min_class`` rows.

    ``selection`` is the plan's (``"val"``, ``"cv5"``, ``"none"``); ``n_train`` the rows a
    candidate may be fitted on (default ``n_fit``); ``search_rows`` the head's subsample cap;
    ``plenty_per_class`` the rows per class from which one held-out split replaces k-fold CV
    (the head's :attr:`~fxtl.heads.registry.HeadSpec.plenty_per_class`).

    Examples
    --------
    >>> choose_strategy(n_fit=300, min_class=100, selection="cv5", search_rows=4000).kind
    'cv'
    >>> s = choose_strategy(n_fit=20000, min_class=2000, selection="cv5", search_rows=4000)
    >>> s.kind, s.subsample
    ('holdout', 4000)
    >>> choose_strategy(n_fit=600, min_class=60, selection="cv5", search_rows=2000,
    ...                 plenty_per_class=50).kind
    'holdout'
    """
    if selection == "none":
        return Strategy("none", 0, None)
    if selection == "val":
        kind, folds = "val", 1
        n_train = n_train if n_train is not None else n_fit
    elif n_fit <= CV_MAX_ROWS and min_class < plenty_per_class:
        kind, folds = "cv", int(selection.removeprefix("cv") or 5)
        n_train = n_fit
    else:
        kind, folds = "holdout", 1
        n_train = int(n_fit * (1 - HOLDOUT_FRACTION))
    return Strategy(kind, folds, search_rows if n_train > search_rows else None)


def _stratified_take(rows: np.ndarray, y: np.ndarray, n: int, seed: int) -> np.ndarray:
    """A stratified subsample of ``n`` of ``rows`` (sorted), every class kept."""
    from sklearn.model_selection import train_test_split

    if n >= len(rows):
        return rows
    counts = np.bincount(y)
    if (counts[counts > 0] < 2).any():
        return np.sort(np.random.default_rng(seed).choice(rows, n, replace=False))
    kept, _ = train_test_split(rows, train_size=n, random_state=seed, stratify=y)
    return np.sort(kept)


def search_folds(strategy: Strategy, *, fit_rows: np.ndarray, labels: np.ndarray,
                 train_rows: np.ndarray | None = None, val_rows: np.ndarray | None = None,
                 seed: int = 0) -> list[tuple[np.ndarray, np.ndarray]]:
    """``[(train, test), ...]`` cache rows that each candidate is fitted and scored on."""
    from sklearn.model_selection import StratifiedKFold, train_test_split

    if strategy.kind == "val":
        tr = train_rows
        if strategy.subsample:
            tr = _stratified_take(tr, labels[tr], strategy.subsample, seed)
        return [(tr, val_rows)]
    if strategy.kind == "holdout":
        tr, te = train_test_split(fit_rows, test_size=HOLDOUT_FRACTION, random_state=seed,
                                  stratify=labels[fit_rows])
        if strategy.subsample:
            tr = _stratified_take(tr, labels[tr], strategy.subsample, seed)
            te = _stratified_take(te, labels[te], max(strategy.subsample // 4, 1), seed)
        return [(np.sort(tr), np.sort(te))]
    rows = fit_rows
    if strategy.subsample:
        rows = _stratified_take(rows, labels[rows], strategy.subsample, seed)
    skf = StratifiedKFold(n_splits=strategy.folds, shuffle=True, random_state=seed)
    return [(rows[a], rows[b]) for a, b in skf.split(rows, labels[rows])]


def jsonable(params: Mapping[str, Any]) -> dict[str, Any]:
    out = {}
    for k, v in params.items():
        k = k.removeprefix("est__")
        if isinstance(v, np.generic):
            v = v.item()
        out[k] = list(v) if isinstance(v, tuple) else v
    return out


def run_search(spec: HeadSpec, *, X: np.ndarray, y: np.ndarray,
               folds: list[tuple[np.ndarray, np.ndarray]], candidates: list[dict], fixed: dict,
               config: HeadConfig, parallel: contextlib.AbstractContextManager | None = None,
               deadline: float | None = None, progress: Progress | None = None,
               path_param: str | None = None, rounds: bool = True,
               small: bool = True) -> GridOutcome:
    """Score every candidate on ``folds`` (indices into ``X``/``y``); the best mean wins (ties:
    see :func:`fxtl.heads.grid.score_grid`). Stops between candidates once ``deadline``
    (``time.perf_counter()``) has passed, keeping what was tried.

    ``config`` gives the seed, l2_normalize, pca, jobs and solver (``"sklearn"`` or ``"torch"``,
    resolved) of the candidates' pipelines.

    By default the candidates are scored in this process (:mod:`fxtl.heads.grid`: each fold
    preprocessed once, threads for the fits); ``rounds=False`` hands the whole grid to
    scikit-learn's ``GridSearchCV`` inside ``parallel`` (a Dask cluster schedules it best; no
    budget stop then). ``small`` data runs ``jobs`` fits side by side on single-threaded BLAS.
    """
    if path_param == KNN_VOTES:
        return _knn_search(spec, X=X, y=y, folds=folds, candidates=candidates, fixed=fixed,
                           config=config, progress=progress)
    jobs = config.jobs

    def factory():
        pipe = build_pipeline(spec.name, params=fixed, seed=config.seed,
                              l2_normalize=config.l2_normalize, pca=config.pca, calibrate=False,
                              solver=_solver(config))
        if "polish" in pipe.steps[-1][1].get_params() and "polish" not in fixed:
            pipe.steps[-1][1].set_params(polish=False)  # candidates need predictions, not digits
        return pipe

    if not rounds:
        return _grid_search_cv(factory(), X=X, y=y, folds=folds, candidates=candidates,
                               jobs=jobs, parallel=parallel)
    template = factory().steps[-1][1]
    workers = workers_for(jobs)
    prepared = prepare_folds(factory, X=X, y=y, folds=folds,
                             kernel=uses_kernel_cache(template, candidates,
                                                      max(len(tr) for tr, _ in folds)),
                             workers=workers if small else 1)
    if not small and type(template).__name__ not in SINGLE_THREADED:
        workers = 1  # BLAS or torch already use every core
    if type(template).__name__ in GIL_BOUND:
        workers = 1
    warm = bool(path_param) and "warm_start" in template.get_params()
    # A regularisation path (ascending) stops once it falls, warm-started or not: the weakly
    # regularised end is the slowest to fit (liblinear's iterations grow with C).
    return score_grid(spec.name, prepared, candidates, warm=warm, workers=workers,
                      deadline=deadline, progress=progress,
                      patience=PATH_PATIENCE if path_param else None)


def _grid_search_cv(pipe, *, X, y, folds, candidates, jobs, parallel) -> GridOutcome:
    """The grid through scikit-learn's GridSearchCV (for a Dask cluster), chosen as
    :func:`fxtl.heads.grid.pick_best` chooses in this process."""
    from sklearn.model_selection import GridSearchCV

    scoring = {"accuracy": "accuracy"}
    if hasattr(pipe.steps[-1][1], "predict_proba"):
        scoring["nll"] = "neg_log_loss"
    gs = GridSearchCV(pipe, [{f"est__{k}": [v] for k, v in c.items()} for c in candidates],
                      cv=folds, n_jobs=jobs, refit=False, scoring=scoring, error_score="raise")
    with parallel or contextlib.nullcontext(), quiet_convergence() as conv:
        gs.fit(X, y)
    # GridSearchCV orders a list of grids as given: one candidate per grid.
    scores = [float(s) for s in gs.cv_results_["mean_test_accuracy"]]
    losses = ([-float(v) for v in gs.cv_results_["mean_test_nll"]] if "nll" in scoring
              else [None] * len(scores))
    return GridOutcome(candidates[pick_best(scores, losses)], scores, len(scores), False, conv)


def _solver(config: HeadConfig) -> str:
    """The estimator family a resolved config names ("auto" means scikit-learn's here)."""
    return "torch" if config.solver == "torch" else "sklearn"


def _knn_search(spec: HeadSpec, *, X, y, folds, candidates, fixed, config: HeadConfig,
                progress) -> GridOutcome:
    """Every (k, weights) candidate from one neighbour query per fold: the k nearest are a
    prefix of the largest k's, so scoring a candidate is a vote, not another search."""
    from sklearn.neighbors import NearestNeighbors

    k_max = max(int(c.get("n_neighbors", fixed.get("n_neighbors", 5))) for c in candidates)
    classes, codes = np.unique(y, return_inverse=True)
    per_fold = []
    for tr, te in folds:
        pipe = build_pipeline(spec.name, params=fixed, seed=config.seed,
                              l2_normalize=config.l2_normalize, pca=config.pca, calibrate=False)
        pre = pipe[:-1]
        Xtr, Xte = pre.fit_transform(X[tr]), pre.transform(X[te])
        k = min(k_max, len(tr))
        dist, idx = NearestNeighbors(n_neighbors=k).fit(Xtr).kneighbors(Xte)
        votes = codes[tr][idx]  # (n_test, k) class codes of the neighbours, nearest first
        row = []
        for c in candidates:
            kk = min(int(c.get("n_neighbors", fixed.get("n_neighbors", 5))), k)
            w = np.ones((len(te), kk))
            if c.get("weights", fixed.get("weights", "uniform")) == "distance":
                d = dist[:, :kk]
                with np.errstate(divide="ignore"):
                    w = 1.0 / d
                zero = (d == 0).any(axis=1)  # exact matches outvote everything (as sklearn)
                w[zero] = (d[zero] == 0).astype(float)
            score = np.zeros((len(te), len(classes)))
            np.add.at(score, (np.arange(len(te))[:, None], votes[:, :kk]), w)
            row.append(float((score.argmax(axis=1) == codes[te]).mean()))
        per_fold.append(row)
    scores = [float(v) for v in np.mean(per_fold, axis=0)]
    if progress:
        progress(len(candidates), len(candidates), spec.name)
    return GridOutcome(candidates[int(np.argmax(scores))], scores, len(candidates), False, [])


def fit_final(spec: HeadSpec, *, X_fit: np.ndarray, y_fit: np.ndarray, params: dict,
              config: HeadConfig, notes: list[str], rows: np.ndarray | None = None):
    """The final estimator on the fit rows, calibrated once when the head asks for it.

    ``config`` gives the seed, l2_normalize, pca and (resolved) solver.

    ``rows``: the fit rows are ``X_fit[rows]`` (taken only as needed, so a head that fits on a
    subsample never copies them all); ``y_fit`` is indexed like ``rows``.
    Returns ``(pipeline, rows_used)``: the RBF SVM uses at most :data:`SVM_FIT_ROWS` rows.
    """
    from sklearn.pipeline import Pipeline

    rows = np.arange(len(y_fit)) if rows is None else np.asarray(rows)
    seed, l2_normalize, pca, solver = config.seed, config.l2_normalize, config.pca, _solver(config)

    def take(idx=None):
        return X_fit[rows] if idx is None else X_fit[rows[idx]]

    n = len(y_fit)
    _, counts = np.unique(y_fit, return_counts=True)
    smallest = int(counts.min())
    calibrate = spec.calibrate and smallest >= 2
    if spec.calibrate and not calibrate:
        notes.append(f"{spec.name}: too few images per class to calibrate; scores are a softmax "
                     "of margins")
    cap = spec.max_fit_rows or n
    if not calibrate or (n <= CALIBRATION_SPLIT_ROWS and n <= cap):
        final = build_pipeline(spec.name, params=params, seed=seed, l2_normalize=l2_normalize,
                               pca=pca, calibrate=calibrate, calibration_cv=min(5, max(smallest, 2)),
                               solver=solver)
        X, y = take(), y_fit
        if n > cap:
            idx = _stratified_take(np.arange(n), _codes(y_fit), cap, seed)
            X, y = take(idx), y_fit[idx]
            notes.append(f"{spec.name}: final fit on a stratified {cap:,} of {n:,} rows")
        with quiet_convergence() as conv, _calibration_threads(final, config.jobs):
            fit_pipeline(final, X, y)
        _note_conv(conv, notes)
        return final, len(y)
    # Fit on most rows, Platt-calibrate once on held-out ones: one fit instead of k + 1.
    from sklearn.calibration import CalibratedClassifierCV
    from sklearn.frozen import FrozenEstimator
    from sklearn.model_selection import train_test_split

    idx = np.arange(n)
    n_cal = min(CALIBRATION_ROWS, max(int(0.15 * n), 2 * len(counts)))
    fit_idx, cal_idx = train_test_split(idx, test_size=n_cal, random_state=seed, stratify=y_fit)
    if len(fit_idx) > cap:
        fit_idx = _stratified_take(np.sort(fit_idx), _codes(y_fit[np.sort(fit_idx)]), cap, seed)
    pipe = build_pipeline(spec.name, params=params, seed=seed, l2_normalize=l2_normalize, pca=pca,
                          calibrate=False, solver=solver)
    with quiet_convergence() as conv:
        fit_pipeline(pipe, take(fit_idx), y_fit[fit_idx])
    _note_conv(conv, notes)
    cal = CalibratedClassifierCV(FrozenEstimator(pipe.steps[-1][1]), method="sigmoid")
    cal.fit(pipe[:-1].transform(take(cal_idx)) if len(pipe.steps) > 1 else take(cal_idx),
            y_fit[cal_idx])
    notes.append(f"{spec.name}: fitted on {len(fit_idx):,} rows, Platt-calibrated on "
                 f"{len(cal_idx):,} held-out rows")
    return Pipeline(pipe.steps[:-1] + [("est", cal)]), len(fit_idx)


@contextlib.contextmanager
def _calibration_threads(pipe, jobs: int | None):
    """Calibration's k fold fits side by side in threads, where the calibrated estimator runs
    on one core and releases the GIL (libsvm, liblinear: :data:`SINGLE_THREADED`) and ``jobs``
    allows more than one: no worker processes to start for fits of a second or less. The
    fitted head keeps ``n_jobs=None``, as it is saved."""
    est = pipe.steps[-1][1]
    inner = getattr(est, "estimator", None)
    workers = workers_for(jobs)
    if workers < 2 or inner is None or type(inner).__name__ not in SINGLE_THREADED \
            or "n_jobs" not in est.get_params():
        yield
        return
    import joblib

    before = est.n_jobs
    est.set_params(n_jobs=workers)
    try:
        with joblib.parallel_config(backend="threading"):
            yield
    finally:
        est.set_params(n_jobs=before)


def workers_for(jobs: int | None) -> int:
    """Threads for ``jobs`` (None or negative: every core), at most the cores."""
    cores = os.cpu_count() or 1
    return cores if jobs is None or jobs < 0 else min(jobs, cores)


def _codes(y: np.ndarray) -> np.ndarray:
    return np.unique(y, return_inverse=True)[1]


def _note_conv(conv: list[str], notes: list[str]) -> None:
    if conv:
        notes.append(f"final fit did not fully converge ({conv[0][:80]}); consider a larger max_iter")


def fit_in_memory(source: RowSource, spec: HeadSpec, *, plan: HeadPlan, config: HeadConfig,
                  notes: list[str], runner: SearchBackend, deadline: float | None = None,
                  progress: Progress | None = None):
    """Search (see :func:`choose_strategy`) and fit the final head on rows held in memory.

    ``config`` is the head's own (:meth:`HeadConfig.for_model`): its params are fixed, its
    seed, jobs, l2_normalize, pca and solver apply (``solver``, see
    :func:`fxtl.heads.registry.resolve_solver`, picks scikit-learn's estimator or the head's
    torch one, for the search and the final fit alike).
    Returns ``(pipeline, info)``; ``info`` feeds ``metrics.json``.
    """
    from sklearn.model_selection import ParameterGrid

    params, seed, pca, solver = dict(config.params), config.seed, config.pca, config.solver
    labels, fit_rows = source.labels, plan.fit_rows
    counts = np.bincount(labels[fit_rows])
    train_rows = val_rows = None
    if plan.selection == "val":
        train_rows = plan.search_rows[plan.val_fold < 0]
        val_rows = plan.search_rows[plan.val_fold == 0]
    strategy = choose_strategy(n_fit=len(fit_rows), min_class=int(counts[counts > 0].min()),
                               selection=plan.selection, search_rows=spec.search_rows,
                               n_train=None if train_rows is None else len(train_rows),
                               plenty_per_class=spec.plenty_per_class or PLENTY_PER_CLASS)
    folds = search_folds(strategy, fit_rows=fit_rows, labels=labels, train_rows=train_rows,
                         val_rows=val_rows, seed=seed) if strategy.kind != "none" else []
    n_min = min(len(tr) for tr, _ in folds) if folds else len(fit_rows)
    shape = DataShape(n_fit=int(n_min), dim=source.dim, n_classes=int((counts > 0).sum()))
    if pca and isinstance(pca, int) and pca > min(n_min, source.dim):
        notes.append(f"pca {pca} lowered to {min(n_min, source.dim)} (training rows/feature dim)")
        pca = int(min(n_min, source.dim))
    solver, solver_notes = resolve_solver(spec, requested=solver,
                                          n_values=len(fit_rows) * source.dim, params=params,
                                          distributed=runner.name == "dask")
    notes.extend(solver_notes)
    resolved = config.replace(pca=pca, solver=solver)  # what the fits below use
    dotted = spec.torch_estimator if solver == "torch" else spec.estimator
    accepted = estimator_params(dotted)
    ignored = sorted(set(params) - accepted)
    if ignored:  # parameters of another form of the head (the large-cache or torch estimator)
        notes.append(f"ignored params {', '.join(ignored)}: not parameters of "
                     f"{dotted.split(':')[1]}")
    params = {k: v for k, v in params.items() if k in accepted}
    fixed = {**{k: v for k, v in spec.defaults.items() if k in accepted}, **params}
    # the candidates' own settings (spec.search_params), where the caller fixed nothing
    searching = {k: v for k, v in spec.search_params.items()
                 if solver == "sklearn" and k in accepted and k not in params}
    notes.extend(spec.adapt(fixed, shape) if spec.adapt else [])
    if spec.scale_up and folds:  # candidates fitted on many rows (a large subsample cap) too
        notes.extend(spec.scale_up(fixed, int(n_min)))
    grid = {k: v for k, v in spec.space(shape).items() if k not in params} if folds else {}
    if folds and params and not grid:
        notes.append("every searched parameter was fixed by params: no search")
    candidates = list(ParameterGrid(grid)) if grid else [{}]
    # The path (warm-started where the estimator can) runs here; a backend the caller chose
    # explicitly gets the grid.
    path = spec.path_param if (spec.path_param and list(grid) == [spec.path_param]
                               and runner.name == "loky") else None
    if spec.name == "knn" and runner.name == "loky" and set(grid) <= {"n_neighbors", "weights"} \
            and fixed.get("metric", "minkowski") in ("minkowski", "euclidean") and fixed.get("p", 2) == 2:
        path = KNN_VOTES
    info: dict[str, Any] = {"solver": solver,
                            "selection": strategy.selection if len(candidates) > 1 else "none",
                            "n_candidates": len(candidates), "selection_score": None,
                            "search_backend": "none"}
    t0 = time.perf_counter()
    best: dict[str, Any] = {}
    rows_searched = 0
    if len(candidates) > 1:
        rows = np.unique(np.concatenate([np.r_[tr, te] for tr, te in folds]))
        rows_searched = len(rows)
        local = [(np.searchsorted(rows, tr), np.searchsorted(rows, te)) for tr, te in folds]
        X_s, y_s = source.features[rows], source.names(labels[rows])
        small = X_s.size < SMALL_VALUES
        parallel, backend = runner.parallel(small)
        dask = backend == "dask"
        info["search_backend"] = "dask" if dask else (
            "this process (one neighbour query per fold)" if path == KNN_VOTES
            else "this process (warm-started path)" if path and "warm_start" in accepted
            else f"threading ({path} path)" if path else "threading")
        if progress:  # the clock of the ETA starts now
            progress(0, len(candidates), spec.name)
        with _blas_limit(small and not dask):
            out = run_search(spec, X=X_s, y=y_s, folds=local, candidates=candidates,
                             fixed={**fixed, **searching},
                             config=resolved.replace(jobs=-1) if dask else resolved,
                             parallel=parallel, deadline=deadline, progress=progress,
                             path_param=path, rounds=not dask, small=small)
        best = out.best
        info["selection_score"] = round(float(max(out.scores)), 6)
        info["search"] = [{"params": jsonable(c), "mean_score": round(sc, 6)}
                          for c, sc in zip(candidates, out.scores)]
        info["candidates_tried"] = out.tried
        info["stopped_by_budget"] = out.stopped_by_budget
        if out.stopped_by_budget:
            notes.append(f"time budget reached: {out.tried} of {len(candidates)} candidates tried")
        info["path_stopped"] = out.path_stopped
        if out.path_stopped:
            notes.append(f"{spec.path_param} path stopped after {out.tried} of {len(candidates)} "
                         f"candidates: the last {PATH_PATIENCE} scored below the best")
        if out.converged_notes:
            notes.append(f"{len(out.converged_notes)} search fits did not fully converge "
                         f"({out.converged_notes[0][:80]})")
        edge = [k for k, g in grid.items() if len(g) > 2 and isinstance(g[0], float)
                and best.get(k) in (g[0], g[-1]) and out.tried == len(candidates)]
        if edge:
            notes.append(f"best {', '.join(edge)} is at the edge of the search grid "
                         f"({jsonable(best)}); try other values with params")
    elif grid:  # a single candidate: nothing to choose
        best = candidates[0]
    info["search_seconds"] = time.perf_counter() - t0
    final_params = {**fixed, **best}
    if spec.scale_up:
        notes.extend(spec.scale_up(final_params, len(fit_rows)))
    t0 = time.perf_counter()
    with _blas_limit(source.features[:1].size * len(fit_rows) < SMALL_VALUES):
        final, used = fit_final(spec, X_fit=source.features, rows=fit_rows,
                                y_fit=source.names(labels[fit_rows]), params=final_params,
                                config=resolved, notes=notes)
    info["refit_seconds"] = time.perf_counter() - t0
    info["best_params"] = jsonable({**params, **best}) if (best or params) else {}
    info["strategy"] = {"kind": strategy.kind, "description": strategy.describe(rows_searched),
                        "path": bool(path), "rows_searched": int(rows_searched),
                        "candidates": len(candidates),
                        "candidates_tried": info.get("candidates_tried", len(candidates) if len(candidates) > 1 else 0),
                        "stopped_by_budget": bool(info.get("stopped_by_budget", False)),
                        "path_stopped": bool(info.get("path_stopped", False)),
                        "search_seconds": round(info["search_seconds"], 4),
                        "final_fit_rows": int(used), "solver": solver,
                        "search_params": jsonable(searching) if rows_searched else {}}
    return final, info


# What an in-memory fit imports besides the estimators' own modules (see preload).
FIT_MODULES = ("sklearn.pipeline", "sklearn.preprocessing", "sklearn.decomposition",
               "sklearn.calibration", "sklearn.frozen", "sklearn.model_selection",
               "sklearn.metrics", "threadpoolctl")


def preload(specs: list[HeadSpec]) -> None:
    """Import what fitting ``specs`` in memory imports, now: worker processes forked afterwards
    (:mod:`fxtl.heads.side_by_side`) then share it instead of each importing scikit-learn
    again (2-3 s of CPU each), and the caller does not import it a third time to read their
    results."""
    for module in FIT_MODULES:
        importlib.import_module(module)
    for spec in specs:
        import_estimator(spec.estimator)


def _blas_limit(small: bool):
    if not small:
        return contextlib.nullcontext()
    from threadpoolctl import threadpool_limits

    return threadpool_limits(limits=1)
