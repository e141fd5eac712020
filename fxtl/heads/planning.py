"""Which cache rows select hyper-parameters, fit the final head and are reported on.

=======================  ======================  =================================  ===========
cache splits             hyper-parameters from   final model fitted on              reported on
=======================  ======================  =================================  ===========
train + val + test       ``val``                 train + val                        ``test``
train + test             k-fold CV on train      train                              ``test``
train + val              k-fold CV on train      train                              ``val``
train only               k-fold CV on the rest   train minus a stratified hold-out  ``holdout``
=======================  ======================  =================================  ===========

The reported split is never seen by the search nor the final fit. How the search then uses its
rows (k-fold, one held-out split, a subsample) is :mod:`fxtl.heads.search`'s choice.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from ..data.splits import stratified_holdout
from ..errors import CacheError

__all__ = ["SplitPlan", "plan_splits"]


@dataclass
class SplitPlan:
    """Which rows select hyper-parameters, which fit the final head, which are reported.

    All index arrays are row numbers of the cache. ``eval_rows`` never intersect
    ``search_rows`` nor ``fit_rows`` (see :func:`plan_splits`).
    """

    fit_rows: np.ndarray  # the final model is fitted on these
    eval_rows: np.ndarray  # scores are reported on these
    eval_split: str  # "test", "val" or "holdout"
    selection: str  # "val", "cv5", ... or "none"
    search_rows: np.ndarray  # every row the search may look at
    val_fold: np.ndarray | None = None  # for selection == "val": 0 on val rows, -1 on train rows
    cv_folds: int = 0
    notes: list[str] = field(default_factory=list)


def plan_splits(labels: np.ndarray, split: np.ndarray, *, seed: int = 0, test_size: float = 0.2,
                cv_folds: int = 5, search: bool = True) -> SplitPlan:
    """Decide the selection, fit and report rows (the table in the module docstring).

    Unlabelled rows (label -1) are never used.
    """
    labels = np.asarray(labels)
    split = np.asarray(split).astype(str)
    labelled = labels >= 0
    rows = {s: np.flatnonzero((split == s) & labelled) for s in ("train", "val", "test")}
    if not len(rows["train"]):
        raise CacheError(f"the cache has no labelled train rows (splits: "
                         f"{', '.join(sorted(set(split.tolist()))) or 'none'}); extract a "
                         "dataset with a train split")
    notes: list[str] = []
    if len(rows["test"]):
        eval_rows, eval_split = rows["test"], "test"
        if len(rows["val"]) and search:
            search_rows = np.concatenate([rows["train"], rows["val"]])
            fold = np.r_[np.full(len(rows["train"]), -1), np.zeros(len(rows["val"]), dtype=int)]
            return SplitPlan(fit_rows=search_rows, eval_rows=eval_rows, eval_split="test",
                             selection="val", search_rows=search_rows, val_fold=fold, notes=notes)
        fit_rows = np.concatenate([rows["train"], rows["val"]]) if len(rows["val"]) else rows["train"]
    elif len(rows["val"]):
        eval_rows, eval_split, fit_rows = rows["val"], "val", rows["train"]
    else:
        fit_rows, eval_rows = stratified_holdout(rows["train"], labels, test_size=test_size,
                                                 seed=seed, source="the cache")
        eval_split = "holdout"
        notes.append(f"no val/test split: reporting on a stratified {test_size:.0%} hold-out of "
                     f"train (seed {int(seed)})")
    if not search:
        return SplitPlan(fit_rows=fit_rows, eval_rows=eval_rows, eval_split=eval_split,
                         selection="none", search_rows=fit_rows[:0], notes=notes)
    counts = np.bincount(labels[fit_rows])
    counts = counts[counts > 0]
    k = int(min(cv_folds, counts.min()))
    if k < 2:
        notes.append("a class has a single training image: no cross-validation possible, "
                     "fitted default parameters")
        return SplitPlan(fit_rows=fit_rows, eval_rows=eval_rows, eval_split=eval_split,
                         selection="none", search_rows=fit_rows[:0], notes=notes)
    if k < cv_folds:
        notes.append(f"{k}-fold CV (the smallest class has {k} training images)")
    return SplitPlan(fit_rows=fit_rows, eval_rows=eval_rows, eval_split=eval_split,
                     selection=f"cv{k}", search_rows=fit_rows, cv_folds=k, notes=notes)

