"""Run one reader of a file in a child process, so that a native library cannot take fxtl down.

A damaged HDF5 file can make libhdf5 itself crash (SIGSEGV) or loop for ever; Python cannot
catch either. :func:`run_isolated` calls a reader function in a child (``os.fork``, or a fresh
interpreter when threads are running or fork is missing) with a time limit, and turns a crash,
a hang or an exception there into one line naming the file and the fix. It holds no state: the
caller decides when to call it and what to remember (:mod:`fxtl.features.cache_guard`).
"""
from __future__ import annotations

import faulthandler
import gc
import importlib
import os
import select
import signal
import sys
import threading
import time
import warnings
from pathlib import Path

__all__ = ["run_isolated"]


def run_isolated(target: str, path: Path, level: str, *, limit: float, fix: str) -> str | None:
    """Call ``target(path, level)`` in a child; None when it returned, else the error line.

    Parameters
    ----------
    target : str
        ``"package.module:function"``, importable in a fresh interpreter too.
    path : Path
        The file the reader reads; every message names it.
    level : str
        Passed to the reader as its second argument.
    limit : float
        Seconds the child may take before it is killed and the file called hanging.
    fix : str
        What the user should do, ending every message (``re-create it with `fxtl extract```).
    """
    if _may_fork():
        return _probe_forked(target, path, level, limit, fix)
    return _probe_spawned(target, path, level, limit, fix)


def _may_fork() -> bool:
    """Fork only while no other Python thread runs: a lock one of them holds (h5py's, the import
    lock, logging's) would stay held in the child and hang it. Native pools (OpenBLAS, OpenMP,
    onnxruntime's) hold none of the locks the child takes: the child runs no BLAS or OpenMP code,
    and collects no garbage (whose finalizers could wait on such a pool)."""
    return hasattr(os, "fork") and threading.active_count() == 1


def _call(target: str, path: Path, level: str) -> None:
    module, name = target.split(":")
    getattr(importlib.import_module(module), name)(path, level)


def _child_error(path: Path, exc: BaseException, fix: str) -> str:
    text = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
    if type(exc).__name__ == "CacheError":  # already fxtl's one line
        return text
    return f"{path} is damaged ({text[:160]}); {fix}"


def _crash_message(path: Path, fix: str, *, signum: int | None, code: int = 0) -> str:
    if signum is not None:
        try:
            name = signal.Signals(signum).name
        except ValueError:
            name = f"signal {signum}"
        return f"{path} is damaged: reading it crashed the HDF5 library ({name}); {fix}"
    return f"{path} is damaged: reading it stopped the HDF5 library (exit status {code}); {fix}"


def _hang_message(path: Path, limit: float, fix: str) -> str:
    return (f"{path} is damaged: reading its HDF5 structure did not finish in {limit:.0f} s "
            f"(a damaged file can make the HDF5 library loop); {fix}")


def _probe_forked(target: str, path: Path, level: str, limit: float, fix: str) -> str | None:
    r, w = os.pipe()
    try:
        with warnings.catch_warnings():
            # Python 3.12+ warns about forking beside native threads; _may_fork says why it is safe.
            warnings.simplefilter("ignore", DeprecationWarning)
            pid = os.fork()
    except OSError:  # no memory or process slot for a fork: a fresh interpreter may still start
        os.close(r)
        os.close(w)
        return _probe_spawned(target, path, level, limit, fix)
    if pid == 0:  # the child: never returns, never runs the parent's exit handlers
        # No garbage collection here: a cycle the parent had not collected yet would be finalized
        # in the child, and a finalizer can wait for a thread that only the parent has (an
        # onnxruntime session left in a traceback waited on its thread pool for ever).
        gc.disable()
        code = 0
        try:
            os.close(r)
            faulthandler.disable()  # a crash must not print a traceback dump on the user's stderr
            signal.signal(signal.SIGINT, signal.SIG_DFL)
            null = os.open(os.devnull, os.O_WRONLY)
            os.dup2(null, 1)
            os.dup2(null, 2)
            try:
                _call(target, path, level)
                out = "ok"
            except BaseException as exc:  # noqa: BLE001 - every failure becomes the parent's line
                out = "error\t" + _child_error(path, exc, fix)
            os.write(w, out.encode("utf-8", "surrogateescape"))
        except BaseException:  # noqa: BLE001
            code = 70
        finally:
            os._exit(code)
    os.close(w)
    done = False
    try:
        data, deadline = b"", time.monotonic() + limit
        while True:
            left = deadline - time.monotonic()
            ready = select.select([r], [], [], max(0.0, left))[0] if left > 0 else []
            if not ready:
                return _hang_message(path, limit, fix)
            chunk = os.read(r, 1 << 16)
            if not chunk:
                break
            data += chunk
        _, status = os.waitpid(pid, 0)
        done = True
        return _verdict(data.decode("utf-8", "surrogateescape"), path, fix,
                        ok=os.WIFEXITED(status) and os.WEXITSTATUS(status) == 0,
                        signum=os.WTERMSIG(status) if os.WIFSIGNALED(status) else None,
                        code=os.WEXITSTATUS(status) if os.WIFEXITED(status) else 0)
    finally:
        os.close(r)
        if not done:  # a hang, or the parent interrupted (Ctrl-C): the child goes too
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
            os.waitpid(pid, 0)


def _verdict(text: str, path: Path, fix: str, *, ok: bool, signum: int | None, code: int) -> str | None:
    if text == "ok" and ok:
        return None
    if text.startswith("error\t"):
        return text[len("error\t"):]
    return _crash_message(path, fix, signum=signum, code=code)


def _probe_spawned(target: str, path: Path, level: str, limit: float, fix: str) -> str | None:
    """Probe in a fresh interpreter (threads are running, or there is no fork)."""
    import subprocess  # here: most probes fork, and a cache hit should not pay for the import
    root = str(Path(__file__).resolve().parents[1])
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([root] + [p for p in sys.path if p]))
    try:
        proc = subprocess.run([sys.executable, "-m", "fxtl._isolate", target, str(path), level, fix],
                              capture_output=True, env=env, timeout=limit + 10.0)
    except subprocess.TimeoutExpired:
        return _hang_message(path, limit, fix)
    except OSError:
        return None  # no child can be started here: the caller reads in-process
    lines = proc.stdout.decode("utf-8", "surrogateescape").strip().splitlines()
    rc = proc.returncode  # negative: killed by that signal (POSIX)
    return _verdict(lines[-1] if lines else "", path, fix, ok=rc == 0,
                    signum=-rc if rc < 0 else None, code=rc)


def _main(argv: list[str]) -> int:
    faulthandler.disable()
    target, path, level, fix = argv[0], Path(argv[1]), argv[2], argv[3]
    try:
        _call(target, path, level)
        out = "ok"
    except BaseException as exc:  # noqa: BLE001
        out = "error\t" + _child_error(path, exc, fix)
    sys.stdout.write(out)
    sys.stdout.flush()
    return 0


if __name__ == "__main__":
    sys.exit(_main(sys.argv[1:]))
