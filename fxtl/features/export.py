"""Export a feature cache for tools that do not speak HDF5 (``fxtl export``)."""
from __future__ import annotations

import csv
from pathlib import Path

import numpy as np

from .._util import atomic_path
from ..errors import FxtlError
from .store import load_features

__all__ = ["export_cache", "EXPORT_FORMATS"]

EXPORT_FORMATS = ("npz", "csv", "parquet")


def export_cache(cache: str | Path, *, fmt: str = "npz", output: str | Path | None = None) -> Path:
    """Write features with labels, paths and split as ``npz``, ``csv`` or ``parquet``.

    Columns (csv/parquet): ``path, split, label, label_name, f0 .. f{D-1}``. The npz holds arrays
    ``features, labels, paths, split, class_names``.

    Returns
    -------
    Path
        The written file (default: the cache path with the format's suffix).
    """
    if fmt not in EXPORT_FORMATS:
        raise FxtlError(f"unknown export format {fmt!r}; use one of {', '.join(EXPORT_FORMATS)}")
    fc = load_features(cache)
    out = Path(output) if output else Path(cache).with_suffix("." + fmt)
    names = np.array(fc.class_names + ["<unlabelled>"], dtype=object)
    label_names = names[np.where(fc.labels >= 0, fc.labels, len(fc.class_names))]
    if fmt == "npz":
        with atomic_path(out, suffix=".npz") as tmp:
            with open(tmp, "wb") as fh:
                np.savez(fh, features=fc.features, labels=fc.labels, paths=np.array(fc.paths, dtype=str),
                         split=fc.split.astype(str), class_names=np.array(fc.class_names, dtype=str))
    elif fmt == "csv":
        with atomic_path(out, suffix=".csv") as tmp:
            with open(tmp, "w", newline="", encoding="utf-8") as fh:
                w = csv.writer(fh)
                w.writerow(["path", "split", "label", "label_name"] + [f"f{i}" for i in range(fc.dim)])
                for i in range(fc.n):
                    w.writerow([fc.paths[i], fc.split[i], int(fc.labels[i]), label_names[i]]
                               + [f"{v:.7g}" for v in fc.features[i]])
    else:
        try:
            import pandas as pd
        except ImportError:
            raise FxtlError("parquet export needs pandas and pyarrow: pip install 'fxtl[export]'") from None
        df = pd.DataFrame({"path": fc.paths, "split": fc.split.astype(str), "label": fc.labels,
                           "label_name": label_names.astype(str)})
        feats = pd.DataFrame(fc.features, columns=[f"f{i}" for i in range(fc.dim)])
        df = pd.concat([df, feats], axis=1)
        with atomic_path(out, suffix=".parquet") as tmp:
            try:
                df.to_parquet(tmp, index=False)
            except ImportError:
                raise FxtlError("parquet export needs pyarrow: pip install 'fxtl[export]'") from None
    return out
