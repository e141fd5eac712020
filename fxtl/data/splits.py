"""The stratified hold-out that heads and fine-tuning share when a dataset has only a train split.

Both stages must carve the same rows for the same seed, so their results compare on the same
images: one function does it, with one set of checks and messages.
"""
from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from ..errors import DataError, ParameterError

__all__ = ["stratified_holdout"]


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
