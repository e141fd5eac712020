"""Which of a multi-layer cache's layers a head is fitted on, chosen on the selection rows only.

A cache written by ``fxtl extract --layers`` holds the penultimate features (``/features``) and
the pooled outputs of earlier stages (``/layers/<name>``). For data unlike ImageNet the earlier
stages often transfer better (Head2Toe, Evci et al. 2022), but not everywhere, so the choice is
made per dataset: greedy forward selection of whole layers, starting from the penultimate
features, adding the layer that most improves a quick standardised logistic-regression probe,
stopping when no layer improves it by more than :data:`MIN_GAIN`. The probe is scored on the
rows that select hyper-parameters (:class:`~fxtl.heads.planning.HeadPlan`: ``val`` when the
cache has train, val and test; else k-fold CV on the fit rows), never on the reported rows.
The heads are then fitted on the concatenation of the chosen layers, in the chosen order.
"""
from __future__ import annotations

from typing import Any, Mapping, Sequence

import numpy as np

from ..errors import CacheError, ParameterError
from ..features.store import FeatureCache
from .planning import HeadPlan

__all__ = ["choose_layers", "layer_matrix", "features_name", "LayerChoice", "MIN_GAIN"]

# What a cache's ``layer`` attribute says for the penultimate features (the name
# fxtl.backbones.network.PENULTIMATE has; that module imports torch).
PENULTIMATE_NAME = "pooled"
# A layer joins only when it raises the probe's accuracy by more than this: below it the gain is
# within the noise of a few hundred selection rows, and every layer adds width (and fit time).
MIN_GAIN = 0.005
# The probe is a ridge classifier (one linear solve per fit, in the dual when rows are fewer than
# columns): a logistic regression's iterations made the greedy search minutes long on 300 rows
# and 2,000 columns. Its penalty is per row, fixed, so choosing stays one fit per candidate.
_PROBE_ALPHA = 1.0


class LayerChoice(dict):
    """``{"layers": [...], "steps": [...], "selection": ..., "candidates": [...]}``: the chosen
    layers in concatenation order and each greedy step's probe scores (JSON-ready)."""

    @property
    def layers(self) -> list[str]:
        return list(self["layers"])


def features_name(attrs: Mapping[str, Any]) -> str:
    """The name ``/features`` goes by in a layer list: the cache's ``layer`` (``pooled`` for the
    penultimate features)."""
    return str(attrs.get("layer") or PENULTIMATE_NAME)


def _blocks(cache: FeatureCache) -> dict[str, np.ndarray]:
    return {features_name(cache.attrs): cache.features,
            **{n: cache.layer(n) for n in cache.layer_names}}


def layer_matrix(cache: FeatureCache, names: Sequence[str]) -> np.ndarray:
    """The float32 columns of ``names`` (``/features``' name or ``/layers`` names) side by side.

    Raises
    ------
    CacheError
        The cache stores no such layer (it was extracted without it).
    """
    have = [features_name(cache.attrs), *cache.layer_names]
    missing = [n for n in names if n not in have]
    if missing:
        raise CacheError(f"{cache.path} stores no layer {', '.join(missing)} (it has "
                         f"{', '.join(have)}); extract it with --layers {','.join(names)}")
    parts = [cache.features if n == have[0] else cache.layer(n) for n in names]
    return np.ascontiguousarray(np.concatenate(parts, axis=1), dtype=np.float32)


def _probe_score(X: np.ndarray, y: np.ndarray, plan: HeadPlan, *, seed: int) -> float:
    """Accuracy of a standardised ridge classifier on the selection rows only."""
    from sklearn.linear_model import RidgeClassifier
    from sklearn.model_selection import StratifiedKFold
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    def fit_score(train: np.ndarray, test: np.ndarray) -> float:
        probe = make_pipeline(StandardScaler(), RidgeClassifier(alpha=_PROBE_ALPHA * len(train)))
        probe.fit(X[train], y[train])
        return float((probe.predict(X[test]) == y[test]).mean())

    if plan.selection == "val":
        rows = plan.search_rows
        return fit_score(rows[plan.val_fold == -1], rows[plan.val_fold == 0])
    rows = plan.search_rows
    folds = StratifiedKFold(n_splits=plan.cv_folds, shuffle=True, random_state=seed)
    scores = [fit_score(rows[a], rows[b]) for a, b in folds.split(rows, y[rows])]
    return float(np.mean(scores))


def choose_layers(cache: FeatureCache, plan: HeadPlan, *, layers: str | Sequence[str] = "auto",
                  seed: int = 0, min_gain: float = MIN_GAIN) -> LayerChoice:
    """The layers to fit heads on (see the module docstring).

    Parameters
    ----------
    cache : FeatureCache
        In memory; its ``/layers`` are read as needed.
    plan : HeadPlan
        Which rows select (:func:`fxtl.heads.planning.plan_head`); only ``plan.search_rows``
        are looked at.
    layers : "auto", "penultimate" or sequence of str
        ``"auto"`` chooses greedily; ``"penultimate"`` or a list is taken as given (checked).
    seed : int
        Seeds the probe's folds.
    min_gain : float
        The least accuracy gain for which a layer is added.

    Returns
    -------
    LayerChoice
    """
    first = features_name(cache.attrs)
    if layers == "penultimate":
        return LayerChoice(layers=[first], steps=[], selection="none", candidates=[first])
    if not isinstance(layers, str):
        layer_matrix(cache, list(layers))[:0]  # refuses a name the cache lacks
        return LayerChoice(layers=list(layers), steps=[], selection="given", candidates=[first, *cache.layer_names])
    if layers != "auto":
        raise ParameterError("layers", f"layers must be 'auto', 'penultimate' or a list of names, got {layers!r}")
    candidates = [first, *cache.layer_names]
    if len(candidates) == 1 or plan.selection == "none":
        return LayerChoice(layers=[first], steps=[], selection=plan.selection, candidates=candidates)
    blocks = _blocks(cache)
    y = np.asarray(cache.labels)
    chosen = [first]
    best = _probe_score(blocks[first], y, plan, seed=seed)
    steps: list[dict[str, Any]] = [{"layers": [first], "score": round(best, 6)}]
    while True:
        left = [n for n in candidates if n not in chosen]
        if not left:
            break
        tried = {n: _probe_score(np.concatenate([blocks[c] for c in [*chosen, n]], axis=1), y, plan,
                                 seed=seed) for n in left}
        name = max(left, key=lambda n: tried[n])  # ties: the earlier (shallower-listed) layer
        steps.append({"tried": {n: round(s, 6) for n, s in tried.items()}, "best": name,
                      "score": round(tried[name], 6), "added": tried[name] > best + min_gain})
        if not tried[name] > best + min_gain:
            break
        chosen.append(name)
        best = tried[name]
    return LayerChoice(layers=chosen, steps=steps, selection=plan.selection, candidates=candidates)
