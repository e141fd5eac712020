"""The HDF5 feature cache: writer and reader of format ``fxtl-features`` version 1.

The spec lives in ``docs/cache-format.md``; this module mirrors it. Writers stamp every element
with ``encoding-type``/``encoding-version``; readers check ``format`` and ``format_version`` and
refuse what they do not know, so a cache is never misread silently.
"""
from __future__ import annotations

import contextlib
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Iterator, Sequence

import numpy as np

from .._util import atomic_path
from ..errors import CacheError

__all__ = ["FORMAT", "FORMAT_VERSION", "FeatureCache", "load_features", "write_cache",
           "read_attrs", "iter_feature_chunks", "summarize"]

FORMAT = "fxtl-features"
FORMAT_VERSION = 1
# Rows per HDF5 chunk of /features are chosen so that one chunk is about 1 MiB.
_CHUNK_BYTES = 1 << 20
_STR = None  # set lazily to h5py.string_dtype("utf-8")

# Root attributes every version-1 cache carries (docs/cache-format.md, "Root attributes").
REQUIRED_ATTRS = ("format", "format_version", "class_names", "backbone", "weights_sha256",
                  "preprocessing", "precision", "layer", "fingerprint", "created",
                  "fxtl_version", "complete")
# Attributes holding JSON text, decoded by the reader.
_JSON_ATTRS = ("preprocessing", "versions", "timings")


def _h5():
    try:
        import h5py
    except ImportError as exc:  # pragma: no cover - h5py is a hard dependency
        raise CacheError("h5py is not installed; pip install h5py") from exc
    return h5py


def _str_dtype():
    global _STR
    if _STR is None:
        _STR = _h5().string_dtype("utf-8")
    return _STR


def _stamp(obj, encoding_type: str) -> None:
    obj.attrs["encoding-type"] = encoding_type
    obj.attrs["encoding-version"] = "1"


def write_cache(path: Path, *, chunks: Iterable[np.ndarray], n: int, dim: int,
                labels: Sequence[int], paths: Sequence[str], split: Sequence[str],
                class_names: Sequence[str], errors: Sequence[tuple[str, str]],
                attrs: dict[str, Any]) -> Path:
    """Write a complete cache at ``path`` atomically.

    ``chunks`` yields float32 arrays whose rows, concatenated, are the ``n`` feature rows in
    order; they are streamed to disk, so memory does not grow with ``n``. The file first exists
    as a temporary sibling and replaces ``path`` in one rename when everything is written.
    """
    h5py = _h5()
    path = Path(path)
    _check_space(path, n * dim * 4 + sum(len(p) + len(s) + 48 for p, s in zip(paths, split)))
    rows_per_chunk = max(1, min(max(n, 1), _CHUNK_BYTES // (4 * max(dim, 1))))
    with atomic_path(path) as tmp:
        with h5py.File(tmp, "w") as f:
            feats = f.create_dataset("features", shape=(n, dim), dtype="float32",
                                     chunks=(rows_per_chunk, dim) if n else None)
            _stamp(feats, "dense-array")
            row = 0
            for block in chunks:
                block = np.asarray(block, dtype=np.float32)
                if block.ndim != 2 or block.shape[1] != dim:
                    raise CacheError(f"internal: feature block of shape {block.shape}, expected (*, {dim})")
                if len(block):
                    feats[row:row + len(block)] = block
                row += len(block)
            if row != n:
                raise CacheError(f"internal: wrote {row} feature rows, expected {n}")
            _stamp(f.create_dataset("labels", data=np.asarray(labels, dtype=np.int64)), "dense-array")
            _stamp(f.create_dataset("paths", data=list(paths), dtype=_str_dtype()), "string-array")
            _stamp(f.create_dataset("split", data=list(split), dtype=_str_dtype()), "string-array")
            g = f.create_group("errors")
            _stamp(g, "errors-table")
            g.create_dataset("path", data=[p for p, _ in errors], dtype=_str_dtype(), shape=(len(errors),))
            g.create_dataset("reason", data=[r for _, r in errors], dtype=_str_dtype(), shape=(len(errors),))
            for key, value in attrs.items():
                f.attrs[key] = _encode_attr(key, value)
            f.attrs["class_names"] = np.array(list(class_names), dtype=object) if class_names else \
                np.array([], dtype=_str_dtype())
            f.attrs["format"] = FORMAT
            f.attrs["format_version"] = FORMAT_VERSION
            f.attrs["n"] = n
            f.attrs["dim"] = dim
            f.attrs["complete"] = True
    return path


def _check_space(path: Path, payload: int) -> None:
    """Refuse before writing when the disk cannot hold the file.

    HDF5 fails late (at flush/close) on a full disk and leaves h5py objects that can crash the
    interpreter when collected, so the space is checked up front.
    """
    import shutil

    from .._util import ensure_dir

    ensure_dir(path.parent)
    need = int(payload * 1.05) + (256 << 10)
    free = shutil.disk_usage(path.parent).free
    if free < need:
        raise CacheError(f"cannot write {path}: No space left on device (needs about "
                         f"{need / 2**20:.1f} MiB, {free / 2**20:.1f} MiB free); free space or choose "
                         "another --cache-dir (nothing was overwritten)")


def _encode_attr(key: str, value: Any) -> Any:
    if key in _JSON_ATTRS or isinstance(value, (dict, list)):
        return json.dumps(value, sort_keys=True)
    if value is None:
        return ""
    return value


def decode_attr(value: Any) -> Any:
    if isinstance(value, bytes):
        return value.decode()
    if isinstance(value, np.ndarray):
        return [decode_attr(v) for v in value.tolist()]
    if isinstance(value, np.generic):
        return value.item()
    return value


def open_cache(path: Path):
    h5py = _h5()
    path = Path(path)
    if not path.exists():
        raise CacheError(f"{path}: no such cache file; create one with `fxtl extract DATA_DIR`")
    if path.is_dir():
        raise CacheError(f"{path} is a directory, not a cache file; pass the .h5 file `fxtl extract` printed")
    try:
        if not h5py.is_hdf5(path):
            raise CacheError(f"{path} is not an HDF5 file; pass a cache written by `fxtl extract`")
        f = h5py.File(path, "r")
    except OSError as exc:
        raise CacheError(f"{path} cannot be read as HDF5 ({exc}); re-create it with `fxtl extract`") from None
    fmt = decode_attr(f.attrs.get("format"))
    if fmt != FORMAT:
        f.close()
        raise CacheError(f"{path} is an HDF5 file but not an fxtl feature cache (format={fmt!r}); "
                         "pass a cache written by `fxtl extract`")
    version = decode_attr(f.attrs.get("format_version"))
    if not isinstance(version, int) or version > FORMAT_VERSION or version < 1:
        f.close()
        raise CacheError(f"{path} has format_version {version}, this fxtl reads up to "
                         f"{FORMAT_VERSION}; upgrade fxtl (pip install -U fxtl)")
    if not decode_attr(f.attrs.get("complete", False)):
        f.close()
        raise CacheError(f"{path} is incomplete; run `fxtl extract` again to finish it")
    missing = [k for k in REQUIRED_ATTRS if k not in f.attrs]
    for name in ("features", "labels", "paths", "split"):
        if name not in f:
            missing.append("/" + name)
    if missing:
        f.close()
        raise CacheError(f"{path} is damaged: missing {', '.join(missing)}; re-create it with `fxtl extract`")
    shapes = {name: f[name].shape for name in ("features", "labels", "paths", "split")}
    n = shapes["features"][0] if len(shapes["features"]) == 2 else None
    if n is None or any(shapes[k] != (n,) for k in ("labels", "paths", "split")):
        f.close()
        raise CacheError(f"{path} is damaged: /features must be [N, D] and /labels, /paths, /split [N] "
                         f"(found {', '.join(f'{k} {list(v)}' for k, v in shapes.items())}); "
                         "re-create it with `fxtl extract`")
    return f


@contextlib.contextmanager
def _reading(path: Path) -> Iterator[None]:
    """Turn what a damaged file makes HDF5 raise (at open or at any later read) into CacheError.

    Bytes overwritten on disk surface as OSError, RuntimeError, KeyError, ValueError or a
    UnicodeDecodeError from whichever object is read first; the user only needs to know which
    file is damaged.
    """
    try:
        yield
    except CacheError:
        raise
    except (OSError, RuntimeError, KeyError, ValueError, TypeError, IndexError) as exc:
        reason = (str(exc).splitlines() or [type(exc).__name__])[0][:160] or type(exc).__name__
        raise CacheError(f"{path} is damaged ({reason}); re-create it with `fxtl extract`") from None


def read_attrs(path: Path) -> dict[str, Any]:
    """Root attributes of a cache, decoded (JSON attributes become dicts)."""
    with _reading(path), open_cache(path) as f:
        return cache_attrs(f)


def cache_attrs(f) -> dict[str, Any]:
    out = {}
    for key, value in f.attrs.items():
        value = decode_attr(value)
        if key in _JSON_ATTRS and isinstance(value, str) and value:
            value = json.loads(value)
        out[key] = value
    return out


def summarize(path: Path) -> dict[str, Any]:
    """Shape, splits, classes and errors of a cache without reading the features."""
    with _reading(path), open_cache(Path(path)) as f:
        attrs = cache_attrs(f)
        split = [decode_attr(s) for s in f["split"][...]]
        errors = []
        if "errors" in f:
            g = f["errors"]
            errors = [{"path": decode_attr(p), "reason": decode_attr(r)}
                      for p, r in zip(g["path"][...], g["reason"][...])]
        n, dim = f["features"].shape
    names, counts = np.unique(np.array(split, dtype=str), return_counts=True)
    return {"n": int(n), "dim": int(dim), "splits": {str(k): int(v) for k, v in zip(names, counts)},
            "errors": errors, "class_names": [str(c) for c in attrs.get("class_names", [])],
            "attrs": attrs}


@dataclass
class FeatureCache:
    """A feature cache loaded in memory.

    Attributes
    ----------
    path : Path
    features : ndarray of float32, shape (n, dim)
    labels : ndarray of int64, shape (n,) -- index into ``class_names``; -1 means unlabelled
    paths : list of str -- image paths relative to the dataset root
    split : ndarray of str -- ``train``, ``val`` or ``test`` per row
    class_names : list of str
    attrs : dict -- provenance (backbone, weights_sha256, preprocessing, precision, fingerprint...)
    errors : list of (path, reason) -- images that could not be used

    Examples
    --------
    >>> cache = load_features("cache/hymenoptera-lite0-0123abcd.h5")  # doctest: +SKIP
    >>> X, y = cache.subset("train")                                    # doctest: +SKIP
    """

    path: Path
    features: np.ndarray
    labels: np.ndarray
    paths: list[str]
    split: np.ndarray
    class_names: list[str]
    attrs: dict[str, Any] = field(default_factory=dict)
    errors: list[tuple[str, str]] = field(default_factory=list)

    @property
    def n(self) -> int:
        return int(self.features.shape[0])

    @property
    def dim(self) -> int:
        return int(self.features.shape[1])

    def __len__(self) -> int:
        return self.n

    @property
    def splits(self) -> dict[str, int]:
        names, counts = np.unique(self.split, return_counts=True)
        return {str(k): int(v) for k, v in zip(names, counts)}

    def mask(self, split: str) -> np.ndarray:
        return self.split == split

    def subset(self, split: str) -> tuple[np.ndarray, np.ndarray]:
        """``(X, y)`` of one split."""
        m = self.mask(split)
        return self.features[m], self.labels[m]

    @property
    def provenance(self) -> dict[str, Any]:
        keys = ("backbone", "weights_sha256", "preprocessing", "precision", "layer", "graph",
                "fingerprint", "fxtl_version", "versions", "dataset_root", "created")
        return {k: self.attrs.get(k) for k in keys if k in self.attrs}

    def __repr__(self) -> str:
        return (f"FeatureCache(path={str(self.path)!r}, n={self.n}, dim={self.dim}, "
                f"splits={self.splits}, classes={len(self.class_names)}, "
                f"backbone={self.attrs.get('backbone')!r})")


def load_features(path: str | Path) -> FeatureCache:
    """Load a cache written by ``fxtl extract``.

    Parameters
    ----------
    path : str or Path
        The ``.h5`` file.

    Returns
    -------
    FeatureCache

    Raises
    ------
    CacheError
        If the file is missing, not HDF5, of another format, of a newer version, or incomplete.
    """
    path = Path(path)
    with _reading(path), open_cache(path) as f:
        attrs = cache_attrs(f)
        features = f["features"][...].astype(np.float32, copy=False)
        labels = f["labels"][...].astype(np.int64, copy=False)
        paths = [decode_attr(p) for p in f["paths"][...]]
        split = np.array([decode_attr(s) for s in f["split"][...]], dtype=object).astype(str)
        errors: list[tuple[str, str]] = []
        if "errors" in f:
            g = f["errors"]
            errors = [(decode_attr(p), decode_attr(r)) for p, r in zip(g["path"][...], g["reason"][...])]
    class_names = [str(c) for c in attrs.get("class_names", [])]
    return FeatureCache(path=path, features=features, labels=labels, paths=paths, split=split,
                        class_names=class_names, attrs=attrs, errors=errors)


def iter_feature_chunks(path: str | Path, *, rows: int = 8192,
                        split: str | None = None) -> Iterator[tuple[np.ndarray, np.ndarray]]:
    """Stream ``(X, y)`` blocks of at most ``rows`` rows without loading the whole cache.

    For caches larger than memory (heads fitted with ``partial_fit``).
    """
    with _reading(path), open_cache(Path(path)) as f:
        n = f["features"].shape[0]
        sp = None if split is None else np.array([decode_attr(s) for s in f["split"][...]])
        for start in range(0, n, rows):
            X = f["features"][start:start + rows]
            y = f["labels"][start:start + rows]
            if sp is not None:
                m = sp[start:start + rows] == split
                X, y = X[m], y[m]
            if len(X):
                yield X.astype(np.float32, copy=False), y.astype(np.int64, copy=False)
