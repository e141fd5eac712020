"""Does `fxtl advise` recommend what actually wins?  (issue 5's calibration table)

    .venv/bin/python benchmarks/advise_calibration.py [--epochs 3] [--quick]
        [--only SUBSTRING ...] [--variant NAME ...]

For several real datasets (hymenoptera photos: similar to ImageNet; scikit-learn's handwritten
digits: different; each also subsampled to vary the size) this runs `advise`, then measures what
each path really achieves on the same splits: the best head on frozen features (logreg), a
fine-tune of the last two blocks and (without --quick) a full fine-tune.

``--only`` runs the datasets whose name contains one of the given substrings (e.g. ``--only
digits``); ``--variant`` adds fine-tunes of the last two blocks with other settings (see
VARIANTS). Rows are merged into benchmarks/results/advise_calibration.json by dataset name: a
rerun of one dataset replaces the fields it measured and keeps the others (and the other
datasets' rows). Every fine-tune's settings, time and best epoch are recorded under ``runs``.
Prints the table that docs/advise.md reports.
"""
from __future__ import annotations

import argparse
import json
import platform
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
HYMENOPTERA = ROOT.parent / "shared" / "datasets" / "hymenoptera"
RESULTS = HERE / "results" / "advise_calibration.json"

# Alternative recipes for the `last:2` fine-tune (finetune() keyword arguments). "lp-ft" starts
# the new classifier from the logistic-regression head fitted on the same split (Kumar et al.
# 2022), the others change one setting of the default recipe each.
VARIANTS = {
    "lp-ft": {"init_head": "LOGREG_RUN"},
    "lr2e-3": {"lr": 2e-3},
    "10ep": {"epochs": 10},
    "bn-train": {"bn": "train"},
    "lp-ft-10ep": {"init_head": "LOGREG_RUN", "epochs": 10},
    # The head was fitted on features extracted at the backbone's own input size (224 for
    # lite0); the digits fine-tunes run at 128 px. "@224" runs at the head's size, and the
    # 0-epoch "probe" runs only evaluate the network with the folded head (no training): at
    # 224 px they must reproduce the head's accuracy, at 128 px they show what the size change
    # alone costs the head.
    "lp-ft@224": {"init_head": "LOGREG_RUN", "image_size": None},
    "probe@128": {"init_head": "LOGREG_RUN", "epochs": 0},
    "probe@224": {"init_head": "LOGREG_RUN", "epochs": 0, "image_size": None},
    # What `fxtl advise` now runs for scenario 3 (fxtl.advice.LP_FT_CROP_SCALE): LP-FT at the
    # head's input size with a milder random crop, since the head was fitted on centre crops.
    "lp-ft@224-crop0.8": {"init_head": "LOGREG_RUN", "image_size": None, "crop_scale": (0.8, 1.0)},
}


def subsample_manifest(root: Path, per_class: int, out: Path, seed: int = 0) -> Path:
    """A CSV manifest with ``per_class`` training images per class and every val image."""
    import numpy as np

    from fxtl.data.discovery import discover

    images = discover(root)
    rng = np.random.default_rng(seed)
    rows = ["path,label,split"]
    for label, name in enumerate(images.class_names):
        train = [s for s in images.samples if s.label == label and s.split == "train"]
        pick = rng.permutation(len(train))[:per_class]
        rows += [f"{train[i].path},{name},train" for i in sorted(pick)]
    rows += [f"{s.path},{images.class_names[s.label]},{s.split}" for s in images.samples if s.split != "train"]
    link = out / f"{root.name}-{per_class}"
    link.mkdir(parents=True, exist_ok=True)
    for entry in root.iterdir():
        target = link / entry.name
        if not target.exists():
            target.symlink_to(entry, target_is_directory=entry.is_dir())
    m = link / "manifest.csv"
    m.write_text("\n".join(rows) + "\n")
    return m


def _datasets(tmp: Path):
    """name -> (builder returning the data path, fine-tune keyword arguments)."""
    from fxtl.data.samples import write_digits

    return {
        "hymenoptera (all, 245 train)": (lambda: HYMENOPTERA, {}),
        "hymenoptera (10/class)": (lambda: subsample_manifest(HYMENOPTERA, 10, tmp), {}),
        "digits (10 classes, 1258 train)": (lambda: write_digits(tmp / "digits"), {"image_size": 128}),
        "digits (10 classes, 10/class)": (lambda: write_digits(tmp / "digits10", per_class=25,
                                                               val_fraction=0.6),
                                          {"image_size": 128}),
    }


def _git_state() -> dict:
    def git(*a: str) -> str:
        try:
            return subprocess.run(["git", *a], cwd=ROOT, capture_output=True, text=True).stdout.strip()
        except OSError:  # pragma: no cover
            return ""
    return {"commit": git("rev-parse", "--short", "HEAD"),
            "dirty_finetune_py": bool(git("status", "--porcelain", "fxtl/finetune.py"))}


def _load(path: Path) -> list[dict]:
    return json.loads(path.read_text()) if path.exists() else []


def _merge(old: list[dict], new: list[dict]) -> list[dict]:
    by_name = {r["dataset"]: r for r in old}
    for r in new:
        if r["dataset"] in by_name:
            merged = by_name[r["dataset"]]
            runs = {**merged.get("runs", {}), **r.get("runs", {})}
            merged.update(r)
            merged["runs"] = runs
        else:
            by_name[r["dataset"]] = r
    return list(by_name.values())


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--epochs", type=int, default=3)
    ap.add_argument("--quick", action="store_true", help="skip the full fine-tunes")
    ap.add_argument("--only", action="append", metavar="SUBSTRING",
                    help="only datasets whose name contains SUBSTRING (repeatable); the other rows "
                         "of the results file are kept")
    ap.add_argument("--variant", action="append", default=[], choices=sorted(VARIANTS),
                    help="also fine-tune the last two blocks with this recipe (repeatable)")
    ap.add_argument("--no-baseline", action="store_true",
                    help="skip the default-recipe fine-tunes (only the variants)")
    ap.add_argument("--seed", type=int, default=0,
                    help="seed of the fine-tunes (shuffling, augmentation); other than 0 it is "
                         "recorded as '@seedN' in the result keys, beside the seed-0 runs")
    ap.add_argument("--output", type=Path, default=RESULTS)
    args = ap.parse_args()
    import fxtl
    from fxtl.advice import advise
    from fxtl.training.loop import finetune
    from fxtl.heads.fitting import fit_heads

    tmp = Path(tempfile.mkdtemp(prefix="fxtl-calib-"))
    cache = tmp / "cache"
    sets = {k: v for k, v in _datasets(tmp).items()
            if not args.only or any(s.lower() in k.lower() for s in args.only)}
    if not sets:
        sys.exit(f"--only {args.only} matches none of: {', '.join(_datasets(tmp))}")
    env = {**_git_state(), "python": platform.python_version(), "machine": platform.processor()
           or platform.machine(), "argv": " ".join(sys.argv[1:])}
    rows = []
    for name, (build, ft_kw) in sets.items():
        data = build()
        t0 = time.perf_counter()
        a = advise(data)
        row = {"dataset": name, "scenario": a.scenario, "similarity": a.similarity["score"],
               "size": a.size["category"], "train_images": a.size["train_images"],
               "advise_seconds": a.seconds, "measured": time.strftime("%Y-%m-%d %H:%M"), **env}
        ex = fxtl.extract(data, cache_dir=cache, progress=False)
        t_head = time.perf_counter()
        head = fit_heads(ex.cache, models=["logreg"], cache_dir=cache)[0]
        row["head_logreg"] = head.metrics["accuracy"]
        row["head_seconds"] = round(time.perf_counter() - t_head, 1)
        row["extract_seconds"] = round(ex.seconds, 1)
        row["split"] = head.metrics["split"]
        jobs = [] if args.no_baseline else [(t, "", {}) for t in (["last:2"] if args.quick else ["last:2", "all"])]
        jobs += [("last:2", v, VARIANTS[v]) for v in args.variant]
        row["runs"] = {}
        for trainable, variant, extra in jobs:
            kw = {"epochs": args.epochs, **ft_kw, **extra, "seed": args.seed}
            if kw.get("init_head") == "LOGREG_RUN":
                kw["init_head"] = head.run_dir
            ft = finetune(data, trainable=trainable, cache_dir=cache, progress=False, **kw)
            key = f"finetune_{trainable}" + (f"+{variant}" if variant else "") + \
                (f"@seed{args.seed}" if args.seed else "")
            row[key] = ft.accuracy
            row["runs"][key] = {"accuracy": ft.accuracy, "split": ft.split, "epochs": ft.epochs,
                                "best_epoch": ft.best_epoch, "stopped_early": ft.stopped_early,
                                "seconds": round(ft.seconds, 1), "bn": ft.metrics.get("bn"),
                                "image_size": (ft.metrics.get("config") or {}).get("image_size"),
                                "commit": env["commit"], "dirty_finetune_py": env["dirty_finetune_py"],
                                "argv": env["argv"],
                                "settings": {k: v for k, v in kw.items() if k != "init_head"}}
            if "init_head" in kw:
                row["runs"][key]["settings"]["init_head"] = "the logreg head of this row"
        row["seconds"] = round(time.perf_counter() - t0, 1)
        rows.append(row)
        print(json.dumps(row), flush=True)
    args.output.parent.mkdir(parents=True, exist_ok=True)
    merged = _merge(_load(args.output), rows)
    args.output.write_text(json.dumps(merged, indent=2) + "\n")
    keys = sorted({k for r in merged for k in r if k.startswith("finetune_")})
    print(f"\n{'dataset':<34} {'scen':>4} {'sim':>5} {'head':>6} " + " ".join(f"{k[9:]:>14}" for k in keys))
    for r in merged:
        print(f"{r['dataset']:<34} {r['scenario']:>4} {r['similarity']:>5.2f} {r['head_logreg']:>6.3f} "
              + " ".join(f"{r.get(k, float('nan')):>14.3f}" for k in keys))
    shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()
