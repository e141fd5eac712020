"""Heads for caches above ``large_threshold`` rows: scalable estimators fed block by block.

``SGDClassifier`` stands in for the linear heads and the SVMs, ``MLPClassifier.partial_fit``
for the MLP; the features are read from the HDF5 file in shuffled blocks, never all at once.
"""
from __future__ import annotations

import time
from typing import Any

import numpy as np

from .planning import HeadPlan
from .registry import HeadSpec, build_pipeline, estimator_params
from .search import jsonable, quiet_convergence
from .source import RowSource

__all__ = ["fit_streaming", "STREAM_EPOCHS"]

STREAM_EPOCHS = 5


def fit_streaming(source: RowSource, spec: HeadSpec, *, plan: HeadPlan, params: dict, search: bool,
                   seed: int, l2_normalize: bool, notes: list[str]):
    """Fit the scalable stand-in with ``partial_fit``, reading the cache block by block.

    Selection: on ``val`` when the plan selects on val, else on a stratified 10% of the fit rows
    (k-fold CV would multiply the passes over a large file). The reported rows are never read
    before the final evaluation.
    """
    from sklearn.model_selection import train_test_split
    from sklearn.pipeline import Pipeline
    from sklearn.preprocessing import Normalizer, StandardScaler

    classes = source.names(np.unique(source.labels[plan.fit_rows]))
    accepted = estimator_params(spec.stream.estimator)
    ignored = sorted(set(params) - accepted)
    if ignored:
        notes.append(f"ignored params {', '.join(ignored)}: not parameters of "
                     f"{spec.stream.estimator.split(':')[1]}")
    params = {k: v for k, v in params.items() if k in accepted}
    fixed = {**spec.stream.defaults, **params}
    grid = {k: v for k, v in spec.stream.space.items() if k not in params}
    from sklearn.model_selection import ParameterGrid

    candidates = list(ParameterGrid(grid)) if (search and plan.selection != "none" and grid) else [{}]
    l2 = Normalizer() if l2_normalize else None

    def prep(X):
        return l2.transform(X) if l2 is not None else X

    def fit_on(rows: np.ndarray, cands: list[dict], rng_seed: int):
        scaler = StandardScaler()
        for _, X, _ in source.blocks(rows):
            scaler.partial_fit(prep(X))
        ests = [build_pipeline(spec.name, params={**fixed, **c}, seed=seed, stream=True)
                .named_steps["est"] for c in cands]
        rng = np.random.default_rng(rng_seed)
        with quiet_convergence():
            for _ in range(STREAM_EPOCHS):
                for X, y in source.shuffled_batches(rows, rng=rng):
                    Xs = scaler.transform(prep(X))
                    for e in ests:
                        e.partial_fit(Xs, source.names(y), classes=classes)
        return scaler, ests

    info: dict[str, Any] = {"n_candidates": len(candidates), "selection_score": None}
    t0 = time.perf_counter()
    best: dict[str, Any] = {}
    if len(candidates) > 1:
        if plan.selection == "val":
            tr = plan.search_rows[plan.val_fold < 0]
            sel = plan.search_rows[plan.val_fold == 0]
            info["selection"] = "val"
        else:
            # 10%, and at least a row per class (the plan searches only when every class has 2+)
            n_classes = len(np.unique(source.labels[plan.fit_rows]))
            n_sel = max(int(0.1 * len(plan.fit_rows)), n_classes)
            tr, sel = train_test_split(plan.fit_rows, test_size=n_sel, random_state=seed,
                                       stratify=source.labels[plan.fit_rows])
            info["selection"] = "train-holdout10"
        scaler, ests = fit_on(tr, candidates, seed)
        correct = np.zeros(len(candidates))
        total = 0
        for _, X, y in source.blocks(sel):
            Xs = scaler.transform(prep(X))
            for i, e in enumerate(ests):
                correct[i] += int((e.predict(Xs) == source.names(y)).sum())
            total += len(y)
        i_best = int(np.argmax(correct))  # first of the ties: the most regularised
        best = candidates[i_best]
        info["selection_score"] = round(float(correct[i_best] / max(total, 1)), 6)
        info["search"] = [{"params": jsonable(c), "mean_score": round(float(k / max(total, 1)), 6)}
                          for c, k in zip(candidates, correct)]
    else:
        info["selection"] = "none"
        best = candidates[0]
    info["search_seconds"] = time.perf_counter() - t0
    t0 = time.perf_counter()
    scaler, (est,) = fit_on(plan.fit_rows, [best], seed + 1)
    info["refit_seconds"] = time.perf_counter() - t0
    steps = ([("l2", l2)] if l2 is not None else []) + [("scale", scaler), ("est", est)]
    info["best_params"] = jsonable({**params, **best})
    notes.append(f"streamed {STREAM_EPOCHS} epochs of partial_fit over {len(plan.fit_rows):,} rows")
    return Pipeline(steps), info

