"""Scoring a head's candidates in this process, each fold's preprocessing done once.

The preprocessing steps of a head (L2, scaling, PCA) are not searched, so :func:`prepare_folds`
fits them once per fold and every candidate reuses the transformed rows: a grid of 16 candidates
on 5 folds scales the features 5 times instead of 80. :func:`score_grid` then fits each
candidate's estimator on every fold:

* warm-started (``warm=True``, e.g. logistic regression's C path): each fold keeps one estimator
  whose next fit starts from the previous candidate's solution;
* the linear SVM with fewer rows than features: a fold's rows are expressed once in their own
  span (:mod:`fxtl.heads.linear_svm`), where liblinear's dual does the same iterations on fewer
  columns;
* the RBF SVM on a precomputed kernel: a fold's squared distances are computed once and each
  ``gamma`` is one ``exp`` of them, so libsvm never recomputes a kernel row;
* otherwise the fits of a round of candidates run in threads (libsvm, liblinear and BLAS release
  the GIL): no worker processes to start, none left behind.

Candidates tied on accuracy (frequent on small data) are told apart by their held-out log-loss
when the estimator gives probabilities, else the first in grid order (most regularised) wins.
A time budget stops the search between rounds, keeping what every fold scored.
"""
from __future__ import annotations

import contextlib
import math
import queue
import threading
import time
import warnings
from dataclasses import dataclass, field
from typing import Any, Callable, Iterator

import numpy as np

__all__ = ["PreparedFold", "GridOutcome", "prepare_folds", "score_grid", "pick_best",
           "candidates_per_round", "borrow_cores",
           "SINGLE_THREADED", "GIL_BOUND", "map_threads", "PATH_PATIENCE", "fit_pipeline",
           "fit_transform_steps", "quiet_convergence"]

# Estimators whose fit uses one core (libsvm, liblinear): candidates may run side by side even on
# large data, where BLAS-based estimators already use every core.
SINGLE_THREADED = frozenset({"SVC", "RBFSVC", "LinearSVC"})
# Estimators whose fit holds the GIL most of the time (scipy's L-BFGS loop on small data): threads
# only contend, so their candidates run one after another.
GIL_BOUND = frozenset({"LogisticRegression"})

# A warm-started path stops once this many candidates in a row score below its best so far: held-out
# accuracy along an L2 path rises to one peak and falls, and the weakly regularised end, the
# slowest to fit, only falls further.
PATH_PATIENCE = 3

# A fold's distance matrices are kept up to this many training rows (6,000: 288 MB of float64).
KERNEL_CACHE_ROWS = 6_000

# (done, total, head name) -> None
Progress = Callable[[int, int, str], None]


@dataclass
class PreparedFold:
    """One fold's training and scoring rows after the head's (fixed) preprocessing."""

    X_train: np.ndarray
    y_train: np.ndarray
    X_test: np.ndarray
    y_test: np.ndarray
    estimator: Any  # unfitted template (the pipeline's last step)
    # Squared Euclidean distances, for the RBF SVM on a precomputed kernel.
    d_train: np.ndarray | None = None
    d_test: np.ndarray | None = None


@dataclass
class GridOutcome:
    best: dict[str, Any]
    scores: list[float]  # mean accuracy per candidate tried, in grid order
    tried: int
    stopped_by_budget: bool
    converged_notes: list[str] = field(default_factory=list)
    # A regularisation path ended early: its last ``PATH_PATIENCE`` scores fell below the best.
    path_stopped: bool = False


def uses_kernel_cache(estimator, candidates: list[dict], n_rows: int = 0) -> bool:
    """True for an RBF ``SVC`` (the only kernel head) fitted on at most
    :data:`KERNEL_CACHE_ROWS` rows: its folds then keep squared distances."""
    from sklearn.svm import SVC

    if not isinstance(estimator, SVC) or n_rows > KERNEL_CACHE_ROWS:
        return False
    return all(c.get("kernel", estimator.kernel) == "rbf" for c in candidates)


def prepare_folds(pipeline_factory: Callable[[], Any], *, X: np.ndarray, y: np.ndarray,
                  folds: list[tuple[np.ndarray, np.ndarray]], kernel: bool = False,
                  workers: int = 1) -> list[PreparedFold]:
    """Fit the pipeline's preprocessing once per fold (``pipeline_factory()`` gives an unfitted
    Pipeline) and transform its rows; with ``kernel`` also their squared distances.

    ``workers`` folds are prepared side by side in threads (scaling, the linear SVM's row-space
    QR and the kernel's distances are BLAS and LAPACK calls, which release the GIL); callers pass
    more than one only where BLAS itself runs on one core."""
    from sklearn.base import clone

    from .kernel_svm import sq_distances
    from .linear_svm import LinearSVC, projects, row_space, to_row_space

    def prepare(fold_rows: tuple[np.ndarray, np.ndarray]) -> PreparedFold:
        tr, te = fold_rows
        pipe = pipeline_factory()
        if len(pipe.steps) > 1:
            pre = pipe[:-1]
            Xtr = fit_transform_steps(pre, X[tr])
            Xte = pre.transform(X[te])
        else:
            Xtr, Xte = X[tr], X[te]
        est = pipe.steps[-1][1]
        if isinstance(est, LinearSVC) and projects(est, Xtr.shape):
            # the fold's rows in their own span, once for every candidate (fxtl.heads.linear_svm)
            scaling = float(est.intercept_scaling) if est.fit_intercept else None
            Q, Xtr_r = row_space(Xtr, intercept_scaling=scaling)
            Xtr, Xte = Xtr_r, to_row_space(Xte, Q, intercept_scaling=scaling)
            est = clone(est).set_params(dual=True, fit_intercept=False)
        fold = PreparedFold(Xtr, y[tr], Xte, y[te], est)
        if kernel:
            fold.d_train, fold.d_test = sq_distances(Xtr, Xtr), sq_distances(Xte, Xtr)
        return fold

    return map_threads(prepare, list(folds), workers)


# Rows per block when a StandardScaler is fitted block by block (see fit_transform_steps).
SCALE_BLOCK = 4096


def fit_transform_steps(pre, X: np.ndarray) -> np.ndarray:
    """``pre.fit_transform(X)`` for a Pipeline of preprocessing steps, with each StandardScaler
    fitted block by block (``partial_fit``: the same statistics, without the float64 copy of
    ``X`` a one-shot fit of float32 rows makes: 230 MB at 22k x 1280)."""
    from sklearn.preprocessing import StandardScaler

    for _, step in pre.steps:
        if type(step) is StandardScaler and len(X) > SCALE_BLOCK:
            for a in range(0, len(X), SCALE_BLOCK):
                step.partial_fit(X[a:a + SCALE_BLOCK])
            X = step.transform(X)
        else:
            X = step.fit_transform(X)
    return X


def fit_pipeline(pipe, X: np.ndarray, y: np.ndarray):
    """``pipe.fit(X, y)``, preprocessing through :func:`fit_transform_steps`."""
    Xt = fit_transform_steps(pipe[:-1], X) if len(pipe.steps) > 1 else X
    pipe.steps[-1][1].fit(Xt, y)
    return pipe


def _fit_score(est, fold: PreparedFold, cand: dict) -> tuple[float, float | None]:
    """Fit ``est`` (set to ``cand``) on the fold; its accuracy and log-loss on the fold's test."""
    from sklearn.metrics import log_loss

    est.set_params(**cand)
    Xtr, Xte = fold.X_train, fold.X_test
    if fold.d_train is not None:
        from .kernel_svm import rbf_gamma

        g = rbf_gamma(est.gamma, fold.X_train)
        est.set_params(kernel="precomputed")
        Xtr, Xte = np.exp(-g * fold.d_train), np.exp(-g * fold.d_test)
    est.fit(Xtr, fold.y_train)
    acc = float((est.predict(Xte) == fold.y_test).mean())
    loss = None
    if hasattr(est, "predict_proba"):  # SVC without probability=True has none
        loss = float(log_loss(fold.y_test, est.predict_proba(Xte), labels=est.classes_))
    return acc, loss


def score_grid(name: str, prepared: list[PreparedFold], candidates: list[dict], *,
               warm: bool = False, workers: int = 1, deadline: float | None = None,
               progress: Progress | None = None, patience: int | None = None) -> GridOutcome:
    """Mean held-out accuracy of every candidate over ``prepared`` folds (see the module doc).

    ``patience``: stop once that many candidates in a row score below the best so far (for a
    warm-started regularisation path, see :data:`PATH_PATIENCE`).
    """
    # One warnings context for all threads: catch_warnings swaps process-wide state, so it must
    # not be entered in each thread.
    with quiet_convergence() as conv:
        out = _score_rounds(name, prepared, candidates, warm=warm, workers=workers,
                            deadline=deadline, progress=progress, patience=patience)
    out.converged_notes = conv
    return out


@contextlib.contextmanager
def quiet_convergence() -> Iterator[list[str]]:
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


def _score_rounds(name, prepared, candidates, *, warm, workers, deadline, progress,
                  patience) -> GridOutcome:
    from sklearn.base import clone

    total, n_folds = len(candidates), len(prepared)
    per_warm = [clone(f.estimator).set_params(warm_start=True) for f in prepared] if warm else None
    # Warm starts chain a fold's fits, so only folds run side by side; else whole candidates too.
    per_round = 1 if warm else candidates_per_round(workers, n_folds)
    scores: list[float] = []
    losses: list[float | None] = []
    stopped = False
    for start in range(0, total, per_round):
        if deadline is not None and scores and time.perf_counter() > deadline:
            stopped = True
            break
        part = candidates[start:start + per_round]
        tasks = [(ci, fi) for ci in range(len(part)) for fi in range(n_folds)]

        def run(task, part=part):
            ci, fi = task
            est = per_warm[fi] if warm else clone(prepared[fi].estimator)
            return _fit_score(est, prepared[fi], part[ci])

        results = map_threads(run, tasks, workers)
        for ci in range(len(part)):
            mine = results[ci * n_folds:(ci + 1) * n_folds]
            scores.append(float(np.mean([r[0] for r in mine])))
            ls = [r[1] for r in mine]
            losses.append(float(np.mean(ls)) if all(v is not None for v in ls) else None)
        if progress:
            progress(len(scores), total, name)
        if patience and len(scores) < total and _fell(scores, patience):
            return GridOutcome(candidates[pick_best(scores, losses)], scores, len(scores), False,
                               path_stopped=True)
    return GridOutcome(candidates[pick_best(scores, losses)], scores, len(scores), stopped)


def candidates_per_round(workers: int, n_folds: int) -> int:
    """Candidates scored per round (a round's fits run side by side, then the path and budget
    are checked): enough to give every worker a fit, and among up to twice that many the count
    whose fits leave the fewest workers idle in the round's last wave (5 folds on 2 workers:
    2 candidates, 10 fits in 5 full waves, where 1 candidate leaves a worker idle 1 wave in 3).

    >>> candidates_per_round(2, 5), candidates_per_round(1, 5), candidates_per_round(8, 5)
    (2, 1, 3)
    """
    least = max(1, math.ceil(workers / n_folds))

    def idle(r: int) -> float:
        fits = r * n_folds
        return (math.ceil(fits / workers) * workers - fits) / (math.ceil(fits / workers) * workers)

    return min(range(least, 2 * least + 1), key=lambda r: (idle(r), r))


def _fell(scores: list[float], patience: int) -> bool:
    """The last ``patience`` scores are all below the best so far.

    >>> _fell([0.7, 0.8, 0.79, 0.78, 0.75], 3), _fell([0.7, 0.8, 0.79, 0.8, 0.75], 3)
    (True, False)
    """
    best = max(scores)
    return len(scores) > patience and all(s < best - 1e-12 for s in scores[-patience:])


# In a worker process fitting one of several heads side by side (fxtl.heads.side_by_side): the
# semaphore counting the cores other workers have left idle (see borrow_cores); None elsewhere.
_spare_cores: Any = None


def borrow_cores(spare: Any) -> None:
    """Make :func:`map_threads` in this (worker) process run its first thread on the worker's
    own core and every further thread only while it holds one of ``spare``'s cores (a
    ``multiprocessing`` semaphore the parent releases as workers finish with nothing left to
    start): the last heads of a run take the cores the others no longer use."""
    global _spare_cores
    _spare_cores = spare


def map_threads(fn: Callable[[Any], Any], tasks: list, workers: int) -> list:
    """``[fn(t) for t in tasks]``, ``workers`` at a time in daemon threads.

    Daemon threads, and a main thread that waits in short slices, so that Ctrl-C or SIGTERM ends
    the command at once: an interrupted search leaves no thread (and no process) running. In a
    worker process that borrows cores (:func:`borrow_cores`) threads after the first run a task
    only while they hold a spare core.
    """
    if workers <= 1 or len(tasks) <= 1:
        return [fn(t) for t in tasks]
    todo: queue.SimpleQueue = queue.SimpleQueue()
    for i, t in enumerate(tasks):
        todo.put((i, t))
    results: list = [None] * len(tasks)
    errors: list[BaseException] = []
    spare = _spare_cores

    def run_one() -> bool:
        try:
            i, t = todo.get_nowait()
        except queue.Empty:
            return False
        try:
            results[i] = fn(t)
        except BaseException as exc:  # re-raised in the caller's thread
            errors.append(exc)
        return True

    def work(k: int):
        while not errors:
            if not k or spare is None:
                if not run_one():
                    return
                continue
            # a borrowed core per task, given back after it (another worker may need it)
            while not spare.acquire(timeout=0.05):
                if errors or todo.empty():
                    return
            try:
                if not run_one():
                    return
            finally:
                spare.release()

    threads = [threading.Thread(target=work, args=(k,), daemon=True, name=f"fxtl-search-{k}")
               for k in range(min(workers, len(tasks)))]
    for th in threads:
        th.start()
    for th in threads:
        while th.is_alive():
            th.join(0.1)
    if errors:
        raise errors[0]
    return results


def pick_best(scores: list[float], losses: list[float | None]) -> int:
    """The best accuracy; among ties the lowest log-loss when every tied one has one, else the
    first (the grid is ordered most regularised first).

    Examples
    --------
    >>> pick_best([0.9, 0.95, 0.95], [0.3, 0.2, 0.1])
    2
    >>> pick_best([0.9, 0.95, 0.95], [None, None, None])
    1
    """
    best = max(scores)
    tied = [i for i, s in enumerate(scores) if s >= best - 1e-12]
    if len(tied) > 1 and all(losses[i] is not None for i in tied):
        return min(tied, key=lambda i: (losses[i], i))
    return tied[0]
