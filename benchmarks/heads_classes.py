"""Heads on many classes (issue 23 item 5): `fxtl fit-head CACHE --model all --json` wall and CPU
seconds, and every head's selection score and reported accuracy, on small real caches.

Caches are real lite0 features you extract first, e.g. scikit-learn's handwritten digits written
as PNG folders (``fxtl.data.samples.write_digits``, train + test folders, so heads select by
5-fold CV as on hymenoptera) at 30, 60 and 100 training images per class, omniglot (8 classes,
class folders only) and hymenoptera (2 classes)::

    python benchmarks/heads_classes.py digits300=D300.h5 digits600=D600.h5 digits1000=D1000.h5 \\
        omniglot=OMNI.h5 hymenoptera=HYM.h5 --label after [--tree PATH] [--repeats 3] \\
        [-o benchmarks/results/heads_classes.json]

``--tree`` runs the ``fxtl`` found in another source tree (e.g. ``git archive BASE fxtl`` unpacked
in a temporary folder) for a "before" measurement; results are stored under ``--label`` in the
output file, beside the other labels already there. Each repeat is a fresh process: wall seconds,
its CPU seconds (user + system of the child, from ``getrusage``) and the machine's load average
before and after, since other jobs on a shared machine stretch the wall time.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from _host import host

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
TARGET_SECONDS = 10.0  # `--model all` on 300-1,000 rows (issue 23 item 5)


def run_all(cache: Path, home: Path, tree: Path) -> dict:
    """``fxtl fit-head CACHE --model all --json`` in a fresh process on ``tree``'s fxtl."""
    cmd = [sys.executable, "-m", "fxtl", "fit-head", str(cache), "--model", "all", "--json",
           "--cache-dir", str(home)]
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    load = os.getloadavg()
    t0 = time.perf_counter()
    p = subprocess.run(cmd, cwd=tree, capture_output=True, text=True,
                       env={**os.environ, "PYTHONPATH": str(tree)})
    wall = time.perf_counter() - t0
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    if p.returncode != 0:
        raise SystemExit(f"fit-head failed on {cache}: {p.stderr[-2000:]}")
    cpu = (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)
    runs = json.loads(p.stdout)["runs"]
    return {"wall_seconds": round(wall, 2), "cpu_seconds": round(cpu, 2),
            "load_before": [round(v, 2) for v in load],
            "load_after": [round(v, 2) for v in os.getloadavg()],
            "heads": {r["model"]: {
                "accuracy": r["accuracy"], "selection_score": r["selection_score"],
                "selection": r["selection"], "search_seconds": r["search_seconds"],
                "fit_seconds": r.get("fit_seconds"), "best_params": r["best_params"],
                "candidates": r["strategy"]["candidates"] if r.get("strategy") else None,
                "candidates_tried": r["strategy"]["candidates_tried"] if r.get("strategy") else None,
                "solver": r.get("solver"), "n_fit": r["n_fit"], "split": r["split"],
                "search": _search_scores(r.get("run_dir"))}
                for r in runs}}


def _search_scores(run_dir: str | None) -> list | None:
    """Every candidate's mean selection score, from the run's metrics.json."""
    path = Path(run_dir) / "metrics.json" if run_dir else None
    if path is None or not path.exists():
        return None
    return [[c["params"], c["mean_score"]] for c in json.loads(path.read_text()).get("search", [])]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("caches", nargs="+", help="NAME=CACHE")
    ap.add_argument("--label", required=True, help="e.g. before or after")
    ap.add_argument("--tree", type=Path, default=ROOT, help="source tree whose fxtl runs")
    ap.add_argument("--repeats", type=int, default=1)
    ap.add_argument("-o", "--output", type=Path, default=ROOT / "benchmarks/results/heads_classes.json")
    args = ap.parse_args()
    tree = args.tree.resolve()
    commit = subprocess.run(["git", "rev-parse", "HEAD"], cwd=ROOT, capture_output=True,
                            text=True).stdout.strip()
    out = json.loads(args.output.read_text()) if args.output.exists() else {
        "benchmark": "heads_classes", "target_seconds": TARGET_SECONDS,
        "caveat": "2 cores shared with other jobs: cpu_seconds (the fit-head process's user + "
                  "system time) is the steadier number; load_before/after give the load average",
        "labels": {}}
    from fxtl.features.store import summarize  # this tree's reader: the cache format is shared

    entry = out["labels"].setdefault(args.label, {})
    entry.update({"git_commit": commit if tree == ROOT else None, "tree": str(tree),
                  "machine": platform.processor() or platform.machine(), "cpus": os.cpu_count(),
                  "host": host(),
                  "date": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
                  "command": "python " + " ".join([Path(sys.argv[0]).as_posix(), *sys.argv[1:]])})
    sets = entry.setdefault("caches", {})
    with tempfile.TemporaryDirectory() as tmp:
        for item in args.caches:
            name, _, path = item.partition("=")
            about = summarize(Path(path))
            reps = [run_all(Path(path), Path(tmp) / f"{name}-{k}", tree) for k in range(args.repeats)]
            walls = sorted(r["wall_seconds"] for r in reps)
            cpus = sorted(r["cpu_seconds"] for r in reps)
            sets[name] = {"cache": str(path), "rows": int(about["n"]),
                          "classes": len(about["class_names"]), "splits": about["splits"],
                          "wall_seconds_median": walls[len(walls) // 2],
                          "cpu_seconds_median": cpus[len(cpus) // 2], "repeats": reps}
            args.output.write_text(json.dumps(out, indent=2) + "\n")  # partial results survive
            print(json.dumps({"label": args.label, "name": name, "wall": walls, "cpu": cpus,
                              "heads": {m: (h["selection_score"], h["accuracy"], h["search_seconds"])
                                        for m, h in reps[0]["heads"].items()}}), file=sys.stderr)


if __name__ == "__main__":
    main()
