"""Does the default fine-tune land below the head it could start from?  (issue 23, item 4)

    .venv/bin/python benchmarks/finetune_default.py [--only NAME ...] [--epochs 5]
        [--image-size PX] [--cap NAME=N ...] [--zero] [--output FILE [--append]]

For each dataset, on one train / selection / report split:

* **the head**: the logistic-regression probe the default fine-tune starts from, alone:
  ``finetune(epochs=0)`` (a standardised logistic regression on the network's features of the
  training images, C by 5-fold CV on them, folded into the classifier) scored on the reported
  split. It is a logreg head on exactly the fine-tune's features (same input size, same
  precision) and training rows;
* **the default fine-tune**: ``finetune(epochs=5)`` with every other option at its default (all
  blocks train, from that probe; epoch 0 kept unless a trained epoch beats it on the selection
  split);
* with ``--zero`` also the recipe before: the same run from a zero classifier (``init="zero"``).

Splits: hymenoptera keeps its own folders (train, val) as a user gets them (the layout of the
issue's numbers): ``val`` is reported on, and the fine-tune selects on a hold-out of train
(``holdout-selection``; results written before that change kept the last epoch).
The class-folder sets (trashnet, chest_xray, omniglot) and scikit-learn's digits get the
calibration's 60/15/25 train/val/test split per class (benchmarks/advise_calibration.py), test
reported, val selecting. ``--cap NAME=N`` first draws N images per class (hymenoptera: N training
images per class; its val folder stays whole). No split is both learned from and selected or
reported on.

Writes benchmarks/results/finetune_default.json after every dataset (a run cut short keeps what
it measured) and prints the table of docs/finetune.md.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
sys.path.insert(0, str(HERE))

import advise_calibration as calib  # noqa: E402  (the calibration's splits)

RESULTS = HERE / "results" / "finetune_default.json"
DATASETS = ("hymenoptera", "digits", "omniglot", "chest_xray", "trashnet")


def _hymenoptera(out: Path, cap: int | None, seed: int) -> Path:
    """Hymenoptera in its own train/val layout; ``cap`` training images per class (val whole)."""
    import numpy as np

    from fxtl.data.discovery import discover

    src = calib.SHARED / "hymenoptera"
    if not cap:
        return src
    images = discover(src)
    rng = np.random.default_rng(seed)
    lines = ["path,label,split"]
    for label, cls in enumerate(images.class_names):
        train = [s for s in images.samples if s.label == label and s.split == "train"]
        keep = sorted(rng.permutation(len(train))[:cap])
        lines += [f"{train[i].path},{cls},train" for i in keep]
        lines += [f"{s.path},{cls},val" for s in images.samples if s.label == label and s.split == "val"]
    root = out / "hymenoptera"
    calib._link_tree(src, root)
    manifest = root / "hymenoptera.csv"
    manifest.write_text("\n".join(lines) + "\n")
    return manifest


def _data(name: str, out: Path, cap: int | None, seed: int) -> Path:
    if name == "hymenoptera":
        return _hymenoptera(out, cap, seed)
    if name == "digits":
        from fxtl.data.samples import write_digits

        return write_digits(out / "digits", classes=10, per_class=cap or 60, val_fraction=0.15,
                            test_fraction=0.25, seed=seed)
    return calib.split_manifest(name, out, seed=seed, per_class=cap)


def _summary(res) -> dict:
    m = res.metrics
    return {"accuracy": res.accuracy, "accuracy_ci95": m.get("accuracy_ci95"), "n": m.get("n"),
            "split": res.split, "selection_split": m.get("selection_split"),
            "best_epoch": res.best_epoch, "epochs": res.epochs, "stopped_early": res.stopped_early,
            "seconds": round(res.seconds, 1), "initial": m.get("initial"),
            "init_probe": m.get("init_probe"), "lr": m["config"]["lr"],
            "image_size": m["config"]["image_size"], "n_train": m.get("n_train"),
            "history": [{k: h.get(k) for k in ("epoch", "train_accuracy", "val_accuracy")}
                        for h in m.get("history", [])], "run_dir": str(res.run_dir)}


def run_dataset(name: str, *, out: Path, cache: Path, epochs: int, image_size: int | None,
                cap: int | None, seed: int, zero: bool, log) -> dict:
    from fxtl.training.loop import finetune

    data = _data(name, out, cap, seed)
    common = dict(seed=seed, cache_dir=cache, progress=False, image_size=image_size)
    t0 = time.perf_counter()
    head = finetune(data, epochs=0, **common)
    log(f"{name}: head (probe) {head.accuracy:.3f} on {head.split} ({head.seconds:.0f} s)")
    ft = finetune(data, epochs=epochs, **common)
    log(f"{name}: default fine-tune {ft.accuracy:.3f} (kept epoch {ft.best_epoch}, "
        f"{ft.seconds:.0f} s)")
    row = {"dataset": name, "data": str(data), "cap_per_class": cap, "head": _summary(head),
           "default": _summary(ft), "gap_points": round(100 * (ft.accuracy - head.accuracy), 1)}
    if zero:
        z = finetune(data, epochs=epochs, init="zero", **common)
        log(f"{name}: zero-start fine-tune {z.accuracy:.3f} ({z.seconds:.0f} s)")
        row["zero_start"] = _summary(z)
    row["within_1_point"] = row["gap_points"] >= -1.0
    row["seconds"] = round(time.perf_counter() - t0, 1)
    return row


def _table(rows: list[dict]) -> str:
    lines = ["| data | train images | reported on (n) | head (probe), acc [95%] | default fine-tune, "
             "acc [95%] (kept epoch) | gap (points) | zero start (before) |",
             "|---|---|---|---|---|---|---|"]
    for r in rows:
        h, d, z = r["head"], r["default"], r.get("zero_start")

        def acc(s):
            ci = s.get("accuracy_ci95") or [float("nan")] * 2
            return f"{s['accuracy']:.3f} [{ci[0]:.2f}, {ci[1]:.2f}]"

        lines.append(f"| {r['dataset']} | {d['n_train']} | {d['split']} ({d['n']}) | {acc(h)} | "
                     f"{acc(d)} ({d['best_epoch']}/{d['epochs']}) | {r['gap_points']:+.1f} | "
                     f"{acc(z) if z else '-'} |")
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--only", action="append", choices=DATASETS, default=None)
    ap.add_argument("--epochs", type=int, default=5)
    ap.add_argument("--image-size", type=int, default=None,
                    help="Input side of every run [default: the backbone's, 224 for lite0].")
    ap.add_argument("--cap", action="append", default=[], metavar="NAME=N",
                    help="At most N images per class of dataset NAME (hymenoptera: training images).")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--zero", action="store_true", help="Also run the zero-start recipe (before).")
    ap.add_argument("--cache-dir", type=Path, default=None)
    ap.add_argument("--output", type=Path, default=RESULTS)
    ap.add_argument("--append", action="store_true",
                    help="Keep the datasets already in --output (same settings) and add these.")
    args = ap.parse_args()
    caps = {k: int(v) for k, v in (c.split("=", 1) for c in args.cap)}

    def log(msg: str) -> None:
        print(f"[{time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)

    tmp = Path(tempfile.mkdtemp(prefix="fxtl-ftdefault-"))
    cache = args.cache_dir or tmp / "cache"
    result = {"settings": {"epochs": args.epochs, "image_size": args.image_size, "caps": caps,
                           "seed": args.seed, "backbone": "lite0", "precision": "auto (bf16 on this CPU)",
                           "command": " ".join(["benchmarks/finetune_default.py", *sys.argv[1:]])},
              "machine": {"cpu": platform.machine(), "cores": os.cpu_count()}, "datasets": []}
    if args.append and args.output.is_file():
        before = json.loads(args.output.read_text())
        result["datasets"] = [r for r in before["datasets"] if r["dataset"] not in (args.only or ())]
        result["settings"]["command"] = [before["settings"]["command"], result["settings"]["command"]]
    for name in args.only or DATASETS:
        row = run_dataset(name, out=tmp, cache=cache, epochs=args.epochs, image_size=args.image_size,
                          cap=caps.get(name), seed=args.seed, zero=args.zero, log=log)
        result["datasets"].append(row)
        result["machine"]["loadavg_at_end"] = os.getloadavg()
        args.output.parent.mkdir(parents=True, exist_ok=True)
        args.output.write_text(json.dumps(result, indent=2) + "\n")
    print(_table(result["datasets"]))


if __name__ == "__main__":
    main()
