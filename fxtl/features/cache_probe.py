"""What the crash guard's child reads: every read fxtl's cache readers make, values thrown away.

Run in a child process by :mod:`fxtl.features.cache_guard` (through :mod:`fxtl._isolate`), so a
file on which libhdf5 crashes or loops takes down only the child.
"""
from __future__ import annotations

from pathlib import Path

import h5py
import numpy as np

from .cache_check import check_cache, declared_bytes
from .cache_text import cache_attrs, read_strings
from .spec import PROBE_READ_ALL_BYTES

__all__ = ["read_for_probe"]


def read_for_probe(path: Path, level: str) -> None:
    """What the child does: every read fxtl's readers make, their values thrown away."""
    with h5py.File(path, "r") as f:
        if level == "format":
            f.attrs.get("format")
            return
        check_cache(f, Path(path))
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
        if declared_bytes(feats) <= PROBE_READ_ALL_BYTES:
            starts = range(0, n, rows)
        else:
            if feats.chunks is not None and hasattr(feats.id, "chunk_iter"):
                feats.id.chunk_iter(lambda info: None)  # walks the whole chunk index
            starts = sorted({0, max(0, n - rows)})
        for start in starts:
            np.asarray(feats[start:start + rows])
