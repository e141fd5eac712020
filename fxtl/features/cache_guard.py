"""Read a cache in a child process before fxtl reads it, so that libhdf5 cannot take fxtl down.

A damaged HDF5 file can make libhdf5 itself crash (SIGSEGV) or loop for ever while h5py opens or
reads it; Python cannot catch either. So before a reader opens a cache, a child process
(:func:`fxtl._isolate.run_isolated`) opens it, runs the spec's checks and reads every element the
caller will read (:mod:`fxtl.features.cache_probe`), with a time limit. A crash, a hang or a failure there becomes one
:class:`~fxtl.errors.CacheError` line naming the file and the fix; only a file the child read
cleanly is opened in this process.

Whether to isolate is the caller's choice: every reader of :mod:`fxtl.features.store` takes
``isolate=``. What a child found is remembered only by a :class:`CacheGuard` the caller enters
(``with CacheGuard(): ...``, as the ``fxtl`` command does for each command, and :func:`guarded`
for one API call that reads a file several times), per file (device, inode, size, mtime) and
for that block only; a cache written inside the block is known good. So a command pays for one
probe per cache at most, and nothing outlives the block.
"""
from __future__ import annotations

import contextlib
import contextvars
import os
import stat
from pathlib import Path
from typing import Iterator

from .._isolate import run_isolated
from ..errors import CacheError, ParameterError
from .spec import MAX_EXPANSION, PROBE_READ_ALL_BYTES

__all__ = ["CacheGuard", "guard_cache", "guarded", "remember_written", "probe_seconds", "LEVELS",
           "PROBE_SECONDS"]

# Seconds the child may take to read a cache's structure; reading the features adds time per byte.
PROBE_SECONDS = 30.0
_PROBE_BYTES_PER_SECOND = 100 << 20
_FIX = "re-create it with `fxtl extract`"

# What the child reads, from least to most: the root attribute `format` only (is it fxtl's?), the
# attributes, checks and small datasets, and all of it with /features.
LEVELS = ("format", "meta", "all")
_Key = tuple[int, int, int, int]


class CacheGuard:
    """The reads of one block of work: isolated or not, and what the children found.

    Entered with ``with``, it is what the readers of :mod:`fxtl.features.store` use when they
    are called with ``isolate=None`` (their default) inside the block; outside any block they
    isolate every read and remember nothing.

    Parameters
    ----------
    isolate : bool
        Read each cache in a child first (default). False reads in-process only: faster for a
        file known good, but a file on which libhdf5 crashes takes the process down.

    Examples
    --------
    >>> with CacheGuard():                                    # doctest: +SKIP
    ...     a = load_features("cache/x.h5")                    # one probe
    ...     b = load_features("cache/x.h5")                    # none: the verdict is known
    """

    def __init__(self, *, isolate: bool = True) -> None:
        self.isolate = bool(isolate)
        self._verdicts: dict[_Key, dict[str, str | None]] = {}
        self._tokens: list[contextvars.Token] = []

    def __enter__(self) -> "CacheGuard":
        self._tokens.append(_active.set(self))
        return self

    def __exit__(self, *exc) -> None:
        _active.reset(self._tokens.pop())

    def check(self, path: str | Path, *, level: str = "all") -> None:
        """Raise :class:`CacheError` unless a child reads ``path`` cleanly (once per file)."""
        if level not in LEVELS:
            raise ParameterError("level", f"level must be one of {', '.join(LEVELS)}, got {level!r}")
        path = Path(path)
        key = _key(path)
        if key is None:
            return  # the reader names a missing or irregular file itself
        known = self._verdicts.setdefault(key, {})
        if any(known.get(lv, "") is None for lv in LEVELS[LEVELS.index(level):]):
            return  # read cleanly at this level or a deeper one
        if known.get(level):
            raise CacheError(known[level])
        error = _probe(path, level)
        known[level] = error
        if error is not None:
            raise CacheError(error)

    def written(self, path: str | Path) -> None:
        """Record that the complete cache ``path`` was just written in this block: no probe."""
        key = _key(Path(path))
        if key is not None:
            self._verdicts[key] = {"all": None}


_active: contextvars.ContextVar[CacheGuard | None] = contextvars.ContextVar("fxtl_cache_guard",
                                                                            default=None)


def guard_cache(path: str | Path, *, features: bool = True, level: str | None = None,
                isolate: bool | None = None) -> None:
    """Raise :class:`CacheError` unless a child process reads ``path`` cleanly.

    Parameters
    ----------
    path : str or Path
        The cache file.
    features : bool
        Also read ``/features`` (every value up to 512 MiB declared, else its chunk index and
        first and last blocks); without it, the attributes, the checks and the small datasets.
    level : {"format", "meta", "all"}, optional
        Overrides ``features``: ``"format"`` reads the root attribute ``format`` only (any
        HDF5 file), ``"meta"`` and ``"all"`` are ``features=False`` and ``True``.
    isolate : bool, optional
        True: probe in a child (the entered :class:`CacheGuard` remembers the verdict, if any).
        False: do nothing. None: as the entered :class:`CacheGuard` says; True outside one.

    Raises
    ------
    CacheError
        One line naming the file: the error the checks raised, or that reading it crashed the
        HDF5 library or did not finish, and ``re-create it with `fxtl extract```.

    Examples
    --------
    >>> guard_cache("damaged.h5")                                   # doctest: +SKIP
    Traceback (most recent call last):
    fxtl.errors.CacheError: damaged.h5 is damaged: reading it crashed the HDF5 library (SIGSEGV); re-create it with `fxtl extract`
    """
    level = level or ("all" if features else "meta")
    active = _active.get()
    if isolate is None:
        isolate = active.isolate if active is not None else True
    if not isolate:
        return
    (active if active is not None and active.isolate else CacheGuard()).check(path, level=level)


@contextlib.contextmanager
def guarded() -> Iterator[None]:
    """A block in which each cache is probed once: inside the entered :class:`CacheGuard`, or
    a new one until the block ends. For an API call that opens a file several times (a head
    streamed from a large cache opens it once per pass): 16 probes of one file became 1."""
    if _active.get() is not None:
        yield
        return
    with CacheGuard():
        yield


def remember_written(path: str | Path) -> None:
    """Tell the entered :class:`CacheGuard` (if any) that ``path`` was just written complete."""
    active = _active.get()
    if active is not None:
        active.written(path)


def _key(path: Path) -> _Key | None:
    try:
        st = os.stat(path)
    except OSError:
        return None
    if not stat.S_ISREG(st.st_mode):  # a FIFO or device is never handed to a child
        return None
    return (st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns)


def probe_seconds(path: Path, *, features: bool) -> float:
    """The child's time limit for ``path``: :data:`PROBE_SECONDS`, plus read time for features.

    The child refuses a dataset declaring more than ``MAX_EXPANSION`` times what the file stores
    before reading it, so that bound on the declared bytes bounds the read time too.
    """
    if not features:
        return PROBE_SECONDS
    try:
        size = min(os.path.getsize(path) * MAX_EXPANSION, PROBE_READ_ALL_BYTES)
    except OSError:
        size = 0
    return PROBE_SECONDS + size / _PROBE_BYTES_PER_SECOND


def _probe(path: Path, level: str) -> str | None:
    limit = probe_seconds(path, features=level == "all")
    # Named, not imported: the reader (and h5py) load in the child, and `fxtl` starts light.
    return run_isolated("fxtl.features.cache_probe:read_for_probe", path, level, limit=limit,
                        fix=_FIX)
