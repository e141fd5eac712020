"""The learning-curve plot of a run (``learning_curves.png``)."""
from __future__ import annotations

from pathlib import Path
from typing import Any, Sequence

from .._util import atomic_path

__all__ = ["plot_learning_curves"]


def plot_learning_curves(history: Sequence[dict[str, Any]], path: Path, *, best_epoch: int = 0,
                         title: str = "") -> Path:
    """Loss and accuracy per epoch, train and val, side by side (PNG).

    Drawn on a bare :class:`matplotlib.figure.Figure` with its Agg canvas: no pyplot, no
    process-wide backend change.
    """
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(9, 3.6))
    FigureCanvasAgg(fig)
    axes = fig.subplots(1, 2)
    ep = [h["epoch"] for h in history]
    for ax, key in ((axes[0], "loss"), (axes[1], "accuracy")):
        ax.plot(ep, [h[f"train_{key}"] for h in history], "o-", label=f"train {key} (augmented)")
        if history and f"val_{key}" in history[0]:
            ax.plot(ep, [h[f"val_{key}"] for h in history], "s-", label=f"val {key}")
        if best_epoch:
            ax.axvline(best_epoch, color="grey", linestyle=":", label=f"kept (epoch {best_epoch})")
        ax.set_xlabel("epoch")
        ax.set_ylabel(key)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    if title:
        fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    with atomic_path(Path(path), suffix=".png") as tmp:
        fig.savefig(tmp, dpi=100, format="png")
    return Path(path)
