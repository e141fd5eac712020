"""scikit-learn vs fxtl's torch solvers (fxtl.heads.torch_heads) on real features.

Fits each head on the ``train`` rows of a real feature cache (standardised with a scaler
fitted on the rows used), scores on the ``val`` rows, and records wall and CPU seconds,
accuracy and how often the two agree. The machine's load average is written beside every
measurement: on a shared machine the seconds are only comparable within one run.

Usage::

    PYTHONPATH=. python benchmarks/torch_heads_speed.py --cache /tmp/views27k.h5 \
        -o benchmarks/results/torch_heads_speed.json
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import time
import warnings
from pathlib import Path

import numpy as np


def _load() -> list[float]:
    return [round(x, 2) for x in os.getloadavg()]


def _timed(make, X, y):
    est = make()
    load0, wall, cpu = _load(), time.perf_counter(), time.process_time()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        est.fit(X, y)
    return est, {"fit_seconds": round(time.perf_counter() - wall, 3),
                 "cpu_seconds": round(time.process_time() - cpu, 3),
                 "loadavg_before": load0, "loadavg_after": _load()}


def _n_iter(est):
    n = getattr(est, "n_iter_", None)
    return int(np.max(n)) if n is not None else None


def compare(name, params, make_sk, make_torch, X, y, Xv, yv) -> dict:
    sk, sk_t = _timed(make_sk, X, y)
    th, th_t = _timed(make_torch, X, y)
    ps, pt = sk.predict(Xv), th.predict(Xv)
    row = {"head": name, "params": params, "n_fit": int(len(y)),
           "sklearn": {**sk_t, "val_accuracy": round(float(np.mean(ps == yv)), 4), "n_iter": _n_iter(sk)},
           "torch": {**th_t, "val_accuracy": round(float(np.mean(pt == yv)), 4), "n_iter": _n_iter(th)},
           "same_predictions": round(float(np.mean(ps == pt)), 4)}
    if hasattr(sk, "predict_proba") and name == "logreg":
        row["max_abs_proba_diff"] = float(np.abs(sk.predict_proba(Xv) - th.predict_proba(Xv)).max())
    row["speedup"] = round(sk_t["fit_seconds"] / max(th_t["fit_seconds"], 1e-9), 2)
    print(json.dumps(row), flush=True)
    return row


def c_path(X, y, Xv, yv, *, sklearn: bool) -> dict:
    from sklearn.linear_model import LogisticRegression

    from fxtl.heads.torch_heads import TorchLogisticRegression

    Cs = [float(c) for c in np.logspace(-4, 2, 13)]
    out = {"Cs": Cs, "n_fit": int(len(y))}
    makers = {"torch": lambda: TorchLogisticRegression(warm_start=True, max_iter=2000)}
    if sklearn:
        makers["sklearn"] = lambda: LogisticRegression(warm_start=True, max_iter=2000)
    for side, make in makers.items():
        est, accs, iters = make(), [], []
        load0, wall, cpu = _load(), time.perf_counter(), time.process_time()
        for C in Cs:
            est.set_params(C=C)
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                est.fit(X, y)
            accs.append(round(float(est.score(Xv, yv)), 4))
            iters.append(_n_iter(est))
        out[side] = {"path_seconds": round(time.perf_counter() - wall, 3),
                     "cpu_seconds": round(time.process_time() - cpu, 3), "val_accuracy": accs,
                     "n_iter": iters, "loadavg_before": load0, "loadavg_after": _load()}
    print(json.dumps(out), flush=True)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--cache", default="/tmp/views27k.h5")
    ap.add_argument("-o", "--output", default="benchmarks/results/torch_heads_speed.json")
    ap.add_argument("--sizes", default="3000,all")
    ap.add_argument("--heads", default="logreg,linear-svm,mlp,path")
    ap.add_argument("--sklearn-path-max", type=int, default=3000,
                    help="walk scikit-learn's C path only up to this many rows (it is slow)")
    args = ap.parse_args()

    from sklearn.linear_model import LogisticRegression
    from sklearn.model_selection import train_test_split
    from sklearn.neural_network import MLPClassifier
    from sklearn.preprocessing import StandardScaler
    from sklearn.svm import LinearSVC

    from fxtl.features.store import load_features
    from fxtl.heads.torch_heads import TorchLinearSVC, TorchLogisticRegression, TorchMLPClassifier

    # torch's import and first-call set-up are paid once per process: time them apart
    wall = time.perf_counter()
    TorchLogisticRegression(max_iter=5).fit(np.eye(4), [0, 1, 0, 1])
    torch_start_seconds = round(time.perf_counter() - wall, 3)
    cache = load_features(args.cache)
    train, val = cache.split == "train", cache.split == "val"
    X_all, y_all = cache.features[train], cache.labels[train]
    Xv_raw, yv = cache.features[val], cache.labels[val]
    heads = args.heads.split(",")
    result = {"cache": args.cache, "n_train": int(train.sum()), "n_val": int(val.sum()),
              "dim": int(cache.dim), "n_classes": len(cache.class_names),
              "machine": f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores, "
                         "shared with other sessions: loadavg recorded beside each fit",
              "sklearn_settings": {"logreg": "LogisticRegression(C, max_iter=2000)",
                                   "linear-svm": "LinearSVC(C, dual='auto', tol=1e-4, max_iter=2000)",
                                   "mlp": "MLPClassifier((256,), alpha, batch_size=256, lr 3e-3, "
                                          "early_stopping, n_iter_no_change=5, max_iter=300)"},
              "torch_settings": {"logreg": "TorchLogisticRegression(C, max_iter=2000)",
                                 "linear-svm": "TorchLinearSVC(C, max_iter=2000)",
                                 "mlp": "TorchMLPClassifier((256,), alpha, batch_size=256, lr 3e-3, "
                                        "early_stopping, n_iter_no_change=5, max_iter=300)"},
              "torch_import_and_first_fit_seconds": torch_start_seconds,
              "rows": [], "paths": []}
    out = Path(args.output)
    mlp_kw = dict(hidden_layer_sizes=(256,), batch_size=256, learning_rate_init=3e-3,
                  early_stopping=True, validation_fraction=0.1, n_iter_no_change=5, max_iter=300,
                  random_state=0)
    for size in args.sizes.split(","):
        if size == "all":
            X_raw, y = X_all, y_all
        else:
            X_raw, _, y, _ = train_test_split(X_all, y_all, train_size=int(size), stratify=y_all,
                                              random_state=0)
        scaler = StandardScaler().fit(X_raw)
        X, Xv = scaler.transform(X_raw).astype(np.float32), scaler.transform(Xv_raw).astype(np.float32)
        jobs = []
        if "logreg" in heads:
            jobs += [("logreg", {"C": C}, lambda C=C: LogisticRegression(C=C, max_iter=2000),
                      lambda C=C: TorchLogisticRegression(C=C, max_iter=2000)) for C in (3e-4, 1e-2)]
        if "linear-svm" in heads:
            jobs += [("linear-svm", {"C": C},
                      lambda C=C: LinearSVC(C=C, dual="auto", tol=1e-4, max_iter=2000),
                      lambda C=C: TorchLinearSVC(C=C, max_iter=2000)) for C in (3e-5, 1e-3)]
        if "mlp" in heads:
            jobs += [("mlp", {"alpha": a}, lambda a=a: MLPClassifier(alpha=a, **mlp_kw),
                      lambda a=a: TorchMLPClassifier(alpha=a, **mlp_kw)) for a in (10.0, 1e-2)]
        for name, params, make_sk, make_torch in jobs:
            result["rows"].append(compare(name, params, make_sk, make_torch, X, y, Xv, yv))
            out.write_text(json.dumps(result, indent=1))
        if "path" in heads:
            result["paths"].append(c_path(X, y, Xv, yv, sklearn=len(y) <= args.sklearn_path_max))
            out.write_text(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
