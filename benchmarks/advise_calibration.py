"""Does `fxtl advise` recommend what actually wins?  (issue 5's calibration table)

    .venv/bin/python benchmarks/advise_calibration.py [--epochs 3] [--quick]

For several real datasets (hymenoptera photos: similar to ImageNet; scikit-learn's handwritten
digits: different; each also subsampled to vary the size) this runs `advise`, then measures what
each path really achieves on the same splits: the best head on frozen features (logreg), a
fine-tune of the last two blocks and a full fine-tune. Writes benchmarks/results/advise_calibration.json
and prints the table that docs/advise.md reports.
"""
from __future__ import annotations

import argparse
import json
import shutil
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
HYMENOPTERA = HERE.parent.parent / "shared" / "datasets" / "hymenoptera"


def subsample_manifest(root: Path, per_class: int, out: Path, seed: int = 0) -> Path:
    """A CSV manifest with ``per_class`` training images per class and every val image."""
    import numpy as np

    from fxtl.data import discover

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


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--epochs", type=int, default=3)
    ap.add_argument("--quick", action="store_true", help="skip the full fine-tunes")
    args = ap.parse_args()
    import fxtl
    from fxtl.advise import advise
    from fxtl.datasets import write_digits
    from fxtl.finetune import finetune
    from fxtl.heads import fit_heads

    tmp = Path(tempfile.mkdtemp(prefix="fxtl-calib-"))
    cache = tmp / "cache"
    sets = {
        "hymenoptera (all, 245 train)": (HYMENOPTERA, {}),
        "hymenoptera (10/class)": (subsample_manifest(HYMENOPTERA, 10, tmp), {}),
        "digits (10 classes, 1258 train)": (write_digits(tmp / "digits"), {"image_size": 128}),
        "digits (10 classes, 10/class)": (write_digits(tmp / "digits10", per_class=25, val_fraction=0.6),
                                          {"image_size": 128}),
    }
    rows = []
    for name, (data, ft_kw) in sets.items():
        t0 = time.perf_counter()
        a = advise(data)
        row = {"dataset": name, "scenario": a.scenario, "similarity": a.similarity["score"],
               "size": a.size["category"], "train_images": a.size["train_images"],
               "advise_seconds": a.seconds}
        ex = fxtl.extract(data, cache_dir=cache, progress=False)
        head = fit_heads(ex.cache, models=["logreg"], cache_dir=cache)[0]
        row["head_logreg"] = head.metrics["accuracy"]
        row["split"] = head.metrics["split"]
        for trainable in (["last:2"] if args.quick else ["last:2", "all"]):
            ft = finetune(data, trainable=trainable, epochs=args.epochs, cache_dir=cache,
                          progress=False, **ft_kw)
            row[f"finetune_{trainable}"] = ft.accuracy
        row["seconds"] = time.perf_counter() - t0
        rows.append(row)
        print(json.dumps(row))
    (HERE / "results").mkdir(exist_ok=True)
    (HERE / "results" / "advise_calibration.json").write_text(json.dumps(rows, indent=2) + "\n")
    print(f"\n{'dataset':<34} {'scen':>4} {'sim':>5} {'head':>6} {'last:2':>7} {'all':>6}")
    for r in rows:
        print(f"{r['dataset']:<34} {r['scenario']:>4} {r['similarity']:>5.2f} {r['head_logreg']:>6.3f} "
              f"{r.get('finetune_last:2', float('nan')):>7.3f} {r.get('finetune_all', float('nan')):>6.3f}")
    shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()
