"""Which images a fine-tune trains on, selects (early-stops) on and reports on.

=====================  ==============================  =========================
dataset splits         early stopping / selection on   reported on
=====================  ==============================  =========================
train + val + test     ``val``                         ``test``
train + val            none (last epoch is kept)       ``val``
train + test           none (last epoch is kept)       ``test``
train only             a 2nd hold-out of the rest      ``holdout``
=====================  ==============================  =========================

No split both selects and reports: with two splits the second is the reported one (as in
``fit-head``, which then selects by k-fold CV on train), so the fine-tune runs its epochs and
keeps the last (the cosine schedule has decayed to zero there) rather than early-stopping on the
images it reports on.

The reported hold-out is :func:`fxtl.data.splits.stratified_holdout` of the train rows
(``test_size``, ``seed``), the call ``fit-head`` makes, so both paths report on the same images
(exactly the same ones when no image is unreadable); the selection hold-out is carved the same
way from the remaining rows.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from ..data.discovery import ImageSet, fingerprint
from ..data.splits import RowSet, RunRows, stratified_holdout
from ..errors import DataError
from .config import SELECTION_HOLDOUT

__all__ = ["Splits", "plan_splits", "run_rows"]


@dataclass(frozen=True)
class Splits:
    """Sample indices per role; ``val`` is the selection split (None: last epoch kept)."""

    train: np.ndarray  # sample indices
    val: np.ndarray | None  # selection split (None: no selection, last epoch kept)
    val_name: str
    report: np.ndarray
    report_name: str
    notes: tuple[str, ...] = ()


def plan_splits(images: ImageSet, *, seed: int, test_size: float) -> Splits:
    labels = np.array([s.label for s in images.samples], dtype=np.int64)
    split = np.array([s.split for s in images.samples])
    rows = {s: np.flatnonzero(split == s) for s in ("train", "val", "test")}
    if not len(rows["train"]):
        raise DataError(f"{images.root} has no train split; fine-tuning needs training images "
                        "(put them in train/<class>/)")
    if len(rows["val"]) and len(rows["test"]):
        return Splits(rows["train"], rows["val"], "val", rows["test"], "test")
    if len(rows["val"]) or len(rows["test"]):
        name = "test" if len(rows["test"]) else "val"
        return Splits(rows["train"], None, "", rows[name], name,
                      (f"train + {name} only: {name} is the reported split, so it selects nothing; "
                       "no early stopping, the last epoch is kept",))
    # Report on exactly the rows fit-head reports on (same call, same seed), and select (early
    # stopping) on a second hold-out of what remains, so no image both selects and reports.
    rest, held = stratified_holdout(rows["train"], labels, test_size=test_size, seed=seed,
                                    source=str(images.root), class_names=images.class_names)
    fit, select = stratified_holdout(rest, labels, test_size=test_size, seed=seed,
                                     source=str(images.root), class_names=images.class_names)
    note = (f"no val/test split: reporting on a stratified {test_size:.0%} hold-out of train "
            f"(seed {seed}, the rows fit-head reports on) and selecting on a second stratified "
            f"{test_size:.0%} hold-out of the rest")
    return Splits(fit, select, SELECTION_HOLDOUT, held, "holdout", (note,))


def run_rows(images: ImageSet, splits: Splits) -> RunRows:
    """Which images the run learned from, selected on and reported on (``rows.json``)."""
    def rowset(rows: np.ndarray, name: str) -> RowSet:
        return RowSet(name, tuple(images.samples[i].path for i in rows))

    return RunRows(data_fingerprint=fingerprint(images), train=rowset(splits.train, "train"),
                   selection=rowset(splits.val, splits.val_name) if splits.val is not None else None,
                   report=rowset(splits.report, splits.report_name))


