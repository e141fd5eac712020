"""Export a feature cache for tools that do not speak HDF5 (``fxtl export``).

An export is a plain copy for other tools: it never replaces an fxtl artifact (a cache, a head,
a run's files: those are refused by name, by content and by folder), and its format is the one
its file name says (``-o x.csv`` writes CSV). CSV text cells that a spreadsheet would run as a
formula are written with a leading ``'`` (docs/cache-format.md, "Exports").
"""
from __future__ import annotations

import csv
from pathlib import Path

import numpy as np

from .._util import atomic_path, csv_cell
from ..errors import FxtlError, ParameterError
from .cache_text import encode_text
from .store import load_features

__all__ = ["export_cache", "export_format", "EXPORT_FORMATS"]

EXPORT_FORMATS = ("npz", "csv", "parquet")
# Files fxtl writes (caches, heads, runs, exports of models) that an export must never replace.
_ARTIFACT_FILES = frozenset({"head.skops", "head.json", "head.joblib", "metrics.json", "rows.json",
                             "predictions.csv", "fxtl-model.json", "model.pt", "checkpoint-last.pt",
                             "confusion.png", "learning_curves.png"})
_ARTIFACT_SUFFIXES = (".h5", ".hdf5", ".skops", ".joblib", ".pt", ".pth", ".onnx", ".lock",
                      ".partial", ".tmp")
# A folder holding one of these is a run folder: nothing is exported into it.
_RUN_MARKERS = ("metrics.json", "head.json", "fxtl-model.json", "checkpoint-last.pt")
_HDF5_SIGNATURE = b"\x89HDF\r\n\x1a\n"


def export_format(fmt: str | None, output: str | Path | None) -> str:
    """The format to write: ``fmt``, else the one ``output``'s suffix names, else ``npz``.

    Raises
    ------
    ParameterError
        ``fmt`` is unknown, or names another format than ``output``'s suffix (``x.csv`` as npz).
    """
    if fmt is not None and fmt not in EXPORT_FORMATS:
        raise ParameterError("fmt", f"unknown export format {fmt!r}; use one of {', '.join(EXPORT_FORMATS)}")
    suffix = Path(output).suffix.lower().lstrip(".") if output else ""
    named = suffix if suffix in EXPORT_FORMATS else None
    if fmt is not None and named is not None and fmt != named:
        raise ParameterError("fmt", f"output {output} names the {named} format but fmt is {fmt}; "
                                    f"name the file .{fmt} or drop fmt to write {named}")
    return fmt or named or "npz"


def _refuse_overwriting_artifacts(out: Path) -> None:
    """Never replace a cache, a head, a run's file or anything inside a run folder."""
    if any((out.parent / marker).exists() for marker in _RUN_MARKERS):
        raise ParameterError("output", f"output {out} is inside the run folder {out.parent}; an "
                                       "export never writes among a run's files: choose another "
                                       "output file")
    if not (out.exists() or out.is_symlink()):
        return
    name = out.name.lower()
    why = "it is a folder" if out.is_dir() else "it is an fxtl file" if (
        name in _ARTIFACT_FILES or name.endswith(_ARTIFACT_SUFFIXES)) else None
    if why is None:
        try:
            with open(out, "rb") as fh:
                why = "it is an HDF5 file (a feature cache)" if fh.read(8) == _HDF5_SIGNATURE else None
        except OSError:
            why = None
    if why:
        raise ParameterError("output", f"output {out} exists and {why[3:]}; an export never "
                                       "overwrites fxtl's files: choose another output file")


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


def export_cache(cache: str | Path, *, fmt: str | None = None,
                 output: str | Path | None = None) -> Path:
    """Write features with labels, paths and split as ``npz``, ``csv`` or ``parquet``.

    Columns (csv/parquet): ``path, split, label, label_name, f0 .. f{D-1}``. The npz holds arrays
    ``features, labels, paths, split, class_names``. In CSV, a text cell starting with ``=``,
    ``+``, ``-``, ``@``, a tab, a carriage return or ``'`` gets a leading ``'`` (so no
    spreadsheet runs it as a formula).

    Parameters
    ----------
    fmt : {"npz", "csv", "parquet"}, optional
        Default: the format ``output``'s suffix names, else ``npz``.
    output : path, optional
        Default: the cache path with the format's suffix.

    Returns
    -------
    Path
        The written file (default: the cache path with the format's suffix).

    Raises
    ------
    ParameterError
        When ``output`` is the cache itself (by any path or link), or any other fxtl artifact
        (a cache, a head, a run's files): it would be replaced; or when ``fmt`` and ``output``'s
        suffix name different formats.
    """
    fmt = export_format(fmt, output)
    out = Path(output) if output else Path(cache).with_suffix("." + fmt)
    _refuse_overwriting_the_cache(Path(cache), out)
    _refuse_overwriting_artifacts(out)
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
                    w.writerow([csv_cell(fc.paths[i]), csv_cell(fc.split[i]), int(fc.labels[i]),
                                csv_cell(label_names[i])]
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
