"""Run ``fxtl demo`` once and keep what it printed: the README's demo block comes from it.

    .venv/bin/python benchmarks/demo_table.py [--cache-dir DIR] [--no-readme] [-- DEMO OPTIONS]

Runs ``python -m fxtl demo --json`` (a few minutes on a CPU) in a fresh cache folder (a
temporary one unless ``--cache-dir``), times the whole command, counts the demo's images per
split, and writes ``benchmarks/results/demo.json``: the command's JSON report with the cache
folder's path written as ``cache`` (what a user running it from a checkout sees), plus the
machine, the commit and the wall time. Then rewrites README.md's ``demo`` sections
(``benchmarks/readme_numbers.py``) unless ``--no-readme``.
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
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg"}


def _as_user_sees(value: Any, cache: str) -> Any:
    """``value`` with every path under ``cache`` written from ``cache`` as ``cache/...``."""
    if isinstance(value, str):
        return value.replace(cache, "cache")
    if isinstance(value, list):
        return [_as_user_sees(v, cache) for v in value]
    if isinstance(value, dict):
        return {k: _as_user_sees(v, cache) for k, v in value.items()}
    return value


def _count_images(data: Path) -> dict[str, int]:
    return {split.name: sum(1 for p in split.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES)
            for split in sorted(data.iterdir()) if split.is_dir()}


def _git_commit() -> str | None:
    try:
        return subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=REPO, text=True,
                              capture_output=True, check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return None


def _gpu() -> str | None:
    try:
        import torch
    except ImportError:
        return None
    return torch.cuda.get_device_name(0) if torch.cuda.is_available() else None


def run(cache_dir: Path, demo_args: list[str]) -> dict[str, Any]:
    cmd = [sys.executable, "-m", "fxtl", "demo", "--json", "--cache-dir", str(cache_dir), *demo_args]
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True)
    wall = time.perf_counter() - t0
    if proc.returncode != 0:
        sys.exit(f"demo_table: fxtl demo failed (exit {proc.returncode}):\n{proc.stderr[-3000:]}")
    report = json.loads(proc.stdout)
    images = _count_images(Path(report["data"]))
    return {
        "benchmark": "demo_table",
        "command": "python -m fxtl demo --json --cache-dir CACHE " + " ".join(demo_args),
        "measured": datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "git_commit": _git_commit(),
        "machine": {"cpus": os.cpu_count(), "cpu": platform.machine(), "gpu": _gpu(),
                    "cpu_bf16": _cpu_bf16(),
                    "load_average_at_end": list(os.getloadavg())},
        "wall_seconds": round(wall, 1),
        "images": images,
        "report": _as_user_sees(report, str(cache_dir)),
    }


def _cpu_bf16() -> bool:
    """Whether this CPU runs bf16 natively: fxtl's ``precision="auto"`` (the demo's) is then
    bf16 on the CPU, and its features, so its numbers, differ from an fp32 machine's."""
    sys.path.insert(0, str(REPO))
    from fxtl.runtime import cpu_supports_bf16

    return bool(cpu_supports_bf16())


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--cache-dir", type=Path, default=None,
                    help="Where the demo writes (must not hold a previous demo) [default: a "
                         "temporary folder].")
    ap.add_argument("--output", "-o", type=Path, default=HERE / "results" / "demo.json")
    ap.add_argument("--no-readme", action="store_true", help="Only write the json.")
    ap.add_argument("demo_args", nargs="*", help="Options passed to fxtl demo (after --).")
    args = ap.parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="fxtl-demo-") as tmp:
        cache = (args.cache_dir or Path(tmp) / "cache").resolve()
        if cache.exists() and any(cache.iterdir()):
            sys.exit(f"demo_table: {cache} is not empty; a demo there would reuse its files")
        result = run(cache, args.demo_args)
    args.output.write_text(json.dumps(result, indent=1) + "\n")
    print(f"demo_table: {result['wall_seconds']} s; wrote {args.output}")
    if not args.no_readme:
        sys.path.insert(0, str(HERE))
        from readme_numbers import update_and_say

        update_and_say("demo_table")
    return 0


if __name__ == "__main__":
    sys.exit(main())
