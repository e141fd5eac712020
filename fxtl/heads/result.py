"""What fitting a head returns: :class:`FitResult`, a value that holds everything its run folder
needs, so fitting (:mod:`fxtl.heads.fitting`) and saving (:mod:`fxtl.heads.runs`) stay apart."""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..data.splits import RunRows
from .config import HeadConfig
from .model import Head

__all__ = ["FitResult", "RUN_KEYS"]

# One entry of ``fxtl fit-head --json``'s ``runs`` (with "head" and "run_dir").
RUN_KEYS = ("model", "split", "accuracy", "balanced_accuracy", "macro_f1", "n", "fit_seconds",
            "search_seconds", "predict_seconds", "selection", "selection_score", "best_params",
            "n_candidates", "trainable_params", "n_fit", "scalable", "estimator", "backend",
            "search_backend", "solver", "strategy", "budget_seconds", "notes")


@dataclass
class FitResult:
    """What :func:`~fxtl.heads.fitting.fit_head` returns: the fitted :class:`Head`, its metrics
    (``metrics.json``), the rows it used (``rows.json``) and the config that made it.

    ``estimator`` is the fitted scikit-learn Pipeline (``classes_`` are class names).
    ``run_dir`` and ``head_path`` are set once the result is saved
    (:func:`fxtl.heads.runs.save_run`).
    """

    head: Head
    metrics: dict[str, Any]
    run_dir: Path | None = None
    head_path: Path | None = None
    # Rows of the reported split: cache row, path, true/predicted class index, score matrix.
    predictions: dict[str, Any] = field(default_factory=dict, repr=False)
    rows: RunRows | None = field(default=None, repr=False)
    config: HeadConfig | None = None

    @property
    def estimator(self):
        return self.head.pipeline

    @property
    def pipeline(self):
        return self.head.pipeline

    def to_dict(self) -> dict[str, Any]:
        """One entry of ``fxtl fit-head --json``'s ``runs``."""
        d = {k: self.metrics.get(k) for k in RUN_KEYS}
        d["head"] = str(self.head_path) if self.head_path else None
        d["run_dir"] = str(self.run_dir) if self.run_dir else None
        return d
