"""Figures without pyplot: a :class:`matplotlib.figure.Figure` with its own Agg canvas.

pyplot keeps global state (the current figure, the process-wide backend choice);
a library that draws behind its caller must touch neither, so every plot in :mod:`fxtl.report`
is made here and written atomically.
"""
from __future__ import annotations

from pathlib import Path

__all__ = ["new_figure", "save_png"]


def new_figure(*, figsize: tuple[float, float]):
    """A pyplot-free ``Figure`` with an Agg canvas attached (works on a head-less machine).

    Examples
    --------
    >>> fig = new_figure(figsize=(2, 2))
    >>> type(fig.canvas).__name__
    'FigureCanvasAgg'
    """
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=figsize)
    FigureCanvasAgg(fig)
    return fig


def save_png(fig, path: str | Path, *, title: str = "", dpi: int = 100) -> Path:
    """Title, tighten and write ``fig`` as a PNG atomically; returns ``path``."""
    from .._util import atomic_path

    if title:
        fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    with atomic_path(Path(path), suffix=".png") as tmp:
        fig.savefig(tmp, dpi=dpi, format="png")
    return Path(path)
