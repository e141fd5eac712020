"""Small shared helpers: atomic writes, hashing, cache home, locking, versions."""
from __future__ import annotations

import contextlib
import errno
import fcntl
import hashlib
import json
import os
import re
import tempfile
import time
from pathlib import Path
from typing import Any, Iterator

from .errors import FxtlError

__all__ = [
    "atomic_write_bytes", "atomic_write_json", "atomic_path", "sha256_file", "default_cache_dir",
    "file_lock", "versions", "now_iso", "json_default", "unique_dir", "say",
    "slug", "current_umask", "read_json", "loads_json", "dumps_json", "meaning_sha256",
    "csv_cell", "csv_text",
]


def default_cache_dir() -> Path:
    """``$FXTL_CACHE`` if set, else ``./cache``."""
    return Path(os.environ.get("FXTL_CACHE", "cache"))


def ensure_dir(path: Path) -> Path:
    """Create ``path`` (and parents); a clear error if the place is read-only or full."""
    try:
        path.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise FxtlError(f"cannot create directory {path}: {exc.strerror}; choose a writable "
                        "place with cache_dir", param="cache_dir") from None
    if not os.access(path, os.W_OK):
        raise FxtlError(f"directory {path} is not writable; choose another with cache_dir",
                        param="cache_dir")
    return path


@contextlib.contextmanager
def atomic_path(final: Path, suffix: str = ".partial") -> Iterator[Path]:
    """Yield a temporary sibling path; on success it replaces ``final`` in one rename.

    On failure the temporary file is removed and ``final`` (old content, if any) is untouched.
    The file gets the mode any new file gets here (``0o666`` less the umask), not mkstemp's
    private ``0o600``, so a cache folder shared by a team stays readable to it.
    """
    final = Path(final)
    ensure_dir(final.parent)
    fd, tmp = tempfile.mkstemp(prefix=final.name + ".", suffix=suffix, dir=final.parent)
    os.close(fd)
    tmp_path = Path(tmp)
    try:
        yield tmp_path
        _fsync_file(tmp_path)
        os.chmod(tmp_path, 0o666 & ~current_umask())
        os.replace(tmp_path, final)
        _fsync_dir(final.parent)
    except BaseException as exc:
        tmp_path.unlink(missing_ok=True)
        reason = storage_failure(exc)
        if reason:
            raise FxtlError(f"cannot write {final}: {reason}; free space or choose another "
                            "cache_dir (nothing was overwritten)", param="cache_dir") from None
        raise


def current_umask() -> int:
    """The process's umask, read without changing it (Linux), else by setting it back at once."""
    try:
        with open("/proc/self/status") as fh:
            for line in fh:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except (OSError, ValueError, IndexError):
        pass
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


_STORAGE_ERRNOS = {errno.ENOSPC: "No space left on device", errno.EDQUOT: "Disk quota exceeded",
                   errno.EROFS: "Read-only file system", errno.EACCES: "Permission denied"}


def storage_failure(exc: BaseException) -> str | None:
    """The reason if ``exc`` is a full disk, quota, read-only or permission failure, else None.

    HDF5 reports these as RuntimeError/OSError with the errno only inside the message text.
    """
    if isinstance(exc, OSError) and exc.errno in _STORAGE_ERRNOS:
        return _STORAGE_ERRNOS[exc.errno]
    if isinstance(exc, (OSError, RuntimeError)):
        text = str(exc)
        for reason in _STORAGE_ERRNOS.values():
            if reason in text:
                return reason
    return None


def _fsync_file(path: Path) -> None:
    with open(path, "rb+") as fh:
        os.fsync(fh.fileno())


def _fsync_dir(path: Path) -> None:
    with contextlib.suppress(OSError):
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def atomic_write_bytes(path: Path, data: bytes) -> None:
    with atomic_path(path) as tmp:
        tmp.write_bytes(data)


def json_default(obj: Any) -> Any:
    """JSON encoder fallback for numpy scalars/arrays and paths."""
    import numpy as np

    if isinstance(obj, np.generic):
        return obj.item()
    if isinstance(obj, np.ndarray):
        return obj.tolist()
    if isinstance(obj, Path):
        return str(obj)
    raise TypeError(f"not JSON serialisable: {type(obj).__name__}")


def atomic_write_json(path: Path, obj: Any) -> None:
    atomic_write_bytes(path, (json.dumps(obj, indent=2, default=json_default) + "\n").encode())


def loads_json(text: str | bytes) -> Any:
    """``json.loads``, with nesting too deep for Python's parser (``'[' * 100000``) reported as
    the ``ValueError`` every other malformed text raises, so readers need one ``except``."""
    try:
        return json.loads(text)
    except RecursionError:
        raise ValueError("JSON nested too deeply to read") from None


def read_json(path: Path) -> Any:
    """The JSON value in the file ``path``; :class:`OSError` or :class:`ValueError` when it
    cannot be had (see :func:`loads_json`)."""
    return loads_json(Path(path).read_text())


def dumps_json(obj: Any, **kwargs: Any) -> str:
    """``json.dumps`` that refuses NaN and infinity (JSON has no such numbers: ``NaN`` in the
    output would make it unreadable to strict parsers); a ValueError names the first one."""
    try:
        return json.dumps(obj, allow_nan=False, default=json_default, **kwargs)
    except ValueError:
        raise ValueError(f"not JSON: a NaN or infinite number at {_first_nonfinite(obj)}") from None


def _first_nonfinite(obj: Any, where: str = "") -> str:
    import math

    if isinstance(obj, float) and not math.isfinite(obj):
        return where or "top level"
    items = obj.items() if isinstance(obj, dict) else enumerate(obj) if isinstance(obj, (list, tuple)) else ()
    for key, value in items:
        found = _first_nonfinite(value, f"{where}.{key}" if where else str(key))
        if found:
            return found
    return ""


def meaning_sha256(record: dict[str, Any], keys: tuple[str, ...]) -> str:
    """sha256 of ``record``'s ``keys`` (absent ones as null) as canonical JSON.

    Stored beside an artifact's file hash, it covers what the file alone does not: the class
    names, preprocessing, backbone and weights hash its answers depend on. An edited sidecar no
    longer matches it. It detects edits and damage, not forgery (anyone can recompute it).
    """
    canon = json.dumps({k: record.get(k) for k in keys}, sort_keys=True, separators=(",", ":"),
                       ensure_ascii=True, default=json_default)
    return hashlib.sha256(canon.encode()).hexdigest()


# A text cell starting with one of these is read as a formula by spreadsheets (CSV injection);
# OWASP's advice: prefix such cells with a single quote. A quote is escaped too, so reading back
# (csv_text) is exact.
_FORMULA_START = ("=", "+", "-", "@", "\t", "\r", "'")


def csv_cell(text: str) -> str:
    """``text`` as a CSV text cell no spreadsheet runs as a formula (``=1+2`` -> ``'=1+2``)."""
    text = str(text)
    return "'" + text if text.startswith(_FORMULA_START) else text


def csv_text(cell: str) -> str:
    """The text :func:`csv_cell` wrote (drops the one quote it may have added)."""
    return cell[1:] if cell.startswith("'") else cell


def sha256_file(path: Path, chunk: int = 1 << 20) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        while block := fh.read(chunk):
            h.update(block)
    return h.hexdigest()


@contextlib.contextmanager
def file_lock(path: Path, *, timeout: float = 3600.0, what: str = "file") -> Iterator[None]:
    """Exclusive advisory lock on ``path`` (created if needed); waits up to ``timeout`` s.

    Used so that two runs on the same cache never write the same file: the second waits for the
    first and then finds its finished result. The holder removes the file when it is done, so
    no ``.lock`` is left beside caches and runs: a waiter that then gets the lock of a removed
    file sees that ``path`` is no longer that file and locks the path afresh.
    """
    path = Path(path)
    ensure_dir(path.parent)
    start = time.monotonic()
    warned = False
    while True:
        fh = open(path, "a+")
        try:
            while True:
                try:
                    fcntl.flock(fh.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
                    break
                except BlockingIOError:
                    if not warned:
                        import sys

                        print(f"fxtl: waiting for another process working on {what} ({path})",
                              file=sys.stderr)
                        warned = True
                    if time.monotonic() - start > timeout:
                        raise FxtlError(f"timed out waiting for the lock {path}; another fxtl "
                                        "process is still running on it") from None
                    time.sleep(0.2)
            if _same_file(fh, path):
                break
        except BaseException:
            fh.close()
            raise
        fh.close()  # the holder removed it while this process waited: lock the new one
    try:
        yield
    finally:
        try:
            path.unlink()  # before the unlock: a waiter then sees a removed file and retries
        except OSError:
            pass  # a read-only folder keeps its lock file; the lock is still released
        fh.close()


def _same_file(fh, path: Path) -> bool:
    try:
        st = os.stat(path)
    except FileNotFoundError:
        return False
    mine = os.fstat(fh.fileno())
    return (st.st_dev, st.st_ino) == (mine.st_dev, mine.st_ino)


class _NoBar:
    """What :func:`progress_bar` returns when nothing is drawn: tqdm's methods, doing nothing
    but count."""

    disable = True

    def __init__(self, total: int) -> None:
        self.total, self.n = total, 0

    def update(self, n: int = 1) -> None:
        self.n += n

    def set_postfix(self, **kwargs) -> None:
        pass

    def close(self) -> None:
        pass


def progress_bar(total: int, desc: str, enabled: bool, **kwargs):
    """A tqdm bar on stderr, drawn only when ``enabled`` and stderr is a terminal (or a
    notebook draws it), so that a CI log gets no bar lines; else a no-op with the same methods.

    No tqdm object is made for a bar that is not drawn: making one starts tqdm's monitor thread,
    which a disabled bar never stops, and a live thread makes every later cache probe start a
    fresh interpreter instead of forking (:mod:`fxtl._isolate`): 0.36 s a probe, not 5 ms.
    """
    import sys

    from tqdm.auto import tqdm

    stream = sys.stderr
    shown = enabled and (tqdm.__module__ == "tqdm.notebook"
                         or (hasattr(stream, "isatty") and stream.isatty()))
    if not shown:
        return _NoBar(total)
    return tqdm(total=total, desc=desc, unit="img", file=stream, dynamic_ncols=True, **kwargs)


def say(msg: str) -> None:
    """Print ``msg`` on stderr on a line of its own, even while a progress bar is drawn there.

    A plain print would glue the message to the bar's current line (``extract: 36%|...|fxtl:
    skipped ...``); tqdm.write clears the bars, prints, and draws them again.
    """
    import sys

    from tqdm.auto import tqdm

    tqdm.write(msg, file=sys.stderr)


def unique_dir(parent: Path, name: str) -> Path:
    """Create and return ``parent/name``, or ``name-2``, ``name-3``... if taken (race-free)."""
    for i in range(1, 1000):
        candidate = Path(parent) / (name if i == 1 else f"{name}-{i}")
        try:
            candidate.mkdir(parents=True)
            return candidate
        except FileExistsError:
            continue
    raise FxtlError(f"too many runs named {name} under {parent}; choose another run_name",
                    param="run_name")


def versions() -> dict[str, str]:
    """Versions of the libraries whose behaviour shapes an artifact."""
    import importlib.metadata as md
    import platform

    out = {"python": platform.python_version()}
    for name in ("fxtl", "torch", "torchvision", "timm", "scikit-learn", "numpy", "h5py", "pillow"):
        try:
            out[name] = md.version(name)
        except md.PackageNotFoundError:
            pass
    return out


def now_iso() -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%S%z")


def slug(text: str) -> str:
    """``text`` as a short file-name-safe token (run and cache names)."""
    return re.sub(r"[^A-Za-z0-9._-]+", "_", str(text)).strip("_")[:40] or "x"
