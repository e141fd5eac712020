"""Export a feature cache for tools that do not speak HDF5 (``fxtl export``)."""
from __future__ import annotations

import csv
from pathlib import Path

import numpy as np

from .._util import atomic_path
from ..errors import FxtlError, ParameterError
from .cache_text import encode_text
from .store import load_features

__all__ = ["export_cache", "EXPORT_FORMATS"]

EXPORT_FORMATS = ("npz", "csv", "parquet")


def _refuse_overwriting_the_cache(cache: Path, out: Path) -> None:
    """The export must never replace its own input (the same file by any name or link)."""
    same = out.resolve() == cache.resolve()
    if not same and out.exists():
        try:
            same = out.samefile(cache)
        except OSError:
            same = False
    if same:
        raise ParameterError("output", f"output {out} is the cache being exported ({cache}); "
                                       "choose another output file")


def export_cache(cache: str | Path, *, fmt: str = "npz", output: str | Path | None = None) -> Path:
    """Write features with labels, paths and split as ``npz``, ``csv`` or ``parquet``.

    Columns (csv/parquet): ``path, split, label, label_name, f0 .. f{D-1}``. The npz holds arrays
    ``features, labels, paths, split, class_names``.

    Returns
    -------
    Path
        The written file (default: the cache path with the format's suffix).

    Raises
    ------
    ParameterError
        When ``output`` is the cache itself (by any path or link): it would be replaced.
    """
    if fmt not in EXPORT_FORMATS:
        raise FxtlError(f"unknown export format {fmt!r}; use one of {', '.join(EXPORT_FORMATS)}")
    out = Path(output) if output else Path(cache).with_suffix("." + fmt)
    _refuse_overwriting_the_cache(Path(cache), out)
    fc = load_features(cache)  # checked on open: every label is -1 or indexes class_names
    names = np.array(fc.class_names + ["<unlabelled>"], dtype=object)
    label_names = names[np.where(fc.labels >= 0, fc.labels, len(fc.class_names))]
    if fmt == "npz":
        with atomic_path(out, suffix=".npz") as tmp:
            with open(tmp, "wb") as fh:
                np.savez(fh, features=fc.features, labels=fc.labels, paths=np.array(fc.paths, dtype=str),
                         split=fc.split.astype(str), class_names=np.array(fc.class_names, dtype=str))
    elif fmt == "csv":
        with atomic_path(out, suffix=".csv") as tmp:
            # surrogateescape: a file name that is not UTF-8 is written as its own bytes
            with open(tmp, "w", newline="", encoding="utf-8", errors="surrogateescape") as fh:
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
        # Parquet strings must be UTF-8: names that are not are escaped as in the cache spec.
        paths, _ = encode_text(fc.paths)
        df = pd.DataFrame({"path": paths, "split": fc.split.astype(str), "label": fc.labels,
                           "label_name": label_names.astype(str)})
        feats = pd.DataFrame(fc.features, columns=[f"f{i}" for i in range(fc.dim)])
        df = pd.concat([df, feats], axis=1)
        with atomic_path(out, suffix=".parquet") as tmp:
            try:
                df.to_parquet(tmp, index=False)
            except ImportError:
                raise FxtlError("parquet export needs pyarrow: pip install 'fxtl[export]'") from None
    return out
