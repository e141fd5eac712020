"""Selection-split vs test accuracy of the demo's runs, over data seeds (issue 13, item 1).

    .venv/bin/python benchmarks/demo_selection_gap.py [--seeds 0 1 2] [--epochs 2 4]
        [--output benchmarks/results/demo_selection_gap.json]

A fine-tune that selects (early-stops) on rows its starting head has learned reports an
optimistic selection score: before issue 13 the demo's LP-FT run read 0.927 on val and 0.740
on test. Without a leak, the selection score of the LP-FT run should sit as close to its test
score as the heads' selection scores sit to theirs. For each data seed (the digits drawn and
their train/val/test split) and each fine-tune length this runs ``fxtl.demo.run_demo`` and
records, per method, the selection-split accuracy (heads: the best candidate's ``val`` score,
fitted on train; LP-FT: ``val`` accuracy of the kept epoch) and the ``test`` accuracy of the
final model. The summary gives, per fine-tune length, the LP-FT gaps next to the heads' largest
and mean absolute gaps, and the mean signed gap (selection minus test): a leak shows as a
large positive mean.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))


def one_run(seed: int, epochs: int, home: Path) -> dict:
    from fxtl.demo import run_demo

    t0 = time.perf_counter()
    report = run_demo(cache_dir=home, seed=seed, epochs=epochs)
    rows = []
    for run in report["plan"]["runs"]:
        m = json.loads((Path(run["run_dir"]) / "metrics.json").read_text())
        if run["kind"] == "head":
            sel = m.get("selection_score")
        else:
            best = m.get("best_epoch") or 0
            sel = m["history"][best - 1].get("val_accuracy") if best else None
        rows.append({"kind": run["kind"], "model": run["model"], "split": m["split"],
                     "selection_split": m.get("selection_split") or m.get("selection"),
                     "selection_accuracy": None if sel is None else round(float(sel), 4),
                     "test_accuracy": round(float(m["accuracy"]), 4),
                     "gap": None if sel is None else round(float(sel) - float(m["accuracy"]), 4)})
    return {"seed": seed, "epochs": epochs, "seconds": round(time.perf_counter() - t0, 1),
            "runs": rows}


def summary(results: list[dict]) -> dict:
    out = {}
    for epochs in sorted({r["epochs"] for r in results}):
        lpft, heads = [], []
        for r in (r for r in results if r["epochs"] == epochs):
            for row in r["runs"]:
                if row["gap"] is None:
                    continue
                (lpft if row["kind"] == "finetune" else heads).append(row["gap"])
        per_seed = [{"seed": r["seed"],
                     "lpft_gap": next((x["gap"] for x in r["runs"] if x["kind"] == "finetune"), None),
                     "heads_max_abs_gap": max(abs(x["gap"]) for x in r["runs"]
                                              if x["kind"] == "head" and x["gap"] is not None)}
                    for r in results if r["epochs"] == epochs]
        out[f"epochs_{epochs}"] = {
            "per_seed": per_seed,
            "lpft_within_heads": sum(abs(p["lpft_gap"]) <= p["heads_max_abs_gap"] for p in per_seed),
            "lpft_mean_gap": round(sum(lpft) / len(lpft), 4) if lpft else None,
            "lpft_mean_abs_gap": round(sum(map(abs, lpft)) / len(lpft), 4) if lpft else None,
            "heads_mean_gap": round(sum(heads) / len(heads), 4) if heads else None,
            "heads_mean_abs_gap": round(sum(map(abs, heads)) / len(heads), 4) if heads else None}
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--epochs", type=int, nargs="+", default=[2, 4])
    ap.add_argument("--output", type=Path, default=ROOT / "benchmarks/results/demo_selection_gap.json")
    args = ap.parse_args()
    commit = subprocess.run(["git", "rev-parse", "HEAD"], cwd=ROOT, capture_output=True,
                            text=True).stdout.strip()
    out = {"benchmark": "demo_selection_gap", "git_commit": commit,
           "machine": platform.processor() or platform.machine(), "cpus": os.cpu_count(),
           "command": "python " + " ".join([Path(sys.argv[0]).as_posix(), *sys.argv[1:]]),
           "results": []}
    with tempfile.TemporaryDirectory() as tmp:
        for seed in args.seeds:
            home = Path(tmp) / f"seed{seed}"  # one cache per seed: both lengths share extraction
            for epochs in args.epochs:
                print(f"[seed {seed}] demo with a {epochs}-epoch fine-tune", file=sys.stderr)
                out["results"].append(one_run(seed, epochs, home))
                out["summary"] = summary(out["results"])
                args.output.write_text(json.dumps(out, indent=2) + "\n")  # partial results survive
    print(json.dumps(out["summary"], indent=2))


if __name__ == "__main__":
    main()
