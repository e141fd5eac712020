"""The HDF5 feature cache: writer and reader of format ``fxtl-features`` (version 2; reads 1).

The spec lives in ``docs/cache-format.md``; this module mirrors it. Writers stamp every element
with ``encoding-type``/``encoding-version``; :func:`open_cache` checks a file against the spec
once, on open, and refuses what it does not know with one line, so a damaged or foreign cache
never reaches numpy or scikit-learn.
"""
from __future__ import annotations

import contextlib
import errno
import json
import os
import shutil
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Iterator, Mapping, Sequence

import h5py
import numpy as np

from .._util import atomic_path, ensure_dir, storage_failure
from ..errors import CacheError, ParameterError
from ..tables import records_frame, require_pandas
from .cache_check import check_cache, check_file
from .cache_guard import guard_cache, remember_written
from .cache_text import (ESCAPED_ATTR, cache_attrs, decode_attr, encode_text, fixed_utf8,
                         read_strings)
from .spec import (CHUNK_BYTES, FORMAT, FORMAT_VERSION, JSON_ATTRS, LAYER_POOLING, LAYERS_GROUP,
                   PROVENANCE_KEYS, READABLE_VERSIONS, REQUIRED_ATTRS, SPLITS, element)

__all__ = ["FORMAT", "FORMAT_VERSION", "READABLE_VERSIONS", "REQUIRED_ATTRS", "PROVENANCE_KEYS",
           "FeatureCache", "load_features", "write_cache", "open_cache", "read_attrs",
           "cache_attrs", "decode_attr", "iter_feature_chunks", "summarize", "read_errors",
           "read_strings", "provenance", "nonfinite_message", "reading_cache", "SPLITS",
           "read_layer"]

# Errors a file system gives when it cannot take more bytes (full disk, quota, size limit).
_NO_SPACE_ERRNOS = (errno.ENOSPC, errno.EDQUOT, errno.EFBIG)
_NO_SPACE_TEXT = ("No space left on device", "Disk quota exceeded", "File too large")


def _stamp(obj) -> None:
    """The element's ``encoding-type`` and ``encoding-version``, as the spec's registry says."""
    spec = element(obj.name)
    obj.attrs["encoding-type"] = spec.encoding_type
    obj.attrs["encoding-version"] = spec.encoding_version


# ----------------------------------------------------------------------------- writer
def write_cache(path: Path, *, chunks: Iterable[np.ndarray], n: int, dim: int,
                labels: Sequence[int], paths: Sequence[str], split: Sequence[str],
                class_names: Sequence[str], errors: Sequence[tuple[str, str]],
                attrs: dict[str, Any],
                layers: Mapping[str, tuple[int, Iterable[np.ndarray]]] | None = None) -> Path:
    """Write a complete cache (format version 3) at ``path`` atomically.

    ``chunks`` yields float32 arrays whose rows, concatenated, are the ``n`` feature rows in
    order; they are streamed to disk, so memory does not grow with ``n``. The file first exists
    as a temporary sibling and replaces ``path`` in one rename when everything is written, so a
    previous cache at ``path`` survives any failure. Strings (paths may hold surrogate escapes
    from ``os.fsdecode``) are stored as the spec's "Text" section says. ``layers`` maps a layer
    name to ``(D_layer, chunks)``, streamed like the features into ``/layers/<name>``.

    Raises
    ------
    CacheError
        When the disk is full or the file would exceed a size limit ("no space"), naming ``path``.
    """
    path = Path(path)
    layers = dict(layers or {})
    need = _size_estimate(n=n, dim=dim + sum(d for d, _ in layers.values()), paths=paths,
                          split=split, errors=errors)
    _check_space(path, need)
    with atomic_path(path) as tmp:
        try:
            # Claim the bytes before HDF5 writes: a full disk or a file-size limit then fails
            # here, cleanly, instead of inside libhdf5, which cannot recover from a failed write.
            _reserve(tmp, need)
            _write_file(tmp, chunks=chunks, n=n, dim=dim, labels=labels, paths=paths, split=split,
                        class_names=class_names, errors=errors, attrs=attrs, layers=layers)
        except (OSError, RuntimeError) as exc:
            if _is_no_space(exc):
                raise CacheError(f"cannot write {path}: no space ({_no_space_reason(exc)}); free "
                                 "space or choose another cache directory (nothing was "
                                 "overwritten)") from None
            raise
    remember_written(path)
    return path


def _is_no_space(exc: BaseException) -> bool:
    if isinstance(exc, OSError) and exc.errno in _NO_SPACE_ERRNOS:
        return True
    text = str(exc)
    return any(t in text for t in _NO_SPACE_TEXT) or storage_failure(exc) == _NO_SPACE_TEXT[0]


def _no_space_reason(exc: BaseException) -> str:
    if isinstance(exc, OSError) and exc.errno in _NO_SPACE_ERRNOS:
        return os.strerror(exc.errno)
    return next((t for t in _NO_SPACE_TEXT if t in str(exc)), "the write failed")


def _size_estimate(*, n: int, dim: int, paths: Sequence[str], split: Sequence[str],
                   errors: Sequence[tuple[str, str]]) -> int:
    """Bytes the file will take: the arrays (strings at their fixed length), HDF5's chunk index
    (about 2 %) and its fixed metadata (about 14 KiB), rounded up."""
    def longest(values) -> int:
        return max([1] + [len(str(v).encode("utf-8", "surrogateescape")) * 4 for v in values])

    strings = n * (longest(paths) + longest(split)) + len(errors) * (
        longest(p for p, _ in errors) + longest(r for _, r in errors))
    return int((n * dim * 4 + n * 8 + strings) * 1.02) + (32 << 10)


def _reserve(tmp: Path, size: int) -> None:
    """Allocate ``size`` bytes for ``tmp`` (raises OSError ENOSPC/EFBIG/EDQUOT when it cannot)."""
    fd = os.open(tmp, os.O_WRONLY)
    try:
        os.posix_fallocate(fd, 0, size)
    except OSError as exc:
        if exc.errno in _NO_SPACE_ERRNOS:
            raise
        # File systems without fallocate (EOPNOTSUPP, EINVAL): HDF5's own errors still apply.
    finally:
        os.close(fd)


def _first_line(exc: BaseException) -> str:
    return ((str(exc).strip().splitlines() or [type(exc).__name__])[0])[:160]


def _write_file(tmp: Path, *, chunks, n, dim, labels, paths, split, class_names, errors, attrs,
                layers) -> None:
    escaped: list[str] = []
    f = h5py.File(tmp, "w")
    try:
        _stamp(_float_rows(f, "features", chunks, n, dim))
        if layers:
            group = f.create_group(LAYERS_GROUP)
            _stamp(group)
            group.attrs["names"] = np.array(list(layers), dtype=h5py.string_dtype("utf-8"))
            for name, (layer_dim, blocks) in layers.items():
                ds = _float_rows(group, name, blocks, n, layer_dim)
                _stamp(ds)
                ds.attrs["pooling"] = LAYER_POOLING
            attrs = {**attrs, "layers": list(layers)}
        _stamp(f.create_dataset("labels", data=np.asarray(labels, dtype="<i8").reshape(-1)))
        _string_dataset(f, "paths", paths, escaped)
        _string_dataset(f, "split", split, escaped)
        g = f.create_group("errors")
        _stamp(g)
        _string_dataset(g, "path", [p for p, _ in errors], escaped)
        _string_dataset(g, "reason", [r for _, r in errors], escaped)
        for key, value in attrs.items():
            _write_attr(f, key, value, escaped)
        _write_attr(f, "class_names", list(class_names), escaped)
        f.attrs["format"] = FORMAT
        f.attrs["format_version"] = np.int64(FORMAT_VERSION)
        f.attrs["n"] = np.int64(n)
        f.attrs["dim"] = np.int64(dim)
        if escaped:
            f.attrs[ESCAPED_ATTR] = np.array(escaped, dtype=h5py.string_dtype("utf-8"))
        f.attrs["complete"] = np.uint8(1)
        f.flush()
    finally:
        f.close()


def _float_rows(parent, name: str, blocks: Iterable[np.ndarray], n: int, dim: int):
    """A float32 [n, dim] dataset chunked by rows (about 1 MiB a chunk), filled from ``blocks``."""
    rows_per_chunk = max(1, min(max(n, 1), CHUNK_BYTES // (4 * max(dim, 1))))
    ds = parent.create_dataset(name, shape=(n, dim), dtype="<f4",
                               chunks=(rows_per_chunk, dim) if n and dim else None)
    row = 0
    for block in blocks:
        block = np.asarray(block, dtype=np.float32)
        if block.ndim != 2 or block.shape[1] != dim:
            raise CacheError(f"internal: {name} block of shape {block.shape}, expected (*, {dim})")
        if len(block):
            ds[row:row + len(block)] = block
        row += len(block)
    if row != n:
        raise CacheError(f"internal: wrote {row} {name} rows, expected {n}")
    return ds


def _string_dataset(parent, name: str, values: Sequence[str], escaped: list[str]) -> None:
    """A fixed-length UTF-8 string dataset sized to the longest value (every reader takes it)."""
    texts, any_escaped = encode_text(values)
    data, dtype = fixed_utf8(texts)
    ds = parent.create_dataset(name, data=data, dtype=dtype, shape=(len(texts),))
    _stamp(ds)
    ds.attrs["_Encoding"] = "utf-8"  # xarray/netCDF decode the bytes to str with this (CF)
    if any_escaped:
        escaped.append(ds.name)


def _write_attr(f, key: str, value: Any, escaped: list[str]) -> None:
    if key in JSON_ATTRS or isinstance(value, dict):
        value = json.dumps(value, sort_keys=True)  # ASCII: surrogates become \udcXX, losslessly
    elif value is None:
        value = ""
    if isinstance(value, (bool, np.bool_)):
        f.attrs[key] = np.uint8(bool(value))
    elif isinstance(value, str):
        (text,), was = encode_text([value])
        f.attrs[key] = text
        if was:
            escaped.append("@" + key)
    elif isinstance(value, (list, tuple)) and all(isinstance(v, str) for v in value):
        texts, was = encode_text(list(value))
        f.attrs[key] = np.array(texts, dtype=h5py.string_dtype("utf-8"))
        if was:
            escaped.append("@" + key)
    elif isinstance(value, (list, tuple)):
        f.attrs[key] = json.dumps(list(value))
    else:
        f.attrs[key] = value


def _check_space(path: Path, payload: int) -> None:
    """Refuse before writing when the disk cannot hold the file.

    HDF5 fails late (at flush/close) on a full disk, so the space is checked up front; what the
    check cannot see (quotas, file-size limits) is caught while writing.
    """
    ensure_dir(path.parent)
    # A margin over the estimate: HDF5 cannot recover from a write that fails half way.
    need = int(payload * 1.05) + (256 << 10)
    free = shutil.disk_usage(path.parent).free
    if free < need:
        raise CacheError(f"cannot write {path}: no space (No space left on device: needs about "
                         f"{need / 2**20:.1f} MiB, {free / 2**20:.1f} MiB free); free space or "
                         "choose another cache directory (nothing was overwritten)")


# ----------------------------------------------------------------------------- attributes
def provenance(attrs: dict[str, Any]) -> dict[str, Any]:
    """The provenance part (:data:`PROVENANCE_KEYS`) of a cache's decoded attributes."""
    return {k: attrs[k] for k in PROVENANCE_KEYS if k in attrs}


# ----------------------------------------------------------------------------- reader
def open_cache(path: Path, *, features: bool = True, isolate: bool | None = None):
    """Open a cache for reading after checking it against the spec; an open ``h5py.File``.

    Everything the spec says about the file's structure is checked here, once (a regular file
    holding all its data itself, declared shapes within what it stores, format, version,
    completeness, attribute and dataset types and shapes, label range, class names); the file
    is refused with a one-line :class:`CacheError` naming it and the fix. Feature values are
    checked as they are read (:func:`load_features`).

    ``isolate``: read the file in a child process first
    (:func:`~fxtl.features.cache_guard.guard_cache`), so that a file on which libhdf5 crashes
    or loops is refused with one line instead of taking the process down. None (default): as
    the entered :class:`~fxtl.features.cache_guard.CacheGuard` says, else True. ``features=False``
    says the caller reads the attributes and small datasets only (a cheaper probe).
    """
    path = Path(path)
    check_file(path)
    guard_cache(path, features=features, isolate=isolate)
    try:
        f = h5py.File(path, "r")
    except OSError as exc:
        raise CacheError(f"{path} cannot be read as HDF5 ({_first_line(exc)}); re-create it "
                         "with `fxtl extract`") from None
    try:
        with reading_cache(path):
            check_cache(f, path)
    except BaseException:
        f.close()
        raise
    return f


@contextlib.contextmanager
def reading_cache(path: Path) -> Iterator[None]:
    """Turn what a damaged file makes HDF5 raise (at open or at any later read) into CacheError.

    Bytes overwritten on disk surface as OSError, RuntimeError, KeyError, ValueError or a
    UnicodeDecodeError from whichever object is read first; the user only needs to know which
    file is damaged.
    """
    try:
        yield
    except CacheError:
        raise
    except MemoryError:
        raise CacheError(f"{path} does not fit in memory; read it in blocks with "
                         "iter_feature_chunks, or use a machine with more memory") from None
    except (OSError, RuntimeError, KeyError, ValueError, TypeError, IndexError, AttributeError,
            OverflowError, SystemError) as exc:
        reason = _first_line(exc) or type(exc).__name__
        raise CacheError(f"{path} is damaged ({reason}); re-create it with `fxtl extract`") from None


def read_attrs(path: Path, *, isolate: bool | None = None) -> dict[str, Any]:
    """Root attributes of a cache, decoded (JSON attributes become dicts); ``isolate`` as in
    :func:`open_cache`."""
    with reading_cache(path), open_cache(path, features=False, isolate=isolate) as f:
        return cache_attrs(f)


def _errors_of(f) -> list[tuple[str, str]]:
    if "errors" not in f:
        return []
    return list(zip(read_strings(f, "errors/path"), read_strings(f, "errors/reason")))


def read_errors(path: str | Path, *, isolate: bool | None = None) -> list[dict[str, str]]:
    """The ``/errors`` table of a cache: ``[{"path", "reason"}]`` for every skipped image."""
    path = Path(path)
    with reading_cache(path), open_cache(path, features=False, isolate=isolate) as f:
        return [{"path": p, "reason": r} for p, r in _errors_of(f)]


def summarize(path: Path, *, isolate: bool | None = None) -> dict[str, Any]:
    """Shape, splits, classes and errors of a cache without reading the features."""
    path = Path(path)
    with reading_cache(path), open_cache(path, features=False, isolate=isolate) as f:
        attrs = cache_attrs(f)
        split = read_strings(f, "split")
        errors = [{"path": p, "reason": r} for p, r in _errors_of(f)]
        n, dim = f["features"].shape
        layers = _layer_dims(f)
    names, counts = np.unique(np.array(split, dtype=str), return_counts=True)
    return {"n": int(n), "dim": int(dim), "splits": {str(k): int(v) for k, v in zip(names, counts)},
            "errors": errors, "class_names": [str(c) for c in attrs.get("class_names", [])],
            "attrs": attrs, "layers": layers}


def _layer_dims(f) -> dict[str, int]:
    """Layer name -> width of the ``/layers`` datasets of an open cache (shapes only)."""
    group = f.get(LAYERS_GROUP)
    out: dict[str, int] = {}
    for name in decode_attr(group.attrs.get("names", [])) if group is not None else []:
        ds = group.get(name)
        if ds is None or len(getattr(ds, "shape", ())) != 2:
            raise CacheError(f"{f.filename} is damaged: /{LAYERS_GROUP}/{name} is missing or not "
                             "[N, D]; re-create it with `fxtl extract`")
        out[str(name)] = int(ds.shape[1])
    return out


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
    layer_names : list of str -- further layers stored beside the features (``extract(layers=)``)
    layers : dict -- layer name -> float32 array (n, D_layer), read from the file on first use

    Examples
    --------
    >>> cache = load_features("cache/hymenoptera-lite0-0123abcd.h5")  # doctest: +SKIP
    >>> X, y = cache.subset("train")                                    # doctest: +SKIP
    >>> cache.layer_names, cache.layer("blocks.4").shape               # doctest: +SKIP
    (['blocks.2', 'blocks.3', 'blocks.4', 'blocks.5', 'blocks.6'], (398, 112))
    """

    path: Path
    features: np.ndarray
    labels: np.ndarray
    paths: list[str]
    split: np.ndarray
    class_names: list[str]
    attrs: dict[str, Any] = field(default_factory=dict)
    errors: list[tuple[str, str]] = field(default_factory=list)
    # rows of the file kept here (None: all); a layer read later keeps the same rows
    kept_rows: np.ndarray | None = field(default=None, repr=False, compare=False)
    _layers: dict[str, np.ndarray] = field(default_factory=dict, init=False, repr=False,
                                           compare=False)

    @property
    def layer_names(self) -> list[str]:
        names = self.attrs.get("layers") or []
        return [names] if isinstance(names, str) else [str(v) for v in names]

    def layer(self, name: str) -> np.ndarray:
        """The pooled features of layer ``name`` (rows as :attr:`features`), read on first use."""
        if name not in self._layers:
            if name not in self.layer_names:
                raise ParameterError("name", f"{self.path} stores no layer {name!r}; it has "
                                     f"{', '.join(self.layer_names) or 'none'} (extract with layers=)")
            X = read_layer(self.path, name)
            self._layers[name] = X if self.kept_rows is None else X[self.kept_rows]
        return self._layers[name]

    @property
    def layers(self) -> dict[str, np.ndarray]:
        return {name: self.layer(name) for name in self.layer_names}

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
        return provenance(self.attrs)

    @property
    def label_names(self) -> np.ndarray:
        """Class name per row (``None`` where unlabelled): the ``y`` a head's estimator is
        fitted on (heads are fitted on names, not on the integer ``labels``)."""
        names = np.asarray(list(self.class_names) + [None], dtype=object)
        return names[np.where(self.labels >= 0, self.labels, len(self.class_names))]

    @property
    def y(self) -> np.ndarray:
        """Same as :attr:`label_names`: ``estimator.fit(cache.features, cache.y)``."""
        return self.label_names

    def to_frame(self, *, features: bool = True):
        """A pandas DataFrame, one row per image: ``path``, ``split``, ``label`` (class name),
        then the features as columns ``f0 ... f{dim-1}`` (``features=False`` leaves them out).
        Needs pandas."""
        frame = records_frame({"path": p, "split": str(s), "label": y}
                              for p, s, y in zip(self.paths, self.split, self.label_names))
        if frame.empty:
            frame = frame.reindex(columns=["path", "split", "label"])
        if not features:
            return frame
        pd = require_pandas()
        feats = pd.DataFrame(self.features, columns=[f"f{i}" for i in range(self.dim)])
        return pd.concat([frame, feats], axis=1)

    def __repr__(self) -> str:
        return (f"FeatureCache(path={str(self.path)!r}, n={self.n}, dim={self.dim}, "
                f"splits={self.splits}, classes={len(self.class_names)}, "
                f"backbone={self.attrs.get('backbone')!r})")


_NONFINITE = ("raise", "drop")


def _check_nonfinite(nonfinite: str) -> None:
    if nonfinite not in _NONFINITE:
        raise ParameterError("nonfinite", f"nonfinite must be one of {', '.join(_NONFINITE)}, "
                                          f"got {nonfinite!r}")


def nonfinite_message(path: Path, bad: np.ndarray, n: int, paths: Sequence[str] | None) -> str:
    """The one line refusing a cache whose rows ``bad`` (of ``n``) hold NaN or infinity."""
    shown = ", ".join(f"{int(i)}" + (f" ({paths[int(i)]})" if paths is not None else "")
                      for i in bad[:5])
    more = f" and {len(bad) - 5} more" if len(bad) > 5 else ""
    return (f"{path} is damaged: {len(bad)} of {n} feature rows hold NaN or infinity (rows "
            f"{shown}{more}); re-create it with `fxtl extract`, or load it with "
            "nonfinite='drop' to leave those rows out")


def load_features(path: str | Path, *, nonfinite: str = "raise",
                  isolate: bool | None = None) -> FeatureCache:
    """Load a cache written by ``fxtl extract``.

    Parameters
    ----------
    path : str or Path
        The ``.h5`` file.
    nonfinite : {"raise", "drop"}
        What to do with feature rows holding NaN or infinity (a damaged file): refuse the file
        with one line naming the rows (default), or leave those rows out with a warning.
    isolate : bool, optional
        Read the file in a child process first (a file on which libhdf5 crashes is then one
        line, not a dead process). None: as the entered ``CacheGuard`` says, else True.

    Returns
    -------
    FeatureCache

    Raises
    ------
    CacheError
        If the file is missing, not HDF5, of another format, of a newer version, incomplete,
        not what the spec says, or (with ``nonfinite="raise"``) holds non-finite features.
    """
    _check_nonfinite(nonfinite)
    path = Path(path)
    with reading_cache(path), open_cache(path, isolate=isolate) as f:
        attrs = cache_attrs(f)
        features = f["features"][...].astype(np.float32, copy=False)
        labels = f["labels"][...].astype(np.int64, copy=False)
        paths = read_strings(f, "paths")
        split = np.array(read_strings(f, "split"), dtype=object).astype(str)
        errors = _errors_of(f)
    class_names = [str(c) for c in attrs.get("class_names", [])]
    finite = np.isfinite(features).all(axis=1)
    if not finite.all():
        bad = np.flatnonzero(~finite)
        if nonfinite == "raise":
            raise CacheError(nonfinite_message(path, bad, len(features), paths))
        warnings.warn(f"{path}: left out {len(bad)} feature rows holding NaN or infinity "
                      f"(first: row {int(bad[0])}, {paths[int(bad[0])]})", stacklevel=2)
        features, labels, split = features[finite], labels[finite], split[finite]
        paths = [p for p, ok in zip(paths, finite) if ok]
    return FeatureCache(path=path, features=features, labels=labels, paths=paths, split=split,
                        class_names=class_names, attrs=attrs, errors=errors,
                        kept_rows=None if finite.all() else np.flatnonzero(finite))


def read_layer(path: str | Path, name: str, *, isolate: bool | None = None) -> np.ndarray:
    """The float32 [N, D_layer] features of layer ``name`` (``/layers/<name>``) of a cache;
    ``isolate`` as in :func:`load_features`.

    Raises
    ------
    CacheError
        The cache stores no such layer, or its dataset is not [N, D] floats, or holds NaN or
        infinity; one line naming the file.
    """
    path = Path(path)
    with reading_cache(path), open_cache(path, isolate=isolate) as f:
        group = f.get(LAYERS_GROUP)
        ds = group.get(name) if isinstance(group, h5py.Group) else None
        n = f["features"].shape[0]
        if not isinstance(ds, h5py.Dataset):
            raise CacheError(f"{path} stores no layer {name!r} (/{LAYERS_GROUP}/{name}); "
                             "extract with layers= to add it")
        if len(ds.shape) != 2 or ds.shape[0] != n or ds.shape[1] < 1 or ds.dtype.kind != "f":
            raise CacheError(f"{path} is damaged: /{LAYERS_GROUP}/{name} is {ds.dtype} "
                             f"{list(ds.shape)}, the spec says float32 [{n}, D]; re-create it "
                             "with `fxtl extract`")
        X = ds[...].astype(np.float32, copy=False)
    bad = np.flatnonzero(~np.isfinite(X).all(axis=1))
    if len(bad):
        raise CacheError(f"{path} is damaged: {len(bad)} of {n} rows of layer {name} hold NaN "
                         f"or infinity (first: row {int(bad[0])}); re-create it with `fxtl extract`")
    return X


def iter_feature_chunks(path: str | Path, *, rows: int = 8192, split: str | None = None,
                        nonfinite: str = "raise",
                        isolate: bool | None = None) -> Iterator[tuple[np.ndarray, np.ndarray]]:
    """Stream ``(X, y)`` blocks of at most ``rows`` rows without loading the whole cache.

    For caches larger than memory (heads fitted with ``partial_fit``). ``nonfinite`` is as in
    :func:`load_features`; with ``"raise"`` the error comes with the first damaged block.
    """
    _check_nonfinite(nonfinite)
    path = Path(path)
    with reading_cache(path), open_cache(path, isolate=isolate) as f:
        n = f["features"].shape[0]
        sp = None if split is None else np.array(read_strings(f, "split"))
        for start in range(0, n, rows):
            X = f["features"][start:start + rows].astype(np.float32, copy=False)
            y = f["labels"][start:start + rows].astype(np.int64, copy=False)
            finite = np.isfinite(X).all(axis=1)
            if not finite.all():
                if nonfinite == "raise":
                    raise CacheError(nonfinite_message(path, start + np.flatnonzero(~finite), n,
                                                       read_strings(f, "paths")))
                X, y = X[finite], y[finite]
                keep = finite
            else:
                keep = None
            if sp is not None:
                m = sp[start:start + rows] == split
                m = m if keep is None else m[keep]
                X, y = X[m], y[m]
            if len(X):
                yield X, y
