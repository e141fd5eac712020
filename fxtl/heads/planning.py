"""Which cache rows select hyper-parameters, fit the final head and are reported on.

=======================  ======================  =================================  ===========
cache splits             hyper-parameters from   final model fitted on              reported on
=======================  ======================  =================================  ===========
train + val + test       ``val``                 train + val                        ``test``
train + test             k-fold CV on train      train                              ``test``
train + val              k-fold CV on train      train                              ``val``
train only               k-fold CV on the rest   train minus a hold-out             ``holdout``
=======================  ======================  =================================  ===========

The rows come from :func:`fxtl.data.splits.plan_splits`, the planner ``finetune`` uses too; this
module adds what is a head's own: the final fit on train + val, and the k of the k-fold CV. The
reported split is never seen by the search nor the final fit. How the search then uses its rows
(k-fold, one held-out split, a subsample) is :mod:`fxtl.heads.search`'s choice.
"""
from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np

from ..data.splits import plan_splits
from ..errors import CacheError

__all__ = ["HeadPlan", "plan_head"]


@dataclass
class HeadPlan:
    """Which rows select hyper-parameters, which fit the final head, which are reported.

    All index arrays are row numbers of the cache. ``eval_rows`` never intersect
    ``search_rows`` nor ``fit_rows`` (see :func:`plan_head`).
    """

    fit_rows: np.ndarray  # the final model is fitted on these
    eval_rows: np.ndarray  # scores are reported on these
    eval_split: str  # "test", "val" or "holdout"
    selection: str  # "val", "cv5", ... or "none"
    search_rows: np.ndarray  # every row the search may look at
    val_fold: np.ndarray | None = None  # for selection == "val": 0 on val rows, -1 on train rows
    cv_folds: int = 0
    notes: list[str] = field(default_factory=list)


def plan_head(labels: np.ndarray, split: np.ndarray, *, paths: Sequence[str] | None = None,
              seed: int = 0, test_size: float = 0.2, cv_folds: int = 5, search: bool = True,
              source: str = "the cache", class_names: Sequence[str] | None = None) -> HeadPlan:
    """Decide the selection, fit and report rows (the table in the module docstring).

    ``paths`` (the cache's ``/paths``) place each row of a hold-out; unlabelled rows (label -1)
    are never used.

    Examples
    --------
    >>> import numpy as np
    >>> plan = plan_head(np.array([0, 1] * 6), np.array(["train"] * 8 + ["test"] * 4))
    >>> plan.eval_split, plan.selection, len(plan.fit_rows)
    ('test', 'cv4', 8)
    """
    labels = np.asarray(labels)
    keys = list(paths) if paths is not None and len(paths) == len(labels) else \
        [f"#{i}" for i in range(len(labels))]
    shared = plan_splits(labels, split, keys, seed=seed, test_size=test_size,
                         select_holdout=False, source=source, class_names=class_names,
                         error=CacheError)
    notes = list(shared.notes)
    eval_rows, eval_split = shared.report, shared.report_name
    if shared.val is not None:
        fit_rows = np.concatenate([shared.train, shared.val])
        if search:
            fold = np.r_[np.full(len(shared.train), -1), np.zeros(len(shared.val), dtype=int)]
            return HeadPlan(fit_rows=fit_rows, eval_rows=eval_rows, eval_split=eval_split,
                            selection="val", search_rows=fit_rows, val_fold=fold, notes=notes)
    else:
        fit_rows = shared.train
    if not search:
        return HeadPlan(fit_rows=fit_rows, eval_rows=eval_rows, eval_split=eval_split,
                        selection="none", search_rows=fit_rows[:0], notes=notes)
    counts = np.bincount(labels[fit_rows])
    counts = counts[counts > 0]
    k = int(min(cv_folds, counts.min()))
    if k < 2:
        notes.append("a class has a single training image: no cross-validation possible, "
                     "fitted default parameters")
        return HeadPlan(fit_rows=fit_rows, eval_rows=eval_rows, eval_split=eval_split,
                        selection="none", search_rows=fit_rows[:0], notes=notes)
    if k < cv_folds:
        notes.append(f"{k}-fold CV (the smallest class has {k} training images)")
    return HeadPlan(fit_rows=fit_rows, eval_rows=eval_rows, eval_split=eval_split,
                    selection=f"cv{k}", search_rows=fit_rows, cv_folds=k, notes=notes)
