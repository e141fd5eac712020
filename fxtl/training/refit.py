"""Retrain the epoch a hold-out of train chose on every train image (``refit``).

Where a fine-tune selects on a hold-out carved from its own train split (``holdout-selection``:
train + val data with val reported, train + test, train only), the trained epoch k that the
hold-out keeps learned from the rows beside it only. As ``fit-head`` refits the head its
selection chose on every row it may learn from, the refit trains the same recipe again on all of
them and reports that model:

* the same start: ``start.pt``, the network and fitted classifier (probe, ``init_head`` or zero)
  the first epoch began from, written before it;
* the same seed, optimizer, rates and augmentation;
* the same schedule per epoch: warm-up over ``warmup_epochs``, then the cosine over ``epochs``
  epochs, counted in the refit's own (more) steps an epoch and stopped after epoch k, so each
  refit epoch ends at the rate the original run's epoch of that number ended at;
* the training rows plus the hold-out, for exactly k epochs. Nothing is selected on the result
  (no rows are left to select on), and the reported split takes no part.

After each refit epoch its state is checkpointed (``checkpoint-refit.pt``); ``model.pt`` is
replaced only once the refit has finished, so an interrupted refit resumes where it stopped (or,
without its checkpoint, restarts from ``start.pt``) and a half-refitted model is never reported.
Cost: k more epochs over every train image (1 / (1 - test_size) of a selection epoch each).
"""
from __future__ import annotations

import sys
import time
from dataclasses import replace
from pathlib import Path
from typing import Any, Callable

import numpy as np

from ..errors import FxtlError
from .checkpoints import (CHECKPOINT_FORMAT, CHECKPOINT_VERSION, REFIT_CHECKPOINT_FILE, START_FILE,
                          TrainState, check_same_settings, load_checkpoint, rng_state,
                          set_rng_state, torch_save)
from .config import FinetuneConfig
from .epochs import EpochRunner
from .rows import Splits, selects_on_holdout
from .trainer import Trainer

__all__ = ["REFIT_PHASE", "needs_start", "refit_applies", "refit_rows", "save_start",
           "refit_kept_epoch", "refit_summary"]

# ``phase`` of the refit's checkpoint and of ``on_step``'s calls during the refit.
REFIT_PHASE = "refit"


def refit_summary(metrics: dict[str, Any]) -> dict[str, Any] | None:
    """A run's ``metrics["refit"]`` without its per-epoch history (what ``--json`` and the
    benchmarks show), or None when the run made no refit."""
    refit = metrics.get("refit")
    return {k: v for k, v in refit.items() if k != "history"} if refit else None


def needs_start(cfg: FinetuneConfig, splits: Splits) -> bool:
    """May this run refit a kept epoch (so it must keep its start, ``start.pt``)?"""
    return cfg.refit and cfg.epochs >= 1 and selects_on_holdout(splits)


def refit_applies(cfg: FinetuneConfig, splits: Splits, state: TrainState) -> bool:
    """Did the selection hold-out keep a trained epoch that the refit retrains?"""
    return needs_start(cfg, splits) and state.best is not None and int(state.best["epoch"]) >= 1


def refit_rows(splits: Splits) -> np.ndarray:
    """Every train image of the plan: the training rows and the selection hold-out, sorted."""
    return np.sort(np.concatenate([splits.train, splits.val]))


def save_start(trainer: Trainer, run_dir: Path, *, primary: bool) -> None:
    """Keep the network the first epoch starts from (``start.pt``); a fresh run's refit state,
    if an earlier attempt left one, is stale and goes."""
    if primary:
        torch_save(trainer.net.state_dict(), run_dir / START_FILE)
        (run_dir / REFIT_CHECKPOINT_FILE).unlink(missing_ok=True)


def refit_kept_epoch(run: EpochRunner, trainer: Trainer, state: TrainState, run_dir: Path, *,
                     on_step: Callable[[dict[str, Any]], None] | None) -> dict[str, Any] | None:
    """Retrain the kept epoch k on every train image (see the module docstring) and save it as
    ``model.pt``; what was done, or None when the rule does not apply (no hold-out of train,
    ``refit`` off, or the start, epoch 0, was kept).

    ``state`` is the finished selection run's; decode errors met during the refit join its
    ``errors``.
    """
    cfg, group = run.cfg, run.group
    if not refit_applies(cfg, run.splits, state):
        return None
    k = int(state.best["epoch"])
    rows = refit_rows(run.splits)
    split = f"train+{run.splits.val_name}"
    everything = EpochRunner(run.images, replace(run.splits, train=rows, val=None, val_name=""),
                             run.labels, pre=run.pre, cfg=cfg, record=run.record,
                             device=run.device, progress=run.progress, group=group)
    trainer.restart(len(everything.train_loader))
    refit = _refit_state(trainer, run_dir, record=run.record, epochs=k, n_rows=len(rows),
                         seed=cfg.seed, device=run.device, group=group)
    if refit.epoch < k and group.is_primary:
        print(f"fxtl: {run.splits.val_name} kept epoch {k}, trained on the {len(run.splits.train)} "
              f"images beside it; refit: training it again from the same start on all "
              f"{len(rows)} train images for {k} epoch(s) (the {cfg.epochs}-epoch schedule, "
              f"stopped after epoch {k})", file=sys.stderr)
    while refit.epoch < k:
        epoch = refit.epoch + 1
        t0 = time.perf_counter()
        row = everything.fit_epoch(trainer, epoch, refit.errors, on_step=on_step, phase=REFIT_PHASE)
        refit.fit_seconds += time.perf_counter() - t0
        refit.history.append(row)
        refit.epoch, refit.done = epoch, epoch == k
        if group.is_primary:
            torch_save({"format": CHECKPOINT_FORMAT, "format_version": CHECKPOINT_VERSION,
                        "phase": REFIT_PHASE, "config": run.record, "refit_epochs": k,
                        "refit_rows": int(len(rows)), **trainer.state(), "rng": rng_state(),
                        **refit.to_dict()}, run_dir / REFIT_CHECKPOINT_FILE)
    if group.is_primary:  # the refit is whole: now it is the kept model
        torch_save(trainer.net.state_dict(), run_dir / "model.pt")
    for path, reason in refit.errors.items():
        state.errors.setdefault(path, reason)
    images = sum(h["train_images"] for h in refit.history)
    return {"epoch_chosen": k, "epochs": k, "refit_rows": int(len(rows)), "refit_split": split,
            "trained_rows": int(len(run.splits.train)), "selection_rows": int(len(run.splits.val)),
            "schedule": f"the {cfg.epochs}-epoch schedule ({cfg.warmup_epochs:g} warm-up, cosine) "
                        f"stopped after epoch {k}",
            "seconds": round(refit.fit_seconds, 3),
            "train_images_per_second": images / refit.fit_seconds if refit.fit_seconds > 0 else 0.0,
            "history": refit.history}


def _refit_state(trainer: Trainer, run_dir: Path, *, record: dict[str, Any], epochs: int,
                 n_rows: int, seed: int, device: str, group) -> TrainState:
    """The refit's state: from its checkpoint when it is this refit's (loading the trainer and
    RNG states), else a fresh one with ``trainer`` set back to the start (``start.pt``)."""
    import torch

    path = run_dir / REFIT_CHECKPOINT_FILE
    if path.is_file():
        ckpt = load_checkpoint(path)
        check_same_settings(ckpt.get("config", {}), record, source=path)
        if (ckpt.get("phase"), ckpt.get("refit_epochs"), ckpt.get("refit_rows")) == \
                (REFIT_PHASE, epochs, n_rows):
            trainer.load_state(ckpt)
            set_rng_state(ckpt["rng"])
            refit = TrainState.from_checkpoint(ckpt)
            if group.is_primary:
                print(f"fxtl: resuming the refit of {run_dir.name} after its epoch "
                      f"{refit.epoch}/{epochs}", file=sys.stderr)
            return refit
        if group.is_primary:
            print(f"fxtl: {path.name} is not this run's refit ({ckpt.get('refit_epochs')} "
                  f"epoch(s) on {ckpt.get('refit_rows')} images); starting the refit afresh",
                  file=sys.stderr)
    group.barrier()  # rank 0 wrote start.pt
    start = run_dir / START_FILE
    if not start.is_file():
        raise FxtlError(f"{start} is missing, so the refit cannot start from the network this run "
                        "started from; start a new run (or one with refit=False, --no-refit)")
    trainer.net.load_state_dict(torch.load(start, map_location=device, weights_only=True))
    torch.manual_seed(seed)  # the refit's dropout stream, as the run's own was seeded
    return TrainState()
