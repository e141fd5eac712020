"""Check an open cache against docs/cache-format.md, once, before anything reads its values.

Every rule the spec states as MUST for a reader's safety is checked here: what fails becomes one
:class:`~fxtl.errors.CacheError` naming the file, what is wrong, and the fix. Nothing downstream
(heads, export, predict) then needs to guard against a damaged or hand-edited cache.
"""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from ..errors import CacheError

__all__ = ["check_cache"]

_ROW_DATASETS = ("features", "labels", "paths", "split")
_FIX = "re-create it with `fxtl extract`"


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


def check_cache(f, path: Path) -> None:
    """Raise :class:`CacheError` unless the open HDF5 file ``f`` is a cache fxtl can read."""
    from .store import FORMAT, FORMAT_VERSION, READABLE_VERSIONS, REQUIRED_ATTRS

    fmt = _text(f.attrs.get("format"))
    if fmt != FORMAT:
        raise CacheError(f"{path} is an HDF5 file but not an fxtl feature cache (format={fmt!r}); "
                         "pass a cache written by `fxtl extract`")
    version = f.attrs.get("format_version")
    _check_version(path, version, FORMAT_VERSION, READABLE_VERSIONS)
    _check_complete(path, f.attrs.get("complete"))
    missing = [k for k in REQUIRED_ATTRS if k not in f.attrs]
    missing += ["/" + name for name in _ROW_DATASETS if name not in f]
    if missing:
        raise _damaged(path, f"missing {', '.join(missing)}")
    import h5py

    for name in _ROW_DATASETS:
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
    feats, labels, paths, split = (f[name] for name in _ROW_DATASETS)
    shapes = ", ".join(f"/{k} {list(f[k].shape)}" for k in _ROW_DATASETS)
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
    from .store import SPLITS

    values = set()
    for start in range(0, n, 1 << 20):
        values.update(np.unique(np.asarray(ds[start:start + (1 << 20)])).tolist())
    bad = sorted(str(_text(v)) for v in values if _text(v) not in SPLITS)
    if bad:
        raise _damaged(path, f"/split holds {', '.join(map(repr, bad[:3]))}; the spec allows "
                             "train, val and test")


def _check_attrs(path: Path, f) -> None:
    from .store import _JSON_ATTRS

    for key in _JSON_ATTRS:
        if key in f.attrs:
            text = _text(f.attrs[key])
            try:
                if isinstance(text, str) and text:
                    json.loads(text)
                elif not isinstance(text, str):
                    raise ValueError
            except ValueError:
                raise _damaged(path, f"attribute {key} is not JSON text") from None
    for key in ("backbone", "weights_sha256", "precision", "layer", "fingerprint"):
        if not isinstance(_text(f.attrs[key]), str):
            raise _damaged(path, f"attribute {key} is {_show(f.attrs[key])}, the spec says a string")


def _check_errors(path: Path, f) -> None:
    if "errors" not in f:
        return
    import h5py

    g = f["errors"]
    if not isinstance(g, h5py.Group) or not all(isinstance(g.get(k), h5py.Dataset)
                                                for k in ("path", "reason")):
        raise _damaged(path, "/errors must be a group holding datasets path and reason")
    if g["path"].shape != g["reason"].shape or len(g["path"].shape) != 1:
        raise _damaged(path, "/errors/path and /errors/reason must be 1-D and of one length")
