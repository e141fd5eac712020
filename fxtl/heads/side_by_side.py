"""Several heads fitted at once, each in a forked worker process.

A head's search on a few hundred or thousand rows keeps only part of a machine busy: the
logistic path's L-BFGS holds the GIL between its small BLAS calls, an MLP candidate trains alone
at the end of a round, the final fits run one after another. Threads cannot fill the gaps with
another head (two GIL-heavy heads in one process slow each other down more than they gain: the
logistic path ran 2-3 times slower beside the SVMs in threads), separate processes can. With
``--model all`` on 2 cores, two heads run at a time, the slowest first, each on a core of its
own; once nothing is left to start, each worker that finishes lends its core to those still
running (a semaphore their search threads take a core from, :func:`fxtl.heads.grid.borrow_cores`),
so a long last head (an MLP searched by 5-fold CV) is not left on one core.

Workers are forked (Linux), so they start in milliseconds with the parent's imports and rows,
read nothing from disk, and send back only the fitted result. Every head is fitted exactly as it
would be alone (same folds, seeds and candidates). A worker ignores Ctrl-C (the parent stops
them all at once), dies with its parent, and runs BLAS and OpenMP on one thread per search thread.

:func:`available` says where this applies; :func:`run` does it.
"""
from __future__ import annotations

import gc
import multiprocessing
import os
import pickle
import signal
import sys
import traceback
from multiprocessing.connection import wait
from typing import Any, Callable, Sequence

from threadpoolctl import threadpool_limits

from ..errors import FxtlError

__all__ = ["available", "run"]

# (done, total, head name) -> None, as fxtl.heads.search.Progress
Progress = Callable[[int, int, str], None]
# How often the parent wakes while it waits, so that Ctrl-C is handled at once.
POLL_SECONDS = 0.2


def available() -> bool:
    """Whether worker processes can be forked here (Linux; elsewhere heads run one at a time)."""
    return sys.platform.startswith("linux") and "fork" in multiprocessing.get_all_start_methods()


def run(names: Sequence[str], work: Callable[[str, Progress | None, Any], Any], *, workers: int,
        progress: Progress | None = None,
        on_start: Callable[[str], None] | None = None) -> dict[str, Any]:
    """``{name: work(name, progress, spare)}`` for every name, ``workers`` at a time in forked
    processes, in the order given (put the slowest first).

    ``work`` runs in the worker; its result (and any progress it reports) is pickled back. An
    exception in a worker is raised here once the other workers are stopped. ``spare`` is a
    semaphore counting idle cores: released once per worker that finishes with no name left to
    start, so that the workers still running may use more threads
    (:func:`fxtl.heads.grid.borrow_cores`).
    """
    ctx = multiprocessing.get_context("fork")
    spare = ctx.Semaphore(0)
    gc.freeze()  # the workers' collector leaves the caller's objects alone: fewer pages copied
    pending = list(names)
    running: dict[Any, tuple[str, Any]] = {}  # read end -> (name, process)
    results: dict[str, Any] = {}
    parent = os.getpid()
    try:
        while pending or running:
            while pending and len(running) < workers:
                name = pending.pop(0)
                if on_start:
                    on_start(name)
                reader, writer = ctx.Pipe(duplex=False)
                proc = ctx.Process(target=_worker, name=f"fxtl-head-{name}", daemon=True,
                                   args=(writer, name, work, progress is not None, parent,
                                         spare))
                proc.start()
                writer.close()
                running[reader] = (name, proc)
            for reader in wait(list(running), timeout=POLL_SECONDS):
                name, proc = running[reader]
                try:
                    kind, *payload = reader.recv()
                except EOFError:
                    running.pop(reader)
                    proc.join()
                    raise FxtlError(f"the worker process fitting {name} ended without a result "
                                    f"(exit status {proc.exitcode}, e.g. out of memory); rerun "
                                    "with jobs=1 to fit one head at a time in this process",
                                    param="jobs") from None
                if kind == "progress":
                    progress(*payload)
                    continue
                running.pop(reader)
                reader.close()
                proc.join()
                if not pending:
                    spare.release()  # its core is free for the workers still running
                if kind == "error":
                    raise payload[0]
                results[name] = payload[0]
    finally:
        gc.unfreeze()
        for reader, (_, proc) in running.items():
            proc.kill()
            proc.join()
            reader.close()
    return results


def _worker(conn, name: str, work: Callable, report: bool, parent: int, spare: Any) -> None:
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # the parent stops the workers
    _die_with(parent)
    try:
        prog = (lambda done, total, model: conn.send(("progress", done, total, model))) \
            if report else None
        with threadpool_limits(limits=1):  # one core each (BLAS, and OpenMP in this thread)
            message = ("result", work(name, prog, spare))
        payload = pickle.dumps(message)
    except BaseException as exc:  # noqa: BLE001 - re-raised in the parent
        payload = pickle.dumps(("error", _portable(exc)))
    conn.send_bytes(payload)
    conn.close()


def _portable(exc: BaseException) -> BaseException:
    """``exc`` itself when it is fxtl's or Python's own (those unpickle as themselves), else a
    RuntimeError carrying its traceback."""
    if isinstance(exc, FxtlError) or type(exc).__module__ == "builtins":
        try:
            pickle.dumps(exc)
            return exc
        except Exception:  # noqa: BLE001 - an unpicklable argument
            pass
    text = "".join(traceback.format_exception(type(exc), exc, exc.__traceback__))
    return RuntimeError(f"in a worker process: {text}")


def _die_with(parent: int) -> None:
    """Ask Linux to kill this worker when its parent dies (even by SIGKILL)."""
    try:
        import ctypes

        ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        pass
    if os.getppid() != parent:  # the parent died before prctl took effect
        os._exit(1)
