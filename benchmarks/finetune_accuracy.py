"""Fine-tune vs heads on hymenoptera (CPU, lite0), end to end through the CLI.

    .venv/bin/python benchmarks/finetune_accuracy.py [--data ../shared/datasets/hymenoptera]
        [--cache-dir cache/bench-finetune] [--epochs 5] [--trainable all [--trainable last:2 ...]]

What it must show: a full fine-tune of at most 5 epochs reaches val accuracy >= 0.93, and
``fxtl compare`` shows it next to the heads. The steps a user would type:

1. ``fxtl extract DATA``                          (the cache the heads use)
2. ``fxtl fit-head CACHE --model all``            (every registered head)
3. ``fxtl finetune DATA --epochs 5 [--trainable ...]``
4. ``fxtl finetune DATA --epochs 5 --init-head <logreg run>``  (LP-FT; skip with --no-lp-ft)
5. ``fxtl compare RUNS... --dataset <name> --json``

Writes benchmarks/results/finetune_accuracy.json (the commands, each one's JSON and the verdict).
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import shlex
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
DEFAULT_DATA = ROOT.parent / "shared" / "datasets" / "hymenoptera"


def fxtl(*args: str) -> dict:
    """Run ``python -m fxtl ARGS --json``; its JSON, with the command and wall time."""
    cmd = [sys.executable, "-m", "fxtl", *args, "--json"]
    print("$ " + shlex.join(["fxtl", *args, "--json"]), file=sys.stderr)
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, cwd=ROOT, stdout=subprocess.PIPE, text=True)
    if proc.returncode != 0:
        sys.exit(f"command failed ({proc.returncode}): {shlex.join(cmd)}")
    return {"command": shlex.join(["fxtl", *args, "--json"]), "wall_seconds": round(time.perf_counter() - t0, 2),
            "result": json.loads(proc.stdout)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data", type=Path, default=DEFAULT_DATA)
    ap.add_argument("--cache-dir", type=Path, default=ROOT / "cache" / "bench-finetune")
    ap.add_argument("--epochs", type=int, default=5)
    ap.add_argument("--trainable", action="append", default=None,
                    help="What the fine-tune trains (repeat for several); default: all.")
    ap.add_argument("--no-lp-ft", action="store_true",
                    help="Skip the fine-tune whose classifier starts from the logreg head.")
    ap.add_argument("--output", type=Path, default=HERE / "results" / "finetune_accuracy.json")
    args = ap.parse_args()
    trainables = args.trainable or ["all"]
    cache = ["--cache-dir", str(args.cache_dir)]
    steps = {"extract": fxtl("extract", str(args.data), *cache)}
    steps["fit_head"] = fxtl("fit-head", steps["extract"]["result"]["cache"], "--model", "all", *cache)
    steps["finetune"] = [fxtl("finetune", str(args.data), "--epochs", str(args.epochs),
                              "--trainable", t, *cache) for t in trainables]
    if not args.no_lp_ft:
        logreg = next(r["run_dir"] for r in steps["fit_head"]["result"]["runs"] if r["model"] == "logreg")
        steps["finetune_lp_ft"] = fxtl("finetune", str(args.data), "--epochs", str(args.epochs),
                                       "--init-head", logreg, *cache)
    dataset = Path(steps["finetune"][0]["result"]["dataset"]).name
    # Only this session's runs: the heads just fitted and the fine-tunes just trained.
    runs = [r["run_dir"] for r in steps["fit_head"]["result"]["runs"]] + \
           [f["result"]["run_dir"] for f in steps["finetune"]] + \
           ([steps["finetune_lp_ft"]["result"]["run_dir"]] if "finetune_lp_ft" in steps else [])
    steps["compare"] = fxtl("compare", *runs, "--dataset", dataset, *cache)

    full = next(f["result"] for f, t in zip(steps["finetune"], trainables) if t == "all") \
        if "all" in trainables else None
    rows = steps["compare"]["result"]["rows"]
    verdict = {}
    if full is not None:
        verdict = {"full_finetune_split": full["split"], "full_finetune_accuracy": full["accuracy"],
                   "epochs": full["epochs"], "target": "val accuracy >= 0.93 within 5 epochs",
                   "passed": full["split"] == "val" and full["accuracy"] >= 0.93 and full["epochs"] <= 5,
                   "shown_in_compare_next_to_heads": any(r["method"] == "finetune:all" for r in rows)
                   and any(r["kind"] == "head" for r in rows)}
    out = {"machine": {"cpu": platform.processor() or platform.machine(), "cores": os.cpu_count(),
                       "loadavg_at_end": os.getloadavg()},
           "data": str(args.data), "verdict": verdict, "compare_rows": rows, "steps": steps}
    from fxtl.report.comparison import format_table

    print(format_table(rows))
    print(f"chart: {steps['compare']['result']['chart']}")
    if verdict:
        print(f"full fine-tune: {verdict['full_finetune_accuracy']:.4f} on {verdict['full_finetune_split']} "
              f"after {verdict['epochs']} epochs -> {'PASS' if verdict['passed'] else 'FAIL'} (>= 0.93)")
    args.output.parent.mkdir(parents=True, exist_ok=True)
    args.output.write_text(json.dumps(out, indent=2) + "\n")


if __name__ == "__main__":
    main()
