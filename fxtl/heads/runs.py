"""A head's run folder: head.skops + head.json, metrics.json, rows.json, predictions.csv,
confusion.png. Written only when the caller names a place."""
from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from .._util import atomic_write_json, ensure_dir, unique_dir
from ..data.splits import RowSet, RunRows, save_rows
from ..errors import FxtlError, ParameterError
from .persistence import save_head
from .planning import SplitPlan
from .source import RowSource

if TYPE_CHECKING:
    from .fitting import FitResult

__all__ = ["new_run_dir", "write_run", "run_rows", "HEAD_FILE"]

HEAD_FILE = "head.skops"


def new_run_dir(runs: Path, name: str, *, exact: bool) -> Path:
    """A new, empty run folder ``runs/name``; with ``exact`` the name is the caller's and an
    existing folder (another head's or a fine-tune's run) is refused, never written into."""
    ensure_dir(runs)
    if not exact:
        return unique_dir(runs, name)
    candidate = runs / name
    try:
        candidate.mkdir()
    except FileExistsError:
        raise FxtlError(f"run folder {candidate} already exists (another run's files are never "
                        "overwritten); choose another run_name or delete the folder") from None
    except OSError as exc:
        raise FxtlError(f"cannot create run folder {candidate}: {exc.strerror}") from None
    return candidate


def claim_run_dir(run_dir: Path) -> Path:
    """``run_dir`` itself as the run folder: created, or an existing empty folder."""
    run_dir = Path(run_dir)
    if run_dir.exists() and (not run_dir.is_dir() or any(run_dir.iterdir())):
        raise ParameterError("run_dir", f"{run_dir} already exists and is not an empty folder "
                             "(another run's files are never overwritten); pass a new folder")
    ensure_dir(run_dir)
    return run_dir


def run_rows(source: RowSource, plan: SplitPlan, selection: str) -> RunRows:
    """Which images the head learned from, selected on and is reported on (``rows.json``)."""
    paths = source.paths or [""] * source.n

    def rowset(rows: np.ndarray, split: str) -> RowSet:
        return RowSet(split=split, paths=tuple(paths[int(r)] for r in np.sort(rows)))

    splits = sorted(set(source.split[plan.fit_rows].tolist()))
    fit = rowset(plan.fit_rows, "+".join(splits) if plan.eval_split != "holdout" else "train")
    if selection == "none":
        sel = None
    elif selection == "val" and plan.val_fold is not None:
        sel = rowset(plan.search_rows[plan.val_fold == 0], "val")
    else:  # k-fold CV or a held-out part: rows of the fit set
        sel = rowset(plan.fit_rows, selection)
    fp = source.attrs.get("data_fingerprint") or f"cache:{source.attrs.get('fingerprint')}"
    return RunRows(data_fingerprint=str(fp), train=fit, selection=sel,
                   report=rowset(plan.eval_rows, plan.eval_split))


def write_run(res: "FitResult", run_dir: Path, source: RowSource, plan: SplitPlan) -> None:
    """Write every file of the run folder ``run_dir`` (which exists and is this run's)."""
    from ..report.metrics import plot_confusion, write_predictions

    head_path = save_head(res.head, run_dir / HEAD_FILE)
    res.run_dir, res.head_path = run_dir, head_path
    m = res.metrics
    m["run_dir"], m["head"] = str(run_dir), str(head_path)
    save_rows(run_dir, run_rows(source, plan, m["selection"]))
    p = res.predictions
    names = res.head.class_names
    rows = np.asarray(p["rows"])
    write_predictions(run_dir, paths=[source.paths[r] if source.paths is not None else ""
                                      for r in rows],
                      y_true=p["y_true"], y_pred=p["y_pred"], class_names=names,
                      split=plan.eval_split, rows=rows,
                      probability=np.asarray(p["scores"])[np.arange(len(rows)), p["y_pred"]])
    plot_confusion(m["confusion_matrix"], names, run_dir / "confusion.png",
                   title=f"{m['model']} on {m['split']}: accuracy {m['accuracy']:.3f}")
    m["confusion_png"] = str(run_dir / "confusion.png")
    m["predictions_csv"] = str(run_dir / "predictions.csv")
    m["rows_json"] = str(run_dir / "rows.json")
    atomic_write_json(run_dir / "metrics.json", m)


