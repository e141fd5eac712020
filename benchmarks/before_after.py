"""Extraction and fine-tuning speed of two checkouts of fxtl, run alternately on the same data.

    .venv/bin/python benchmarks/before_after.py --before /path/to/old/checkout [--after .] \
        [--data ../shared/datasets/hymenoptera] [--rounds 3]

Each round runs, for each checkout, ``python -m fxtl extract DATA --force`` (images/s), the same
``extract`` again (a cache hit: wall seconds of the whole command, interpreter start included),
``python -m fxtl fit-head CACHE --model all`` (wall seconds) and
``python -m fxtl finetune DATA --epochs 1`` (training images/s of that epoch), with the
checkout first on PYTHONPATH and the same interpreter. Alternating the two sides spreads
machine noise over both; the medians are compared. Writes benchmarks/results/before_after.json.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
DEFAULT_DATA = HERE.parent.parent / "shared" / "datasets" / "hymenoptera"


def _git_rev(checkout: Path) -> str:
    out = subprocess.run(["git", "-C", str(checkout), "rev-parse", "--short", "HEAD"],
                         capture_output=True, text=True)
    return out.stdout.strip() or "unknown"


def _fxtl(checkout: Path, *args: str) -> dict:
    env = {**os.environ, "PYTHONPATH": str(checkout)}
    proc = subprocess.run([sys.executable, "-m", "fxtl", *args, "--json"], cwd=checkout, env=env,
                          capture_output=True, text=True)
    if proc.returncode:
        raise SystemExit(f"{checkout}: fxtl {' '.join(args)} failed:\n{proc.stderr[-2000:]}")
    return json.loads(proc.stdout)


def _extract_rate(checkout: Path, data: Path, cache: Path) -> tuple[float, str]:
    res = _fxtl(checkout, "extract", str(data), "--force", "--cache-dir", str(cache))
    return float(res["images_per_second"]), str(res["cache"])


def _wall(checkout: Path, *args: str) -> float:
    t = time.perf_counter()
    _fxtl(checkout, *args)
    return time.perf_counter() - t


def _finetune_rate(checkout: Path, data: Path, cache: Path) -> float:
    res = _fxtl(checkout, "finetune", str(data), "--epochs", "1", "--cache-dir", str(cache))
    return float(res["train_images_per_second"])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--before", type=Path, required=True)
    ap.add_argument("--after", type=Path, default=HERE.parent)
    ap.add_argument("--data", type=Path, default=DEFAULT_DATA)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--skip-finetune", action="store_true")
    ap.add_argument("--output", type=Path, default=HERE / "results" / "before_after.json")
    args = ap.parse_args()
    sides = {"before": args.before.resolve(), "after": args.after.resolve()}
    stages = ("extract", "cache_hit_seconds", "fit_head_all_seconds", "finetune")
    rates: dict[str, dict[str, list[float]]] = {s: {k: [] for k in stages} for s in sides}
    t0 = time.time()
    with tempfile.TemporaryDirectory() as tmp:
        for r in range(args.rounds):
            for side, checkout in sides.items():
                cache = Path(tmp) / side
                rate, cache_file = _extract_rate(checkout, args.data, cache)
                rates[side]["extract"].append(rate)
                rates[side]["cache_hit_seconds"].append(
                    _wall(checkout, "extract", str(args.data), "--cache-dir", str(cache)))
                rates[side]["fit_head_all_seconds"].append(
                    _wall(checkout, "fit-head", cache_file, "--model", "all",
                          "--cache-dir", str(cache / f"fit{r}")))
                if not args.skip_finetune:
                    rates[side]["finetune"].append(_finetune_rate(checkout, args.data, cache))
                print(f"round {r + 1} {side}: extract {rates[side]['extract'][-1]:.1f} img/s, "
                      f"cache hit {rates[side]['cache_hit_seconds'][-1]:.2f} s, "
                      f"fit-head all {rates[side]['fit_head_all_seconds'][-1]:.1f} s"
                      + ("" if args.skip_finetune else
                         f", finetune {rates[side]['finetune'][-1]:.1f} img/s"), file=sys.stderr)
    summary = {}
    for stage in stages:
        if not rates["before"][stage]:
            continue
        b, a = (statistics.median(rates[s][stage]) for s in ("before", "after"))
        summary[stage] = {"before_median": round(b, 1), "after_median": round(a, 1),
                          "after_over_before": round(a / b, 3)}
    result = {"command": " ".join(sys.argv), "data": str(args.data),
              "revisions": {s: _git_rev(c) for s, c in sides.items()},
              "rounds": args.rounds, "rates": rates, "summary": summary,
              "loadavg_at_end": list(os.getloadavg()), "seconds": round(time.time() - t0, 1)}
    args.output.parent.mkdir(parents=True, exist_ok=True)
    args.output.write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(summary, indent=2))


if __name__ == "__main__":
    main()
