"""Heads on five real datasets with lite0, lite1 and lite2: accuracy and extraction speed.
(issue 23, item 3: "the README has heads on the five shared datasets for lite0/lite1/lite2")

    .venv/bin/python benchmarks/backbones_table.py [--only NAME ...] [--backbones lite0,lite1,lite2]
        [--work DIR] [--output FILE] [--no-readme]

For hymenoptera, trashnet, chest_xray, omniglot (``../shared/datasets``) and scikit-learn's
handwritten digits (PNG folders, 60 per class, train/val/test, as ``fxtl demo`` writes them), and
for every backbone, through the command line as a user runs it:

1. ``fxtl extract DATA --backbone B --force --json``: its ``images_per_second`` (decode included,
   a fresh extraction, never a cache hit), with the load average just before and after;
2. ``fxtl fit-head CACHE --model all --json``: the best head by selection score (``val`` where
   the data has train/val/test, k-fold CV on train otherwise; never the reported split), its
   accuracy on the reported split with the 95% Wilson interval from its ``metrics.json``.

Every backbone sees the same splits: the datasets' own folders (hymenoptera train/val: reported
on val; digits train/val/test: reported on test); the class-folder sets (train only) get fxtl's
seeded 20% hold-out, placed by a hash of each path, so it is the same images for every backbone.

Results: ``benchmarks/results/backbones_table.json`` (a run with ``--only`` updates its datasets
and keeps the others). Prints the markdown table and writes it into README.md between the
``<!-- fxtl:backbones-table -->`` markers (``benchmarks/readme_numbers.py`` renders the same
block from the results file).
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

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
SHARED = Path(os.environ.get("FXTL_DATASETS", ROOT.parent / "shared" / "datasets"))
if not SHARED.is_dir():  # a worktree elsewhere than beside shared/
    SHARED = Path("/work/shared/datasets")
RESULTS = HERE / "results" / "backbones_table.json"
README = ROOT / "README.md"
DATASETS = ("hymenoptera", "trashnet", "chest_xray", "omniglot", "digits")  # the table's order
# Cheapest first, so that a run cut short has measured the most datasets (each cell is saved).
RUN_ORDER = ("chest_xray", "hymenoptera", "trashnet", "digits", "omniglot")
BACKBONES = ("lite0", "lite1", "lite2")


def dataset_dir(name: str, work: Path) -> Path:
    if name != "digits":
        return SHARED / name
    from fxtl.data.samples import write_digits

    root = work / "data" / "digits"
    if not (root / "train").exists():  # the demo's digits: 60 per class, half train
        write_digits(root, classes=10, per_class=60, val_fraction=0.25, test_fraction=0.25, seed=0)
    return root


def fxtl(*args: str) -> dict:
    """One ``fxtl`` command in its own process (as a user runs it); its JSON result."""
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    t0 = time.perf_counter()
    p = subprocess.run([sys.executable, "-m", "fxtl", *args, "--json"], capture_output=True,
                       text=True, env=env, cwd=ROOT)
    if p.returncode != 0:
        raise SystemExit(f"fxtl {' '.join(args)} failed ({p.returncode}): "
                         f"{(p.stdout + p.stderr).strip()[-2000:]}")
    d = json.loads(p.stdout)
    d["_wall_seconds"] = round(time.perf_counter() - t0, 2)
    return d


def measure(name: str, backbone: str, work: Path) -> dict:
    from fxtl.report.comparison import pick_by_selection

    data = dataset_dir(name, work)
    home = work / "cache"
    load_before = os.getloadavg()
    ex = fxtl("extract", str(data), "--backbone", backbone, "--cache-dir", str(home), "--force")
    load_after = os.getloadavg()
    fit = fxtl("fit-head", ex["cache"], "--model", "all", "--cache-dir", str(home))
    rows = [{**r, "train_seconds": r["fit_seconds"]} for r in fit["runs"]]
    best, picked_by = pick_by_selection(rows)
    metrics = json.loads((Path(best["run_dir"]) / "metrics.json").read_text())
    return {"dataset": name, "backbone": backbone, "images": ex["n"], "dim": ex["dim"],
            "splits": ex["splits"], "precision": ex.get("precision"),
            "extract_seconds": ex["seconds"], "images_per_second": ex["images_per_second"],
            "load_average_before": [round(v, 2) for v in load_before],
            "load_average_after": [round(v, 2) for v in load_after],
            "fit_head_wall_seconds": fit["_wall_seconds"],
            "best": {"model": best["model"], "picked_by": picked_by,
                     "selection": best.get("selection"), "selection_score": best.get("selection_score"),
                     "split": best["split"], "n": best["n"], "accuracy": best["accuracy"],
                     "accuracy_ci95": metrics.get("accuracy_ci95"), "macro_f1": best["macro_f1"]},
            "heads": {r["model"]: {"accuracy": r["accuracy"], "selection_score": r.get("selection_score")}
                      for r in fit["runs"]}}


def markdown(results: list[dict], backbones: list[str]) -> str:
    by = {(r["dataset"], r["backbone"]): r for r in results}
    names = [d for d in DATASETS if any((d, b) in by for b in backbones)]
    lines = ["| data (reported split, images) | " + " | ".join(backbones) + " |",
             "|---|" + "---|" * len(backbones)]
    for d in names:
        first = next(by[(d, b)] for b in backbones if (d, b) in by)
        cells = []
        accs = [by[(d, b)]["best"]["accuracy"] for b in backbones if (d, b) in by]
        for b in backbones:
            r = by.get((d, b))
            if r is None:
                cells.append("-")
                continue
            best = r["best"]
            lo, hi = best["accuracy_ci95"] or (float("nan"), float("nan"))
            acc = f"{best['accuracy']:.3f}"
            acc = f"**{acc}**" if best["accuracy"] == max(accs) else acc
            ips = r["images_per_second"]
            cells.append(f"{acc} [{lo:.2f}, {hi:.2f}] {best['model']}; "
                         f"{ips:.{1 if ips < 10 else 0}f} img/s")
        lines.append(f"| {d} ({first['best']['split']}, {first['best']['n']}) | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def rewrite_readme(block: str) -> None:
    """README.md's ``backbones-table`` section (benchmarks/readme_numbers.py renders the same
    text from the results file)."""
    sys.path.insert(0, str(HERE))
    from _readme import replace_section

    README.write_text(replace_section(README.read_text(encoding="utf-8"), "backbones-table", block),
                      encoding="utf-8")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--only", action="append", choices=DATASETS, help="this dataset only (repeatable)")
    ap.add_argument("--backbones", default=",".join(BACKBONES))
    ap.add_argument("--work", type=Path, default=None, help="caches and runs [default: a temp dir]")
    ap.add_argument("--output", type=Path, default=RESULTS)
    ap.add_argument("--no-readme", action="store_true", help="do not rewrite README.md's table")
    ap.add_argument("--render", action="store_true",
                    help="measure nothing: rewrite the table from the results file")
    args = ap.parse_args()
    if args.render:
        results = json.loads(args.output.read_text())
        save(results["results"], args, date=results["date"], command=results["command"])
        print(json.loads(args.output.read_text())["table"])
        return
    backbones = [b.strip() for b in args.backbones.split(",") if b.strip()]
    work = args.work or Path(tempfile.mkdtemp(prefix="fxtl-backbones-"))
    old = json.loads(args.output.read_text()) if args.output.exists() else {}
    keep = [r for r in old.get("results", [])
            if not (r["dataset"] in (args.only or DATASETS) and r["backbone"] in backbones)]
    new: list[dict] = []
    for name in [d for d in RUN_ORDER if d in (args.only or DATASETS)]:
        for bb in backbones:
            r = measure(name, bb, work)
            new.append(r)
            b = r["best"]
            print(f"{name:<12} {bb:<6} {r['images_per_second']:7.1f} img/s (load {r['load_average_before'][0]:.1f})"
                  f"  best {b['model']:<10} {b['accuracy']:.3f} {b['accuracy_ci95']} on {b['split']} "
                  f"(n={b['n']}), fit-head {r['fit_head_wall_seconds']:.0f} s", flush=True)
            save(keep + new, args)  # every cell, so a run cut short keeps what it measured
    print()
    print(json.loads(args.output.read_text())["table"])


def save(cells: list[dict], args: argparse.Namespace, *, date: str | None = None,
         command: str | None = None) -> None:
    results = sorted(cells, key=lambda r: (DATASETS.index(r["dataset"]), r["backbone"]))
    all_bbs = [b for b in BACKBONES if any(r["backbone"] == b for r in results)] + \
        sorted({r["backbone"] for r in results} - set(BACKBONES))
    table = markdown(results, all_bbs)
    out = {"date": date or time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
           "machine": {"platform": platform.platform(), "cpus": os.cpu_count(),
                       "python": platform.python_version(),
                       "note": "img/s move with the machine and with the load average recorded per "
                               "extraction"},
           "command": command or "python benchmarks/backbones_table.py " + " ".join(sys.argv[1:]),
           "results": results, "table": table}
    loads = [r["load_average_before"][0] for r in results]
    # Extraction uses both cores: a 1-minute load average under the core count means the
    # columns were measured alone and rank the backbones; above it other jobs took a share.
    quiet = max(loads) < (os.cpu_count() or 1)
    where = (f"on a {os.cpu_count()}-core CPU with nothing else running (1-minute load average "
             f"{min(loads):.1f}-{max(loads):.1f} at the extractions, extraction's own threads "
             f"included), so the columns rank the backbones' speed on this CPU"
             if quiet else
             f"on a {os.cpu_count()}-core CPU shared with other jobs (1-minute load average "
             f"{min(loads):.1f}-{max(loads):.1f} at the extractions): slower than alone and not a "
             f"reliable ranking of the backbones")
    block = (f"{table}\n\nBest head of `fit-head --model all` (picked by selection score, never on "
             f"the reported split), its accuracy on the reported split [95% Wilson interval]; "
             f"`fxtl extract` images/s end to end ({results[0].get('precision') or 'auto'}, "
             f"decode included, process start and weight loading not) {where}. Rates move "
             f"between machines (the same lite0 extraction ran at 65 img/s on the CPU of the "
             f"issue-22 measurements and at 33 img/s on this one, for both the old and the new "
             f"code), so compare within this table; the accuracies do not depend on the machine. "
             f"{out['date']}; raw: `benchmarks/results/backbones_table.json`.")
    out["readme_block"] = block
    args.output.parent.mkdir(parents=True, exist_ok=True)
    args.output.write_text(json.dumps(out, indent=1) + "\n")
    if not args.no_readme:
        rewrite_readme(block)


if __name__ == "__main__":
    main()
