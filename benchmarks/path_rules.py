"""What two cheaper rules for the C paths (issue 23 item 5) change, on real caches: each rule
against the rule before, in one process (``jobs=1``, so CPU seconds compare): the chosen C, the
selection score, the reported accuracy, the candidates tried and the CPU seconds.

* ``linear-svm`` candidates at liblinear ``tol`` 1e-1 against 1e-2 (the final fit keeps 1e-4);
* a path that stops after 2 candidates in a row score below its best, against 3
  (``fxtl.heads.grid.PATH_PATIENCE``), for ``linear-svm`` and ``logreg``.

Caches are real lite0 features, as for ``benchmarks/heads_classes.py``::

    python benchmarks/path_rules.py digits300=D300.h5 digits1000=D1000.h5 omniglot=O.h5 \\
        [-o benchmarks/results/path_rules.json]
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
from fxtl.heads import fit_head, fitting, search  # noqa: E402
from fxtl.heads.registry import get_head  # noqa: E402

# (label, model, liblinear tol of the candidates or None for the registry's, path patience)
RULES = [("linear-svm tol 1e-2, patience 3", "linear-svm", 1e-2, 3),
         ("linear-svm tol 1e-1, patience 3", "linear-svm", 1e-1, 3),
         ("linear-svm tol 1e-1, patience 2", "linear-svm", 1e-1, 2),
         ("logreg patience 3", "logreg", None, 3),
         ("logreg patience 2", "logreg", None, 2)]


def _timed(cache: str, model: str, tol: float | None, patience: int) -> dict:
    real_get, real_patience = fitting.get_head, search.PATH_PATIENCE
    spec = get_head(model)
    if tol is not None:
        spec = replace(spec, search_params={**spec.search_params, "tol": tol})
    fitting.get_head = lambda name: spec if name == model else real_get(name)
    search.PATH_PATIENCE = patience
    try:
        r0 = resource.getrusage(resource.RUSAGE_SELF)
        t0 = time.perf_counter()
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            res = fit_head(cache, model=model, jobs=1)
        wall = time.perf_counter() - t0
        r1 = resource.getrusage(resource.RUSAGE_SELF)
    finally:
        fitting.get_head, search.PATH_PATIENCE = real_get, real_patience
    m = res.metrics
    return {"wall_seconds": round(wall, 3),
            "cpu_seconds": round(r1.ru_utime - r0.ru_utime + r1.ru_stime - r0.ru_stime, 3),
            "search_seconds": m["search_seconds"], "refit_seconds": m["refit_seconds"],
            "best_params": m["best_params"], "selection_score": m["selection_score"],
            "accuracy": m["accuracy"], "candidates_tried": m["strategy"]["candidates_tried"],
            "search": [[c["params"], c["mean_score"]] for c in m["search"]],
            "selection": m["selection"], "split": m["split"], "n_fit": m["n_fit"]}


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("caches", nargs="+", help="NAME=CACHE.h5")
    ap.add_argument("-o", "--output", default=str(ROOT / "benchmarks/results/path_rules.json"))
    args = ap.parse_args(argv)
    result = {**provenance("path_rules", args.caches), "caches": {}}
    for item in args.caches:
        name, _, path = item.partition("=")
        rows = result["caches"][name] = {"cache": path}
        for label, model, tol, patience in RULES:
            r = rows[label] = _timed(path, model, tol, patience)
            print(f"{name:12s} {label:32s} {r['best_params']} sel {r['selection_score']} "
                  f"acc {r['accuracy']:.4f} tried {r['candidates_tried']} "
                  f"cpu {r['cpu_seconds']:.2f} s", flush=True)
    result["load_after"] = [round(v, 2) for v in os.getloadavg()]
    Path(args.output).write_text(json.dumps(result, indent=1) + "\n")
    print(f"wrote {args.output}")


if __name__ == "__main__":
    main()
