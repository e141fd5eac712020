"""Rows of a feature cache for fitting heads: in memory, or streamed block by block from HDF5."""
from __future__ import annotations

import contextlib
from pathlib import Path
from typing import Iterator

import numpy as np

from ..errors import CacheError
from ..features.store import FeatureCache, load_features, read_attrs
from .model import Head

__all__ = ["RowSource", "open_source"]

# Above this many rows heads are fitted with streaming, scalable estimators.
LARGE_ROWS = 100_000


class RowSource:
    """Rows of a cache, in memory (small caches) or streamed from the HDF5 file (large ones)."""

    def __init__(self, *, path: Path | None, attrs: dict, labels: np.ndarray, split: np.ndarray,
                 class_names: list[str], dim: int, paths: list[str] | None,
                 features: np.ndarray | None, large: bool):
        self.path, self.attrs, self.labels, self.split = path, attrs, labels, split
        self.class_names, self.dim, self.paths = class_names, dim, paths
        self.features, self.large = features, large

    @property
    def n(self) -> int:
        return int(len(self.labels))

    def names(self, labels: np.ndarray) -> np.ndarray:
        """Class names of label indices: heads are fitted on names, so ``classes_`` are labels."""
        return np.asarray(self.class_names, dtype=object)[np.asarray(labels, dtype=np.int64)]

    @property
    def dataset(self) -> str:
        return str(self.attrs.get("dataset_name") or (Path(self.path).stem if self.path else "dataset"))

    def blocks(self, rows: np.ndarray, *, block_rows: int = 8192) -> Iterator[tuple[np.ndarray, np.ndarray, np.ndarray]]:
        """``(row_ids, X, y)`` for ``rows`` in row order, a block at a time (sequential read)."""
        rows = np.sort(np.asarray(rows, dtype=np.int64))
        if self.features is not None:
            for s in range(0, len(rows), block_rows):
                r = rows[s:s + block_rows]
                yield r, self.features[r], self.labels[r]
            return
        wanted = np.zeros(self.n, dtype=bool)
        wanted[rows] = True
        with self._features_file() as feats:
            for start in range(0, self.n, block_rows):
                sel = np.flatnonzero(wanted[start:start + block_rows])
                if len(sel):
                    r = start + sel
                    yield r, self._block(feats, start, block_rows)[sel], self.labels[r]

    @contextlib.contextmanager
    def _features_file(self) -> Iterator:
        """``/features`` of the cache file, open (checked on open) for a pass of block reads;
        what a damaged file makes HDF5 raise meanwhile becomes one CacheError line."""
        from ..features.store import open_cache, reading_cache

        with reading_cache(self.path), open_cache(self.path) as f:
            yield f["features"]

    def _block(self, feats, start: int, block_rows: int) -> np.ndarray:
        """Rows ``start:start + block_rows`` of the file's features; a NaN or infinite row is
        refused by row number and path, as :func:`load_features` refuses an in-memory cache."""
        from ..features.store import nonfinite_message

        X = np.asarray(feats[start:start + block_rows], dtype=np.float32)
        finite = np.isfinite(X).all(axis=1)
        if not finite.all():
            bad = start + np.flatnonzero(~finite)
            raise CacheError(nonfinite_message(self.path, bad, self.n, self.paths))
        return X

    def shuffled_batches(self, rows: np.ndarray, *, rng: np.random.Generator, block_rows: int = 4096,
                         mix: int = 8) -> Iterator[tuple[np.ndarray, np.ndarray]]:
        """``(X, y)`` batches of ``rows`` in random order, for ``partial_fit``.

        Caches are stored sorted by split and class, so consecutive rows are one class; SGD
        needs mixed batches. Random blocks are read (contiguous slices, cheap in HDF5), ``mix``
        at a time, and their rows shuffled together.
        """
        wanted = np.zeros(self.n, dtype=bool)
        wanted[np.asarray(rows, dtype=np.int64)] = True
        starts = np.arange(0, self.n, block_rows)
        starts = np.array([s for s in starts if wanted[s:s + block_rows].any()], dtype=np.int64)
        order = rng.permutation(len(starts))
        with (contextlib.nullcontext(self.features) if self.features is not None
              else self._features_file()) as feats:
            for g in range(0, len(order), mix):
                parts_X, parts_y = [], []
                for s in starts[order[g:g + mix]]:
                    sel = np.flatnonzero(wanted[s:s + block_rows])
                    block = (feats[s:s + block_rows] if self.features is not None
                             else self._block(feats, int(s), block_rows))
                    parts_X.append(np.asarray(block[sel], dtype=np.float32))
                    parts_y.append(self.labels[s + sel])
                X, y = np.concatenate(parts_X), np.concatenate(parts_y)
                p = rng.permutation(len(y))
                yield X[p], y[p]

    def scores_on(self, head: Head, rows: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """``(y_true, scores)`` of ``head`` on ``rows``, in the order of ``rows``."""
        rows = np.asarray(rows, dtype=np.int64)
        if self.features is not None:
            return self.labels[rows], head.scores(self.features[rows])
        order = np.argsort(rows, kind="stable")
        got_y, got_s = [], []
        for _, X, y in self.blocks(rows):
            got_y.append(y)
            got_s.append(head.scores(X))
        y_sorted, s_sorted = np.concatenate(got_y), np.concatenate(got_s)
        y_out, s_out = np.empty_like(y_sorted), np.empty_like(s_sorted)
        y_out[order], s_out[order] = y_sorted, s_sorted
        return y_out, s_out


def open_source(cache: str | Path | FeatureCache, *, large_threshold: int) -> RowSource:
    if isinstance(cache, FeatureCache):
        return RowSource(path=cache.path, attrs=dict(cache.attrs), labels=cache.labels,
                       split=np.asarray(cache.split).astype(str), class_names=list(cache.class_names),
                       dim=cache.dim, paths=list(cache.paths), features=cache.features,
                       large=cache.n > large_threshold)
    path = Path(cache)
    attrs = read_attrs(path)  # validates format, version and completeness
    n = int(attrs.get("n", 0))
    if n <= large_threshold:
        c = load_features(path)
        return open_source(c, large_threshold=large_threshold)
    from ..features.store import open_cache, read_strings

    # Labels and splits are small; the features stay on disk and are streamed. read_strings
    # undoes the store's escaping of names that are not UTF-8.
    with open_cache(path) as f:
        labels = f["labels"][...].astype(np.int64)
        split = np.array(read_strings(f, "split"))
        dim = int(f["features"].shape[1])
        paths = read_strings(f, "paths")
    return RowSource(path=path, attrs=attrs, labels=labels, split=split,
                   class_names=[str(c) for c in attrs.get("class_names", [])], dim=dim,
                   paths=paths, features=None, large=True)

