"""Which of a multi-layer cache's layers a head is fitted on, chosen on the selection rows only.

A cache written by ``fxtl extract --layers`` holds the penultimate features (``/features``) and
the pooled outputs of earlier stages (``/layers/<name>``). For data unlike ImageNet the earlier
stages often transfer better (Head2Toe, Evci et al. 2022), but not everywhere, so the choice is
made per dataset: greedy forward selection of whole layers, starting from the penultimate
features, adding the layer that most improves a standardised ridge probe, and only while the
improvement is larger than its noise.

The probe is scored by leave-one-out over every row that may select hyper-parameters
(:class:`~fxtl.heads.planning.HeadPlan`'s ``search_rows``: train + val when the cache has train,
val and test; else the fit rows), never on the reported rows. Leave-one-out on all of them is
far less noisy than one small val split (a val split of 150 images moves by 0.7 points per
image), and for a ridge probe it is exact and cheap: the Gram matrix of a set of layers is the
sum of the layers' Gram matrices, and one eigendecomposition of it gives the leave-one-out
predictions of every penalty in :data:`_ALPHAS` (the best is taken per candidate set). A layer
joins when it turns more rows from wrong to right than from right to wrong by more than
:data:`NOISE_Z` standard deviations of that difference (a one-sided sign test at about 84 %) and
by at least :data:`MIN_GAIN` of the rows; the concatenation of every layer is tried as well, and
taken when it beats the greedy set by the same rule. The heads are then fitted on the
concatenation of the chosen layers, in the chosen order.
"""
from __future__ import annotations

from typing import Any, Mapping, Sequence

import numpy as np

from ..errors import CacheError, ParameterError
from ..features.store import FeatureCache
from .planning import HeadPlan

__all__ = ["choose_layers", "layer_matrix", "features_name", "LayerChoice", "MIN_GAIN", "NOISE_Z"]

# What a cache's ``layer`` attribute says for the penultimate features (the name
# fxtl.backbones.network.PENULTIMATE has; that module imports torch).
PENULTIMATE_NAME = "pooled"
# A layer joins only when it raises the probe's leave-one-out accuracy by at least this much and
# by more than NOISE_Z standard deviations of the paired difference: every layer adds width
# (and fit time), so a gain within noise is no reason to take it.
MIN_GAIN = 0.005
NOISE_Z = 1.0
# Ridge penalties, as multiples of the mean eigenvalue of the Gram matrix (so the grid follows
# the width of the candidate set); the leave-one-out accuracy picks one per candidate.
_ALPHAS = (0.01, 0.1, 1.0, 10.0)
# Leave-one-out needs the rows' Gram matrix: above this many selection rows a stratified
# subsample of them chooses (an n x n eigendecomposition per candidate).
_MAX_ROWS = 2000


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


def _take(rows: np.ndarray, y: np.ndarray, n: int, seed: int) -> np.ndarray:
    """At most ``n`` of ``rows``, stratified by ``y[rows]`` (all of them when fewer)."""
    if len(rows) <= n:
        return rows
    rng = np.random.default_rng(seed)
    keep = []
    for c in np.unique(y[rows]):
        members = rows[y[rows] == c]
        k = max(1, int(round(n * len(members) / len(rows))))
        keep.append(rng.choice(members, size=min(k, len(members)), replace=False))
    return np.sort(np.concatenate(keep))


def _gram(X: np.ndarray) -> np.ndarray:
    """The Gram matrix of ``X``'s rows, each column standardised on these rows."""
    X = X.astype(np.float64)
    X = X - X.mean(axis=0)
    sd = X.std(axis=0)
    X = X / np.where(sd > 0, sd, 1.0)
    return X @ X.T


def _loo_correct(K: np.ndarray, y: np.ndarray) -> np.ndarray:
    """Per row: is a ridge classifier (one-vs-rest targets, intercept) fitted on every other row
    right about it? The best penalty of :data:`_ALPHAS` (by leave-one-out accuracy; ties: the
    larger penalty) is used.

    ``K`` is the Gram matrix of the rows; centred, ``K = Q diag(w) Q'``, the hat matrix of
    penalty ``a`` is ``1/n + Q diag(w / (w + a)) Q'`` (the intercept is the ``1/n``) and the
    leave-one-out prediction of row ``i`` is ``t_i - (t_i - p_i) / (1 - h_ii)``.
    """
    n = len(y)
    classes = np.unique(y)
    T = (y[:, None] == classes[None, :]).astype(np.float64) * 2 - 1
    mean = T.mean(axis=0)
    T = T - mean
    J = np.eye(n) - 1.0 / n
    w, Q = np.linalg.eigh(J @ K @ J)
    w = np.clip(w, 0.0, None)
    QT = Q.T @ T
    best, best_ok = -1.0, np.zeros(n, dtype=bool)
    for a in sorted(_ALPHAS, reverse=True):
        shrink = w / (w + a * max(w.mean(), 1e-12))
        P = Q @ (shrink[:, None] * QT)
        h = np.einsum("ij,j,ij->i", Q, shrink, Q) + 1.0 / n  # + the intercept's share
        loo = mean + (P - h[:, None] * T) / np.clip(1.0 - h, 1e-9, None)[:, None]
        ok = classes[loo.argmax(axis=1)] == y
        if ok.mean() > best + 1e-12:
            best, best_ok = float(ok.mean()), ok
    return best_ok


def _beats(new: np.ndarray, old: np.ndarray, min_gain: float) -> tuple[bool, int, int]:
    """Does ``new`` (per-row correct) beat ``old`` by more than noise? ``(yes, gained, lost)``."""
    gained = int((new & ~old).sum())
    lost = int((old & ~new).sum())
    diff = gained - lost
    return bool(diff > NOISE_Z * np.sqrt(gained + lost) and diff >= min_gain * len(new)
                and diff > 0), gained, lost


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
        Seeds the subsample of selection rows (only above :data:`_MAX_ROWS` of them).
    min_gain : float
        The least leave-one-out accuracy gain for which a layer is added.

    Returns
    -------
    LayerChoice
        ``steps[0]`` scores the penultimate features; each later step lists the candidates
        ``tried`` (their leave-one-out accuracy), the ``best``, the rows it ``gained`` and
        ``lost`` against the set so far, and whether it was ``added``; a last step with
        ``"all": True`` compares the concatenation of every layer.
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
    labels = np.asarray(cache.labels)
    rows = _take(np.asarray(plan.search_rows), labels, _MAX_ROWS, seed)
    y = labels[rows]
    blocks = _blocks(cache)
    grams = {n: _gram(np.asarray(blocks[n])[rows]) for n in candidates}
    how = f"leave-one-out on {len(rows)} {plan.selection if plan.selection != 'val' else 'train+val'} rows"

    def score(names: Sequence[str]) -> np.ndarray:
        return _loo_correct(sum(grams[n] for n in names), y)

    chosen = [first]
    ok = score(chosen)
    steps: list[dict[str, Any]] = [{"layers": [first], "score": round(float(ok.mean()), 6)}]
    while True:
        left = [n for n in candidates if n not in chosen]
        if not left:
            break
        tried = {n: score([*chosen, n]) for n in left}
        name = max(left, key=lambda n: tried[n].mean())  # ties: the earlier (shallower-listed) layer
        added, gained, lost = _beats(tried[name], ok, min_gain)
        steps.append({"tried": {n: round(float(v.mean()), 6) for n, v in tried.items()},
                      "best": name, "score": round(float(tried[name].mean()), 6),
                      "gained": gained, "lost": lost, "added": added})
        if not added:
            break
        chosen.append(name)
        ok = tried[name]
    if len(chosen) < len(candidates):
        every = score(candidates)
        added, gained, lost = _beats(every, ok, min_gain)
        steps.append({"all": True, "layers": list(candidates), "score": round(float(every.mean()), 6),
                      "gained": gained, "lost": lost, "added": added})
        if added:
            chosen = list(candidates)
    return LayerChoice(layers=chosen, steps=steps, selection=plan.selection, candidates=candidates,
                       probe=how)
