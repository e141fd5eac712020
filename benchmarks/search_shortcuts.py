"""What the search's shortcuts for many classes (issue 23 item 5) change: each head fitted with
the rule before and the rule now, on real caches, in one process (``jobs=1``, so CPU seconds
compare): the chosen parameters, the selection score, the reported accuracy and the seconds.

* ``linear-svm``: candidates at liblinear ``tol`` 1e-2 (now, ``search_params``) against 1e-4
  (before: the final fit's tolerance for every candidate);
* ``mlp``: one stratified 20% held-out split from 50 fit rows per class (now,
  ``plenty_per_class``) against 5-fold CV up to 300 per class (before).

Caches are real lite0 features, as for ``benchmarks/heads_classes.py``::

    python benchmarks/search_shortcuts.py digits300=D300.h5 digits1000=D1000.h5 omniglot=O.h5 \\
        [-o benchmarks/results/search_shortcuts.json]
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import sys
import time
import warnings
from dataclasses import replace
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from _host import provenance  # noqa: E402
from fxtl.heads import fit_head, fitting  # noqa: E402
from fxtl.heads.registry import get_head  # noqa: E402
from fxtl.heads.search import PLENTY_PER_CLASS  # noqa: E402


def _timed(cache: str, model: str, **options) -> dict:
    r0 = resource.getrusage(resource.RUSAGE_SELF)
    t0 = time.perf_counter()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        res = fit_head(cache, model=model, jobs=1, **options)
    wall = time.perf_counter() - t0
    r1 = resource.getrusage(resource.RUSAGE_SELF)
    m = res.metrics
    return {"wall_seconds": round(wall, 3),
            "cpu_seconds": round(r1.ru_utime - r0.ru_utime + r1.ru_stime - r0.ru_stime, 3),
            "search_seconds": m["search_seconds"], "refit_seconds": m["refit_seconds"],
            "selection": m["selection"], "best_params": m["best_params"],
            "selection_score": m["selection_score"], "accuracy": m["accuracy"],
            "candidates_tried": m["strategy"]["candidates_tried"], "split": m["split"],
            "n_fit": m["n_fit"]}


def calibration_sources(cache: str, C: float) -> dict:
    """The linear SVM at ``C`` on the cache's fit rows (its train split), Platt-calibrated two
    ways, accuracy on the rest: scikit-learn's ``ensemble=False`` (5 folds of the rows scaled
    once) and sigmoids fitted on 5 folds each scaled with its own statistics, as the search
    scales them (the shortcut not taken: reusing the search's held-out decisions)."""
    import numpy as np
    from sklearn.calibration import CalibratedClassifierCV, _fit_calibrator
    from sklearn.model_selection import StratifiedKFold
    from sklearn.preprocessing import StandardScaler

    from fxtl.features.store import load_features
    from fxtl.heads.linear_svm import LinearSVC

    fc = load_features(cache)
    X, y, split = np.asarray(fc.features), np.asarray(fc.labels), np.asarray(fc.split)
    fit = split == "train"
    if fit.all():
        return {}
    Xf, yf, Xr, yr = X[fit], y[fit], X[~fit], y[~fit]
    sc = StandardScaler().fit(Xf)
    A, B = sc.transform(Xf), sc.transform(Xr)
    cv = StratifiedKFold(5, shuffle=True, random_state=0)
    est = LinearSVC(C=C, tol=1e-4, max_iter=2000)
    kfold = CalibratedClassifierCV(est, method="sigmoid", ensemble=False, cv=cv).fit(A, yf)
    full = LinearSVC(C=C, tol=1e-4, max_iter=2000).fit(A, yf)
    D = np.zeros((len(yf), len(full.classes_) if len(full.classes_) > 2 else 1))
    for a, b in cv.split(Xf, yf):
        s = StandardScaler().fit(Xf[a])
        m = LinearSVC(C=C, tol=1e-4, max_iter=2000).fit(s.transform(Xf[a]), yf[a])
        D[b] = m.decision_function(s.transform(Xf[b])).reshape(len(b), -1)
    pair = _fit_calibrator(full, D, yf, full.classes_, "sigmoid", xp=np)
    own = full.classes_[np.argmax(pair.predict_proba(B), axis=1)]
    return {"C": C, "kfold_scaled_once_accuracy": float((kfold.predict(B) == yr).mean()),
            "own_scaling_folds_accuracy": float((own == yr).mean()),
            "max_abs_decision_own_scaling_folds": float(np.abs(D).max()),
            "max_abs_decision_final_on_reported": float(np.abs(full.decision_function(B)).max())}


def measure(cache: str) -> dict:
    out = {}
    # linear-svm: the caller's tol holds for candidates and final fit alike (the rule before)
    out["linear-svm"] = {"before": _timed(cache, "linear-svm", params={"tol": 1e-4}),
                         "now": _timed(cache, "linear-svm")}
    before_mlp = replace(get_head("mlp"), plenty_per_class=PLENTY_PER_CLASS)
    real = fitting.get_head
    fitting.get_head = lambda name: before_mlp if name == "mlp" else real(name)
    try:
        mlp_before = _timed(cache, "mlp")
    finally:
        fitting.get_head = real
    out["mlp"] = {"before": mlp_before, "now": _timed(cache, "mlp")}
    out["linear_svm_calibration"] = calibration_sources(
        cache, out["linear-svm"]["now"]["best_params"]["C"])
    return out


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("caches", nargs="+", help="NAME=CACHE.h5")
    ap.add_argument("-o", "--output", default=str(ROOT / "benchmarks/results/search_shortcuts.json"))
    args = ap.parse_args(argv)
    result = {**provenance("search_shortcuts", args.caches), "caches": {}}
    for item in args.caches:
        name, _, path = item.partition("=")
        result["caches"][name] = {"cache": path, **measure(path)}
        for model, pair in result["caches"][name].items():
            if model in ("cache", "linear_svm_calibration"):
                continue
            b, n = pair["before"], pair["now"]
            print(f"{name:12s} {model:10s} before {b['best_params']} sel {b['selection_score']} "
                  f"acc {b['accuracy']:.4f} {b['cpu_seconds']:.2f} s | now {n['best_params']} "
                  f"sel {n['selection_score']} acc {n['accuracy']:.4f} {n['cpu_seconds']:.2f} s",
                  flush=True)
        print(f"{name:12s} linear-svm calibration: {result['caches'][name]['linear_svm_calibration']}")
    result["load_after"] = [round(v, 2) for v in os.getloadavg()]
    Path(args.output).write_text(json.dumps(result, indent=1) + "\n")
    print(f"wrote {args.output}")


if __name__ == "__main__":
    main()
