"""Which images a fine-tune trains on, selects (early-stops) on and reports on.

:func:`fxtl.data.splits.plan_splits` decides, as it does for ``fit-head``, so both report on the
same images. Where the data has no val split to select on (train only; train and one reported
split, e.g. train + val with val reported), a fine-tune selects on a hold-out of its training
rows (``holdout-selection``): the fitted start is epoch 0 there, the best epoch is kept, and a
kept start is refitted on the training and selection rows (every train image with two splits,
as ``fit-head`` fits its head), a kept trained epoch retrained on them (``refit``). With ``selection_holdout=False``, or a class too small to spare
an image, every training image trains, nothing selects and the last epoch is kept (the cosine
schedule has decayed to zero there).
"""
from __future__ import annotations

from collections.abc import Collection

import numpy as np

from ..data.discovery import ImageSet, fingerprint
from ..data.splits import SELECTION_HOLDOUT, RunRows, SplitPlan
from ..data.splits import plan_splits as plan_rows
from ..data.splits import run_rows as rows_record

__all__ = ["Splits", "plan_splits", "run_rows", "two_splits", "selects_on_holdout"]

# The fine-tune's name for the shared plan (fields train, val, val_name, report, report_name).
Splits = SplitPlan


def plan_splits(images: ImageSet, *, seed: int, test_size: float,
                selection_holdout: bool = True) -> Splits:
    """The shared plan of ``images`` (see :func:`fxtl.data.splits.plan_splits`), selecting on a
    hold-out of train where the data has no val split to select on, unless
    ``selection_holdout`` is False."""
    plan = plan_rows(np.array([s.label for s in images.samples], dtype=np.int64),
                     np.array([s.split for s in images.samples]),
                     [s.path for s in images.samples], seed=seed, test_size=test_size,
                     select_holdout=selection_holdout, source=str(images.root),
                     class_names=images.class_names)
    if plan.val is None:
        why = ("selection_holdout is off" if not selection_holdout
               else "no hold-out of train could be spared")
        return plan.with_notes(f"{plan.report_name} is the reported split and {why}: nothing "
                               "selects, no early stopping, the last epoch is kept")
    return plan


def two_splits(splits: Splits) -> bool:
    """Has the data train and one reported split, and no val split to select on (train + val
    with val reported, train + test)? There ``selection_holdout`` decides the selection."""
    return splits.report_name != "holdout" and splits.val_name in ("", SELECTION_HOLDOUT)


def selects_on_holdout(splits: Splits) -> bool:
    """Are the selection rows a hold-out of train (:data:`SELECTION_HOLDOUT`)? Then a trained
    epoch they keep is retrained on every train image (``refit``, :mod:`fxtl.training.refit`)."""
    return splits.val is not None and splits.val_name == SELECTION_HOLDOUT


def run_rows(images: ImageSet, splits: Splits, *, unread: Collection[str] = ()) -> RunRows:
    """Which images the run learned from, selected on and reported on (``rows.json``);
    ``unread``: paths that failed to decode, listed in no role."""
    paths = [s.path for s in images.samples]
    return rows_record(paths, data_fingerprint=fingerprint(images),
                       train=("train", splits.train),
                       selection=(splits.val_name, splits.val) if splits.val is not None else None,
                       report=(splits.report_name, splits.report), unread=unread)
