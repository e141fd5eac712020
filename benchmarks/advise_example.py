"""Run ``fxtl advise`` on hymenoptera once and keep what it printed: the README's example.

    .venv/bin/python benchmarks/advise_example.py [--data ../shared/datasets/hymenoptera] [--no-readme]

Writes ``benchmarks/results/advise_example.json``: the command's output with the dataset's path
written as ``../shared/datasets/<name>`` (where the README's commands assume the datasets are),
plus the machine, the commit and the wall time. Then rewrites README.md's ``advise-example``
section (``benchmarks/readme_numbers.py``) unless ``--no-readme``.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import time
from datetime import datetime, timezone
from pathlib import Path

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
DEFAULT_DATA = REPO.parent / "shared" / "datasets" / "hymenoptera"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--data", type=Path, default=DEFAULT_DATA)
    ap.add_argument("--output", "-o", type=Path, default=HERE / "results" / "advise_example.json")
    ap.add_argument("--no-readme", action="store_true", help="Only write the json.")
    args = ap.parse_args(argv)
    data = args.data.resolve()
    shown = f"../shared/datasets/{data.name}"
    t0 = time.perf_counter()
    proc = subprocess.run([sys.executable, "-m", "fxtl", "advise", str(data)], cwd=REPO,
                          capture_output=True, text=True)
    wall = time.perf_counter() - t0
    if proc.returncode != 0:
        sys.exit(f"advise_example: fxtl advise failed (exit {proc.returncode}):\n{proc.stderr[-3000:]}")
    try:
        commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=REPO, text=True,
                                capture_output=True, check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        commit = None
    result = {
        "benchmark": "advise_example",
        "command": f"fxtl advise {shown}",
        "measured": datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "git_commit": commit,
        "machine": {"cpus": os.cpu_count(), "cpu": platform.machine(),
                    "load_average_at_end": list(os.getloadavg())},
        "wall_seconds": round(wall, 1),
        "output": proc.stdout.replace(str(data), shown),
    }
    args.output.write_text(json.dumps(result, indent=1) + "\n")
    print(f"advise_example: {result['wall_seconds']} s; wrote {args.output}")
    if not args.no_readme:
        sys.path.insert(0, str(HERE))
        from readme_numbers import update_and_say

        update_and_say("advise_example")
    return 0


if __name__ == "__main__":
    sys.exit(main())
