"""The cache hit as a user sees it: `fxtl extract DATA` run again on an unchanged folder.

    .venv/bin/python benchmarks/cache_hit.py [--data ../shared/datasets/hymenoptera] [--runs 9]

Each run is a fresh ``python -m fxtl extract DATA --cache-dir DIR --json`` (interpreter start,
imports, the forked child that checks the cache, the answer), timed from spawn to exit. Its peak
RSS is ``ru_maxrss`` of ``os.wait4`` on that process: Linux gives the largest resident set of the
process and of every descendant it waited for (the forked probe child), i.e. the largest single
process of the tree, not their sum. Three variants alternate in every round so machine noise
falls on all of them:

- ``hit``: as a user runs it, with Python's bytecode cache (a private ``PYTHONPYCACHEPREFIX``,
  filled by warm-up runs that are not counted);
- ``no_probe``: the same with ``fxtl --no-cache-probe`` (the difference is what the child costs);
- ``no_bytecode_write``: ``PYTHONDONTWRITEBYTECODE=1`` and no prefix, as in a sandbox that
  forbids writing ``__pycache__`` (fxtl's own modules are then compiled on every start).

One more run, untimed, goes through a wrapper that records every attempt to import torch or
scikit-learn in the command and in its forked child (an import hook inherited across the fork),
and which process imported the probe module (so the child is seen to have run).

Writes benchmarks/results/cache_hit.json (load average, date, commit, CPU); the README's
cache-hit row is rendered from it by benchmarks/readme_numbers.py.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from datetime import datetime, timezone
from pathlib import Path

from _host import cpu_model

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
RESULTS = HERE / "results"
TARGETS = {"wall_seconds_median": 0.5, "peak_rss_mb": 300.0}
VARIANTS = ("hit", "no_probe", "no_bytecode_write")
WATCHED = ("torch", "sklearn")
PROBE_MODULE = "fxtl.features.cache_probe"

# Runs `python -m fxtl ARGS` with an import hook; every process of the command (the fork
# inherits the hook) appends "pid<TAB>module" to the log for each watched import it attempts.
_WRAPPER = r"""
import os, runpy, sys
LOG, WATCHED, PROBE = sys.argv[1], set(sys.argv[2].split(",")), sys.argv[3]
seen = set()

class Watch:
    def find_spec(self, name, path=None, target=None):
        top = name.split(".")[0]
        key = (os.getpid(), top if top in WATCHED else name)
        if (top in WATCHED or name == PROBE) and key not in seen:
            seen.add(key)
            with open(LOG, "a") as f:
                f.write(f"{key[0]}\t{key[1]}\n")
        return None

sys.meta_path.insert(0, Watch())
with open(LOG, "a") as f:
    f.write(f"{os.getpid()}\tmain\n")
sys.argv = ["fxtl", *sys.argv[4:]]
runpy.run_module("fxtl", run_name="__main__", alter_sys=True)
"""


def _default_data() -> Path:
    for root in (REPO.parent, REPO.parent.parent):
        candidate = root / "shared" / "datasets" / "hymenoptera"
        if candidate.is_dir():
            return candidate
    return REPO.parent / "shared" / "datasets" / "hymenoptera"


def _env(variant: str, pycache: Path) -> dict[str, str]:
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(
        [str(REPO)] + [p for p in os.environ.get("PYTHONPATH", "").split(os.pathsep) if p])}
    if variant == "no_bytecode_write":
        env["PYTHONDONTWRITEBYTECODE"] = "1"
        env.pop("PYTHONPYCACHEPREFIX", None)
    else:
        env.pop("PYTHONDONTWRITEBYTECODE", None)
        env["PYTHONPYCACHEPREFIX"] = str(pycache)
    return env


def _command(variant: str, data: Path, cache_dir: Path) -> list[str]:
    probe = ["--no-cache-probe"] if variant == "no_probe" else []
    return [*probe, "extract", str(data), "--cache-dir", str(cache_dir), "--json"]


def _run(argv: list[str], env: dict[str, str], scratch: Path) -> dict:
    """Spawn, wait with ``os.wait4``; wall seconds, the tree's largest RSS, CPU seconds, JSON."""
    out, err = scratch / "stdout", scratch / "stderr"
    with open(out, "wb") as o, open(err, "wb") as e:
        t0 = time.perf_counter()
        proc = subprocess.Popen(argv, stdout=o, stderr=e, env=env, cwd=scratch)
        _, status, usage = os.wait4(proc.pid, 0)
        wall = time.perf_counter() - t0
    proc.returncode = os.waitstatus_to_exitcode(status)  # reaped here, not by Popen
    if proc.returncode:
        raise SystemExit(f"cache_hit: {' '.join(argv)} failed ({proc.returncode}):\n"
                         + err.read_text(errors="replace")[-2000:])
    return {"wall_seconds": wall, "peak_rss_mb": usage.ru_maxrss / 1024,
            "cpu_seconds": usage.ru_utime + usage.ru_stime,
            "result": json.loads(out.read_text())}


def _imports(data: Path, cache_dir: Path, env: dict[str, str], scratch: Path) -> dict:
    """Which processes of one cache-hit command tried to import torch or scikit-learn."""
    log = scratch / "imports.log"
    log.unlink(missing_ok=True)
    run = _run([sys.executable, "-c", _WRAPPER, str(log), ",".join(WATCHED), PROBE_MODULE,
                *_command("hit", data, cache_dir)], env, scratch)
    lines = [line.split("\t") for line in log.read_text().splitlines()]
    main_pid = next(int(pid) for pid, what in lines if what == "main")
    probe_pids = sorted({int(pid) for pid, what in lines if what == PROBE_MODULE})
    return {"how": "a sys.meta_path hook installed before fxtl starts, inherited by the forked "
                   "child; it logs each process's first attempt to import a watched package",
            "cache_hit": run["result"]["cache_hit"],
            "watched": list(WATCHED),
            "imported": sorted({what for _, what in lines if what in WATCHED}),
            "probe_ran_in_child": any(pid != main_pid for pid in probe_pids),
            "processes_seen": len({pid for pid, _ in lines})}


def _git_rev() -> str:
    out = subprocess.run(["git", "-C", str(REPO), "rev-parse", "--short", "HEAD"],
                         capture_output=True, text=True)
    return out.stdout.strip() or "unknown"


def _summary(runs: list[dict]) -> dict:
    walls = [r["wall_seconds"] for r in runs]
    return {"wall_seconds": [round(w, 4) for w in walls],
            "wall_seconds_median": round(statistics.median(walls), 4),
            "wall_seconds_min": round(min(walls), 4), "wall_seconds_max": round(max(walls), 4),
            "peak_rss_mb": round(max(r["peak_rss_mb"] for r in runs), 1),
            "cpu_seconds_median": round(statistics.median(r["cpu_seconds"] for r in runs), 4)}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--data", type=Path, default=_default_data(),
                    help="An image folder [default: ../shared/datasets/hymenoptera].")
    ap.add_argument("--cache-dir", type=Path, default=None,
                    help="Where the cache is (extracted first when missing) [default: a "
                         "temporary folder].")
    ap.add_argument("--runs", type=int, default=9, help="Timed runs of each variant.")
    ap.add_argument("--warmup", type=int, default=2,
                    help="Untimed runs of each variant first (they fill the bytecode cache).")
    ap.add_argument("--output", type=Path, default=RESULTS / "cache_hit.json")
    args = ap.parse_args(argv)
    if not args.data.is_dir():
        raise SystemExit(f"cache_hit: {args.data} is not a folder; pass --data")
    data = args.data.resolve()
    load_start = list(os.getloadavg())
    with tempfile.TemporaryDirectory(prefix="fxtl-cache-hit-") as tmp:
        scratch, pycache = Path(tmp), Path(tmp) / "pycache"
        cache_dir = (args.cache_dir or scratch / "cache").resolve()
        first = _run([sys.executable, "-m", "fxtl", *_command("hit", data, cache_dir)],
                     _env("hit", pycache), scratch)
        prepared = {"cache_hit": first["result"]["cache_hit"],
                    "seconds": round(first["wall_seconds"], 1)}
        runs: dict[str, list[dict]] = {v: [] for v in VARIANTS}
        loads = []
        for i in range(args.warmup + args.runs):
            for variant in VARIANTS:
                res = _run([sys.executable, "-m", "fxtl", *_command(variant, data, cache_dir)],
                           _env(variant, pycache), scratch)
                if not res["result"]["cache_hit"]:
                    raise SystemExit(f"cache_hit: run {i + 1} ({variant}) was not a cache hit")
                if i >= args.warmup:
                    runs[variant].append(res)
            if i >= args.warmup:
                loads.append(round(os.getloadavg()[0], 2))
        imports = _imports(data, cache_dir, _env("hit", pycache), scratch)
        cache = first["result"]["cache"]
    summary = {v: _summary(r) for v, r in runs.items()}
    hit = summary["hit"]
    result = {
        "measured": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "revision": _git_rev(),
        "command": "python benchmarks/cache_hit.py " + " ".join(sys.argv[1:] if argv is None else argv),
        "fxtl_command": f"python -m fxtl extract {data} --cache-dir DIR --json",
        "data": str(data), "images": first["result"]["n"], "cache": Path(cache).name,
        "prepared": prepared, "runs": args.runs, "warmup": args.warmup,
        "peak_rss_is": "ru_maxrss from os.wait4 on the command: the largest resident set of the "
                       "command and the child it forks and waits for (not their sum)",
        "variants": summary,
        "probe_seconds_median": round(hit["wall_seconds_median"]
                                      - summary["no_probe"]["wall_seconds_median"], 4),
        "no_bytecode_write_extra_seconds_median": round(
            summary["no_bytecode_write"]["wall_seconds_median"] - hit["wall_seconds_median"], 4),
        "imports": imports,
        "targets": TARGETS,
        "machine": {"cpu": cpu_model(), "cpus": os.cpu_count(), "python": platform.python_version(),
                    "load_average_at_start": load_start,
                    "load_average_1min_per_round": loads,
                    "load_average_at_end": list(os.getloadavg())},
    }
    args.output.parent.mkdir(parents=True, exist_ok=True)
    args.output.write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps({v: {k: s[k] for k in ("wall_seconds_median", "wall_seconds_min",
                                            "wall_seconds_max", "peak_rss_mb")}
                      for v, s in summary.items()}, indent=1))
    print(f"imports: {imports}; load average {load_start[0]:.2f} at the start, "
          f"{result['machine']['load_average_at_end'][0]:.2f} at the end", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
