"""What heads and fine-tuning share about rows: the stratified hold-out, and the record of which
images a run learned from, selected on and reported on.

Both stages must carve the same rows for the same seed, so their results compare on the same
images: one function does it, with one set of checks and messages. Every run writes a
:class:`RunRows` (``rows.json``) so that a later step can refuse to report on images an earlier
step learned from (:func:`leaked_rows`).
"""
from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ..errors import DataError, ParameterError

__all__ = ["stratified_holdout", "RowSet", "RunRows", "leaked_rows", "save_rows", "load_rows",
           "ROWS_FILE"]


def stratified_holdout(rows: np.ndarray, labels: np.ndarray, *, test_size: float, seed: int,
                       source: str, class_names: Sequence[str] | None = None
                       ) -> tuple[np.ndarray, np.ndarray]:
    """Split ``rows`` into (kept, held out), stratified by ``labels[rows]``; both sorted.

    Parameters
    ----------
    rows : ndarray of int
        Candidate row (or sample) indices, all from the train split.
    labels : ndarray of int
        Class index of every row, indexed by ``rows``.
    test_size : float
        Fraction held out, in (0, 1).
    seed : int
        Seed of the shuffle; the same seed gives the same rows.
    source : str
        What holds the rows (a dataset folder, a cache file), named in errors.
    class_names : sequence of str, optional
        Used to name the class that is too small.

    Examples
    --------
    >>> import numpy as np
    >>> kept, held = stratified_holdout(np.arange(10), np.array([0, 1] * 5), test_size=0.2,
    ...                                 seed=0, source="toy")
    >>> len(kept), len(held), sorted(np.array([0, 1] * 5)[held].tolist())
    (8, 2, [0, 1])
    """
    from sklearn.model_selection import train_test_split

    if not 0.0 < test_size < 1.0:
        raise ParameterError("test_size", f"test_size must be a fraction in (0, 1), got {test_size}")
    y = np.asarray(labels)[rows]
    counts = np.bincount(y)
    present = np.flatnonzero(counts)
    smallest = int(present[counts[present].argmin()])
    if counts[smallest] < 2:
        name = class_names[smallest] if class_names is not None else str(smallest)
        raise DataError(f"{source} has only a train split and class {name!r} has under 2 images, "
                        "so no stratified hold-out is possible; add images or a val split")
    try:
        kept, held = train_test_split(rows, test_size=test_size, random_state=seed, stratify=y)
    except ValueError as exc:
        raise ParameterError("test_size", f"cannot hold out test_size={test_size} of {source} "
                             f"stratified: {exc}") from None
    return np.sort(kept), np.sort(held)


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
    from .._util import atomic_write_json

    path = Path(run_dir) / ROWS_FILE
    atomic_write_json(path, rows.to_dict())
    return path


def load_rows(run_dir: str | Path) -> RunRows | None:
    """The run's :class:`RunRows`, or ``None`` for a run made before fxtl recorded them."""
    from .._util import read_json

    path = Path(run_dir) / ROWS_FILE
    if not path.exists():
        return None
    try:
        d = read_json(path)
    except (OSError, ValueError) as exc:
        raise DataError(f"{path} cannot be read ({exc}); re-run the command that made it") from None
    return RunRows.from_dict(d, source=str(path))
