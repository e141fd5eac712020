"""Heads on hymenoptera (issue 3's measurements): accuracy, search time, predict agreement.

    .venv/bin/python benchmarks/heads_accuracy.py [--data ../shared/datasets/hymenoptera] [--jobs 2]

1. ``fxtl.extract`` the dataset with the default backbone (lite0, precision auto; reused when
   the cache exists).
2. ``python -m fxtl fit-head CACHE --model all --jobs 2 --json`` as a subprocess, timed end to
   end (interpreter start included), ``--repeats`` times: accuracy of every head on ``val``
   (selection by 5-fold CV on train; val is never seen by the search) and wall time.
3. ``python -m fxtl predict RUN_DIR DATA/val --json`` for each saved head: the backbone is
   rebuilt and the val images re-embedded; the labels must equal those of the evaluation
   inside fit-head (``predictions.csv`` of the run).

Targets (issue 3): best head >= 0.95 val accuracy; logreg, svm, mlp each >= 0.90; ``--model all``
with search < 30 s on 2 cores; predict agrees on 100% of val images.
Writes benchmarks/results/heads_accuracy.json (or --output).
"""
from __future__ import annotations

import argparse
import csv
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
DEFAULT_DATA = REPO.parent / "shared" / "datasets" / "hymenoptera"
TARGETS = {"best_accuracy": 0.95, "each_of": ("logreg", "svm", "mlp"), "each_accuracy": 0.90,
           "all_seconds": 30.0}


def run_json(args: list[str]) -> tuple[dict, float]:
    """Run ``python -m fxtl ARGS --json``; (parsed stdout, wall seconds)."""
    t0 = time.perf_counter()
    proc = subprocess.run([sys.executable, "-m", "fxtl", *args, "--json"], cwd=REPO,
                          capture_output=True, text=True)
    wall = time.perf_counter() - t0
    if proc.returncode != 0:
        raise SystemExit(f"fxtl {' '.join(args)} failed ({proc.returncode}): {proc.stderr.strip()[-500:]}")
    return json.loads(proc.stdout), wall


def eval_labels(run_dir: Path) -> dict[str, str]:
    with open(run_dir / "predictions.csv", newline="") as fh:
        return {row["path"]: row["predicted"] for row in csv.DictReader(fh)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data", type=Path, default=DEFAULT_DATA)
    ap.add_argument("--cache-dir", type=Path, default=REPO / "cache" / "bench-heads")
    ap.add_argument("--precision", default="auto", help="extraction precision (auto = the default)")
    ap.add_argument("--jobs", type=int, default=2)
    ap.add_argument("--repeats", type=int, default=3, help="timed fit-head --model all runs")
    ap.add_argument("--predict-heads", choices=("best", "all"), default="all")
    ap.add_argument("--output", type=Path, default=HERE / "results" / "heads_accuracy.json")
    args = ap.parse_args()
    if not args.data.is_dir():
        raise SystemExit(f"{args.data}: no such dataset folder; pass --data")

    import fxtl

    load_before = os.getloadavg()
    ex = fxtl.extract(args.data, precision=args.precision, cache_dir=args.cache_dir, progress=False)
    print(f"cache {ex.cache} ({ex.n} images, {ex.splits}, {ex.precision}, "
          f"{'reused' if ex.cache_hit else f'{ex.seconds:.1f} s'})")

    walls, runs = [], None
    for i in range(args.repeats):
        d, wall = run_json(["fit-head", str(ex.cache), "--model", "all", "--jobs", str(args.jobs),
                            "--cache-dir", str(args.cache_dir), "--run-name", f"bench-{int(time.time())}-{i}"])
        walls.append(wall)
        if runs is None:
            runs = d["runs"]
        else:  # seeded: every repeat must give the same scores
            assert [r["accuracy"] for r in d["runs"]] == [r["accuracy"] for r in runs], "not reproducible"
        print(f"fit-head --model all --jobs {args.jobs}: {wall:.1f} s wall "
              f"(heads alone {sum(r['fit_seconds'] for r in d['runs']):.1f} s)")

    best = max(runs, key=lambda r: (r["accuracy"], r["macro_f1"]))
    to_check = runs if args.predict_heads == "all" else [best]
    agreement = {}
    val_dir = args.data / "val"
    for r in to_check:
        d, wall = run_json(["predict", r["run_dir"], str(val_dir)])
        expected = eval_labels(Path(r["run_dir"]))
        got = {Path(p["path"]).resolve().relative_to(args.data.resolve()).as_posix(): p["label"]
               for p in d["predictions"]}
        same = sum(got.get(k) == v for k, v in expected.items())
        agreement[r["model"]] = {"images": len(expected), "predicted": len(got), "same_label": same,
                                 "errors": d["errors"], "seconds": round(wall, 2),
                                 "precision": d["precision"]}
        print(f"predict {r['model']}: {same}/{len(expected)} labels equal to fit-head's evaluation "
              f"({wall:.1f} s)")

    each = {m: next(r["accuracy"] for r in runs if r["model"] == m) for m in TARGETS["each_of"]}
    checks = {
        f"best val accuracy >= {TARGETS['best_accuracy']}": best["accuracy"] >= TARGETS["best_accuracy"],
        **{f"{m} val accuracy >= {TARGETS['each_accuracy']}": a >= TARGETS["each_accuracy"]
           for m, a in each.items()},
        f"--model all < {TARGETS['all_seconds']:.0f} s (median wall)":
            statistics.median(walls) < TARGETS["all_seconds"],
        "predict == fit-head labels": all(a["same_label"] == a["images"] for a in agreement.values()),
    }

    head = f"{'model':<11} {'val acc':>8} {'bal acc':>8} {'macro-F1':>8} {'fit s':>7}  {'selection':<9} best params"
    print("\n" + head + "\n" + "-" * len(head))
    for r in runs:
        params = " ".join(f"{k}={v:.3g}" if isinstance(v, float) else f"{k}={v}"
                          for k, v in r["best_params"].items())
        print(f"{r['model']:<11} {r['accuracy']:>8.4f} {r['balanced_accuracy']:>8.4f} {r['macro_f1']:>8.4f} "
              f"{r['fit_seconds']:>7.2f}  {r['selection']:<9} {params}")
    print(f"\nfit-head --model all wall: {', '.join(f'{w:.1f}' for w in walls)} s "
          f"(median {statistics.median(walls):.1f}); load average before {load_before[0]:.2f}")
    for name, ok in checks.items():
        print(f"  [{'PASS' if ok else 'FAIL'}] {name}")

    out = {
        "machine": {"cpu": platform.processor() or platform.machine(), "cores": os.cpu_count(),
                    "load_average_before": load_before, "load_average_after": os.getloadavg(),
                    "python": platform.python_version()},
        "data": str(args.data), "cache": str(ex.cache), "precision": ex.precision,
        "splits": ex.splits, "jobs": args.jobs,
        "command": f"python -m fxtl fit-head {ex.cache} --model all --jobs {args.jobs} --json",
        "fit_head_all_wall_seconds": walls, "fit_head_all_wall_seconds_median": statistics.median(walls),
        "runs": runs, "best": best["model"], "predict_agreement": agreement,
        "targets": {k: list(v) if isinstance(v, tuple) else v for k, v in TARGETS.items()},
        "checks": checks,
    }
    args.output.parent.mkdir(parents=True, exist_ok=True)
    args.output.write_text(json.dumps(out, indent=2) + "\n")
    print(f"wrote {args.output}")


if __name__ == "__main__":
    main()
