"""Check a cache against docs/cache-format.md, once, before anything reads its values.

Every rule the spec states as MUST for a reader's safety is checked here: what fails becomes one
:class:`~fxtl.errors.CacheError` naming the file, what is wrong, and the fix. Nothing downstream
(heads, export, predict) then needs to guard against a damaged, hand-edited or hostile cache.
:func:`check_file` runs before HDF5 sees the file, :func:`check_cache` on the open file; the
first checks of the latter read metadata only, so a file that points outside itself or declares
more than it holds is refused before a byte of data is read.
"""
from __future__ import annotations

import json
import math
import os
import stat
from pathlib import Path

import h5py
import numpy as np

from ..errors import CacheError
from .spec import (EXPANSION_SLACK_BYTES, FORMAT, FORMAT_VERSION, JSON_ATTRS, MAX_EXPANSION,
                   READABLE_VERSIONS, REQUIRED_ATTRS, ROW_DATASETS, SPLITS, STRING_ATTRS)

__all__ = ["check_file", "check_cache", "check_self_contained", "declared_bytes"]

_FIX = "re-create it with `fxtl extract`"
_HDF5_SIGNATURE = b"\x89HDF\r\n\x1a\n"


def _damaged(path: Path, what: str) -> CacheError:
    return CacheError(f"{path} is damaged: {what}; {_FIX}")


def _show(value) -> str:
    """A stored value, shown on one short line (a forged one may be a big array)."""
    value = _text(value)
    if isinstance(value, np.ndarray):
        return f"an array of {value.dtype} {list(value.shape)}"
    return repr(value)[:80]


def _text(value):
    if isinstance(value, bytes):
        return value.decode("utf-8", "replace")
    if isinstance(value, np.ndarray) and value.shape == ():
        return _text(value[()])
    if isinstance(value, np.generic) and not isinstance(value, np.bytes_):
        return value.item()
    return value


def check_file(path: Path) -> None:
    """Raise :class:`CacheError` unless ``path`` is a regular file with HDF5's signature.

    Only ``os.stat`` and a read of the signature happen here: a FIFO, a device or a socket is
    refused before anything opens it (opening a FIFO blocks until a writer comes).
    """
    try:
        st = os.stat(path)
    except FileNotFoundError:
        raise CacheError(f"{path}: no such cache file; create one with `fxtl extract DATA_DIR`") from None
    except OSError as exc:
        raise CacheError(f"{path} cannot be read ({exc.strerror or exc}); check its permissions "
                         "or re-create it with `fxtl extract`") from None
    if stat.S_ISDIR(st.st_mode):
        raise CacheError(f"{path} is a directory, not a cache file; pass the .h5 file `fxtl extract` printed")
    if not stat.S_ISREG(st.st_mode):
        raise CacheError(f"{path} is not a regular file (a pipe, device or socket); pass the .h5 "
                         "file `fxtl extract` wrote")
    if not _has_hdf5_signature(path, st.st_size):
        raise CacheError(f"{path} is not an HDF5 file; pass a cache written by `fxtl extract`")


def _has_hdf5_signature(path: Path, size: int) -> bool:
    """HDF5's signature at offset 0, 512, 1024, ... (where the library looks for it), read here
    rather than by ``h5py.is_hdf5``, which parses the superblock in this process."""
    try:
        with open(path, "rb") as fh:
            offset = 0
            while offset + 8 <= size:
                fh.seek(offset)
                if fh.read(8) == _HDF5_SIGNATURE:
                    return True
                offset = 512 if offset == 0 else offset * 2
    except OSError as exc:
        raise CacheError(f"{path} cannot be read ({exc.strerror or exc}); check its permissions "
                         "or re-create it with `fxtl extract`") from None
    return False


def check_self_contained(f, path: Path) -> None:
    """Raise :class:`CacheError` unless every object of ``f`` keeps its data in ``f``.

    External links, external raw storage and virtual datasets would make a reader open other
    files (``/etc/passwd``, a file of the reader's) on the file's say; a declared shape above
    what the file stores (a fill value stands in for the rest) would make it allocate what the
    file's author chose. Metadata only: no dataset value is read.
    """
    links: list[tuple[bytes, int]] = []

    def note(name: bytes, info) -> None:  # returning None walks on (HDF5's visit protocol)
        links.append((name, info.type))

    f.id.links.visit(note, info=True)  # every link once, soft and external ones not followed
    for name, kind in links:
        where = "/" + name.decode("utf-8", "replace")
        if kind == h5py.h5l.TYPE_EXTERNAL:
            raise _hostile(path, f"{where} is an external link (to another file)")
        if kind != h5py.h5l.TYPE_HARD:
            continue
        obj = f.get(where)
        if not isinstance(obj, h5py.Dataset):
            continue
        if obj.is_virtual:
            raise _hostile(path, f"{where} is a virtual dataset (its data is in other files)")
        if obj.external:
            raise _hostile(path, f"{where} keeps its data in external files "
                                 f"({obj.external[0][0]!s:.60})")
        declared = declared_bytes(obj)
        stored = obj.id.get_storage_size()
        if declared > MAX_EXPANSION * stored + EXPANSION_SLACK_BYTES:
            raise _damaged(path, f"{where} declares shape {list(obj.shape)} ({declared / 2**20:.0f} "
                                 f"MiB) but the file stores {stored / 2**20:.1f} MiB of it (a reader "
                                 f"takes at most {MAX_EXPANSION}x what is stored)")


def declared_bytes(ds) -> int:
    """Bytes a full read of dataset ``ds`` allocates, from its shape and type (metadata only)."""
    return math.prod(int(d) for d in (ds.shape or ())) * int(ds.dtype.itemsize)


def _hostile(path: Path, what: str) -> CacheError:
    return CacheError(f"{path} is refused: {what}; a cache must hold all its data itself "
                      f"(docs/cache-format.md, \"File\"); {_FIX}")


def check_cache(f, path: Path) -> None:
    """Raise :class:`CacheError` unless the open HDF5 file ``f`` is a cache fxtl can read."""
    check_self_contained(f, path)
    fmt = _text(f.attrs.get("format"))
    if fmt != FORMAT:
        raise CacheError(f"{path} is an HDF5 file but not an fxtl feature cache (format={fmt!r}); "
                         "pass a cache written by `fxtl extract`")
    version = f.attrs.get("format_version")
    _check_version(path, version, FORMAT_VERSION, READABLE_VERSIONS)
    _check_complete(path, f.attrs.get("complete"))
    missing = [k for k in REQUIRED_ATTRS if k not in f.attrs]
    missing += ["/" + name for name in ROW_DATASETS if name not in f]
    if missing:
        raise _damaged(path, f"missing {', '.join(missing)}")
    for name in ROW_DATASETS:
        if not isinstance(f[name], h5py.Dataset):
            raise _damaged(path, f"/{name} is a {type(f[name]).__name__.lower()}, not a dataset")
    n = _check_shapes(path, f)
    class_names = _check_class_names(path, f.attrs.get("class_names"))
    _check_labels(path, f["labels"], len(class_names))
    _check_split(path, f["split"], n)
    _check_attrs(path, f)
    _check_errors(path, f)


def _check_version(path: Path, version, newest: int, readable: tuple[int, ...]) -> None:
    if isinstance(version, (str, bytes)) or (isinstance(version, np.ndarray) and version.dtype.kind in "SOU"):
        raise _damaged(path, f"format_version is stored as text ({_show(version)}), the spec "
                             "says an integer")
    if not isinstance(version, (int, np.integer)) or isinstance(version, (bool, np.bool_)):
        raise _damaged(path, f"format_version is {_show(version)}, the spec says an integer")
    if int(version) > newest:
        raise CacheError(f"{path} has format_version {int(version)}, this fxtl reads up to "
                         f"{newest}; upgrade fxtl (pip install -U fxtl)")
    if int(version) not in readable:
        raise _damaged(path, f"format_version {int(version)} does not exist")


def _check_complete(path: Path, complete) -> None:
    if complete is None or (isinstance(complete, (bool, np.bool_, int, np.integer)) and not complete):
        raise CacheError(f"{path} is incomplete; run `fxtl extract` again to finish it")
    if isinstance(complete, (bool, np.bool_)) or (isinstance(complete, (int, np.integer))
                                                   and int(complete) == 1):
        return
    raise _damaged(path, f"complete is {_show(complete)}, the spec says 1 (an integer)")


def _check_shapes(path: Path, f) -> int:
    feats, labels, paths, split = (f[name] for name in ROW_DATASETS)
    shapes = ", ".join(f"/{k} {list(f[k].shape)}" for k in ROW_DATASETS)
    if len(feats.shape) != 2 or any(ds.shape != (feats.shape[0],) for ds in (labels, paths, split)):
        raise _damaged(path, f"/features must be [N, D] and /labels, /paths, /split [N] (found {shapes})")
    n, dim = feats.shape
    if dim == 0:
        raise _damaged(path, "/features has zero columns (no feature values)")
    if feats.dtype.kind != "f":
        raise _damaged(path, f"/features holds {feats.dtype}, the spec says float32")
    if labels.dtype.kind not in "iu":
        raise _damaged(path, f"/labels holds {labels.dtype}, the spec says int64")
    for name in ("paths", "split"):
        if f[name].dtype.kind not in "SO":
            raise _damaged(path, f"/{name} holds {f[name].dtype}, the spec says UTF-8 strings")
    for key, actual in (("n", n), ("dim", dim)):
        stored = f.attrs.get(key)
        if stored is not None and (not isinstance(stored, (int, np.integer)) or int(stored) != actual):
            raise _damaged(path, f"attribute {key} is {_show(stored)} but /features has {actual}")
    return int(n)


def _check_class_names(path: Path, value) -> list[str]:
    if isinstance(value, (str, bytes)):
        raise _damaged(path, f"class_names is one string ({_show(value)}), the spec says an "
                             "array of strings, one per class")
    arr = np.asarray(value)
    if arr.ndim != 1 or arr.dtype.kind not in "SOU":
        raise _damaged(path, "class_names must be a 1-D array of strings")
    names = [_text(v) for v in arr.tolist()]
    if not all(isinstance(v, str) for v in names):
        raise _damaged(path, "class_names must be a 1-D array of strings")
    seen: set[str] = set()
    twice = [v for v in names if v in seen or seen.add(v)]
    if twice:
        raise _damaged(path, f"class_names holds {twice[0]!r:.60} twice; each class is named once")
    return names


def _check_labels(path: Path, ds, n_classes: int) -> None:
    # Read in blocks: an int64 column is small, but a forged shape must not allocate much.
    lo, hi = 0, -1
    for start in range(0, ds.shape[0], 1 << 20):
        block = ds[start:start + (1 << 20)]
        if len(block):
            lo, hi = min(lo, int(block.min())), max(hi, int(block.max()))
    if lo < -1:
        raise _damaged(path, f"/labels holds {lo}; labels are -1 (unlabelled) or an index into "
                             "class_names")
    if hi >= n_classes:
        raise _damaged(path, f"/labels holds {hi} but class_names has {n_classes} "
                             f"name{'s' if n_classes != 1 else ''} (labels index into it)")


def _check_split(path: Path, ds, n: int) -> None:
    values = set()
    for start in range(0, n, 1 << 20):
        values.update(np.unique(np.asarray(ds[start:start + (1 << 20)])).tolist())
    bad = sorted(str(_text(v)) for v in values if _text(v) not in SPLITS)
    if bad:
        raise _damaged(path, f"/split holds {', '.join(map(repr, bad[:3]))}; the spec allows "
                             "train, val and test")


def _check_attrs(path: Path, f) -> None:
    for key in JSON_ATTRS:
        if key in f.attrs:
            text = _text(f.attrs[key])
            try:
                if isinstance(text, str) and text:
                    json.loads(text)
                elif not isinstance(text, str):
                    raise ValueError
            except ValueError:
                raise _damaged(path, f"attribute {key} is not JSON text") from None
    for key in STRING_ATTRS:
        if not isinstance(_text(f.attrs[key]), str):
            raise _damaged(path, f"attribute {key} is {_show(f.attrs[key])}, the spec says a string")


def _check_errors(path: Path, f) -> None:
    if "errors" not in f:
        return
    g = f["errors"]
    if not isinstance(g, h5py.Group) or not all(isinstance(g.get(k), h5py.Dataset)
                                                for k in ("path", "reason")):
        raise _damaged(path, "/errors must be a group holding datasets path and reason")
    if g["path"].shape != g["reason"].shape or len(g["path"].shape) != 1:
        raise _damaged(path, "/errors/path and /errors/reason must be 1-D and of one length")
