"""Which layer-choice rule picks layers that help, judged without any test row  (issue 23 item 2)

    .venv/bin/python benchmarks/layers_rules.py CACHE.h5 [CACHE.h5 ...] [--reps 3]

For each multi-layer cache (``fxtl extract --layers auto``) only the train and val rows are
used: ``--reps`` times they are split at random (stratified) into 75 % *fit* rows and 25 % *dev*
rows; each rule chooses its layers from the fit rows alone, a logistic-regression head (C by
3-fold CV on the fit rows) is fitted on them and scored on the dev rows. The test rows, on which
docs/layers.md reports, are never read, so choosing a rule here does not choose on test.

Rules: ``penultimate``; ``val-split`` (the rule before: a ridge probe at a fixed penalty scored
on one 20 % split of the fit rows, greedy from the penultimate, a layer added for a gain over
0.005); ``loo`` (fxtl.heads.layers.choose_layers now: leave-one-out over every fit row, penalty
chosen per candidate, added only above the noise of the paired difference, the concatenation
of every layer tried last); ``all`` (every layer, no choice).

Writes benchmarks/results/layers_rules.json.
"""
from __future__ import annotations

import argparse
import json
import sys
import time
import warnings
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
RESULTS = HERE / "results" / "layers_rules.json"


def _split(rows: np.ndarray, y: np.ndarray, rng) -> tuple[np.ndarray, np.ndarray]:
    fit, dev = [], []
    for c in np.unique(y[rows]):
        members = rng.permutation(rows[y[rows] == c])
        k = max(1, int(round(0.25 * len(members))))
        dev.append(members[:k])
        fit.append(members[k:])
    return np.sort(np.concatenate(fit)), np.sort(np.concatenate(dev))


def _val_split_rule(blocks: dict, names: list[str], y: np.ndarray, fit: np.ndarray, seed: int) -> list[str]:
    """The rule before: ridge (alpha = rows) on one 20 % split, gain > 0.005."""
    from sklearn.linear_model import RidgeClassifier
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    rng = np.random.default_rng(seed)
    inner_fit, inner_val = [], []
    for c in np.unique(y[fit]):
        members = rng.permutation(fit[y[fit] == c])
        k = max(1, int(round(0.2 * len(members))))
        inner_val.append(members[:k])
        inner_fit.append(members[k:])
    a, b = np.concatenate(inner_fit), np.concatenate(inner_val)

    def score(chosen: list[str]) -> float:
        X = np.concatenate([blocks[n] for n in chosen], axis=1)
        probe = make_pipeline(StandardScaler(), RidgeClassifier(alpha=1.0 * len(a)))
        probe.fit(X[a], y[a])
        return float((probe.predict(X[b]) == y[b]).mean())

    chosen = [names[0]]
    best = score(chosen)
    while len(chosen) < len(names):
        tried = {n: score([*chosen, n]) for n in names if n not in chosen}
        name = max(tried, key=tried.get)
        if not tried[name] > best + 0.005:
            break
        chosen.append(name)
        best = tried[name]
    return chosen


def _head_accuracy(X: np.ndarray, y: np.ndarray, fit: np.ndarray, dev: np.ndarray, seed: int) -> float:
    from sklearn.linear_model import LogisticRegressionCV
    from sklearn.model_selection import StratifiedKFold
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    folds = int(min(3, np.bincount(y[fit]).min()))
    est = LogisticRegressionCV(Cs=[1e-3, 1e-2, 1e-1, 1.0], max_iter=1000,
                               cv=StratifiedKFold(folds, shuffle=True, random_state=seed))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        head = make_pipeline(StandardScaler(), est).fit(X[fit], y[fit])
    return float((head.predict(X[dev]) == y[dev]).mean())


def study(path: Path, reps: int, log) -> dict:
    from fxtl.features.store import load_features
    from fxtl.heads.layers import choose_layers, features_name
    from fxtl.heads.planning import HeadPlan

    fc = load_features(path)
    names = [features_name(fc.attrs), *fc.layer_names]
    blocks = {names[0]: fc.features, **{n: fc.layer(n) for n in fc.layer_names}}
    y = np.asarray(fc.labels)
    split = np.asarray(fc.split).astype(str)
    rows = np.flatnonzero(np.isin(split, ["train", "val"]) & (y >= 0))
    out = {"cache": str(path), "rows": int(len(rows)), "classes": len(fc.class_names),
           "layers": {n: int(blocks[n].shape[1]) for n in names}, "reps": []}
    for rep in range(reps):
        rng = np.random.default_rng(1000 + rep)
        fit, dev = _split(rows, y, rng)
        plan = HeadPlan(fit_rows=fit, eval_rows=dev, eval_split="dev", selection="cv5",
                        search_rows=fit, cv_folds=5)
        t0 = time.perf_counter()
        loo = choose_layers(fc, plan, layers="auto", seed=rep).layers
        loo_s = time.perf_counter() - t0
        rules = {"penultimate": [names[0]], "val-split": _val_split_rule(blocks, names, y, fit, rep),
                 "loo": loo, "all": names}
        acc = {}
        for rule, chosen in rules.items():
            X = np.concatenate([blocks[n] for n in chosen], axis=1)
            acc[rule] = _head_accuracy(X, y, fit, dev, rep)
        out["reps"].append({"fit": int(len(fit)), "dev": int(len(dev)), "chosen": rules,
                            "dev_accuracy": acc, "loo_seconds": round(loo_s, 2)})
        log(f"{path.name} rep {rep}: " + ", ".join(f"{r} {a:.3f} ({'+'.join(rules[r]) if r in ('loo', 'val-split') else ''})"
                                                 for r, a in acc.items()))
    out["mean_dev_accuracy"] = {r: round(float(np.mean([x["dev_accuracy"][r] for x in out["reps"]])), 4)
                                for r in out["reps"][0]["dev_accuracy"]}
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("caches", nargs="+", type=Path)
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--output", type=Path, default=RESULTS)
    args = ap.parse_args()

    def log(msg: str) -> None:
        print(f"[{time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)

    res = {"command": " ".join(["benchmarks/layers_rules.py", *sys.argv[1:]]), "caches": []}
    for path in args.caches:
        res["caches"].append(study(path, args.reps, log))
        args.output.parent.mkdir(parents=True, exist_ok=True)
        args.output.write_text(json.dumps(res, indent=2) + "\n")
    for c in res["caches"]:
        m = c["mean_dev_accuracy"]
        print(f"{Path(c['cache']).name}: " + ", ".join(f"{r} {a:.3f}" for r, a in m.items()))


if __name__ == "__main__":
    main()
