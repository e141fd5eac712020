"""Scale: extraction and fine-tuning images/s with 1 and 2 processes, and peak RSS against N.

    .venv/bin/python benchmarks/scale.py [--data ../shared/datasets/hymenoptera] [--repeats 2]
                                         [--rss-sizes 2000,20000] [--skip-speed] [--skip-memory]
                                         [--skip-finetune]

1. Speed, on the dataset (hymenoptera: 398 images), each configuration ``--repeats`` times,
   alternating so that load from other users of the machine hits all alike:
     1 process:   python -m fxtl extract DATA --cache-dir TMP --force --json
     2 processes: python -m torch.distributed.run --standalone --nproc-per-node 2 \\
                      -m fxtl extract DATA --cache-dir TMP --force --json
     1 process, 1 thread (what each of the 2 ranks runs as, alone):
                  OMP_NUM_THREADS=1 python -m fxtl extract DATA --workers 0 --cache-dir TMP --force --json
   ``loop`` images/s is what extract reports (for torchrun: all images / time until every rank's
   shard is done); ``end to end`` is images / wall time of the whole command (process start,
   model load, merge included). The two caches are compared row by row.
2. Memory: peak RSS of the ``fxtl extract`` process (ru_maxrss; decode workers aside) on CSV
   manifests of exactly 2,000 and 20,000 rows that repeat the dataset through symlinked folders.
   Features of 20,000 images are 20,000 x 1280 x 4 B = 98 MiB: holding them would show.

3. Fine-tuning (DDP): one epoch of a full fine-tune, 1 process against torchrun with 2
   (``--batch-size 32`` is the effective batch either way), training images/s from metrics.json.

Writes benchmarks/results/scale.json and prints a table. The numbers are whatever this machine
gave at the time, loadavg included: other jobs share its cores.
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
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
DEFAULT_DATA = ROOT.parent / "shared" / "datasets" / "hymenoptera"
PY = sys.executable

# Runs the CLI and reports the peak RSS of its own process on stderr.
_RSS_WRAPPER = (
    "import resource, sys\n"
    "from fxtl.cli import cli\n"
    "try:\n"
    "    cli(sys.argv[1:], prog_name='fxtl', standalone_mode=False)\n"
    "finally:\n"
    "    s = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss\n"
    "    print(f'PEAK_RSS_KB {s}', file=sys.stderr)\n")


def run(cmd: list[str], **env_extra: str) -> tuple[dict, float, str]:
    """Run ``cmd``; return its JSON result (last stdout line), wall seconds and stderr."""
    env = {k: v for k, v in os.environ.items() if k not in ("WORLD_SIZE", "RANK", "LOCAL_RANK")}
    env.update(env_extra)
    t0 = time.perf_counter()
    p = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT, env=env)
    wall = time.perf_counter() - t0
    if p.returncode != 0:
        sys.exit(f"failed ({p.returncode}): {' '.join(cmd)}\n{p.stderr[-3000:]}")
    return json.loads(p.stdout.strip().splitlines()[-1]), wall, p.stderr


def speed(data: Path, tmp: Path, repeats: int) -> dict:
    single = [PY, "-m", "fxtl", "extract", str(data), "--cache-dir", str(tmp / "p1"), "--force", "--json"]
    double = [PY, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
              "-m", "fxtl", "extract", str(data), "--cache-dir", str(tmp / "p2"), "--force", "--json"]
    one_thread = single[:5] + ["--workers", "0", "--cache-dir", str(tmp / "p1t"), "--force", "--json"]
    configs = {"1": (single, {}), "2": (double, {}), "1x1thread": (one_thread, {"OMP_NUM_THREADS": "1"})}
    runs = []
    for r in range(repeats):
        for procs, (cmd, env) in configs.items():
            load = os.getloadavg()[0]
            d, wall, _ = run(cmd, **env)
            runs.append({"processes": procs, "repeat": r, "n": d["n"], "precision": d["precision"],
                         "loop_images_per_second": d["images_per_second"],
                         "end_to_end_images_per_second": d["n"] / wall, "wall_seconds": wall,
                         "loadavg_1min_before": load, "cache": d["cache"],
                         "shard_runs": d.get("shard_runs", [])})
            print(f"  {procs} process(es), run {r}: {d['images_per_second']:.1f} img/s in loop, "
                  f"{d['n'] / wall:.1f} end to end ({wall:.1f} s, load {load:.1f})", file=sys.stderr)
    summary = {}
    for procs in configs:
        mine = [x for x in runs if x["processes"] == procs]
        summary[procs] = {
            "loop_images_per_second_median": statistics.median(x["loop_images_per_second"] for x in mine),
            "end_to_end_images_per_second_median": statistics.median(x["end_to_end_images_per_second"] for x in mine),
            "wall_seconds_median": statistics.median(x["wall_seconds"] for x in mine)}
    from fxtl.features.store import load_features

    a = load_features(runs[0]["cache"])
    b = load_features(next(x for x in runs if x["processes"] == "2")["cache"])
    same = {"paths_equal": a.paths == b.paths, "fingerprint_equal": a.attrs["fingerprint"] == b.attrs["fingerprint"],
            "max_abs_feature_diff": float(abs(a.features - b.features).max()),
            "feature_scale_max_abs": float(abs(a.features).max())}
    return {"commands": {k: " ".join(c) + "".join(f" ({k2}={v})" for k2, v in e.items())
                         for k, (c, e) in configs.items()}, "runs": runs,
            "summary": summary, "one_vs_two_processes": same}


def finetune_speed(data: Path, tmp: Path, repeats: int) -> dict:
    opts = ["finetune", str(data), "--epochs", "1", "--batch-size", "32", "--json"]
    single = [PY, "-m", "fxtl", *opts]
    double = [PY, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2", "-m", "fxtl", *opts]
    runs = []
    for r in range(repeats):
        for procs, cmd in (("1", single), ("2", double)):
            load = os.getloadavg()[0]
            d, wall, _ = run(cmd + ["--cache-dir", str(tmp / f"ft{procs}-{r}")])
            m = json.loads((Path(d["run_dir"]) / "metrics.json").read_text())
            runs.append({"processes": procs, "repeat": r, "world_size": m["world_size"],
                         "train_images_per_second": m["train_images_per_second"],
                         "val_accuracy": d["accuracy"], "wall_seconds": wall, "loadavg_1min_before": load})
            print(f"  finetune {procs} process(es), run {r}: {m['train_images_per_second']:.1f} train img/s, "
                  f"val {d['accuracy']:.3f} ({wall:.1f} s, load {load:.1f})", file=sys.stderr)
    summary = {p: {"train_images_per_second_median": statistics.median(
                       x["train_images_per_second"] for x in runs if x["processes"] == p),
                   "wall_seconds_median": statistics.median(x["wall_seconds"] for x in runs if x["processes"] == p)}
               for p in ("1", "2")}
    return {"commands": {"1": " ".join(single), "2": " ".join(double)}, "runs": runs, "summary": summary}


def manifest(data: Path, rows: int, folder: Path) -> Path:
    """A CSV manifest of exactly ``rows`` rows cycling through the dataset via symlinked copies.

    The dataset is copied once under ``folder`` and the copies link to that: manifest paths must
    resolve inside the manifest's folder.
    """
    import shutil

    from fxtl.data.discovery import discover

    base = folder / "base"
    if not base.exists():
        shutil.copytree(data, base)
    images = discover(base)
    lines = ["path,label,split"]
    copy = 0
    while len(lines) - 1 < rows:
        link = folder / f"copy{copy}"
        if not link.exists():
            link.symlink_to(base, target_is_directory=True)
        for s in images.samples[: rows - (len(lines) - 1)]:
            lines.append(f"copy{copy}/{s.path},{images.class_names[s.label]},{s.split}")
        copy += 1
    m = folder / f"n{rows}.csv"
    m.write_text("\n".join(lines) + "\n")
    return m


def memory(data: Path, tmp: Path, sizes: list[int]) -> list[dict]:
    out = []
    for n in sizes:
        m = manifest(data, n, tmp)
        cmd = [PY, "-c", _RSS_WRAPPER, "extract", str(m), "--cache-dir", str(tmp / "mem"), "--force", "--json"]
        load = os.getloadavg()[0]
        d, wall, err = run(cmd)
        line = [l for l in err.splitlines() if l.startswith("PEAK_RSS_KB")][-1]
        main_kb = int(line.split()[1])
        row = {"images": n, "n": d["n"], "dim": d["dim"], "peak_rss_mb_main": main_kb / 1024,
               "wall_seconds": wall,
               "images_per_second": d["images_per_second"], "loadavg_1min_before": load,
               "feature_matrix_mb": d["n"] * d["dim"] * 4 / 2**20,
               "command": "python -c <peak-RSS wrapper> extract " + f"{m.name} --cache-dir TMP --force --json"}
        out.append(row)
        print(f"  {n} images: peak RSS main process {row['peak_rss_mb_main']:.0f} MB ({wall:.0f} s, "
              f"load {load:.1f})", file=sys.stderr)
        Path(d["cache"]).unlink(missing_ok=True)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data", type=Path, default=DEFAULT_DATA)
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--rss-sizes", default="2000,20000")
    ap.add_argument("--skip-speed", action="store_true")
    ap.add_argument("--skip-memory", action="store_true")
    ap.add_argument("--skip-finetune", action="store_true")
    ap.add_argument("--output", type=Path, default=HERE / "results" / "scale.json")
    args = ap.parse_args()
    import torch

    out: dict = {"command": " ".join([Path(PY).name, *sys.argv]),
                 "machine": {"cpu": platform.processor() or platform.machine(), "cores": os.cpu_count(),
                             "torch": torch.__version__, "python": platform.python_version()},
                 "data": str(args.data)}
    # A skipped part keeps its numbers from the previous run of the same output file (with the
    # command and time of that run), so the memory part (long) need not be re-measured.
    previous = json.loads(args.output.read_text()) if args.output.exists() else {}
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        parts = {"speed": (args.skip_speed, lambda: speed(args.data, tmp, args.repeats)),
                 "memory": (args.skip_memory,
                            lambda: memory(args.data, tmp, [int(s) for s in args.rss_sizes.split(",")])),
                 "finetune": (args.skip_finetune, lambda: finetune_speed(args.data, tmp, args.repeats))}
        for part, (skip, measure) in parts.items():
            if skip:
                if part in previous:
                    out[part] = previous[part]
                continue
            print(f"{part}:", file=sys.stderr)
            out[part] = {"measured": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "command": out["command"],
                         "results": measure()}
    if "memory" in out and len(out["memory"]["results"]) >= 2:
        lo, hi = out["memory"]["results"][0], out["memory"]["results"][-1]
        out["memory"]["rss_growth"] = {"images_ratio": hi["images"] / lo["images"],
                             "main_ratio": hi["peak_rss_mb_main"] / lo["peak_rss_mb_main"],
                             "main_delta_mb": hi["peak_rss_mb_main"] - lo["peak_rss_mb_main"],
                             "feature_matrix_delta_mb": hi["feature_matrix_mb"] - lo["feature_matrix_mb"]}
    args.output.parent.mkdir(parents=True, exist_ok=True)
    args.output.write_text(json.dumps(out, indent=2) + "\n")

    if "speed" in out:
        sp = out["speed"]["results"]
        s = sp["summary"]
        reps = len([x for x in sp["runs"] if x["processes"] == "1"])
        print(f"\nExtraction speed, {sp['runs'][0]['n']} images, {out['machine']['cores']} cores "
              f"({sp['runs'][0]['precision']}; median of {reps}; measured {out['speed']['measured']}):")
        print(f"{'processes':>10} {'img/s (loop)':>14} {'img/s (end to end)':>20} {'wall s':>8}")
        for p in s:
            print(f"{p:>10} {s[p]['loop_images_per_second_median']:>14.1f} "
                  f"{s[p]['end_to_end_images_per_second_median']:>20.1f} {s[p]['wall_seconds_median']:>8.1f}")
        same = sp["one_vs_two_processes"]
        print(f"1 vs 2 processes: same paths {same['paths_equal']}, same fingerprint "
              f"{same['fingerprint_equal']}, max |diff| {same['max_abs_feature_diff']:.2g} "
              f"(features up to {same['feature_scale_max_abs']:.2g})")
    if "memory" in out:
        print(f"\nPeak RSS of `fxtl extract` (measured {out['memory']['measured']}):")
        print(f"{'images':>8} {'peak RSS MB':>12} {'features MB':>12} {'img/s':>7} {'wall s':>8}")
        for r in out["memory"]["results"]:
            print(f"{r['images']:>8} {r['peak_rss_mb_main']:>12.0f} {r['feature_matrix_mb']:>12.0f} "
                  f"{r['images_per_second']:>7.1f} {r['wall_seconds']:>8.0f}")
        if "rss_growth" in out["memory"]:
            g = out["memory"]["rss_growth"]
            print(f"{g['images_ratio']:.0f}x the images: main RSS x{g['main_ratio']:.3f} "
                  f"({g['main_delta_mb']:+.0f} MB; holding the features would add {g['feature_matrix_delta_mb']:.0f} MB)")
    if "finetune" in out:
        s = out["finetune"]["results"]["summary"]
        print(f"\nFine-tuning, 1 epoch, effective batch 32 (measured {out['finetune']['measured']}):")
        for p in s:
            print(f"{p:>10} process(es) {s[p]['train_images_per_second_median']:>8.1f} train img/s "
                  f"{s[p]['wall_seconds_median']:>8.1f} s wall")
    print(f"\nwrote {args.output}")


if __name__ == "__main__":
    main()
