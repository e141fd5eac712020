"""The fine-tune command: finetune."""
from __future__ import annotations

import re
from pathlib import Path

import click

from ..training.config import BN_FROZEN_BELOW, BN_MODES, INITS, MONITORS, OPTIMIZERS
from .common import (SEED, backbone_value, cache_dir_option, device_options, emit, handle_errors,
                     json_option, log, prepare_compute_process, resolve_cache_dir, show_progress)


class _Trainable(click.ParamType):
    """``all``, ``head`` or ``last:N`` (N checked against the backbone by the library)."""

    name = "all|head|last:N"

    def convert(self, value, param, ctx):
        text = str(value).strip().lower()
        if text in ("all", "head") or re.fullmatch(r"last:[1-9]\d*", text):
            return text
        self.fail(f"{value!r} is not all, head or last:N (e.g. last:2)", param, ctx)


@click.command()
@click.argument("data_dir", type=click.Path(exists=True, path_type=Path))
@click.option("--backbone", "-b", default="lite0", show_default=True, callback=backbone_value,
              help="Registry name, torchvision name, timm:<name>, ARCH=PATH, or a finetune run folder.")
@click.option("--trainable", type=_Trainable(), default="all", show_default=True,
              help="What trains: all, head (the new classifier), or last:N (last N blocks + classifier).")
@click.option("--epochs", type=click.IntRange(min=0), default=10, show_default=True,
              help="Epochs (0: only evaluate the initial model, e.g. an --init-head probe).")
@click.option("--lr", type=click.FloatRange(min=0, min_open=True), default=None,
              help="Peak learning rate of the classifier [default: 5e-4 adamw, 1e-2 sgd; 0.4x "
                   "that from the probe].")
@click.option("--batch-size", type=click.IntRange(min=1), default=32, show_default=True,
              help="Images per optimizer step; under torchrun, of all processes together "
                   "(each takes batch-size / world-size).")
@click.option("--image-size", type=click.IntRange(min=16), default=None,
              help="Input side in pixels [default: the backbone's, 224 for lite0].")
@click.option("--optimizer", type=click.Choice(OPTIMIZERS), default="adamw", show_default=True,
              help="AdamW, or SGD with Nesterov momentum.")
@click.option("--weight-decay", type=click.FloatRange(min=0), default=0.05, show_default=True,
              help="On weights only (not biases or norm layers).")
@click.option("--momentum", type=click.FloatRange(0, 1), default=0.9, show_default=True, help="SGD only.")
@click.option("--label-smoothing", type=click.FloatRange(0, 1, max_open=True), default=0.1, show_default=True)
@click.option("--warmup-epochs", type=click.FloatRange(min=0), default=1.0, show_default=True,
              help="Linear warm-up, then cosine decay (per step).")
@click.option("--lr-decay", type=click.FloatRange(0, 1, min_open=True), default=0.5, show_default=True,
              help="Discriminative learning rates: each block down from the classifier trains at "
                   "this factor of the one above (1: the same rate everywhere).")
@click.option("--bn", type=click.Choice(BN_MODES), default="auto", show_default=True,
              help=f"BatchNorm statistics; auto freezes them when a class has under "
                   f"{BN_FROZEN_BELOW} training images.")
@click.option("--patience", type=click.IntRange(min=0), default=3, show_default=True,
              help="Early stopping: epochs without improvement on the selection split (val "
                   "when a test split reports, else a hold-out of train; none with "
                   "--no-selection-holdout) (0: never stop early).")
@click.option("--monitor", type=click.Choice(MONITORS), default="accuracy", show_default=True,
              help="Selection-split metric for early stopping and the kept epoch (ties: lower "
                   "loss; the fitted start gives way only to a higher accuracy).")
@click.option("--crop-scale", type=click.FloatRange(0, 1, min_open=True), nargs=2, default=(0.25, 1.0),
              show_default=True, help="Area fraction range of the random resized crop.")
@click.option("--no-flip", "no_flip", is_flag=True,
              help="No random horizontal flips (for data where a mirror image is another class: digits, text).")
@click.option("--init", type=click.Choice(INITS), default="probe", show_default=True,
              help="How the classifier starts: probe = a logistic regression fitted on the "
                   "training images' features (LP-FT, Kumar et al. 2022; kept as epoch 0 unless "
                   "an epoch beats it on the selection split); zero = a zero classifier.")
@click.option("--init-head", type=click.Path(exists=True, path_type=Path), default=None,
              help="Start the classifier from a fit-head logreg run refitted on the training "
                   "images (LP-FT with that head's settings; overrides --init).")
@click.option("--no-selection-holdout", "no_selection_holdout", is_flag=True,
              help="Where DATA_DIR has no val split to select on (train only, or train + one "
                   "reported split): train on every train image and keep the last epoch, "
                   "instead of selecting the epoch (the probe's start included) on a "
                   "--test-size hold-out of train.")
@click.option("--no-refit", "no_refit", is_flag=True,
              help="Where the epoch is selected on a hold-out of train: report the kept epoch as "
                   "trained beside the hold-out, instead of training it again from the same start "
                   "on every train image for as many epochs (the default; about that many more "
                   "epochs of time).")
@click.option("--seed", type=SEED, default=0, show_default=True,
              help="Seeds the classifier, shuffling, augmentation and hold-out.")
@click.option("--test-size", type=click.FloatRange(0, 1, min_open=True, max_open=True), default=0.2,
              show_default=True, help="Hold-out fraction of train: the reported one when "
                   "DATA_DIR has only train, and the selection one.")
@device_options
@click.option("--workers", type=click.IntRange(min=0), default=None,
              help="Decoding processes [default: none on a CPU with <= 2 cores, else one per spare core].")
@click.option("--run-name", default=None,
              help="Run folder name [default: <dataset>-<backbone>-ft-<trainable>-<config hash>].")
@click.option("--resume", is_flag=True,
              help="Continue a killed run (--run-name, else the latest of the same settings); "
                   "a finished run has nothing to resume and reports its results.")
@click.option("--keep-checkpoint", is_flag=True,
              help="Keep checkpoint-last.pt (the training state, ~3x the model) once the run "
                   "has finished; by default only an unfinished run keeps it.")
@cache_dir_option
@json_option
@handle_errors
def finetune(data_dir, run_name, resume, cache_dir, as_json, no_flip, no_selection_holdout,
             no_refit, patience, **options):
    """Fine-tune the backbone on DATA_DIR (same splits and metrics as fit-head).

    The classifier starts from a logistic regression fitted on the training images' features
    (--init zero: from zeros). Trains on train, keeps the best epoch on val (epoch 0 is that
    start) and reports on test. With two splits the second is only reported on and the epoch
    is selected on a hold-out of train; with only train, it reports on fit-head's hold-out and
    selects on a second one. A trained epoch kept on a hold-out of train is then trained again
    from the same start on every train image (--no-refit: not). No image both selects and
    reports. The run folder
    <cache-dir>/runs/<run>/ holds the model (usable as --backbone and by predict), metrics.json,
    rows.json, learning curves and confusion matrix.

    \b
    Distributed (DistributedDataParallel; gloo on CPU, NCCL on CUDA):
      torchrun --nproc-per-node 2 -m fxtl finetune DATA_DIR    one node
      torchrun --nnodes 2 --node-rank R --rdzv-endpoint HOST:29500 --nproc-per-node 4 \\
               -m fxtl finetune DATA_DIR                        several (shared file system)
    --batch-size stays the batch of one optimizer step, so results match a single process and
    --resume works with another number of processes.
    """
    from ..training.config import FinetuneConfig
    from ..training.loop import finetune as run_finetune

    prepare_compute_process()

    # Every other option is a FinetuneConfig field of the same name.
    config = FinetuneConfig(flip=not no_flip, selection_holdout=not no_selection_holdout,
                            refit=not no_refit, patience=patience or None, **options)
    res = run_finetune(data_dir, config=config, cache_dir=resolve_cache_dir(cache_dir),
                       run_name=run_name, resume=resume, progress=show_progress())
    if res.rank != 0:  # under torchrun only rank 0 reports, so stdout holds one result
        return
    for note in res.metrics.get("notes", []):
        log(f"fxtl: {note}")

    def human(d):
        from ..report.metrics import format_metrics

        refit = d["refit"]
        again = ([f"  refit: epoch {refit['epoch_chosen']} (chosen on the "
                  f"{refit['selection_rows']} {res.metrics['selection_split']} images) trained "
                  f"again from the same start on all {refit['refit_rows']} train images for "
                  f"{refit['epochs']} epoch(s), {refit['seconds']:.1f} s: the model reported below"]
                 if refit else [])
        return "\n".join([
            f"{d['run_dir']}",
            f"  {d['model']}: {d['epochs']} epoch(s), kept epoch {d['best_epoch']}"
            f"{' (stopped early)' if d['stopped_early'] else ''}; {d['trainable_params']:,} trained "
            f"parameters; {d['fit_seconds']:.1f} s training at {d['train_images_per_second']:.1f} "
            f"images/s ({d['precision']} on {d['device']}, BatchNorm {d['bn']})", *again,
            f"  on {d['split']}: " + format_metrics(res.metrics).replace("\n", "\n  ")])

    emit(res.to_dict(), as_json, human)
