"""Which images a fine-tune trains on, selects (early-stops) on and reports on.

:func:`fxtl.data.splits.plan_splits` decides, as it does for ``fit-head``, so both report on the
same images. With only a train split a fine-tune also selects on a second hold-out of what the
report leaves; with two splits the second reports and nothing selects (the cosine schedule has
decayed to zero at the last epoch, which is kept).
"""
from __future__ import annotations

from collections.abc import Collection

import numpy as np

from ..data.discovery import ImageSet, fingerprint
from ..data.splits import RunRows, SplitPlan
from ..data.splits import plan_splits as plan_rows
from ..data.splits import run_rows as rows_record

__all__ = ["Splits", "plan_splits", "run_rows"]

# The fine-tune's name for the shared plan (fields train, val, val_name, report, report_name).
Splits = SplitPlan


def plan_splits(images: ImageSet, *, seed: int, test_size: float) -> Splits:
    """The shared plan of ``images`` (see :func:`fxtl.data.splits.plan_splits`)."""
    plan = plan_rows(np.array([s.label for s in images.samples], dtype=np.int64),
                     np.array([s.split for s in images.samples]),
                     [s.path for s in images.samples], seed=seed, test_size=test_size,
                     select_holdout=True, source=str(images.root),
                     class_names=images.class_names)
    if plan.val is None:
        return plan.with_notes(f"train + {plan.report_name} only: {plan.report_name} is the "
                               "reported split, so it selects nothing; no early stopping, the "
                               "last epoch is kept")
    return plan


def run_rows(images: ImageSet, splits: Splits, *, unread: Collection[str] = ()) -> RunRows:
    """Which images the run learned from, selected on and reported on (``rows.json``);
    ``unread``: paths that failed to decode, listed in no role."""
    paths = [s.path for s in images.samples]
    return rows_record(paths, data_fingerprint=fingerprint(images),
                       train=("train", splits.train),
                       selection=(splits.val_name, splits.val) if splits.val is not None else None,
                       report=(splits.report_name, splits.report), unread=unread)
