"""Fine-tune a pretrained backbone on a DATA_DIR (``fxtl finetune``): the comparison path.

The same backbone registry, discovery, splits and bad-image handling as ``extract``; a new
linear classifier replaces the ImageNet one. By default it starts from a logistic-regression
probe fitted on the training rows' own features (``init="probe"``: LP-FT, Kumar et al. 2022),
kept as epoch 0 unless a trained epoch beats it on the selection split (val when a test split
reports, else a hold-out of train: :mod:`fxtl.training.rows`); ``init_head`` starts from
a ``fit-head`` run refitted on those rows instead, ``init="zero"`` from zeros. Where the
selection rows are a hold-out of train, a kept trained epoch k is trained again from the same
start on every train image for k epochs and that model is reported (``refit``,
:mod:`fxtl.training.refit`). What trains
is ``trainable``: ``all`` (the default), ``head`` (the new classifier only) or ``last:N`` (the
last N blocks, :func:`~fxtl.training.blocks.block_groups`, and the classifier).

The package, one module per concern:

========================  ==================================================================
``config``                :class:`FinetuneConfig`, every option, validated; what ``resume`` compares
``rows``                  which images train, select and report (the split table; ``rows.json``)
``augment``               seeded random resized crop + flip, the per-epoch (distributed) sampler
``blocks``                a network's blocks in forward order; what ``trainable`` trains
``lpft``                  refit an ``init_head`` on the training rows and fold it into a layer
``trainer``               network, optimizer, schedule, one step, evaluation
``epochs``                one epoch, selection (early stopping), checkpoint, the final report
``refit``                 a kept epoch trained again on every train image (selection on a hold-out)
``checkpoints``           training state, ``checkpoint-last.pt``, the run folder
``curves``                ``learning_curves.png``
``loop`` (this module)    :func:`finetune`: puts them together and writes the run folder
========================  ==================================================================

Reproducibility: the shuffling order and every augmentation draw are derived from
``(seed, epoch, image)``; dropout draws from torch's RNG, seeded inside a
:func:`torch.random.fork_rng` block (the caller's RNG state is restored on return) and stored in
every checkpoint, so a resumed run ends with the same weights as an uninterrupted one (on the same
machine, device and thread count).

Distributed (``torchrun --nproc-per-node N -m fxtl finetune DATA_DIR``): DistributedDataParallel
over the default process group, gloo on CPU and NCCL on CUDA. ``batch_size`` stays the
*effective* batch of one optimizer step: each of the W processes takes ``batch_size / W`` images
and the loss is divided by the whole step's image count, so the averaged gradient is the
single-process one (tests/test_finetune_ddp.py). Only rank 0 writes the run folder; every rank
reads the checkpoint, so the run folder must be on a file system all nodes share.

Run folder ``<cache-dir>/runs/<run-name>/``:

``fxtl-model.json``     manifest (makes the folder a backbone: ``load_backbone(run_dir)``)
``model.pt``            ``torch.save`` of the network's state dict (best epoch), new classifier
``checkpoint-last.pt``  training state for ``resume`` (``torch.load(..., weights_only=True)``);
                        removed once the run has finished, unless ``keep_checkpoint``
``start.pt``            the network the first epoch started from (for ``refit``); removed once finished
``checkpoint-refit.pt`` the refit's training state, as ``checkpoint-last.pt`` (same lifetime)
``metrics.json``        the :mod:`fxtl.report.metrics` schema, ``kind="finetune"``, plus ``history``
``rows.json``           which images trained, selected and reported (:class:`fxtl.data.splits.RunRows`)
``learning_curves.png`` loss and accuracy per epoch, train and val
``confusion.png``       confusion matrix on the reported split
"""
from __future__ import annotations

import contextlib
import hashlib
import json
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable

import numpy as np

from .. import __version__
from .._util import (atomic_write_json, default_cache_dir, ensure_dir, file_lock, read_json,
                     sha256_file, slug)
from ..backbones.registry import MODEL_MANIFEST, load_backbone
from ..data.discovery import ImageSet, discover, fingerprint
from ..data.images import Preprocessing
from ..data.splits import save_rows
from ..distributed import TrainingGroup, place_rank, torchrun_env
from ..errors import FxtlError, ParameterError
from ..runtime import resolve_device, resolve_precision
from .augment import TrainTransform, epoch_sampler
from .blocks import block_groups
from .checkpoints import (CHECKPOINT_FILE, CHECKPOINT_FORMAT, CHECKPOINT_VERSION,
                          REFIT_CHECKPOINT_FILE, check_same_settings, choose_run_dir,
                          discard_unfinished, initial_state, is_finished, manifest_digest,
                          remove_checkpoint, remove_start, torch_save)
from .config import (BN_FROZEN_BELOW, BN_MODES, DEFAULT_LR, MONITORS, OPTIMIZERS, FinetuneConfig,
                     parse_trainable)
from .curves import plot_learning_curves
from .epochs import EpochRunner
from .lpft import linear_head_weights, new_classifier, probe_classifier, refit_kept_start
from .refit import needs_start, refit_kept_epoch, refit_summary, save_start
from .rows import plan_splits, run_rows, selects_on_holdout, two_splits
from .trainer import Trainer

if TYPE_CHECKING:  # the class is built lazily (importing it imports torch)
    from ..backbones.registry import Backbone

__all__ = ["finetune", "FinetuneConfig", "FinetuneResult", "TrainTransform", "block_groups",
           "parse_trainable", "linear_head_weights", "plot_learning_curves", "epoch_sampler",
           "BN_FROZEN_BELOW", "CHECKPOINT_FORMAT", "CHECKPOINT_VERSION", "OPTIMIZERS", "BN_MODES",
           "MONITORS", "DEFAULT_LR"]

MODEL_FORMAT = "fxtl-model"
MODEL_FORMAT_VERSION = 1


@dataclass
class FinetuneResult:
    """What :func:`finetune` did; ``to_dict()`` is the ``fxtl finetune --json`` output."""

    run_dir: Path
    model: str
    split: str
    accuracy: float
    macro_f1: float
    epochs: int
    seconds: float
    best_epoch: int
    fit_seconds: float
    trainable_params: int
    train_images_per_second: float
    inference_images_per_second: float
    stopped_early: bool
    resumed_from_epoch: int
    errors: list[dict[str, str]]
    metrics: dict[str, Any] = field(repr=False, default_factory=dict)
    rank: int = 0  # this process's torchrun rank (every rank returns the same metrics)
    world_size: int = 1

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d.pop("metrics")
        d.pop("rank")
        d["run_dir"] = str(self.run_dir)
        d.update({k: self.metrics.get(k) for k in ("balanced_accuracy", "n", "backbone", "dataset",
                                                    "precision", "device", "bn")})
        d["refit"] = refit_summary(self.metrics)  # model.pt is best_epoch trained again
        d["artifacts"] = {name: str(self.run_dir / name) for name in
                          (MODEL_MANIFEST, "model.pt", CHECKPOINT_FILE, REFIT_CHECKPOINT_FILE,
                           "metrics.json", "rows.json", "learning_curves.png", "confusion.png")
                          if (self.run_dir / name).exists()}
        return d


def finetune(data: str | Path, *, config: FinetuneConfig | None = None,
             cache_dir: str | Path | None = None, run_name: str | None = None,
             resume: bool = False, progress: bool = True,
             on_step: Callable[[dict[str, Any]], None] | None = None,
             **options: Any) -> FinetuneResult:
    """Fine-tune a backbone on the images of ``data`` and evaluate it like ``fit-head`` does.

    Parameters
    ----------
    data : str or Path
        DATA_DIR (class folders or split folders) or a CSV manifest, as for ``extract``.
    config : FinetuneConfig, optional
        Every training option (default ``FinetuneConfig()``).
    cache_dir : path, optional
        Home of ``runs/`` (default ``./cache`` or ``$FXTL_CACHE``).
    run_name : str, optional
        Run folder name (default ``<dataset>-<backbone>-ft-<trainable>-<config hash>``, with
        ``-2``, ``-3``... when taken).
    resume : bool
        Continue the run (``run_name``, else the latest run of the same configuration) from its
        last checkpoint; starts afresh when there is none. A finished run has nothing to resume:
        its stored results are returned (the settings must match), nothing is trained.
    progress : bool
        Progress bar per epoch on stderr (loss, accuracy, images/s).
    on_step : callable, optional
        Called after every optimizer step with ``{"epoch", "step", "loss", "images", "phase"}``
        (``epoch`` counts from 1; ``phase`` is ``train``, or ``refit`` while a kept epoch is
        trained again on every train image); for logging, or to stop a run from outside.
    **options
        Fields of :class:`FinetuneConfig` (``epochs=5``, ``lr=1e-3``...), overriding ``config``.

    Returns
    -------
    FinetuneResult

    Examples
    --------
    >>> res = finetune("data/hymenoptera", epochs=5)            # doctest: +SKIP
    >>> res.split, res.accuracy >= 0.93                          # doctest: +SKIP
    ('val', True)
    >>> bb = load_backbone(str(res.run_dir))                    # the fine-tuned network  # doctest: +SKIP
    """
    import torch

    t_start = time.perf_counter()
    cfg = (config or FinetuneConfig()).replace(**options)
    named_backbone = cfg.backbone  # as the user named it: the run folder's name says so
    images = discover(data)
    env = torchrun_env()
    device = resolve_device(cfg.device)
    workers = cfg.workers
    if env is not None:  # torchrun: this rank's device and share of the cores
        if cfg.batch_size % env.world_size:
            suggest = max(env.world_size, cfg.batch_size // env.world_size * env.world_size)
            raise ParameterError("batch_size", f"batch_size {cfg.batch_size} is the batch of all "
                                 f"{env.world_size} processes together and must be a multiple of "
                                 f"{env.world_size}; use e.g. batch_size={suggest}")
        device, rank_workers = place_rank(env, device)
        workers = rank_workers if workers is None else workers
    cfg = cfg.replace(device=device, workers=workers,
                      precision=resolve_precision(cfg.precision, device))
    splits = plan_splits(images, seed=cfg.seed, test_size=cfg.test_size,
                         selection_holdout=cfg.selection_holdout)
    labels = np.array([s.label for s in images.samples], dtype=np.int64)
    cuda = [torch.device(device).index or 0] if device.startswith("cuda") else []
    with TrainingGroup(env, device) as group, torch.random.fork_rng(devices=cuda):
        torch.manual_seed(cfg.seed)  # dropout draws from it; fork_rng restores the caller's
        bb, cfg, groups, n_train_blocks = _network(cfg, images, labels[splits.train])
        pre = bb.preprocessing
        record = cfg.record(data_fingerprint=fingerprint(images), two_splits=two_splits(splits),
                            holdout_selection=selects_on_holdout(splits))
        init_info = new_classifier(bb, images.class_names, cfg.init_head, images=images,
                                   train_rows=splits.train)
        if init_info is not None:
            init_info["kind"] = "init_head"
        run = EpochRunner(images, splits, labels, pre=pre, cfg=cfg, record=record, device=device,
                          progress=progress, group=group)
        trainer = Trainer(bb, groups=groups, n_train_blocks=n_train_blocks, cfg=cfg, device=device,
                          steps_per_epoch=len(run.train_loader), group=group)
        cfg_hash = hashlib.sha256(json.dumps(record, sort_keys=True).encode()).hexdigest()[:8]
        base = (f"{slug(images.name)}-{slug(Path(named_backbone).name)}-ft-"
                f"{cfg.trainable.replace(':', '')}-{cfg_hash}")
        runs = Path(cache_dir) if cache_dir else default_cache_dir()
        # Rank 0 picks (and creates) the run folder; every rank reads and rank 0 writes it.
        run_dir = None
        if group.is_primary:
            run_dir = ensure_dir(choose_run_dir(runs / "runs", base, run_name=run_name, resume=resume))
        run_dir = Path(group.broadcast(str(run_dir)))
        if resume and is_finished(run_dir):
            return _finished_result(run_dir, record, seconds=time.perf_counter() - t_start,
                                    group=group)
        fresh = not (run_dir / CHECKPOINT_FILE).exists()
        try:
            metrics, resumed_from = _train(run, trainer, run_dir, record, group=group, resume=resume,
                                           on_step=on_step, init_info=init_info, cfg=cfg)
            if group.is_primary:
                failed = {e["path"] for e in metrics["errors"]}  # absolute, as decoded
                unread = {s.path for s in images.samples if str(images.abspath(s)) in failed}
                save_rows(run_dir, run_rows(images, splits, unread=unread))
                write_outputs(run_dir, metrics, bb, pre=pre, images=images)
        except BaseException:
            if fresh and group.is_primary:
                discard_unfinished(run_dir)
            raise
        group.barrier()  # the run folder is complete before any rank returns
        if group.is_primary:  # finished: its manifest is in place
            remove_start(run_dir)
            if not cfg.keep_checkpoint:
                remove_checkpoint(run_dir)
    return _result(run_dir, metrics, seconds=time.perf_counter() - t_start,
                   resumed_from=resumed_from, group=group)


def _result(run_dir: Path, metrics: dict[str, Any], *, seconds: float, resumed_from: int,
            group: TrainingGroup) -> FinetuneResult:
    return FinetuneResult(
        run_dir=run_dir, model=metrics["model"], split=metrics["split"],
        accuracy=metrics["accuracy"], macro_f1=metrics["macro_f1"], epochs=metrics["epochs"],
        seconds=seconds, best_epoch=metrics["best_epoch"],
        fit_seconds=metrics["fit_seconds"], trainable_params=metrics["trainable_params"],
        train_images_per_second=metrics["train_images_per_second"],
        inference_images_per_second=metrics["inference_images_per_second"],
        stopped_early=metrics["stopped_early"], resumed_from_epoch=resumed_from,
        errors=metrics["errors"], metrics=metrics, rank=group.rank, world_size=group.world_size)


def _finished_result(run_dir: Path, record: dict[str, Any], *, seconds: float,
                     group: TrainingGroup) -> FinetuneResult:
    """``resume`` of a finished run: nothing to train; its stored results, when it was made with
    these settings (its checkpoint may have been removed, so ``metrics.json`` says which)."""
    path = run_dir / "metrics.json"
    try:
        metrics = read_json(path)
        check_same_settings(metrics["config"], record, source=path)
        result = _result(run_dir, metrics, seconds=seconds, resumed_from=int(metrics["epochs"]),
                         group=group)
    except (OSError, ValueError, TypeError, KeyError) as exc:
        reason = f"no {exc}" if isinstance(exc, KeyError) else str(exc).splitlines()[0][:120]
        raise FxtlError(f"{path} of the finished run {run_dir.name} cannot be read ({reason}); "
                        "start a new run under another run name") from None
    if group.is_primary:
        print(f"fxtl: {run_dir.name} is finished (its {MODEL_MANIFEST} is in place): nothing to "
              "resume; its results follow", file=sys.stderr)
    return result


def _train(run: EpochRunner, trainer: Trainer, run_dir: Path, record: dict[str, Any], *,
           group: TrainingGroup, resume: bool, on_step, init_info: dict[str, Any] | None,
           cfg: FinetuneConfig) -> tuple[dict[str, Any], int]:
    """The fitted start (a fresh run), the epochs still to run, the refit of the kept start or
    of a kept trained epoch, then the report: ``(metrics, epoch resumed from)``."""
    lock = file_lock(run_dir / ".lock", what=f"the run {run_dir.name}") if group.is_primary \
        else contextlib.nullcontext()
    initial = None
    kept: dict[str, Any] = {}  # the probe's training features, for the refit below
    with lock:
        state = initial_state(trainer, run_dir / CHECKPOINT_FILE, record, resume=resume,
                              quiet=not group.is_primary)
        resumed_from = int(state.epoch)
        if state.epoch == 0 and state.best is None:  # a fresh start (a resumed one has its weights)
            if cfg.init == "probe" and cfg.init_head is None:
                init_info = probe_classifier(trainer, run.train_rows_loader(),
                                             run.labels[run.splits.train], run.images.class_names,
                                             errors=state.errors, seed=cfg.seed,
                                             paths=[run.paths[i] for i in run.splits.train],
                                             keep=kept)
                if init_info is not None:
                    init_info["kind"] = "probe"
            if init_info is not None:
                initial = run.keep_initial(trainer, state, run_dir)
            if needs_start(cfg, run.splits):  # a kept trained epoch is retrained from it
                save_start(trainer, run_dir, primary=group.is_primary)
        while not state.done and state.epoch < record["epochs"]:
            run.train_epoch(trainer, state, run_dir, on_step=on_step)
        final_refit = _refit_kept_start(run, trainer, state, run_dir, cfg=cfg, kept=kept)
        refit = refit_kept_epoch(run, trainer, state, run_dir, on_step=on_step)
        metrics = run.report(trainer, state, run_dir)
    if initial is not None:
        metrics["initial"] = initial
    if final_refit is not None:
        metrics["final_refit"] = final_refit
        every = " (every train image, the rows fit-head fits its head on)" \
            if two_splits(run.splits) else ""
        metrics["notes"].append(
            f"{run.splits.val_name} kept the fitted start (epoch 0) over every trained epoch, so "
            f"it was refitted on the {final_refit['refit_rows']} {final_refit['refit_split']} "
            f"images{every} before the report, as fit-head refits the head its selection chose; "
            f"the {run.splits.report_name} images took no part")
    if refit is not None:
        metrics["refit"] = refit
        # the reported model's training time: the selection epochs and the refit's (compare)
        metrics["fit_seconds"] = round(metrics["fit_seconds"] + refit["seconds"], 3)
        metrics["notes"].append(
            f"{run.splits.val_name} chose epoch {refit['epoch_chosen']} (trained on the "
            f"{refit['trained_rows']} images beside it); the reported model is that epoch trained "
            f"again from the same start on all {refit['refit_rows']} {refit['refit_split']} images "
            f"for {refit['epochs']} epoch(s) ({refit['schedule']}; {refit['seconds']:.1f} s), as "
            f"fit-head refits the head its selection chose; the {run.splits.report_name} images "
            "took no part")
    elif (not cfg.refit and selects_on_holdout(run.splits) and metrics["best_epoch"] >= 1):
        metrics["notes"].append(
            f"refit is off: the reported model is epoch {metrics['best_epoch']} as trained on the "
            f"{metrics['n_train']} images beside the {run.splits.val_name} rows")
    if init_info is not None and init_info["kind"] == "init_head":
        metrics["init_head"] = init_info
        metrics["notes"].append(
            f"init_head refitted on this fine-tune's {init_info['refit_rows']} training images "
            "only (same hyper-parameters), so it has not seen the selection or report images")
    elif init_info is not None:
        metrics["init_probe"] = init_info
        metrics["notes"].append(
            f"the classifier started from a logistic-regression probe fitted on this fine-tune's "
            f"{init_info['refit_rows']} training images only (C={init_info['C']:g} by "
            f"{init_info['folds']}-fold CV on them)" + (
                "; that start is epoch 0, kept unless a trained epoch beats it on "
                f"{run.splits.val_name}" if initial is not None else ""))
    elif cfg.init == "probe" and cfg.init_head is None and resumed_from == 0:
        metrics["notes"].append("fewer than two classes have a readable training image: the "
                                "classifier started at zero")
    return metrics, resumed_from


def _refit_kept_start(run: EpochRunner, trainer: Trainer, state, run_dir: Path, *,
                      cfg: FinetuneConfig, kept: dict[str, Any]) -> dict[str, Any] | None:
    """When the selection split kept the fitted start (epoch 0 is the best), refit that start on
    the training and selection rows (:func:`~fxtl.training.lpft.refit_kept_start`) and save it as
    the kept weights; the refit's info, or None when the rule does not apply.

    Deterministic, so a resumed run that reports again refits to the same classifier."""
    fitted_start = cfg.init_head is not None or cfg.init == "probe"
    if not (fitted_start and run.splits.val is not None and state.best is not None
            and int(state.best["epoch"]) == 0):
        return None
    run.load_kept(trainer, run_dir)
    info = refit_kept_start(trainer, init_head=cfg.init_head, images=run.images, labels=run.labels,
                            rows={"train": run.splits.train, "val": run.splits.val},
                            loader_for=run.rows_loader, errors=state.errors, paths=run.paths,
                            seed=cfg.seed, kept=kept, split=f"train+{run.splits.val_name}")
    if info is not None and run.group.is_primary:
        torch_save(trainer.net.state_dict(), run_dir / "model.pt")
    return info


def _network(cfg: FinetuneConfig, images: ImageSet, train_labels: np.ndarray):
    """The backbone at the run's input size, its blocks, and ``cfg`` resolved against it."""
    counts = np.bincount(train_labels, minlength=len(images.class_names))
    bn = cfg.bn if cfg.bn != "auto" else ("frozen" if counts.min() < BN_FROZEN_BELOW else "train")
    bb = load_backbone(cfg.backbone)
    bb.preprocessing = bb.preprocessing.with_crop(cfg.image_size) if cfg.image_size else bb.preprocessing
    groups = block_groups(bb.model, bb.classifier_name)
    n_train_blocks = parse_trainable(cfg.trainable, len(groups))
    trainable = {0: "head", len(groups): "all"}.get(n_train_blocks, f"last:{n_train_blocks}")
    cfg = cfg.replace(backbone=bb.spec.name, trainable=trainable, lr=cfg.peak_lr,
                      image_size=int(bb.preprocessing.crop), bn=bn)
    return bb, cfg, groups, n_train_blocks


def write_outputs(run_dir: Path, metrics: dict[str, Any], bb: Backbone, *, pre: Preprocessing,
                   images: ImageSet) -> None:
    """metrics.json, the plots, and the manifest that makes the folder a backbone (last)."""
    from ..report.metrics import plot_confusion

    # A run trained from a run names the original base, so loading rebuilds the right network.
    base_name = bb.spec.meta.get("base", bb.spec.name) if bb.spec.source == "run" else bb.spec.name

    atomic_write_json(run_dir / "metrics.json", metrics)
    plot_confusion(metrics["confusion_matrix"], metrics["class_names"], run_dir / "confusion.png",
                   title=f"{metrics['model']} on {metrics['split']} (accuracy {metrics['accuracy']:.3f})")
    plot_learning_curves(metrics["history"], run_dir / "learning_curves.png",
                         best_epoch=metrics["best_epoch"], title=f"{metrics['model']} {images.name}")
    manifest = {
        "format": MODEL_FORMAT, "format_version": MODEL_FORMAT_VERSION, "backbone": base_name,
        "architecture": bb.spec.arch, "state_dict": "model.pt",
        "weights_sha256": sha256_file(run_dir / "model.pt"),
        "base_weights_sha256": bb.weights_sha256, "num_classes": len(images.class_names),
        "class_names": list(images.class_names), "classifier": bb.classifier_name,
        "preprocessing": pre.to_dict(), "trained_from": bb.spec.name,
        "trainable": metrics["config"]["trainable"], "best_epoch": metrics["best_epoch"],
        "dataset": images.name, "dataset_fingerprint": metrics["dataset_fingerprint"],
        "config": metrics["config"], "created": metrics["created"], "fxtl_version": __version__,
        "versions": metrics["versions"],
    }
    if metrics.get("refit"):  # model.pt is best_epoch trained again on every train image
        manifest["refit"] = {k: metrics["refit"][k] for k in ("epochs", "refit_rows", "refit_split")}
    manifest["meaning_sha256"] = manifest_digest(manifest)
    atomic_write_json(run_dir / MODEL_MANIFEST, manifest)


