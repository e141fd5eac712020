"""Fine-tuning speed: fxtl's training loop against the PyTorch transfer-learning tutorial's.

    .venv/bin/python benchmarks/finetune_speed.py [--data ../shared/datasets/hymenoptera]
                                                  [--epochs 2] [--rounds 2] [--batch-size 32]

Same data (the train split), same network (lite0 with a new 2-class classifier, every
parameter trained), same batch size, in one process run:

* tutorial -- the loop of https://pytorch.org/tutorials/beginner/transfer_learning_tutorial.html:
  ``ImageFolder`` with torchvision ``RandomResizedCrop(224)``, ``RandomHorizontalFlip``,
  ``ToTensor``, ``Normalize`` on PIL images, ``DataLoader(shuffle=True, num_workers=0)``, fp32,
  NCHW, ``SGD(lr=0.001, momentum=0.9)``, ``CrossEntropyLoss``, BatchNorm in train mode.
* fxtl -- ``fxtl.finetune(data, trainable="all", epochs=E)`` with its defaults (bf16 autocast
  where the CPU runs it natively, depthwise convolutions in fp32 while training, channels_last,
  crop + resize in one resampling, decoding in the main process on a 2-core CPU (workers
  elsewhere), BatchNorm statistics frozen below 200 images per class).

Measured: training images/s over the epochs' training phase (model loading and fxtl's
validation passes excluded). Rounds alternate tutorial and fxtl so both see the same machine
load. The headline is the ratio of median per-epoch rates (robust to one epoch slowed by
another process on a shared machine); the ratio of total images / total training seconds over
all rounds and epochs (warm-up included) is reported too.
Writes benchmarks/results/finetune_speed.json.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
DEFAULT_DATA = HERE.parent.parent / "shared" / "datasets" / "hymenoptera"


def tutorial_epochs(data: Path, epochs: int, batch_size: int, seed: int) -> list[dict]:
    """The tutorial's train phase, ``epochs`` times; images/s per epoch."""
    import timm
    import torch.nn as nn
    from torchvision import datasets, transforms

    from fxtl.backbones.registry import get_backbone
    from fxtl.backbones.weights import map_by_order, package_file, torch_load

    torch.manual_seed(seed)
    model = timm.create_model("tf_efficientnet_lite0", pretrained=False)
    model.load_state_dict(map_by_order(torch_load(package_file(get_backbone("lite0"))), model))
    model.classifier = nn.Linear(model.classifier.in_features, 2)
    tf = transforms.Compose([transforms.RandomResizedCrop(224), transforms.RandomHorizontalFlip(),
                             transforms.ToTensor(), transforms.Normalize([0.5] * 3, [0.5] * 3)])
    ds = datasets.ImageFolder(str(data / "train"), tf)
    loader = torch.utils.data.DataLoader(ds, batch_size=batch_size, shuffle=True, num_workers=0)
    criterion = nn.CrossEntropyLoss()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.001, momentum=0.9)
    out = []
    for _ in range(epochs):
        model.train()
        t0 = time.perf_counter()
        n, correct = 0, 0
        for inputs, labels in loader:
            optimizer.zero_grad()
            with torch.set_grad_enabled(True):
                outputs = model(inputs)
                loss = criterion(outputs, labels)
                loss.backward()
                optimizer.step()
            n += len(inputs)
            correct += int((outputs.argmax(1) == labels).sum())
        seconds = time.perf_counter() - t0
        out.append({"images": n, "seconds": seconds, "images_per_second": n / seconds,
                    "train_accuracy": correct / n})
    return out


def fxtl_epochs(data: Path, epochs: int, batch_size: int, seed: int, cache_dir: Path) -> tuple[list[dict], dict]:
    from fxtl.training.loop import finetune

    res = finetune(data, trainable="all", epochs=epochs, batch_size=batch_size, seed=seed,
                   patience=None, cache_dir=cache_dir, progress=False)
    rows = [{"images": h["train_images"], "seconds": h["train_seconds"],
             "images_per_second": h["train_images_per_second"], "train_accuracy": h["train_accuracy"],
             "val_accuracy": h.get("val_accuracy")} for h in res.metrics["history"]]
    info = {k: res.metrics[k] for k in ("precision", "device", "bn", "config")}
    info["workers"] = _fxtl_workers()
    return rows, info


def _fxtl_workers() -> int:
    from fxtl.distributed import available_cores
    from fxtl.features.extraction import default_workers

    return 0 if available_cores() <= 2 else default_workers("cpu")


def summary(rows: list[dict]) -> dict:
    images = sum(r["images"] for r in rows)
    seconds = sum(r["seconds"] for r in rows)
    return {"images_per_second": images / seconds, "median_epoch_images_per_second":
            statistics.median(r["images_per_second"] for r in rows), "epochs": len(rows),
            "images": images, "seconds": round(seconds, 2)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data", type=Path, default=DEFAULT_DATA)
    ap.add_argument("--epochs", type=int, default=2, help="Epochs per side per round.")
    ap.add_argument("--rounds", type=int, default=2, help="Alternating tutorial/fxtl rounds.")
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--output", type=Path, default=HERE / "results" / "finetune_speed.json")
    args = ap.parse_args()
    # What the `fxtl` command sets for the process (the library leaves it alone): both sides get it.
    from fxtl.runtime import keep_freed_memory

    keep_freed_memory()
    if not (args.data / "train").is_dir():
        sys.exit(f"{args.data}/train not found; pass --data DIR with train/<class>/ folders")

    tutorial, fxtl_rows, info = [], [], {}
    with tempfile.TemporaryDirectory() as tmp:
        for r in range(args.rounds):
            t = tutorial_epochs(args.data, args.epochs, args.batch_size, seed=r)
            f, info = fxtl_epochs(args.data, args.epochs, args.batch_size, seed=r, cache_dir=Path(tmp))
            tutorial += t
            fxtl_rows += f
            print(f"round {r + 1}: tutorial {[round(x['images_per_second'], 1) for x in t]} img/s, "
                  f"fxtl {[round(x['images_per_second'], 1) for x in f]} img/s", file=sys.stderr)
    out = {
        "machine": {"cpu": platform.processor() or platform.machine(), "cores": os.cpu_count(),
                    "torch": torch.__version__, "threads": torch.get_num_threads(),
                    "loadavg_at_end": os.getloadavg()},
        "data": str(args.data), "batch_size": args.batch_size, "epochs_per_round": args.epochs,
        "rounds": args.rounds, "fxtl_settings": info,
        "tutorial": {**summary(tutorial), "per_epoch": tutorial},
        "fxtl": {**summary(fxtl_rows), "per_epoch": fxtl_rows},
    }
    out["speedup"] = out["fxtl"]["images_per_second"] / out["tutorial"]["images_per_second"]
    out["speedup_median_epoch"] = (out["fxtl"]["median_epoch_images_per_second"]
                                   / out["tutorial"]["median_epoch_images_per_second"])
    out["target"] = ">= 2x"
    print(f"tutorial loop (fp32, no workers): {out['tutorial']['images_per_second']:6.1f} img/s "
          f"(median epoch {out['tutorial']['median_epoch_images_per_second']:.1f})")
    print(f"fxtl finetune ({info['precision']}, {info['workers']} worker(s), BatchNorm {info['bn']}): "
          f"{out['fxtl']['images_per_second']:6.1f} img/s (median epoch "
          f"{out['fxtl']['median_epoch_images_per_second']:.1f})")
    print(f"speed-up: {out['speedup_median_epoch']:.2f}x median epoch (target >= 2x), "
          f"{out['speedup']:.2f}x overall; load average at end {os.getloadavg()[0]:.1f}")
    args.output.parent.mkdir(parents=True, exist_ok=True)
    args.output.write_text(json.dumps(out, indent=2) + "\n")


if __name__ == "__main__":
    main()
