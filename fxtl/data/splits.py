"""What heads and fine-tuning share about rows: which images learn, select and report, the
record of them, and the rule for run names.

=====================  ======================================  =========================
dataset splits         ``val`` (selects, when given)           ``report``
=====================  ======================================  =========================
train + val + test     ``val``                                 ``test``
train + val            a hold-out of train, if asked for       ``val``
train + test           a hold-out of train, if asked for       ``test``
train only             a 2nd hold-out, if asked for            ``holdout`` of train
=====================  ======================================  =========================

:func:`plan_splits` is the only place that decides this; ``fit-head`` and ``finetune`` both call
it, so their results compare on the same images. No split both selects and reports: with two
splits the second reports, and the selection happens inside train (a head by k-fold CV, a
fine-tune on a hold-out of train, :data:`SELECTION_HOLDOUT`, that it learns from only through
the epoch it keeps). The reported rows never depend on whether a selection hold-out is carved.

A hold-out decides each image by itself (:func:`hash_holdout`): a hash of its path and the seed
says which side it is on. A head sees a cache, which lacks the images that failed to decode; a
fine-tune sees the folder and learns which images are unreadable only while it trains. Deciding
per image gives both the same rows, and an image keeps its side when the dataset grows.

Every run writes a :class:`RunRows` (``rows.json``) so that a later step can refuse to report on
images an earlier step learned from (:func:`leaked_rows`).
"""
from __future__ import annotations

import hashlib
import re
from collections.abc import Collection, Sequence
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np

from .._util import atomic_write_json, read_json
from ..errors import DataError, FxtlError, ParameterError

__all__ = ["SplitPlan", "plan_splits", "hash_holdout", "RowSet", "RunRows", "run_rows",
           "leaked_rows", "save_rows", "load_rows", "check_run_name", "ROWS_FILE",
           "SELECTION_HOLDOUT", "MIN_TRAIN_PER_CLASS"]

# The selection split's name when it is a hold-out of train (the report hold-out is "holdout").
SELECTION_HOLDOUT = "holdout-selection"
# A selection hold-out of a two-split dataset must leave every class this many training images
# (and take at least one): below that the hold-out would leave the class next to nothing to
# learn from and score it on one image, so the plan trains on all of train instead.
MIN_TRAIN_PER_CLASS = 2
# What a run folder may be called: one path component, no hidden or control characters.
_RUN_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]*")


@dataclass(frozen=True)
class SplitPlan:
    """Row (or sample) indices per role, each sorted; see the module docstring.

    ``train`` never meets ``report``; ``val`` is the selection split (``None``: the consumer
    selects inside ``train`` or not at all) named ``val_name``.
    """

    train: np.ndarray
    val: np.ndarray | None
    val_name: str
    report: np.ndarray
    report_name: str
    notes: tuple[str, ...] = ()

    def with_notes(self, *notes: str) -> "SplitPlan":
        return replace(self, notes=self.notes + notes)


def hash_holdout(rows: np.ndarray, labels: np.ndarray, keys: Sequence[str], *, test_size: float,
                 seed: int, salt: str = "report", source: str,
                 class_names: Sequence[str] | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Split ``rows`` into (kept, held out), each image on its own: held out when a hash of
    ``(seed, salt, keys[row])`` falls below ``test_size``; both sorted.

    Every class keeps at least one image on each side: a class the hash sends wholly to one side
    moves its image with the lowest (or highest) hash across. So about ``test_size`` of each class
    is held out, and exactly the same images whichever other images are present.

    Parameters
    ----------
    rows : ndarray of int
        Candidate row (or sample) indices, all from the train split.
    labels : ndarray of int
        Class index of every row, indexed by ``rows``.
    keys : sequence of str
        What identifies a row's image (its path relative to the dataset root), indexed by
        ``rows``; the same image has the same key in a cache and in its folder.
    test_size : float
        Fraction held out, in (0, 1).
    seed : int
        The same seed gives the same rows.
    salt : str
        Tells apart hold-outs carved with one seed (the report's, the selection's).
    source : str
        What holds the rows (a dataset folder, a cache file), named in errors.
    class_names : sequence of str, optional
        Used to name the class that is too small.

    Examples
    --------
    >>> import numpy as np
    >>> keys = [f"img{i}.jpg" for i in range(40)]
    >>> kept, held = hash_holdout(np.arange(40), np.array([0, 1] * 20), keys, test_size=0.2,
    ...                           seed=0, source="toy")
    >>> kept2, held2 = hash_holdout(np.arange(1, 40), np.array([0, 1] * 20), keys, test_size=0.2,
    ...                             seed=0, source="toy")       # image 0 is unreadable
    >>> set(held2) == set(held) - {0}
    True
    """
    if not (isinstance(test_size, (int, float)) and 0.0 < test_size < 1.0):
        raise ParameterError("test_size", f"test_size must be a fraction in (0, 1), got {test_size}")
    rows = np.asarray(rows, dtype=np.int64)
    y = np.asarray(labels)[rows]
    u = np.array([_unit_hash(f"{int(seed)}\0{salt}\0{keys[r]}") for r in rows], dtype=np.float64)
    held = u < test_size
    for c in np.unique(y):
        mine = np.flatnonzero(y == c)
        if len(mine) < 2:
            name = class_names[c] if class_names is not None else str(c)
            raise DataError(f"{source} has only a train split and class {name!r} has under 2 "
                            "images, so no hold-out is possible; add images or a val split")
        if not held[mine].any():
            held[mine[np.argmin(u[mine])]] = True
        elif held[mine].all():
            held[mine[np.argmax(u[mine])]] = False
    return np.sort(rows[~held]), np.sort(rows[held])


def _unit_hash(text: str) -> float:
    """A number in [0, 1) that depends only on ``text`` (stable across runs and machines)."""
    digest = hashlib.blake2b(text.encode("utf-8", "surrogateescape"), digest_size=8).digest()
    return int.from_bytes(digest, "big") / 2.0 ** 64


def plan_splits(labels: np.ndarray, split: np.ndarray, keys: Sequence[str], *, seed: int,
                test_size: float, select_holdout: bool, source: str,
                class_names: Sequence[str] | None = None,
                error: type[FxtlError] = DataError) -> SplitPlan:
    """Which rows learn, select and report (the table in the module docstring).

    Parameters
    ----------
    labels : ndarray of int
        Class index per row; rows labelled -1 (unlabelled) are never used.
    split : ndarray of str
        ``train``, ``val`` or ``test`` per row.
    keys : sequence of str
        Per row, what identifies its image (its relative path); see :func:`hash_holdout`.
    seed, test_size : int, float
        Of the hold-outs carved from train (the report's when the data has only train, the
        selection's).
    select_holdout : bool
        Where the data has no val split to select on (train only, or train and one reported
        split): also carve a selection hold-out from the training rows (a fine-tune keeps an
        epoch and stops early on it; a head selects by k-fold CV and passes False). With two
        splits a class left with fewer than :data:`MIN_TRAIN_PER_CLASS` training images gets
        no hold-out: the plan then has none, and a note says why.
    source : str
        The dataset folder or cache, named in errors.
    error : FxtlError subclass
        Raised when there are no labelled train rows.
    """
    labels = np.asarray(labels)
    split = np.asarray(split).astype(str)
    labelled = labels >= 0
    rows = {s: np.flatnonzero((split == s) & labelled) for s in ("train", "val", "test")}
    if not len(rows["train"]):
        found = ", ".join(sorted(set(split.tolist()))) or "none"
        raise error(f"{source} has no labelled train rows (splits: {found}); give it a train "
                    "split (train/<class>/, or class folders)")
    if len(rows["test"]) and len(rows["val"]):
        return SplitPlan(rows["train"], rows["val"], "val", rows["test"], "test")
    kw = dict(test_size=test_size, seed=seed, source=source, class_names=class_names)
    if len(rows["test"]) or len(rows["val"]):
        report_name = "test" if len(rows["test"]) else "val"
        plan = SplitPlan(rows["train"], None, "", rows[report_name], report_name)
        return _select_in_train(plan, labels, keys, **kw) if select_holdout else plan
    rest, held = hash_holdout(rows["train"], labels, keys, **kw)
    note = (f"no val/test split: reporting on a {test_size:.0%} hold-out of train (seed "
            f"{int(seed)}, each image placed by a hash of its path, as fit-head and finetune both do)")
    if not select_holdout:
        return SplitPlan(rest, None, "", held, "holdout", (note,))
    fit, select = hash_holdout(rest, labels, keys, salt="selection", **kw)
    return SplitPlan(fit, select, SELECTION_HOLDOUT, held, "holdout",
                     (note + f"; selecting on a second {test_size:.0%} hold-out of the rest",))


def _select_in_train(plan: SplitPlan, labels: np.ndarray, keys: Sequence[str], *,
                     test_size: float, seed: int, source: str,
                     class_names: Sequence[str] | None) -> SplitPlan:
    """``plan`` (train and a reported split) with a selection hold-out carved from its training
    rows (:func:`hash_holdout`, salt ``selection``: as train-only data gets its second one);
    ``plan`` with a note instead when a class would keep under :data:`MIN_TRAIN_PER_CLASS`."""
    def named(c: int) -> str:
        return repr(class_names[c] if class_names is not None else str(c))

    classes, counts = np.unique(labels[plan.train], return_counts=True)
    if counts.min() < 2:  # hash_holdout needs one image on each side
        c, n = int(classes[np.argmin(counts)]), int(counts.min())
        return plan.with_notes(f"class {named(c)} has {n} train image(s), too few for a selection "
                               "hold-out: every train image trains, nothing selects")
    fit, select = hash_holdout(plan.train, labels, keys, test_size=test_size, seed=seed,
                               salt="selection", source=source, class_names=class_names)
    kept = np.bincount(labels[fit], minlength=int(classes.max()) + 1)[classes]
    if kept.min() < MIN_TRAIN_PER_CLASS:
        i = int(np.argmin(kept))
        return plan.with_notes(f"class {named(int(classes[i]))} has {int(counts[i])} train images, "
                               f"too few for a selection hold-out (it would keep {int(kept[i])} to "
                               "train on): every train image trains, nothing selects")
    note = (f"train + {plan.report_name} only: {plan.report_name} is the reported split, so "
            f"selecting on a {test_size:.0%} hold-out of train (seed {int(seed)}, each image "
            "placed by a hash of its path)")
    return SplitPlan(fit, select, SELECTION_HOLDOUT, plan.report, plan.report_name,
                     plan.notes + (note,))


def check_run_name(name: str | None, *, param: str = "run_name") -> str | None:
    """``name`` when it can name a run folder (one path component of letters, digits, ``.``,
    ``_`` and ``-``, not starting with ``.``, ``-`` or ``_``), else :class:`ParameterError`.

    >>> check_run_name("exp-1.b")
    'exp-1.b'
    >>> check_run_name("../x")
    Traceback (most recent call last):
    ...
    fxtl.errors.ParameterError: run_name '../x': use letters, digits, '.', '_' and '-' only, starting with a letter or digit
    """
    if name is None:
        return None
    if not isinstance(name, str) or not _RUN_NAME.fullmatch(name):
        raise ParameterError(param, f"{param} {name!r}: use letters, digits, '.', '_' and '-' "
                                    "only, starting with a letter or digit")
    return name


# ----------------------------------------------------------------------------- what a run used
ROWS_FILE = "rows.json"
ROWS_FORMAT = "fxtl-rows"
ROWS_FORMAT_VERSION = 1
_ROLES = ("train", "selection", "report")


@dataclass(frozen=True)
class RowSet:
    """Images that played one role in a run: ``split`` names where they came from
    (``train``, ``val``, ``test``, ``holdout``, ``train+val``, ``cv5`` ...), ``paths`` are relative
    to the dataset root, as in the cache's ``/paths``."""

    split: str
    paths: tuple[str, ...]


@dataclass(frozen=True)
class RunRows:
    """Which images a run learned from (``train``), selected on (``selection``: hyper-parameters,
    early stopping; ``None`` when nothing was selected) and reported on (``report``).

    ``data_fingerprint`` is :func:`fxtl.data.discovery.fingerprint` of the dataset without any
    backbone part, so a head run and a fine-tune of the same images carry the same value.
    """

    data_fingerprint: str
    train: RowSet
    selection: RowSet | None
    report: RowSet

    def learned_from(self) -> frozenset[str]:
        """Every image whose label shaped this run's model: its train and selection rows."""
        sel = self.selection.paths if self.selection is not None else ()
        return frozenset(self.train.paths) | frozenset(sel)

    def to_dict(self) -> dict:
        d = {"format": ROWS_FORMAT, "format_version": ROWS_FORMAT_VERSION,
             "data_fingerprint": self.data_fingerprint}
        for role in _ROLES:
            rs = getattr(self, role)
            d[role] = None if rs is None else {"split": rs.split, "n": len(rs.paths),
                                               "paths": list(rs.paths)}
        return d

    @classmethod
    def from_dict(cls, d: dict, *, source: str = "rows.json") -> "RunRows":
        if not isinstance(d, dict) or d.get("format") != ROWS_FORMAT:
            raise DataError(f"{source} is not an fxtl rows record; re-run the command that made it")
        if d.get("format_version") != ROWS_FORMAT_VERSION:
            raise DataError(f"{source} has rows format version {d.get('format_version')!r}; this "
                            f"fxtl reads version {ROWS_FORMAT_VERSION}: upgrade fxtl")
        sets = {}
        for role in _ROLES:
            v = d.get(role)
            if v is None and role == "selection":
                sets[role] = None
                continue
            if (not isinstance(v, dict) or not isinstance(v.get("split"), str)
                    or not isinstance(v.get("paths"), list)
                    or not all(isinstance(p, str) for p in v["paths"])):
                raise DataError(f"{source}: '{role}' is damaged; re-run the command that made it")
            sets[role] = RowSet(v["split"], tuple(v["paths"]))
        if not isinstance(d.get("data_fingerprint"), str):
            raise DataError(f"{source}: 'data_fingerprint' is missing; re-run the command that made it")
        return cls(data_fingerprint=d["data_fingerprint"], **sets)


def run_rows(paths: Sequence[str], *, data_fingerprint: str, train: tuple[str, np.ndarray],
             selection: tuple[str, np.ndarray] | None, report: tuple[str, np.ndarray],
             unread: Collection[str] = ()) -> RunRows:
    """The :class:`RunRows` of a run: each role is ``(split name, row indices into paths)``.

    ``unread``: paths of images that could not be decoded; a role never lists them (a fine-tune
    learns of them while it trains, a head's cache never holds them), so a head and a fine-tune
    of the same data list the same images.
    """
    skip = frozenset(unread)

    def rowset(role: tuple[str, np.ndarray]) -> RowSet:
        name, rows = role
        picked = (paths[int(r)] for r in np.sort(np.asarray(rows, dtype=np.int64)))
        return RowSet(name, tuple(p for p in picked if p not in skip))

    return RunRows(data_fingerprint=str(data_fingerprint), train=rowset(train),
                   selection=rowset(selection) if selection is not None else None,
                   report=rowset(report))


def leaked_rows(learner: RunRows, reporter: RunRows) -> frozenset[str]:
    """Images ``learner`` learned from (train or selection) that ``reporter`` reports on.

    Non-empty means ``reporter``'s numbers are not held out from ``learner``: e.g. a head refitted
    on train+val used to start a fine-tune that early-stops on val. Runs of different datasets
    share no rows.

    Examples
    --------
    >>> a = RunRows("d", RowSet("train+val", ("a", "b")), None, RowSet("test", ("c",)))
    >>> b = RunRows("d", RowSet("train", ("a",)), RowSet("val", ("b",)), RowSet("val", ("b",)))
    >>> sorted(leaked_rows(a, b))
    ['b']
    """
    if learner.data_fingerprint != reporter.data_fingerprint:
        return frozenset()
    return learner.learned_from() & frozenset(reporter.report.paths)


def save_rows(run_dir: str | Path, rows: RunRows) -> Path:
    """Write ``rows.json`` into ``run_dir`` (atomically)."""
    path = Path(run_dir) / ROWS_FILE
    atomic_write_json(path, rows.to_dict())
    return path


def load_rows(run_dir: str | Path) -> RunRows | None:
    """The run's :class:`RunRows`, or ``None`` for a run made before fxtl recorded them."""
    path = Path(run_dir) / ROWS_FILE
    if not path.exists():
        return None
    try:
        d = read_json(path)
    except (OSError, ValueError) as exc:
        raise DataError(f"{path} cannot be read ({exc}); re-run the command that made it") from None
    return RunRows.from_dict(d, source=str(path))
