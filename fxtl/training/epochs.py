"""The epoch loop: loaders per split, one training epoch, selection, checkpoint, final report.

Decoding happens in DataLoader workers, except on a CPU with at most 2 cores, where the compute
threads need both cores (benchmarks/finetune_speed.py). Under torchrun each rank trains on its
share of every batch (:func:`fxtl.training.augment.epoch_sampler`) and evaluates every
``world_size``-th image of a split; the pieces are gathered, so every rank holds the same
numbers, and only rank 0 writes.
"""
from __future__ import annotations

import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import numpy as np

from .._util import now_iso, progress_bar, versions
from ..data.discovery import ImageDataset, ImageSet, fingerprint
from ..data.images import Preprocessing, collate_images
from ..distributed import TrainingGroup, available_cores
from ..errors import DataError
from ..runtime import default_workers
from .augment import TrainImages, TrainTransform, epoch_sampler
from .checkpoints import (CHECKPOINT_FILE, CHECKPOINT_FORMAT, CHECKPOINT_VERSION, TrainState,
                          rng_state, torch_save)
from .config import FinetuneConfig
from .rows import Splits
from .trainer import Trainer, evaluate_loader, note_errors

__all__ = ["EpochRunner", "EpochTotals", "make_loader", "is_improvement",
           "MIN_DELTA"]

# A selection loss must drop by more than this to count as an improvement.
MIN_DELTA = 1e-4


def make_loader(dataset, *, batch_size: int, workers: int, device: str, sampler=None,
                seed: int = 0, persistent: bool = True):
    import torch

    kwargs: dict[str, Any] = {}
    if workers > 0:
        kwargs.update(prefetch_factor=4, persistent_workers=persistent)
    # An explicit generator: creating an iterator must not draw from the global RNG, or a
    # resumed run would see another dropout stream than an uninterrupted one.
    return torch.utils.data.DataLoader(dataset, batch_size=batch_size, sampler=sampler, shuffle=False,
                                       collate_fn=collate_images,
                                       num_workers=workers, pin_memory=device.startswith("cuda"),
                                       generator=torch.Generator().manual_seed(seed), **kwargs)


def is_improvement(acc: float, loss: float, best: dict[str, Any] | None, monitor: str) -> bool:
    """Better than ``best``: lower loss, or higher accuracy (ties broken by lower loss).

    Against the fitted start (``best["epoch"] == 0``) accuracy must be higher: the start's loss
    is that of a logistic regression whose C was chosen for accuracy (often a strong penalty,
    so soft probabilities), not comparable with a trained network's, and a tie broken by it
    would replace the start by a trained epoch that is no more accurate.
    """
    if best is None:
        return True
    if monitor == "loss":
        return loss < best["loss"] - MIN_DELTA
    higher = acc > best["accuracy"] + 1e-12
    if best.get("epoch") == 0:
        return higher
    return higher or (acc >= best["accuracy"] - 1e-12 and loss < best["loss"] - MIN_DELTA)


@dataclass
class EpochTotals:
    """One epoch's training numbers over every rank."""

    loss_sum: float
    correct: int
    seen: int
    seconds: float


class EpochRunner:
    """The data side of one fine-tune: loaders per split, one epoch, the final report.

    ``cfg`` is the resolved config; ``record`` its stored form (written into every checkpoint).
    """

    def __init__(self, images: ImageSet, splits: Splits, labels: np.ndarray, *,
                 pre: Preprocessing, cfg: FinetuneConfig, record: dict[str, Any], device: str,
                 progress: bool, group: TrainingGroup):
        self.images, self.splits, self.labels, self.cfg, self.record = images, splits, labels, cfg, record
        self.pre, self.device, self.group = pre, device, group
        self.progress = progress and group.is_primary
        workers = cfg.workers
        if workers is None:
            # On two cores the compute threads need both: a decoding worker only preempts them.
            workers = 0 if device == "cpu" and available_cores() <= 2 else default_workers(device)
        self.workers = workers
        self.paths = [str(images.abspath(s)) for s in images.samples]
        bs = self.batch_size = cfg.batch_size // group.world_size  # per process
        self.train_ds = TrainImages([self.paths[i] for i in splits.train],
                                    TrainTransform(pre, scale=cfg.crop_scale, flip=cfg.flip))
        self.sampler = epoch_sampler(len(self.train_ds), cfg.seed, rank=group.rank,
                                     world_size=group.world_size)
        self.train_loader = make_loader(self.train_ds, batch_size=bs, sampler=self.sampler,
                                        seed=cfg.seed, device=device,
                                        workers=min(workers, max(1, len(self.train_ds) // bs)))
        self.val_loader = self.eval_loader(splits.val, persistent=True) if splits.val is not None else None

    def _my_rows(self, rows: np.ndarray) -> np.ndarray:
        """This rank's share of an evaluation split (every world_size-th row)."""
        return rows[self.group.rank::self.group.world_size]

    def eval_loader(self, rows: np.ndarray, *, persistent: bool = False):
        return make_loader(ImageDataset([self.paths[i] for i in self._my_rows(rows)], self.pre),
                           batch_size=self.batch_size * 2, device=self.device,
                           workers=self.workers, persistent=persistent)

    def train_rows_loader(self):
        """The training images in order, evaluation preprocessing, every row on every rank
        (the probe's features: each rank fits the same probe)."""
        return self.rows_loader(self.splits.train)

    def rows_loader(self, rows: np.ndarray):
        """``rows``' images in order, evaluation preprocessing, every row on every rank."""
        return make_loader(ImageDataset([self.paths[i] for i in rows], self.pre),
                           batch_size=self.batch_size * 2, device=self.device,
                           workers=self.workers, persistent=False)

    def load_kept(self, trainer: Trainer, run_dir: Path) -> None:
        """Load the kept weights (``model.pt``, written by rank 0) into ``trainer``."""
        import torch

        self.group.barrier()
        trainer.net.load_state_dict(torch.load(run_dir / "model.pt", map_location=self.device,
                                               weights_only=True))

    def keep_initial(self, trainer: Trainer, state: TrainState, run_dir: Path) -> dict[str, Any] | None:
        """Epoch 0: score the fitted start on the selection split and keep it as the best so far,
        so a trained epoch is kept only if it beats it there (None: no selection split)."""
        if self.val_loader is None:
            return None
        ev = self.evaluate(trainer, self.splits.val, self.val_loader, state.errors)
        state.best = {"epoch": 0, "accuracy": ev["accuracy"], "loss": ev["loss"]}
        if self.group.is_primary:
            torch_save(trainer.net.state_dict(), run_dir / "model.pt")
        if self.progress:
            print(f"fxtl: epoch 0 (the fitted start): val loss {ev['loss']:.4f}, val accuracy "
                  f"{ev['accuracy']:.4f}", file=sys.stderr)
        return {"val_loss": ev["loss"], "val_accuracy": ev["accuracy"]}

    def _train_steps(self, trainer: Trainer, epoch: int, errors: dict[str, str],
                     on_step: Callable[[dict[str, Any]], None] | None, *,
                     phase: str = "train") -> EpochTotals:
        """Every optimizer step of one epoch; the totals of all ranks."""
        import torch

        group, cfg = self.group, self.cfg
        train_labels = self.labels[self.splits.train]
        t0 = time.perf_counter()
        loss_sum, correct, seen = 0.0, 0, 0
        desc = f"epoch {epoch}/{cfg.epochs}" if phase == "train" else f"{phase} epoch {epoch}"
        bar = progress_bar(len(self.train_ds), desc, self.progress)
        for step, (x, idx, errs) in enumerate(self.train_loader, start=1):
            keep = note_errors(idx, errs, errors, self.train_ds.paths)
            n_keep = int(keep.sum())
            bar.update(min(len(idx) * group.world_size, bar.total - bar.n))
            # Every batch advances the schedule. One that cannot train is skipped by every rank
            # together: a rank with no usable image (or a single one while BatchNorm learns batch
            # statistics: it cannot normalise one image).
            counts = group.counts(n_keep)
            if min(counts) == 0 or (min(counts) == 1 and cfg.bn == "train"):
                trainer.sched.step()
                continue
            x = x if keep.all() else x[keep]
            x = x.to(self.device, non_blocking=True).contiguous(memory_format=torch.channels_last)
            y = torch.as_tensor(train_labels[idx[keep].numpy()], device=self.device)
            loss, ok = trainer.step(x, y, sum(counts))
            trainer.sched.step()
            loss_sum, correct, seen = loss_sum + loss * n_keep, correct + ok, seen + n_keep
            bar.set_postfix(loss=f"{loss_sum / seen:.3f}", acc=f"{correct / seen:.3f}",
                            img_s=f"{seen * group.world_size / (time.perf_counter() - t0):.1f}")
            if on_step is not None:
                on_step({"epoch": epoch, "step": step, "loss": loss, "images": n_keep,
                         "phase": phase})
        bar.close()
        seconds = time.perf_counter() - t0
        # The whole batch's numbers, from every rank (and the images any rank skipped).
        everyone = group.gather((loss_sum, correct, seen, errors))
        for e in everyone:
            errors.update({k: v for k, v in e[3].items() if k not in errors})
        totals = EpochTotals(*(sum(e[i] for e in everyone) for i in range(3)), seconds=seconds)
        if totals.seen == 0:
            raise DataError(f"no training image under {self.images.root} could be decoded "
                            f"(first: {next(iter(errors.items()), ('?', '?'))}); fix the files")
        return totals

    def fit_epoch(self, trainer: Trainer, epoch: int, errors: dict[str, str], *,
                  on_step: Callable[[dict[str, Any]], None] | None,
                  phase: str = "train") -> dict[str, Any]:
        """Train epoch ``epoch`` (counted from 1) on the training rows: its history row."""
        self.sampler.set_epoch(epoch)
        trainer.train_mode()
        tot = self._train_steps(trainer, epoch, errors, on_step, phase=phase)
        return {"epoch": epoch, "train_loss": tot.loss_sum / tot.seen,
                "train_accuracy": tot.correct / tot.seen, "train_seconds": round(tot.seconds, 3),
                "train_images": int(tot.seen), "train_images_per_second": tot.seen / tot.seconds,
                "lr": trainer.opt.param_groups[-1]["lr"]}

    def train_epoch(self, trainer: Trainer, state: TrainState, run_dir: Path, *,
                    on_step: Callable[[dict[str, Any]], None] | None) -> None:
        """Train one epoch, validate, keep the best weights, checkpoint; updates ``state``."""
        epoch = state.epoch + 1
        t0 = time.perf_counter()
        row = self.fit_epoch(trainer, epoch, state.errors, on_step=on_step)
        improved = True  # without a selection split the last epoch is kept
        if self.val_loader is not None:
            ev = self.evaluate(trainer, self.splits.val, self.val_loader, state.errors)
            row.update(val_loss=ev["loss"], val_accuracy=ev["accuracy"],
                       val_seconds=round(ev["seconds"], 3))
            improved = is_improvement(ev["accuracy"], ev["loss"], state.best, self.cfg.monitor)
            if self.progress:
                print(f"fxtl: epoch {epoch}: val loss {ev['loss']:.4f}, val accuracy "
                      f"{ev['accuracy']:.4f}{' (best)' if improved else ''}", file=sys.stderr)
        state.fit_seconds += time.perf_counter() - t0
        state.history.append(row)
        state.epoch = epoch
        self._select(trainer, state, row, improved, run_dir)
        state.done = state.stopped_early or epoch == self.cfg.epochs
        if self.group.is_primary:  # one writer; every rank holds the same state
            torch_save({"format": CHECKPOINT_FORMAT, "format_version": CHECKPOINT_VERSION,
                        "config": self.record, **trainer.state(), "rng": rng_state(),
                        **state.to_dict()}, run_dir / CHECKPOINT_FILE)

    def _select(self, trainer: Trainer, state: TrainState, row: dict[str, Any], improved: bool,
                run_dir: Path) -> None:
        """Keep the weights of an improving epoch (``model.pt``); count the others, stop early."""
        epoch = state.epoch
        if improved:
            state.best = {"epoch": epoch, "accuracy": row.get("val_accuracy"),
                          "loss": row.get("val_loss")}
            state.bad_epochs = 0
            if self.group.is_primary:
                torch_save(trainer.net.state_dict(), run_dir / "model.pt")
            return
        state.bad_epochs += 1
        patience = self.cfg.patience
        if patience is not None and state.bad_epochs >= patience and epoch < self.cfg.epochs:
            state.stopped_early = True
            if self.group.is_primary:
                print(f"fxtl: early stop after epoch {epoch}: no val improvement in {patience} "
                      f"epoch(s); keeping epoch {state.best['epoch']}", file=sys.stderr)

    def evaluate(self, trainer: Trainer, rows: np.ndarray, loader, errors: dict[str, str]) -> dict[str, Any]:
        """Loss, accuracy, predictions (in ``rows`` order) and speed over ``rows``.

        Each rank evaluates its share (:meth:`_my_rows`); the pieces are gathered, so every
        rank returns the numbers of the whole split.
        """
        mine = self._my_rows(rows)
        ev = evaluate_loader(trainer, loader, self.labels[mine], errors, [self.paths[i] for i in mine])
        everyone = self.group.gather((ev["preds"], ev["loss_sum"], ev["n"], ev["seconds"], errors))
        preds = np.full(len(rows), -1, dtype=np.int64)
        for r, (p, *_rest) in enumerate(everyone):
            preds[r::self.group.world_size] = p
        for e in everyone:
            errors.update({k: v for k, v in e[4].items() if k not in errors})
        n = sum(e[2] for e in everyone)
        seconds = max(e[3] for e in everyone)
        good = preds >= 0
        labels = self.labels[rows]
        return {"loss": sum(e[1] for e in everyone) / max(n, 1),
                "accuracy": float((preds[good] == labels[good]).mean()) if n else 0.0,
                "preds": preds, "n": n, "seconds": seconds,
                "images_per_second": len(rows) / seconds if seconds > 0 else 0.0}

    def report(self, trainer: Trainer, state: TrainState, run_dir: Path) -> dict[str, Any]:
        """Metrics of the kept weights on the reported split (the ``metrics.json`` content)."""
        import torch

        from ..report.metrics import classification_metrics, write_predictions

        model_file = run_dir / "model.pt"
        self.group.barrier()  # rank 0 has written model.pt
        if state.best is not None:
            trainer.net.load_state_dict(torch.load(model_file, map_location=self.device,
                                                   weights_only=True))
        elif self.group.is_primary:  # epochs == 0: the initial model is the result
            torch_save(trainer.net.state_dict(), model_file)
        rows, errors = self.splits.report, state.errors
        # Reporting on the selection split: reuse its loader (its workers are running already).
        loader = self.val_loader if rows is self.splits.val else self.eval_loader(rows)
        ev = self.evaluate(trainer, rows, loader, errors)
        good = ev["preds"] >= 0
        if not good.any():
            raise DataError(f"none of the {self.splits.report_name} images under "
                            f"{self.images.root} could be decoded; fix the files")
        m = classification_metrics(self.labels[rows][good], ev["preds"][good], self.images.class_names)
        if self.group.is_primary:  # per-image results: what compare's paired test reads
            kept = np.asarray(rows)[good]
            write_predictions(run_dir, paths=[self.images.samples[i].path for i in kept],
                              y_true=self.labels[kept], y_pred=ev["preds"][good],
                              class_names=self.images.class_names, split=self.splits.report_name)
        return self._metrics(trainer, state, m, ev, run_dir)

    def _metrics(self, trainer: Trainer, state: TrainState, m: dict[str, Any], ev: dict[str, Any],
                 run_dir: Path) -> dict[str, Any]:
        history, cfg, bb = state.history, self.cfg, trainer.bb
        train_time = sum(h["train_seconds"] for h in history)
        return {
            "kind": "finetune", "model": f"finetune:{cfg.trainable}", "backbone": bb.spec.name,
            "architecture": bb.spec.arch, "base_weights_sha256": bb.weights_sha256,
            "dataset": self.images.name, "dataset_root": str(self.images.root),
            # Like a cache's fingerprint: the data plus what shapes the result.
            "dataset_fingerprint": fingerprint(self.images, backbone=bb.spec.name),
            "data_fingerprint": self.record["data_fingerprint"], "split": self.splits.report_name,
            "selection_split": self.splits.val_name or None, **m,
            "fit_seconds": round(state.fit_seconds, 3), "epochs": int(state.epoch),
            "best_epoch": int(state.best["epoch"]) if state.best else 0,
            "stopped_early": bool(state.stopped_early),
            "trainable_params": int(trainer.trainable_params),
            "total_params": int(sum(p.numel() for p in trainer.net.parameters())),
            "train_images_per_second": (sum(h["train_images"] for h in history) / train_time
                                        if train_time > 0 else 0.0),
            "inference_images_per_second": ev["images_per_second"],
            "history": history, "n_train": int(len(self.splits.train)),
            "errors": [{"path": p, "reason": r} for p, r in sorted(state.errors.items())],
            "notes": list(self.splits.notes), "bn": cfg.bn, "precision": trainer.precision,
            "device": self.device, "world_size": self.group.world_size,
            "batch_size_per_process": self.batch_size, "config": self.record, "run_dir": str(run_dir),
            "created": now_iso(),
            "versions": versions(),
        }
