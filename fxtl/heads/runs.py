"""A head's run folder: head.skops + head.json, metrics.json, rows.json, predictions.csv,
confusion.png. Saving is a step of its own, after the fit.

Where runs go follows one rule (:func:`destination`): nothing is written unless a place is named;
``run_dir`` is that exact folder (one head); otherwise a new folder inside ``runs_dir`` (or
``cache_dir/"runs"``), named ``run_name`` (``run_name-<model>`` for several heads) or
``<dataset>-<backbone>-<model>-<time>``. A named folder that exists and holds anything is refused
before the fit starts (:func:`check_destination`), never written into.

A folder appears whole or not at all: the files are written into ``.fxtl-partial/`` beside it
and the folder is renamed into place, so a fit killed at any point leaves no half run (nor an
empty folder) in the way of a rerun.
"""
from __future__ import annotations

import errno
import os
import secrets
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import numpy as np

from .._util import atomic_write_json, ensure_dir, slug, unique_dir
from ..data.splits import ROWS_FILE, check_run_name, save_rows
from ..errors import FxtlError, ParameterError
from ..report.metrics import plot_confusion, write_predictions
from .persistence import save_head
from .result import FitResult

__all__ = ["Destination", "destination", "check_destination", "save_run", "save_runs",
           "HEAD_FILE"]

HEAD_FILE = "head.skops"
# Where a run folder is written before it is renamed into place (one level deeper than runs, so
# nothing that lists runs/*/metrics.json sees a half-written one).
STAGING = ".fxtl-partial"


@dataclass(frozen=True)
class Destination:
    """Where fitted heads are saved: exactly ``run_dir``, or new folders inside ``runs_dir``
    (named ``run_name``, or after the dataset, backbone, model and time)."""

    runs_dir: Path | None = None
    run_name: str | None = None
    run_dir: Path | None = None

    def exact_folders(self, models: Sequence[str]) -> list[Path]:
        """The folders this destination names for ``models`` ([] when names are generated)."""
        if self.run_dir is not None:
            return [self.run_dir]
        if self.run_name is None:
            return []
        if len(models) == 1:
            return [self.runs_dir / self.run_name]
        return [self.runs_dir / f"{self.run_name}-{m}" for m in models]


def destination(*, run_dir: str | Path | None = None, runs_dir: str | Path | None = None,
                cache_dir: str | Path | None = None, run_name: str | None = None,
                save: bool = True) -> Destination | None:
    """The one rule for where runs go (see the module docstring); ``None``: write nothing.

    Examples
    --------
    >>> destination(cache_dir="cache", run_name="exp")
    Destination(runs_dir=PosixPath('cache/runs'), run_name='exp', run_dir=None)
    >>> destination(run_name="exp") is None      # a name, but no place
    True
    """
    run_name = check_run_name(run_name or None)  # "" names nothing, as for finetune
    if run_dir is not None and (runs_dir is not None or run_name is not None):
        raise ParameterError("run_dir", "run_dir is the exact run folder; pass it alone, or "
                             "runs_dir (and run_name) instead")
    if not save:
        return None
    if run_dir is not None:
        return Destination(run_dir=Path(run_dir))
    if runs_dir is None and cache_dir is not None:
        runs_dir = Path(cache_dir) / "runs"
    return Destination(runs_dir=Path(runs_dir), run_name=run_name) if runs_dir is not None else None


def check_destination(dest: Destination | None, models: Sequence[str]) -> None:
    """Refuse, before any fit, a named folder that is taken (exists, and is not an empty folder)."""
    if dest is None:
        return
    if dest.run_dir is not None and len(models) > 1:
        raise ParameterError("run_dir", f"run_dir holds one head; {len(models)} models were "
                             "given: pass runs_dir to save each in its own folder")
    if dest.run_dir is not None and _taken(dest.run_dir):
        raise ParameterError("run_dir", f"{dest.run_dir} already exists and is not an empty "
                             "folder (another run's files are never overwritten); pass a new folder")
    for folder in dest.exact_folders(models):
        if _taken(folder):
            raise FxtlError(f"run folder {folder} already exists (another run's files are never "
                            "overwritten); choose another run_name or delete the folder",
                            param="run_name")


def save_runs(results: Sequence[FitResult], dest: Destination) -> list[Path]:
    """Save each result in its folder of ``dest``; returns the folders."""
    folders = dest.exact_folders([r.metrics["model"] for r in results])
    stamp = time.strftime("%Y%m%d-%H%M%S")
    out = []
    for i, res in enumerate(results):
        if folders:
            out.append(save_run(res, folders[i]))
            continue
        p = res.head.provenance
        base = (f"{slug(p.get('dataset') or 'dataset')}-"
                f"{slug(Path(str(p.get('backbone') or 'x')).name)}-{res.metrics['model']}-{stamp}")
        out.append(save_run(res, unique_dir(dest.runs_dir, base)))  # reserved empty folder
    return out


def save_run(res: FitResult, run_dir: str | Path) -> Path:
    """Write every file of ``res``'s run folder at ``run_dir`` (new, or an empty folder).

    Sets ``res.run_dir``, ``res.head_path`` and the paths in ``res.metrics``.
    """
    final = Path(run_dir)
    if _taken(final):
        raise FxtlError(f"run folder {final} already exists (another run's files are never "
                        "overwritten); choose another run_name or delete the folder",
                        param="run_name")
    staging = ensure_dir(final.parent / STAGING)
    stage = staging / f"{final.name}.{os.getpid()}.{secrets.token_hex(4)}"
    stage.mkdir()  # as any new folder (the umask applies), unlike mkdtemp's 0o700
    try:
        _write_files(res, stage, final)
        try:
            os.rename(stage, final)  # replaces an empty folder; refuses one that holds files
        except OSError as exc:
            if exc.errno in (errno.ENOTEMPTY, errno.EEXIST, errno.ENOTDIR):
                raise FxtlError(f"run folder {final} already exists (another run's files are "
                                "never overwritten); choose another run_name or delete the "
                                "folder", param="run_name") from None
            raise FxtlError(f"cannot create run folder {final}: {exc.strerror}") from None
    except BaseException:
        shutil.rmtree(stage, ignore_errors=True)
        raise
    finally:
        try:
            staging.rmdir()  # only when no other save is in progress
        except OSError:
            pass
    res.run_dir, res.head_path = final, final / HEAD_FILE
    res.head.path = res.head_path
    return final


def _taken(folder: Path) -> bool:
    return folder.exists() and (not folder.is_dir() or any(folder.iterdir()))


def _write_files(res: FitResult, stage: Path, final: Path) -> None:
    """The run's files, written into ``stage``; paths in ``metrics.json`` name ``final``."""
    save_head(res.head, stage / HEAD_FILE)
    m = res.metrics
    m["run_dir"], m["head"] = str(final), str(final / HEAD_FILE)
    if res.rows is not None:
        save_rows(stage, res.rows)
    p = res.predictions
    names = res.head.class_names
    rows = np.asarray(p["rows"])
    write_predictions(stage, paths=list(p["paths"]), y_true=p["y_true"], y_pred=p["y_pred"],
                      class_names=names, split=m["split"], rows=rows,
                      probability=np.asarray(p["scores"])[np.arange(len(rows)), p["y_pred"]])
    plot_confusion(m["confusion_matrix"], names, stage / "confusion.png",
                   title=f"{m['model']} on {m['split']}: accuracy {m['accuracy']:.3f}")
    m["confusion_png"] = str(final / "confusion.png")
    m["predictions_csv"] = str(final / "predictions.csv")
    m["rows_json"] = str(final / ROWS_FILE)
    atomic_write_json(stage / "metrics.json", m)
