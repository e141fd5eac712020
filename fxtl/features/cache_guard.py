"""Read a cache in a child process before fxtl reads it, so that libhdf5 cannot take fxtl down.

A damaged HDF5 file can make libhdf5 itself crash (SIGSEGV) or loop for ever while h5py opens or
reads it; Python cannot catch either. So before fxtl reads a cache it did not just write, a child
process (``os.fork``, or a fresh interpreter when threads are running or fork is missing) opens
it, runs the spec's checks and reads every element the caller will read, with a time limit. A
crash, a hang or a failure there becomes one :class:`~fxtl.errors.CacheError` line naming the
file and the fix; only a file the child read cleanly is opened in this process.

The verdict is remembered for the life of the process, per file (device, inode, size, mtime),
and a cache this process wrote itself is known good: a cache hit pays for one probe at most.
``FXTL_CACHE_PROBE=off`` in the environment reads in-process only, without the child.
"""
from __future__ import annotations

import faulthandler
import os
import select
import signal
import sys
import threading
import time
import warnings
from pathlib import Path

from ..errors import CacheError, ParameterError

__all__ = ["guard_cache", "remember_written", "forget", "probe_seconds", "PROBE_ENV"]

# Environment switch: "off" skips the child process (in-process reads only).
PROBE_ENV = "FXTL_CACHE_PROBE"
# Seconds the child may take to read a cache's structure; reading the features adds time per byte.
PROBE_SECONDS = 30.0
_PROBE_BYTES_PER_SECOND = 100 << 20
# Up to this size the child reads every feature value; above it, the chunk index and two blocks.
_READ_ALL_BYTES = 512 << 20
_FIX = "re-create it with `fxtl extract`"

# What the child reads, from least to most: the root attribute `format` only (is it fxtl's?), the
# attributes, checks and small datasets, and all of it with /features.
LEVELS = ("format", "meta", "all")
# (device, inode, size, mtime_ns) -> {level: None (read cleanly) or the error line}.
_verdicts: dict[tuple[int, int, int, int], dict[str, str | None]] = {}
_in_probe = False  # True inside the child: its own reads must not probe again


def _key(path: Path) -> tuple[int, int, int, int] | None:
    try:
        st = os.stat(path)
    except OSError:
        return None  # open_cache names a missing file itself
    return (st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns)


def remember_written(path: str | Path) -> None:
    """Record that this process has just written the complete cache ``path``: no probe for it."""
    key = _key(Path(path))
    if key is not None:
        _verdicts[key] = {"all": None}


def forget() -> None:
    """Drop every remembered verdict (tests; a file replaced within one mtime tick)."""
    _verdicts.clear()


def probe_seconds(path: Path, *, features: bool) -> float:
    """The child's time limit for ``path``: :data:`PROBE_SECONDS`, plus read time for features."""
    if not features:
        return PROBE_SECONDS
    try:
        size = min(os.path.getsize(path), _READ_ALL_BYTES)
    except OSError:
        size = 0
    return PROBE_SECONDS + size / _PROBE_BYTES_PER_SECOND


def guard_cache(path: str | Path, *, features: bool = True, level: str | None = None) -> None:
    """Raise :class:`CacheError` unless a child process reads ``path`` cleanly.

    Parameters
    ----------
    path : str or Path
        The cache file.
    features : bool
        Also read ``/features`` (every value up to 512 MiB, else its chunk index and first and
        last blocks); without it, the attributes, the checks and the small datasets only.
    level : {"format", "meta", "all"}, optional
        Overrides ``features``: ``"format"`` reads the root attribute ``format`` only (any
        HDF5 file; used to tell fxtl's files from others), ``"meta"`` and ``"all"`` are
        ``features=False`` and ``True``.

    Raises
    ------
    CacheError
        One line naming the file: the error the checks raised, or that reading it crashed the
        HDF5 library or did not finish, and ``re-create it with `fxtl extract```.

    Examples
    --------
    >>> guard_cache("cache/hymenoptera-lite0-0247b4e1abc3e3fb.h5")  # doctest: +SKIP
    >>> guard_cache("damaged.h5")                                   # doctest: +SKIP
    Traceback (most recent call last):
    fxtl.errors.CacheError: damaged.h5 is damaged: reading it crashed the HDF5 library (SIGSEGV); re-create it with `fxtl extract`
    """
    if _in_probe or os.environ.get(PROBE_ENV, "").lower() in ("off", "0", "no"):
        return
    path = Path(path)
    key = _key(path)
    if key is None:
        return
    level = level or ("all" if features else "meta")
    if level not in LEVELS:
        raise ParameterError("level", f"level must be one of {', '.join(LEVELS)}, got {level!r}")
    known = _verdicts.setdefault(key, {})
    if any(known.get(lv, "") is None for lv in LEVELS[LEVELS.index(level):]):
        return  # read cleanly at this level or a deeper one
    if known.get(level):
        raise CacheError(known[level])
    limit = probe_seconds(path, features=level == "all")
    import h5py  # noqa: F401  (the reader needs it anyway; a forked child then inherits it)

    error = _probe_forked(path, level, limit) if _may_fork() else _probe_spawned(path, level, limit)
    known[level] = error
    if error is not None:
        raise CacheError(error)


def _may_fork() -> bool:
    """Fork only while no other Python thread runs: a lock one of them holds (h5py's, the import
    lock, logging's) would stay held in the child and hang it. Native pools (OpenBLAS, OpenMP)
    hold none of the locks the child takes, and the child runs no BLAS or OpenMP code."""
    return hasattr(os, "fork") and threading.active_count() == 1


def read_for_probe(path: Path, level: str) -> None:
    """What the child does: every read fxtl's readers make, their values thrown away."""
    import numpy as np

    from .store import cache_attrs, open_cache, read_strings

    if level == "format":
        import h5py

        with h5py.File(path, "r") as f:
            f.attrs.get("format")
        return
    with open_cache(path, features=False) as f:
        cache_attrs(f)
        # The reads the readers make, in their way: a probe that asked more of a file than they
        # do would refuse files they read well.
        names = ["paths", "split"] + (["errors/path", "errors/reason"] if "errors" in f else [])
        for name in names:
            read_strings(f, name)
        labels = f["labels"]
        for start in range(0, labels.shape[0], 1 << 20):
            labels[start:start + (1 << 20)]
        if level != "all":
            return
        feats = f["features"]
        n = feats.shape[0]
        rows = max(1, (1 << 22) // max(1, feats.dtype.itemsize * feats.shape[1]))
        if os.path.getsize(path) <= _READ_ALL_BYTES:
            starts = range(0, n, rows)
        else:
            if feats.chunks is not None and hasattr(feats.id, "chunk_iter"):
                feats.id.chunk_iter(lambda info: None)  # walks the whole chunk index
            starts = sorted({0, max(0, n - rows)})
        for start in starts:
            np.asarray(feats[start:start + rows])


def _child_error(path: Path, exc: BaseException) -> str:
    if isinstance(exc, CacheError):
        return str(exc).strip().splitlines()[0]
    reason = (str(exc).strip().splitlines() or [type(exc).__name__])[0][:160]
    return f"{path} is damaged ({reason}); {_FIX}"


def _crash_message(path: Path, *, signum: int | None, code: int = 0) -> str:
    if signum is not None:
        try:
            name = signal.Signals(signum).name
        except ValueError:
            name = f"signal {signum}"
        return f"{path} is damaged: reading it crashed the HDF5 library ({name}); {_FIX}"
    return f"{path} is damaged: reading it stopped the HDF5 library (exit status {code}); {_FIX}"


def _hang_message(path: Path, limit: float) -> str:
    return (f"{path} is damaged: reading its HDF5 structure did not finish in {limit:.0f} s "
            f"(a damaged file can make the HDF5 library loop); {_FIX}")


def _probe_forked(path: Path, level: str, limit: float) -> str | None:
    """Probe in a forked child; the error line, or None when the child read the file cleanly."""
    global _in_probe
    r, w = os.pipe()
    try:
        with warnings.catch_warnings():
            # Python 3.12+ warns about forking beside native threads; _may_fork says why it is safe.
            warnings.simplefilter("ignore", DeprecationWarning)
            pid = os.fork()
    except OSError:  # no memory or process slot for a fork: a fresh interpreter may still start
        os.close(r)
        os.close(w)
        return _probe_spawned(path, level, limit)
    if pid == 0:  # the child: never returns, never runs the parent's exit handlers
        code = 0
        try:
            os.close(r)
            faulthandler.disable()  # a crash must not print a traceback dump on the user's stderr
            signal.signal(signal.SIGINT, signal.SIG_DFL)
            null = os.open(os.devnull, os.O_WRONLY)
            os.dup2(null, 1)
            os.dup2(null, 2)
            _in_probe = True
            try:
                read_for_probe(path, level)
                out = "ok"
            except BaseException as exc:  # noqa: BLE001 - every failure becomes the parent's line
                out = "error\t" + _child_error(path, exc)
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
                return _hang_message(path, limit)
            chunk = os.read(r, 1 << 16)
            if not chunk:
                break
            data += chunk
        _, status = os.waitpid(pid, 0)
        done = True
        text = data.decode("utf-8", "surrogateescape")
        if text == "ok" and os.WIFEXITED(status) and os.WEXITSTATUS(status) == 0:
            return None
        if text.startswith("error\t"):
            return text[len("error\t"):]
        if os.WIFSIGNALED(status):
            return _crash_message(path, signum=os.WTERMSIG(status))
        return _crash_message(path, signum=None, code=os.WEXITSTATUS(status))
    finally:
        os.close(r)
        if not done:  # a hang, or the parent interrupted (Ctrl-C): the child goes too
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
            os.waitpid(pid, 0)


def _probe_spawned(path: Path, level: str, limit: float) -> str | None:
    """Probe in a fresh interpreter (threads are running, or there is no fork)."""
    import subprocess  # here: most probes fork, and a cache hit should not pay for the import
    root = str(Path(__file__).resolve().parents[2])
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([root] + [p for p in sys.path if p]),
               **{PROBE_ENV: "off"})
    try:
        proc = subprocess.run([sys.executable, "-m", "fxtl.features.cache_guard", str(path), level],
                              capture_output=True, env=env, timeout=limit + 10.0)
    except subprocess.TimeoutExpired:
        return _hang_message(path, limit)
    except OSError:
        return None  # no child can be started here: the caller reads in-process, unguarded
    lines = proc.stdout.decode("utf-8", "surrogateescape").strip().splitlines()
    text = lines[-1] if lines else ""
    if proc.returncode == 0 and text == "ok":
        return None
    if text.startswith("error\t"):
        return text[len("error\t"):]
    rc = proc.returncode  # negative: killed by that signal (POSIX)
    return _crash_message(path, signum=-rc if rc < 0 else None, code=rc)


def _main(argv: list[str]) -> int:
    global _in_probe
    faulthandler.disable()
    # fxtl.features.store imports this module again under its own name: switch that copy off too.
    os.environ[PROBE_ENV] = "off"
    _in_probe = True
    path, level = Path(argv[0]), argv[1]
    try:
        read_for_probe(path, level)
        out = "ok"
    except BaseException as exc:  # noqa: BLE001
        out = "error\t" + _child_error(path, exc)
    sys.stdout.write(out)
    sys.stdout.flush()
    return 0


if __name__ == "__main__":
    sys.exit(_main(sys.argv[1:]))
