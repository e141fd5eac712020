"""2-D maps of a feature cache (``fxtl plot-embedding``): PCA or t-SNE, coloured by class.

A quick look at whether the backbone separates the classes before any head is fitted: tight,
separate clusters mean a linear head will do; overlapping clouds mean fine-tuning may pay.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from .._util import default_cache_dir
from ..errors import FxtlError, ParameterError
from ..features.store import FeatureCache, load_features

__all__ = ["plot_embedding", "EmbeddingPlot", "METHODS"]

METHODS = ("pca", "tsne")
_MARKERS = {"train": "o", "val": "^", "test": "s"}


@dataclass
class EmbeddingPlot:
    """What :func:`plot_embedding` drew; ``to_dict()`` is the ``--json`` output."""

    plot: Path
    method: str
    n: int  # points drawn
    n_total: int  # labelled rows in the selected split(s)
    explained_variance: list[float] = field(default_factory=list)  # PCA: of the 2 components
    notes: list[str] = field(default_factory=list)
    figure: Any = field(default=None, repr=False, compare=False)  # the matplotlib Figure drawn

    def to_dict(self) -> dict[str, Any]:
        d = {k: v for k, v in asdict(self).items() if k != "figure"}
        d["plot"] = str(self.plot)
        return d


def plot_embedding(cache: str | Path | FeatureCache, *, method: str = "pca",
                   split: str | None = None, output: str | Path | None = None, seed: int = 0,
                   max_points: int = 5000, perplexity: float = 30.0,
                   cache_dir: str | Path | None = None) -> EmbeddingPlot:
    """Project the features to 2-D and save a scatter plot coloured by class as a PNG.

    Parameters
    ----------
    cache : path or FeatureCache
    method : {"pca", "tsne"}
        t-SNE runs on the first 50 principal components (the usual recipe).
    split : str, optional
        Only rows of this split (default: all; markers tell the splits apart).
    output : path, optional
        The PNG (default ``<cache-dir>/plots/<cache name>-<method>.png``).
    seed : int
        Seeds the subsample and t-SNE.
    max_points : int
        Larger caches are subsampled (stratified by class), since t-SNE is quadratic.
    perplexity : float
        t-SNE perplexity (lowered for tiny caches).

    Returns
    -------
    EmbeddingPlot
        ``plot`` is the PNG written; ``figure`` the matplotlib Figure (shows inline in a notebook).

    Examples
    --------
    >>> plot_embedding("cache/hymenoptera-lite0-1e2b80d0e2303460.h5", method="tsne").plot  # doctest: +SKIP
    PosixPath('cache/plots/hymenoptera-lite0-1e2b80d0e2303460-tsne.png')
    """
    if method not in METHODS:
        raise ParameterError("method", f"unknown embedding method {method!r}; use {' or '.join(METHODS)}")
    c = cache if isinstance(cache, FeatureCache) else load_features(cache)
    rows = np.arange(c.n) if split is None else np.flatnonzero(c.split == split)
    if not len(rows):
        raise ParameterError("split", f"{c.path} has no {split} rows (splits: "
                             f"{', '.join(c.splits)}); pick another split")
    notes: list[str] = []
    n_total = len(rows)
    rng = np.random.default_rng(seed)
    if len(rows) > max_points:
        # Stratified subsample: each class keeps its share.
        keep = []
        for label in np.unique(c.labels[rows]):
            members = rows[c.labels[rows] == label]
            take = max(1, int(round(len(members) * max_points / len(rows))))
            keep.append(rng.choice(members, size=min(take, len(members)), replace=False))
        rows = np.sort(np.concatenate(keep))
        notes.append(f"subsampled {len(rows)} of {n_total} rows (stratified, seed {seed})")
    if len(rows) < 3:
        raise FxtlError(f"{c.path} has {len(rows)} rows to draw; a 2-D map needs at least 3")
    xy, explained = _project(c.features[rows], method=method, seed=seed, perplexity=perplexity,
                             notes=notes)
    if output is None:
        home = Path(cache_dir) if cache_dir else default_cache_dir()
        output = home / "plots" / f"{Path(c.path).stem}-{method}{'-' + split if split else ''}.png"
    output = Path(output)
    if output.suffix.lower() != ".png":
        raise ParameterError("output", f"output {output} must end in .png")
    fig = _draw(xy, c.labels[rows], c.split[rows], c.class_names, output,
          title=f"{c.attrs.get('dataset_name') or Path(c.path).stem} - {c.attrs.get('backbone', '?')} "
                f"features, {method.upper() if method == 'pca' else 't-SNE'}")
    return EmbeddingPlot(plot=output, method=method, n=len(rows), n_total=n_total,
                         explained_variance=explained, notes=notes, figure=fig)


def _project(X: np.ndarray, *, method: str, seed: int, perplexity: float,
             notes: list[str]) -> tuple[np.ndarray, list[float]]:
    from sklearn.decomposition import PCA
    from sklearn.preprocessing import StandardScaler

    X = StandardScaler().fit_transform(np.asarray(X, dtype=np.float64))
    if method == "pca":
        pca = PCA(n_components=2, random_state=seed).fit(X)
        return pca.transform(X), [round(float(v), 6) for v in pca.explained_variance_ratio_]
    from sklearn.manifold import TSNE

    k = min(50, X.shape[0] - 1, X.shape[1])
    Z = PCA(n_components=k, random_state=seed).fit_transform(X) if X.shape[1] > k else X
    perp = min(perplexity, max(1.0, (X.shape[0] - 1) / 3.0))
    if perp != perplexity:
        notes.append(f"t-SNE perplexity lowered to {perp:.1f} for {X.shape[0]} points")
    xy = TSNE(n_components=2, perplexity=perp, init="pca", random_state=seed).fit_transform(Z)
    return xy, []


def _draw(xy: np.ndarray, labels: np.ndarray, split: np.ndarray, class_names: list[str],
          output: Path, *, title: str):
    import matplotlib

    from .figures import new_figure, save_png

    k = max(len(class_names), 1)
    cmap = matplotlib.colormaps["tab10" if k <= 10 else "tab20" if k <= 20 else "turbo"]
    fig = new_figure(figsize=(7, 6))
    ax = fig.add_subplot()
    for s in sorted(set(split.tolist())):
        for j in range(-1, k):
            m = (labels == j) & (split == s)
            if not m.any():
                continue
            colour = "0.6" if j < 0 else cmap(j / max(k - 1, 1) if k > 20 else j)
            ax.scatter(xy[m, 0], xy[m, 1], s=14, alpha=0.75, marker=_MARKERS.get(s, "o"),
                       color=colour, edgecolors="none",
                       label=(f"{class_names[j] if j >= 0 else 'unlabelled'}"
                              + (f" ({s})" if len(set(split.tolist())) > 1 else "")) if k <= 20 or j < 0 else None)
    if k <= 20:
        ax.legend(fontsize=7, markerscale=1.5, loc="best", frameon=False)
    ax.set_title(title, fontsize=10)
    ax.set_xticks([])
    ax.set_yticks([])
    save_png(fig, output, dpi=110)
    return fig
