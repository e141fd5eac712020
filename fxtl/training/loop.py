"""Fine-tune a pretrained backbone on a DATA_DIR (``fxtl finetune``): the comparison path.

The same backbone registry, discovery, splits and bad-image handling as ``extract``; a fresh
linear classifier replaces the ImageNet one (or starts from a fitted logistic-regression head,
``init_head``: the LP-FT recipe of Kumar et al. 2022). What trains is ``trainable``:

``all``       every parameter (the default)
``head``      the new classifier only (end-to-end linear probing, with augmentation)
``last:N``    the last N blocks and the classifier

A *block* is a stage of the network in forward order: the children of its top-level
``Sequential``/``ModuleList`` containers (``blocks.0`` .. ``blocks.6`` for EfficientNet,
``features.k`` for torchvision's), other top-level modules as they are (``layer1`` .. ``layer4``
for ResNets); a normalisation layer joins the block before it (``conv_head`` + ``bn2``), so
lite0 has 9 blocks. :func:`block_groups` lists them.

Splits (fixed by the data, like ``fit-head``):

=====================  ==============================  =========================
dataset splits         early stopping / selection on   reported on
=====================  ==============================  =========================
train + val [+ test]   ``val``                         ``test`` if present else ``val``
train + test           none (last epoch is kept)       ``test``
train only             a 2nd hold-out of the rest      ``holdout``
=====================  ==============================  =========================

The reported hold-out is :func:`fxtl.data.splits.stratified_holdout` of the train rows
(``test_size``, ``seed``), the call ``fit-head`` makes, so both paths report on the same images
(exactly the same ones when no image is unreadable); the selection hold-out is carved the same
way from the remaining rows. An ``init_head`` is refitted on the fine-tune's training rows only.

The recipe: AdamW (or SGD with Nesterov momentum), linear warm-up then cosine decay per step,
label smoothing, weight decay on weights only (not biases or norms), discriminative learning
rates (``lr * lr_decay**depth``, depth 0 = the classifier, 1 = the last block...), train-time
RandomResizedCrop + horizontal flip done on PIL images (uint8 tensors, normalised inside the
network) and the backbone's evaluation transform for val/test. BatchNorm statistics are frozen
(``bn="frozen"``: running statistics kept, affine weights still trained) by default when the
smallest class has fewer than :data:`BN_FROZEN_BELOW` training images; frozen blocks always keep
theirs.

Speed: bf16 autocast on CPUs with native bf16 and on CUDA (fp16 with a gradient scaler on older
GPUs), except depthwise convolutions while training on CPU (oneDNN's bf16 depthwise backward is
2-3x slower than its fp32 one); channels_last; JPEG draft decoding; decoding in DataLoader
workers, except on a CPU with at most 2 cores, where the compute threads need both cores and
decoding in the main process measured 10% faster than one worker.

Reproducibility and resume: the shuffling order and every augmentation draw are derived from
``(seed, epoch, image)``, not from worker or global RNG state, so a run does not depend on the
number of workers. After every epoch ``checkpoint-last.pt`` (model, optimizer, scheduler, scaler,
epoch, RNG states, best metric, history) is written atomically; ``resume=True`` continues a killed
run from its last finished epoch and ends with the same weights as an uninterrupted run (on the
same machine, device and thread count). The best weights are kept in ``model.pt``.

Distributed (``torchrun --nproc-per-node N -m fxtl finetune DATA_DIR``): DistributedDataParallel
over the default process group, gloo on CPU and NCCL on CUDA (``cuda:LOCAL_RANK``), with a
DistributedSampler (:func:`_epoch_sampler`). ``batch_size`` stays the *effective* batch of one
optimizer step: each of the W processes takes ``batch_size / W`` images (it must divide), and the
loss is summed and divided by the whole step's image count, so the averaged gradient is the
single-process one. No learning-rate scaling is needed or done: the effective batch, hence the
recipe, is what the user set (to train with a larger effective batch, raise ``--batch-size`` and
scale ``--lr`` with it, the linear rule of Goyal et al. 2017). With fp32 and frozen BatchNorm a
2-process run ends within 1e-5 of the single-process weights (tests/test_finetune_ddp.py); with
``bn=train`` each process normalises with its own half-batch statistics (as DDP does without
SyncBatchNorm). Validation and test are split over the ranks and gathered. Only rank 0 writes
the run folder (checkpoints, model, metrics, plots) and prints; every rank reads the checkpoint,
so the run folder must be on a file system all nodes share. A checkpoint holds nothing
world-size specific, so ``resume`` continues with any number of processes.

Run folder ``<cache-dir>/runs/<run-name>/``:

``fxtl-model.json``     manifest (makes the folder a backbone: ``load_backbone(run_dir)``)
``model.pt``            ``torch.save`` of the network's state dict (best epoch), new classifier
``checkpoint-last.pt``  training state for ``resume`` (``torch.load(..., weights_only=True)``)
``metrics.json``        the :mod:`fxtl.evaluate` schema, ``kind="finetune"``, plus ``history``
``rows.json``           which images trained, selected and reported (:class:`fxtl.data.splits.RunRows`)
``learning_curves.png`` loss and accuracy per epoch, train and val
``confusion.png``       confusion matrix on the reported split
"""
from __future__ import annotations

import contextlib
import hashlib
import json
import math
import random
import re
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Sequence

import numpy as np

from .. import __version__
from .._util import (slug, atomic_path, atomic_write_json, default_cache_dir, ensure_dir, file_lock,
                    now_iso, save_figure, sha256_file, unique_dir, versions)
from ..backbones.registry import DEFAULT_BACKBONE, MODEL_MANIFEST, replace_linear, load_backbone
from ..data.splits import RowSet, RunRows, save_rows, stratified_holdout
from ..data.discovery import ImageDataset, ImageSet, discover, fingerprint
from ..distributed import TrainingGroup, available_cores, place_rank, torchrun_env
from ..errors import DataError, FxtlError, ProvenanceError
from ..features.extraction import default_workers
from ..data.images import INTERPOLATION, ImageDecodeError, Preprocessing, collate_images, open_image, to_chw
from ..runtime import autocast, keep_freed_memory, resolve_device, resolve_precision

if TYPE_CHECKING:  # the class is built lazily (importing it imports torch)
    from ..backbones.registry import Backbone

__all__ = ["finetune", "FinetuneResult", "TrainTransform", "block_groups", "parse_trainable",
           "linear_head_weights", "BN_FROZEN_BELOW", "CHECKPOINT_FORMAT", "CHECKPOINT_VERSION",
           "OPTIMIZERS", "BN_MODES", "MONITORS"]

# bn="auto" freezes BatchNorm statistics when the smallest class has fewer training images
# than this: statistics of a few batches are noisier than the pretrained ones. On hymenoptera
# (~120 per class) frozen statistics gave a lower val loss at every epoch (0.15-0.19 vs
# 0.22-0.52, lite0, 5 epochs) and train faster.
BN_FROZEN_BELOW = 200
CHECKPOINT_FORMAT = "fxtl-finetune-checkpoint"
CHECKPOINT_VERSION = 1
MODEL_FORMAT = "fxtl-model"
MODEL_FORMAT_VERSION = 1
OPTIMIZERS = ("adamw", "sgd")
BN_MODES = ("auto", "train", "frozen")
MONITORS = ("accuracy", "loss")
# Default peak learning rate (the classifier's) per optimizer. With lr_decay 0.5 and a zero
# classifier, 5 epochs of lite0 on hymenoptera kept val accuracy 0.935-0.941 over seeds 0-2
# (0.922-0.948 with lr_decay 0.7; 0.928 at lr 1e-3 without decay).
DEFAULT_LR = {"adamw": 5e-4, "sgd": 1e-2}
# A val loss must drop by more than this to count as an improvement.
_MIN_DELTA = 1e-4
# The selection split's name when the data has only train (the report hold-out is "holdout").
SELECTION_HOLDOUT = "holdout-selection"
# Hyper-parameters that must match for `resume` (anything else may change between sessions).
_RESUME_KEYS = ("backbone", "trainable", "epochs", "lr", "batch_size", "image_size", "optimizer",
                "weight_decay", "momentum", "label_smoothing", "warmup_epochs", "lr_decay", "bn",
                "patience", "monitor", "crop_scale", "flip", "init_head", "seed", "test_size", "precision",
                "data_fingerprint")


# ----------------------------------------------------------------------------- augmentation
class TrainTransform:
    """Random resized crop + horizontal flip on a PIL image -> uint8 tensor ``[3, size, size]``.

    The crop is drawn as torchvision's ``RandomResizedCrop`` draws it (area fraction in
    ``scale``, log-uniform aspect ratio in ``ratio``, ten tries, then a center crop), then the
    box is resized straight to ``size`` in one resampling. Randomness comes only from the
    ``rng`` passed in, so the same seed gives the same image in any process.
    """

    def __init__(self, pre: Preprocessing, *, scale: tuple[float, float] = (0.25, 1.0),
                 ratio: tuple[float, float] = (3 / 4, 4 / 3), flip: bool = True):
        self.pre = pre
        self.size = pre.crop
        self.scale = (float(scale[0]), float(scale[1]))
        self.log_ratio = (math.log(ratio[0]), math.log(ratio[1]))
        self.flip = flip
        self._interp = INTERPOLATION[pre.interpolation]

    def crop_box(self, width: int, height: int, rng: np.random.Generator) -> tuple[int, int, int, int]:
        """``(left, top, right, bottom)`` of the random crop of a ``width x height`` image."""
        area = width * height
        for _ in range(10):
            target = area * rng.uniform(*self.scale)
            aspect = math.exp(rng.uniform(*self.log_ratio))
            w = int(round(math.sqrt(target * aspect)))
            h = int(round(math.sqrt(target / aspect)))
            if 0 < w <= width and 0 < h <= height:
                top = int(rng.integers(0, height - h + 1))
                left = int(rng.integers(0, width - w + 1))
                return left, top, left + w, top + h
        ratio = width / height  # fallback: the largest center crop within the ratio range
        lo, hi = math.exp(self.log_ratio[0]), math.exp(self.log_ratio[1])
        if ratio < lo:
            w, h = width, int(round(width / lo))
        elif ratio > hi:
            w, h = int(round(height * hi)), height
        else:
            w, h = width, height
        left, top = (width - w) // 2, (height - h) // 2
        return left, top, left + w, top + h

    def __call__(self, im, rng: np.random.Generator):
        from PIL import Image

        box = self.crop_box(*im.size, rng)
        im = im.resize((self.size, self.size), self._interp, box=box, reducing_gap=None)
        if self.flip and rng.random() < 0.5:
            im = im.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
        return to_chw(im)

    def load(self, path: str | Path, rng: np.random.Generator):
        """Decode ``path`` robustly (:func:`~fxtl.preprocess.open_image`) and augment it."""
        return self(open_image(path, draft_size=self.pre.resize if self.pre.jpeg_draft else None), rng)


class _TrainImages:
    """``(i, seed) -> (uint8 image, i, error or "")``; bad images never raise (see ImageDataset)."""

    def __init__(self, paths: Sequence[str], transform: TrainTransform):
        self.paths = [str(p) for p in paths]
        self.transform = transform

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, key: tuple[int, int]):
        import torch

        i, seed = key
        try:
            return self.transform.load(self.paths[i], np.random.default_rng(seed)), i, ""
        except ImageDecodeError as exc:
            s = self.transform.size
            return torch.zeros(3, s, s, dtype=torch.uint8), i, str(exc)


def _epoch_sampler(n: int, seed: int, *, rank: int = 0, world_size: int = 1):
    import torch
    from torch.utils.data.distributed import DistributedSampler

    class EpochSampler(DistributedSampler):
        """Yields ``(index, augmentation seed)``; order and seeds depend on (seed, epoch) only.

        A DistributedSampler: one permutation of the whole training set per epoch, padded like
        torch's (repeating its start) to a multiple of the world size, and rank ``r`` takes every
        ``world_size``-th item from ``r``. With per-rank batches of ``batch_size / world_size``
        the ranks' k-th batches together are exactly the single-process run's k-th batch.
        """

        def __init__(self):
            super().__init__(range(n), num_replicas=world_size, rank=rank, shuffle=True,
                             seed=seed, drop_last=False)

        def __iter__(self):
            g = torch.Generator().manual_seed(int(seed) * 1_000_003 + self.epoch)
            order = torch.randperm(n, generator=g).tolist()
            seeds = torch.randint(0, 2**62, (n,), generator=g).tolist()
            pairs = list(zip(order, seeds))
            pad = self.total_size - n
            pairs += (pairs * math.ceil(pad / n))[:pad] if pad else []
            return iter(pairs[self.rank:self.total_size:self.num_replicas])

    return EpochSampler()


# ----------------------------------------------------------------------------- what trains
def block_groups(model, classifier_name: str) -> list[tuple[str, list[str]]]:
    """The network's blocks in forward order, without the classifier: ``[(label, modules)]``.

    ``modules`` are dotted module names. Parameters of the model itself (e.g. a ViT's class
    token) belong to the first block.
    """
    import torch.nn as nn

    head_top = classifier_name.split(".")[0]
    norms = (nn.modules.batchnorm._BatchNorm, nn.LayerNorm, nn.GroupNorm)
    units: list[tuple[str, Any]] = []
    for name, child in model.named_children():
        if name == head_top or not any(True for _ in child.parameters()):
            continue
        if isinstance(child, (nn.Sequential, nn.ModuleList)) and len(child) > 1:
            units += [(f"{name}.{n}", c) for n, c in child.named_children()
                      if any(True for _ in c.parameters())]
        else:
            units.append((name, child))
    groups: list[tuple[str, list[str]]] = []
    for name, module in units:
        if groups and isinstance(module, norms):
            label, members = groups[-1]
            groups[-1] = (f"{label}+{name}", members + [name])
        else:
            groups.append((name, [name]))
    return groups


def parse_trainable(trainable: str, n_blocks: int) -> int:
    """``all`` -> n_blocks, ``head`` -> 0, ``last:N`` -> N: how many blocks train (plus the head)."""
    text = str(trainable).strip().lower()
    if text == "all":
        return n_blocks
    if text == "head":
        return 0
    m = re.fullmatch(r"last:(\d+)", text)
    if not m:
        raise FxtlError(f"--trainable {trainable!r} is not all, head or last:N (e.g. last:2)")
    k = int(m.group(1))
    if not 1 <= k <= n_blocks:
        raise FxtlError(f"--trainable {trainable}: this backbone has {n_blocks} blocks; "
                        f"use last:1 .. last:{n_blocks}, or all")
    return k


def _param_owner(groups: list[tuple[str, list[str]]], head_top: str):
    """Function: parameter name -> block index (len(groups) for the head)."""
    prefixes = [(m + ".", gi) for gi, (_, members) in enumerate(groups) for m in members]
    prefixes.append((head_top + ".", len(groups)))
    prefixes.sort(key=lambda p: -len(p[0]))

    def owner(param_name: str) -> int:
        for prefix, gi in prefixes:
            if param_name.startswith(prefix):
                return gi
        return 0  # parameters of the model itself: with the stem

    return owner


# ----------------------------------------------------------------------------- LP-FT init
def linear_head_weights(pipeline, head_classes: Sequence[str], class_names: Sequence[str],
                        *, feature_dim: int) -> tuple[np.ndarray, np.ndarray]:
    """Fold a fitted ``[StandardScaler ->] LogisticRegression`` pipeline into ``(W, b)``.

    ``W @ x + b`` are logits over ``class_names`` whose softmax equals the pipeline's
    ``predict_proba`` on raw features ``x`` (the scaler is folded in: ``W = coef / scale``,
    ``b = intercept - W @ mean``). A binary model's single margin ``d`` becomes ``(-d/2, d/2)``.
    ``head_classes`` names the head's class indices (``pipeline.classes_`` index into it).

    Raises
    ------
    FxtlError
        The pipeline holds a step that is not linear-foldable (PCA, L2 normalisation, an SVM...).
    """
    steps = list(pipeline.steps) if hasattr(pipeline, "steps") else [("est", pipeline)]
    est = steps[-1][1]
    if not (hasattr(est, "coef_") and hasattr(est, "intercept_") and hasattr(est, "predict_proba")):
        raise FxtlError(f"--init-head needs a logistic-regression head, not {type(est).__name__}; "
                        "fit one with `fxtl fit-head CACHE --model logreg`")
    mean = np.zeros(feature_dim)
    scale = np.ones(feature_dim)
    for name, step in steps[:-1]:
        if step is None or step == "passthrough":
            continue
        if type(step).__name__ != "StandardScaler":
            raise FxtlError(f"--init-head: the head's step {name!r} ({type(step).__name__}) cannot "
                            "be folded into a linear layer; fit the head without --pca/--l2")
        m = step.mean_ if getattr(step, "mean_", None) is not None else np.zeros(feature_dim)
        s = step.scale_ if getattr(step, "scale_", None) is not None else np.ones(feature_dim)
        # x -> (x - m) / s applied after the previous affine map (x - mean) / scale.
        mean, scale = mean + m * scale, scale * s
    coef = np.asarray(est.coef_, dtype=np.float64)
    intercept = np.asarray(est.intercept_, dtype=np.float64)
    if coef.shape[1] != feature_dim:
        raise ProvenanceError(f"--init-head: the head expects {coef.shape[1]}-d features, the "
                              f"backbone gives {feature_dim}-d; fit the head on this backbone")
    if coef.shape[0] == 1:  # binary: one margin for classes_[1]
        coef = np.vstack([-coef[0] / 2, coef[0] / 2])
        intercept = np.array([-intercept[0] / 2, intercept[0] / 2])
    w = coef / scale
    b = intercept - w @ mean
    index = {c: i for i, c in enumerate(class_names)}
    W = np.zeros((len(class_names), feature_dim))
    B = np.full(len(class_names), float(b.min()) - 10.0)  # classes the head never saw: unlikely
    for row, cls in enumerate(np.asarray(est.classes_).tolist()):
        name = head_classes[int(cls)] if isinstance(cls, (int, np.integer)) else str(cls)
        if name not in index:
            raise ProvenanceError(f"--init-head: the head knows class {name!r}, the dataset does "
                                  "not; fit the head on this dataset's features")
        W[index[name]], B[index[name]] = w[row], b[row]
    return W.astype(np.float32), B.astype(np.float32)


def _load_linear_head(run: str | Path, bb: Backbone) -> Any:
    """The ``Head`` of a ``fit-head`` run, checked against the backbone."""
    from ..heads.fitting import load_head

    head = load_head(run)
    prov = head.provenance
    for key, mine in (("backbone", bb.spec.name), ("weights_sha256", bb.weights_sha256),
                      ("layer", bb.layer)):
        if prov.get(key) is not None and prov.get(key) != mine:
            raise ProvenanceError(f"--init-head {run}: the head was fitted on features with {key} "
                                  f"{prov.get(key)!r}, this fine-tune uses {mine!r}; fit the head "
                                  "on a cache of the same backbone")
    head_pre = prov.get("preprocessing")
    if isinstance(head_pre, str):
        head_pre = json.loads(head_pre)
    crop = (head_pre or {}).get("crop")
    if crop and int(crop) != bb.preprocessing.crop:
        print(f"fxtl: warning: --init-head {run} was fitted on {crop}-px features but this fine-tune "
              f"runs at {bb.preprocessing.crop} px, where it starts far below its own accuracy "
              f"(digits: 0.885 at 224 px, 0.109 at 128; docs/advise.md); use --image-size {crop}",
              file=sys.stderr)
    return head


def _head_cache(run: str | Path, head: Any) -> Path:
    """The feature cache a head was fitted on (its sidecar, else its run's metrics.json)."""
    cache = head.provenance.get("cache")
    if not cache and head.path is not None:
        metrics = Path(head.path).parent / "metrics.json"
        with contextlib.suppress(OSError, ValueError):
            cache = json.loads(metrics.read_text()).get("cache")
    if not cache:
        raise ProvenanceError(f"init_head {run} does not say which feature cache it was fitted on, "
                              "so it cannot be refitted on this fine-tune's training rows; refit "
                              "it with `fxtl fit-head`")
    cache = Path(cache)
    if not cache.is_file():
        raise ProvenanceError(f"init_head {run} was fitted on the feature cache {cache}, which is "
                              "gone; re-extract it (fxtl extract) so the head can be refitted on "
                              "this fine-tune's training rows only")
    return cache


def refit_on_train_rows(run: str | Path, bb: Backbone, images: ImageSet,
                        train_rows: np.ndarray) -> tuple[Any, list[str], dict[str, Any]]:
    """A clone of ``run``'s head (same hyper-parameters) fitted on the fine-tune's training rows.

    ``fit-head`` may have fitted the head on train+val (or its hold-out differs); a start head that
    has seen the fine-tune's selection or report images would make those numbers optimistic. The
    head's own cache supplies the features of exactly the training images (matched by path).

    Returns ``(pipeline, class_names, info)``; ``info`` says which cache and how many rows.
    """
    import warnings

    from sklearn.base import clone

    from ..features.store import load_features

    head = _load_linear_head(run, bb)
    cache_path = _head_cache(run, head)
    cache = load_features(cache_path)
    train_paths = {images.samples[i].path for i in train_rows}
    rows = np.array([i for i, p in enumerate(cache.paths)
                     if p in train_paths and cache.labels[i] >= 0], dtype=np.int64)
    if not len(rows):
        raise ProvenanceError(f"init_head {run}: its cache {cache_path} holds none of this "
                              f"fine-tune's training images under {images.root}; fit the head on "
                              "a cache of this dataset")
    pipeline = clone(head.pipeline)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # convergence notes: the head's own run reported them
        pipeline.fit(cache.features[rows], cache.labels[rows])
    info = {"head": str(head.path or run), "cache": str(cache_path), "refit_rows": int(len(rows)),
            "refit_split": "train"}
    return pipeline, list(cache.class_names), info


# ----------------------------------------------------------------------------- results
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
        d["artifacts"] = {name: str(self.run_dir / name) for name in
                          (MODEL_MANIFEST, "model.pt", "checkpoint-last.pt", "metrics.json", "rows.json",
                           "learning_curves.png", "confusion.png") if (self.run_dir / name).exists()}
        return d


@dataclass(frozen=True)
class _Splits:
    train: np.ndarray  # sample indices
    val: np.ndarray | None  # selection split (None: no selection, last epoch kept)
    val_name: str
    report: np.ndarray
    report_name: str
    notes: tuple[str, ...] = ()


def _plan_splits(images: ImageSet, *, seed: int, test_size: float) -> _Splits:
    labels = np.array([s.label for s in images.samples], dtype=np.int64)
    split = np.array([s.split for s in images.samples])
    rows = {s: np.flatnonzero(split == s) for s in ("train", "val", "test")}
    if not len(rows["train"]):
        raise DataError(f"{images.root} has no train split; fine-tuning needs training images "
                        "(put them in train/<class>/)")
    if len(rows["val"]):
        report, name = (rows["test"], "test") if len(rows["test"]) else (rows["val"], "val")
        return _Splits(rows["train"], rows["val"], "val", report, name)
    if len(rows["test"]):
        return _Splits(rows["train"], None, "", rows["test"], "test",
                       ("no val split: no early stopping, the last epoch is kept",))
    # Report on exactly the rows fit-head reports on (same call, same seed), and select (early
    # stopping) on a second hold-out of what remains, so no image both selects and reports.
    rest, held = stratified_holdout(rows["train"], labels, test_size=test_size, seed=seed,
                                    source=str(images.root), class_names=images.class_names)
    fit, select = stratified_holdout(rest, labels, test_size=test_size, seed=seed,
                                     source=str(images.root), class_names=images.class_names)
    note = (f"no val/test split: reporting on a stratified {test_size:.0%} hold-out of train "
            f"(seed {seed}, the rows fit-head reports on) and selecting on a second stratified "
            f"{test_size:.0%} hold-out of the rest")
    return _Splits(fit, select, SELECTION_HOLDOUT, held, "holdout", (note,))


def _run_rows(images: ImageSet, splits: _Splits) -> RunRows:
    """Which images the run learned from, selected on and reported on (``rows.json``)."""
    def rowset(rows: np.ndarray, name: str) -> RowSet:
        return RowSet(name, tuple(images.samples[i].path for i in rows))

    return RunRows(data_fingerprint=fingerprint(images), train=rowset(splits.train, "train"),
                   selection=rowset(splits.val, splits.val_name) if splits.val is not None else None,
                   report=rowset(splits.report, splits.report_name))


# ----------------------------------------------------------------------------- checkpoints
def _rng_state() -> dict[str, Any]:
    import torch

    np_state = np.random.get_state()
    py_state = random.getstate()
    state = {"torch": torch.get_rng_state(),
             "numpy": {"keys": torch.from_numpy(np_state[1].astype(np.int64)), "pos": int(np_state[2]),
                       "has_gauss": int(np_state[3]), "cached_gaussian": float(np_state[4])},
             "python": {"version": int(py_state[0]), "state": list(py_state[1]),
                        "gauss": py_state[2]}}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def _set_rng_state(state: dict[str, Any]) -> None:
    import torch

    torch.set_rng_state(state["torch"])
    n = state["numpy"]
    np.random.set_state(("MT19937", n["keys"].numpy().astype(np.uint32), n["pos"], n["has_gauss"],
                         n["cached_gaussian"]))
    p = state["python"]
    random.setstate((p["version"], tuple(p["state"]), p["gauss"]))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def _seed_everything(seed: int) -> None:
    import torch

    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def _torch_save(obj: Any, path: Path) -> None:
    import torch

    with atomic_path(path, suffix=".tmp") as tmp:
        torch.save(obj, tmp)


def _load_checkpoint(path: Path) -> dict[str, Any]:
    import torch

    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:
        raise FxtlError(f"{path} cannot be read ({str(exc).splitlines()[0][:120]}); delete it "
                        "and run without --resume") from None
    if not isinstance(ckpt, dict) or ckpt.get("format") != CHECKPOINT_FORMAT:
        raise FxtlError(f"{path} is not an fxtl fine-tune checkpoint; run without --resume")
    if ckpt.get("format_version", 0) > CHECKPOINT_VERSION:
        raise FxtlError(f"{path} has checkpoint version {ckpt.get('format_version')}, this fxtl "
                        f"reads up to {CHECKPOINT_VERSION}; upgrade fxtl")
    return ckpt


# ----------------------------------------------------------------------------- run folders
def _run_dir(runs: Path, base: str, *, run_name: str | None, resume: bool) -> Path:
    """The folder to train into: an exact ``run_name``, the latest ``base*`` run when resuming,
    else a new ``base``, ``base-2``, ... folder."""
    ensure_dir(runs)
    if run_name:
        if not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9._-]*", run_name):
            raise FxtlError(f"--run-name {run_name!r}: use letters, digits, '.', '_' and '-' only")
        run_dir = runs / run_name
        if not resume and (run_dir / "checkpoint-last.pt").exists():
            raise FxtlError(f"run folder {run_dir} already holds a run; pass --resume to continue "
                            "it, or choose another --run-name (or delete the folder)")
        return run_dir
    if resume:
        found = [d for d in runs.glob(f"{base}*") if re.fullmatch(re.escape(base) + r"(-\d+)?", d.name)
                 and (d / "checkpoint-last.pt").is_file()]
        if found:
            return max(found, key=lambda d: (d / "checkpoint-last.pt").stat().st_mtime)
    return unique_dir(runs, base)


# ----------------------------------------------------------------------------- the loop
def _make_loader(dataset, *, batch_size: int, workers: int, device: str, sampler=None,
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


def _progress(total: int, desc: str, enabled: bool):
    from tqdm.auto import tqdm

    return tqdm(total=total, desc=desc, unit="img", file=sys.stderr, disable=not enabled,
                dynamic_ncols=True, leave=True)


class _Trainer:
    """Holds the network, optimizer and schedule of one run (internal to :func:`finetune`)."""

    def __init__(self, bb: Backbone, *, groups, n_train_blocks: int, bn_frozen: bool, cfg: dict,
                 device: str, precision: str, steps_per_epoch: int, group: TrainingGroup):
        import torch

        self.bb, self.device, self.precision = bb, device, precision
        self.net = bb.model
        if device == "cpu":
            keep_freed_memory()
        bb.to(device=device, memory_format=torch.channels_last)
        head_top = bb.classifier_name.split(".")[0]
        n_blocks = len(groups)
        owner = _param_owner(groups, head_top)
        first_trained = n_blocks - n_train_blocks
        self.frozen_modules = [bb.model.get_submodule(m) for gi, (_, members) in enumerate(groups)
                               if gi < first_trained for m in members]
        self.bn_frozen = bn_frozen
        param_groups: dict[tuple[int, bool], list] = {}
        self.trainable_params = 0
        for name, p in self.net.named_parameters():
            gi = owner(name)
            train = gi >= first_trained
            p.requires_grad_(train)
            if train:
                self.trainable_params += p.numel()
                param_groups.setdefault((gi, p.ndim > 1), []).append(p)
        lr, decay = cfg["lr"], cfg["lr_decay"]
        opt_groups = [{"params": ps, "lr": lr * decay ** (n_blocks - gi),
                       "weight_decay": cfg["weight_decay"] if wd else 0.0}
                      for (gi, wd), ps in sorted(param_groups.items())]
        if cfg["optimizer"] == "sgd":
            self.opt = torch.optim.SGD(opt_groups, lr=lr, momentum=cfg["momentum"], nesterov=True)
        else:
            self.opt = torch.optim.AdamW(opt_groups, lr=lr)
        total = max(1, cfg["epochs"] * steps_per_epoch)
        warm = min(int(round(cfg["warmup_epochs"] * steps_per_epoch)), total - 1)

        def schedule(step: int) -> float:
            if step < warm:
                return (step + 1) / (warm + 1)
            return 0.5 * (1.0 + math.cos(math.pi * min(1.0, (step - warm) / max(1, total - warm))))

        self.sched = torch.optim.lr_scheduler.LambdaLR(self.opt, schedule)
        self.scaler = torch.amp.GradScaler("cuda") if precision == "fp16" else None
        if device == "cpu" and precision == "bf16":
            _depthwise_fp32_when_training(self.net)
        # Summed, then divided by the images of the whole (all-rank) batch: DDP averages the
        # ranks' gradients, so each rank scales its sum by world_size / global count.
        self.criterion = torch.nn.CrossEntropyLoss(label_smoothing=cfg["label_smoothing"],
                                                   reduction="sum")
        self.world_size = group.world_size
        self.train_net = group.wrap(self.net)  # DistributedDataParallel under torchrun

    def logits(self, x):
        return self.net(self.bb.normalize(x))

    def train_mode(self) -> None:
        import torch.nn as nn

        self.net.train()
        for m in self.frozen_modules:
            m.eval()
        if self.bn_frozen:
            for m in self.net.modules():
                if isinstance(m, nn.modules.batchnorm._BatchNorm):
                    m.eval()

    def step(self, x, y, n_batch: int) -> tuple[float, int]:
        """One optimizer step on this rank's ``x``; ``n_batch`` images in the all-rank batch.

        Returns this rank's mean loss and its correct count.
        """
        import torch

        with autocast(self.device, self.precision):
            out = self.train_net(self.bb.normalize(x))
            loss_sum = self.criterion(out.float(), y)
            loss = loss_sum * (self.world_size / n_batch)
        self.opt.zero_grad(set_to_none=True)
        if self.scaler is not None:
            self.scaler.scale(loss).backward()
            self.scaler.step(self.opt)
            self.scaler.update()
        else:
            loss.backward()
            self.opt.step()
        with torch.no_grad():
            correct = int((out.argmax(1) == y).sum())
        return float(loss_sum.detach()) / max(1, len(y)), correct

    def state(self) -> dict[str, Any]:
        return {"model": self.net.state_dict(), "optimizer": self.opt.state_dict(),
                "scheduler": self.sched.state_dict(),
                "scaler": self.scaler.state_dict() if self.scaler is not None else None}

    def load_state(self, ckpt: dict[str, Any]) -> None:
        self.net.load_state_dict(ckpt["model"])
        self.opt.load_state_dict(ckpt["optimizer"])
        self.sched.load_state_dict(ckpt["scheduler"])
        if self.scaler is not None and ckpt.get("scaler"):
            self.scaler.load_state_dict(ckpt["scaler"])


def _depthwise_fp32_when_training(model) -> None:
    """Run depthwise convolutions outside bf16 autocast while gradients are recorded.

    On CPU, oneDNN's bf16 depthwise backward is 2-3x slower than its fp32 one (lite0's 5x5
    1152-channel conv: 86 vs 28 ms at batch 32) while the forward costs the same; this made a
    whole lite0 training step ~10% faster. Inference (no gradients) keeps bf16, so evaluation
    here computes exactly what ``fxtl predict`` and ``extract`` compute.
    """
    import torch
    import torch.nn as nn

    for module in model.modules():
        if isinstance(module, nn.Conv2d) and module.groups > 1 and module.groups == module.in_channels:
            forward = module.forward

            def run(x, forward=forward):
                if torch.is_grad_enabled() and torch.is_autocast_enabled("cpu"):
                    with torch.autocast("cpu", enabled=False):
                        return forward(x.float())
                return forward(x)

            module.forward = run


def _evaluate(trainer: _Trainer, loader, labels: np.ndarray, errors: dict[str, str],
              paths: Sequence[str]) -> dict[str, Any]:
    """Summed cross-entropy, predictions and time over a loader of ``ImageDataset`` items."""
    import torch

    trainer.net.eval()
    preds = np.full(len(labels), -1, dtype=np.int64)
    loss_sum, n = 0.0, 0
    t0 = time.perf_counter()
    with torch.inference_mode(), autocast(trainer.device, trainer.precision):
        for x, idx, errs in loader:
            keep = _note_errors(idx, errs, errors, paths)
            if not keep.any():
                continue
            idx = idx[keep]
            x = x if keep.all() else x[keep]
            x = x.to(trainer.device, non_blocking=True).contiguous(memory_format=torch.channels_last)
            y = torch.as_tensor(labels[idx.numpy()], device=trainer.device)
            out = trainer.logits(x).float()
            loss_sum += float(torch.nn.functional.cross_entropy(out, y, reduction="sum"))
            preds[idx.numpy()] = out.argmax(1).cpu().numpy()
            n += len(idx)
    return {"loss_sum": loss_sum, "preds": preds, "n": n, "seconds": time.perf_counter() - t0}


def _note_errors(idx, errs, errors: dict[str, str], paths: Sequence[str]) -> np.ndarray:
    keep = np.array([not e for e in errs], dtype=bool)
    for i, e in zip(idx.tolist(), errs):
        if e and paths[i] not in errors:
            errors[paths[i]] = e
            print(f"fxtl: skipped {paths[i]}: {e}", file=sys.stderr)
    return keep


def _improved(acc: float, loss: float, best: dict[str, Any] | None, monitor: str) -> bool:
    if best is None:
        return True
    if monitor == "loss":
        return loss < best["loss"] - _MIN_DELTA
    return acc > best["accuracy"] + 1e-12 or (acc >= best["accuracy"] - 1e-12 and loss < best["loss"] - _MIN_DELTA)


def finetune(data: str | Path, *, backbone: str = DEFAULT_BACKBONE, trainable: str = "all",
             epochs: int = 10, lr: float | None = None, batch_size: int = 32,
             image_size: int | None = None, optimizer: str = "adamw", weight_decay: float = 0.05,
             momentum: float = 0.9, label_smoothing: float = 0.1, warmup_epochs: float = 1.0,
             lr_decay: float = 0.5, bn: str = "auto", patience: int | None = 3,
             monitor: str = "accuracy", crop_scale: tuple[float, float] = (0.25, 1.0),
             flip: bool = True,
             init_head: str | Path | None = None, seed: int = 0, test_size: float = 0.2,
             device: str = "auto", precision: str = "auto", workers: int | None = None,
             cache_dir: str | Path | None = None, run_name: str | None = None,
             resume: bool = False, progress: bool = True,
             on_step: Callable[[dict[str, Any]], None] | None = None) -> FinetuneResult:
    """Fine-tune ``backbone`` on the images of ``data`` and evaluate it like ``fit-head`` does.

    Parameters
    ----------
    data : str or Path
        DATA_DIR (class folders or split folders) or a CSV manifest, as for ``extract``.
    backbone : str
        Backbone name (``fxtl backbones``) or a fine-tuned run folder; default ``lite0``.
    trainable : str
        ``all``, ``head`` or ``last:N`` (the last N blocks and the classifier).
    epochs : int
        Epochs of training (0: only evaluate the initial model, e.g. an ``init_head`` probe).
    lr : float, optional
        Peak learning rate of the classifier (default 5e-4 for AdamW, 1e-2 for SGD).
    batch_size, image_size : int
        Images per step; input side (default: the backbone's, 224 for lite0).
    optimizer : {"adamw", "sgd"}
    weight_decay, momentum, label_smoothing : float
    warmup_epochs : float
        Linear warm-up length before the cosine decay (per step).
    lr_decay : float
        Discriminative learning rates: block at depth d (the classifier is 0) trains at
        ``lr * lr_decay**d``; with the default 0.5 lite0's last block trains at half the
        classifier's rate and its stem hardly moves. 1.0 gives every block the same rate.
    bn : {"auto", "train", "frozen"}
        BatchNorm statistics; ``auto`` freezes them when the smallest class has fewer than
        :data:`BN_FROZEN_BELOW` training images.
    patience : int, optional
        Stop after this many epochs without improvement on val (None: never stop early).
    monitor : {"accuracy", "loss"}
        What "improvement" means (accuracy ties are broken by lower val loss).
    crop_scale : (float, float)
        Area fraction range of the random resized crop.
    flip : bool
        Random horizontal flips (turn off where a mirror image is another class or none:
        digits, text, road signs).
    init_head : path, optional
        A ``fit-head`` run (or its ``head.joblib``) of a logistic regression on this backbone's
        features: the new classifier starts from it (LP-FT).
    seed : int
        Seeds the classifier init, the shuffling, the augmentation and the hold-out.
    test_size : float
        Hold-out fraction when the data has only a train split.
    device, precision : str
        ``auto`` picks CUDA when present and bf16 where the hardware runs it natively.
    workers : int, optional
        Decoding processes (default: none on a CPU with at most 2 cores, else one per spare
        core).
    cache_dir : path, optional
        Home of ``runs/`` (default ``./cache`` or ``$FXTL_CACHE``).
    run_name : str, optional
        Run folder name (default ``<dataset>-<backbone>-ft-<trainable>-<config hash>``, with
        ``-2``, ``-3``... when taken).
    resume : bool
        Continue the run (``run_name``, else the latest run of the same configuration) from its
        last checkpoint; starts afresh when there is none.
    progress : bool
        Progress bar per epoch on stderr (loss, accuracy, images/s).
    on_step : callable, optional
        Called after every optimizer step with ``{"epoch", "step", "loss", "images"}``
        (``epoch`` counts from 1); for logging, or to stop a run from outside.

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
    t_start = time.perf_counter()
    lr = _check_options(optimizer=optimizer, bn=bn, monitor=monitor, lr=lr, epochs=epochs,
                        batch_size=batch_size, lr_decay=lr_decay, label_smoothing=label_smoothing,
                        weight_decay=weight_decay, warmup_epochs=warmup_epochs,
                        image_size=image_size, crop_scale=crop_scale, patience=patience)
    images = discover(data)
    env = torchrun_env()
    device = resolve_device(device)
    if env is not None:  # torchrun: this rank's device and share of the cores
        if batch_size % env.world_size:
            suggest = max(env.world_size, batch_size // env.world_size * env.world_size)
            raise FxtlError(f"--batch-size {batch_size} is the batch of all {env.world_size} "
                            f"processes together and must be a multiple of {env.world_size}; "
                            f"use e.g. --batch-size {suggest}")
        device, rank_workers = place_rank(env, device)
        workers = rank_workers if workers is None else workers
    precision = resolve_precision(precision, device)
    splits = _plan_splits(images, seed=seed, test_size=test_size)
    labels = np.array([s.label for s in images.samples], dtype=np.int64)
    counts = np.bincount(labels[splits.train], minlength=len(images.class_names))

    with TrainingGroup(env, device) as group:
        bn_mode = bn if bn != "auto" else ("frozen" if counts.min() < BN_FROZEN_BELOW else "train")
        _seed_everything(seed)  # the new classifier's init draws from it
        bb = load_backbone(backbone)
        pre = bb.preprocessing.with_crop(image_size) if image_size else bb.preprocessing
        bb.preprocessing = pre
        groups = block_groups(bb.model, bb.classifier_name)
        n_train_blocks = parse_trainable(trainable, len(groups))
        trainable_name = {0: "head", len(groups): "all"}.get(n_train_blocks, f"last:{n_train_blocks}")
        cfg = {"backbone": bb.spec.name, "trainable": trainable_name, "epochs": int(epochs), "lr": lr,
               "batch_size": int(batch_size), "image_size": int(pre.crop), "optimizer": optimizer,
               "weight_decay": float(weight_decay), "momentum": float(momentum),
               "label_smoothing": float(label_smoothing), "warmup_epochs": float(warmup_epochs),
               "lr_decay": float(lr_decay), "bn": bn_mode, "patience": patience, "monitor": monitor,
               "crop_scale": [float(crop_scale[0]), float(crop_scale[1])],
               "init_head": str(Path(init_head).resolve()) if init_head else None, "seed": int(seed),
               "test_size": float(test_size), "precision": precision,
               "data_fingerprint": fingerprint(images)}
        if not flip:  # only when off, so runs and checkpoints made before the option keep their names
            cfg["flip"] = False
        init_info = _new_classifier(bb, images.class_names, init_head, images=images,
                                    train_rows=splits.train)

        run = _Run(images, splits, labels, pre=pre, cfg=cfg, device=device, workers=workers,
                   progress=progress, group=group)
        trainer = _Trainer(bb, groups=groups, n_train_blocks=n_train_blocks,
                           bn_frozen=bn_mode == "frozen", cfg=cfg, device=device, precision=precision,
                           steps_per_epoch=len(run.train_loader), group=group)
        cfg_hash = hashlib.sha256(json.dumps(cfg, sort_keys=True).encode()).hexdigest()[:8]
        base = (f"{slug(images.name)}-{slug(Path(backbone).name)}-ft-"
                f"{trainable_name.replace(':', '')}-{cfg_hash}")
        runs = Path(cache_dir) if cache_dir else default_cache_dir()
        # Rank 0 picks (and creates) the run folder; every rank reads and rank 0 writes it.
        run_dir = None
        if group.is_primary:
            run_dir = ensure_dir(_run_dir(runs / "runs", base, run_name=run_name, resume=resume))
        run_dir = Path(group.broadcast(str(run_dir)))
        lock = file_lock(run_dir / ".lock", what=f"the run {run_dir.name}") if group.is_primary \
            else contextlib.nullcontext()
        with lock:
            state = _initial_state(trainer, run_dir / "checkpoint-last.pt", cfg, resume=resume,
                                   quiet=not group.is_primary)
            resumed_from = int(state["epoch"])
            while not state["done"] and state["epoch"] < epochs:
                run.train_epoch(trainer, state, run_dir, on_step=on_step)
            metrics = run.report(trainer, state, run_dir)
            if init_info is not None:
                metrics["init_head"] = init_info
                metrics["notes"].append(
                    f"init_head refitted on this fine-tune's {init_info['refit_rows']} training "
                    "images only (same hyper-parameters), so it has not seen the selection or "
                    "report images")
            if group.is_primary:
                save_rows(run_dir, _run_rows(images, splits))
                _write_outputs(run_dir, metrics, bb, pre=pre, images=images)
        group.barrier()  # the run folder is complete before any rank returns
        return FinetuneResult(
            run_dir=run_dir, model=metrics["model"], split=metrics["split"],
            accuracy=metrics["accuracy"], macro_f1=metrics["macro_f1"], epochs=metrics["epochs"],
            seconds=time.perf_counter() - t_start, best_epoch=metrics["best_epoch"],
            fit_seconds=metrics["fit_seconds"], trainable_params=metrics["trainable_params"],
            train_images_per_second=metrics["train_images_per_second"],
            inference_images_per_second=metrics["inference_images_per_second"],
            stopped_early=metrics["stopped_early"], resumed_from_epoch=resumed_from,
            errors=metrics["errors"], metrics=metrics, rank=group.rank, world_size=group.world_size)


def _check_options(*, optimizer: str, bn: str, monitor: str, lr: float | None, epochs: int,
                   batch_size: int, lr_decay: float, label_smoothing: float, weight_decay: float,
                   warmup_epochs: float, image_size: int | None, crop_scale: tuple[float, float],
                   patience: int | None) -> float:
    """Validate the options (one-line errors naming the option); returns the learning rate."""
    for value, allowed, option in ((optimizer, OPTIMIZERS, "--optimizer"), (bn, BN_MODES, "--bn"),
                                   (monitor, MONITORS, "--monitor")):
        if value not in allowed:
            raise FxtlError(f"unknown {option} {value!r}; use one of {', '.join(allowed)}")
    lr = DEFAULT_LR[optimizer] if lr is None else float(lr)
    checks = [(epochs >= 0, f"--epochs must be >= 0 (got {epochs})"),
              (batch_size >= 1, f"--batch-size must be >= 1 (got {batch_size})"),
              (lr > 0, f"--lr must be > 0 (got {lr})"),
              (0 < lr_decay <= 1, f"--lr-decay must be in (0, 1] (got {lr_decay})"),
              (0 <= label_smoothing < 1, f"--label-smoothing must be in [0, 1) (got {label_smoothing})"),
              (weight_decay >= 0, f"--weight-decay must be >= 0 (got {weight_decay})"),
              (warmup_epochs >= 0, f"--warmup-epochs must be >= 0 (got {warmup_epochs})"),
              (image_size is None or image_size >= 16, f"--image-size must be >= 16 (got {image_size})"),
              (0 < crop_scale[0] <= crop_scale[1] <= 1,
               f"--crop-scale must satisfy 0 < low <= high <= 1 (got {crop_scale})"),
              (patience is None or patience >= 1, f"--patience must be >= 1 (got {patience})")]
    for ok, msg in checks:
        if not ok:
            raise FxtlError(msg)
    return lr


def _new_classifier(bb: Backbone, class_names: Sequence[str], init_head: str | Path | None, *,
                    images: ImageSet, train_rows: np.ndarray) -> dict[str, Any] | None:
    """Replace the ImageNet classifier by a zero one, or one folded from a logistic head
    refitted on ``train_rows`` (:func:`refit_on_train_rows`); returns the refit's info.

    A zero classifier (as in BiT, Kolesnikov et al. 2020) sends no gradient into the pretrained
    features until it has learned something, so the first steps do not scramble them with a
    random head's errors (and a run does not depend on a random init).
    """
    import torch

    feature_dim = bb.feature_dim
    replace_linear(bb.model, bb.classifier_name, len(class_names))
    W = np.zeros((len(class_names), feature_dim), dtype=np.float32)
    b = np.zeros(len(class_names), dtype=np.float32)
    info = None
    if init_head:
        pipeline, head_classes, info = refit_on_train_rows(init_head, bb, images, train_rows)
        W, b = linear_head_weights(pipeline, head_classes, class_names, feature_dim=feature_dim)
    classifier = bb.model.get_submodule(bb.classifier_name)
    with torch.no_grad():
        classifier.weight.copy_(torch.from_numpy(W))
        classifier.bias.copy_(torch.from_numpy(b))
    return info


def _initial_state(trainer: _Trainer, ckpt_path: Path, cfg: dict[str, Any], *,
                   resume: bool, quiet: bool = False) -> dict[str, Any]:
    """A fresh training state, or the checkpoint's (loading the trainer and RNG states)."""
    state: dict[str, Any] = {"epoch": 0, "history": [], "best": None, "bad_epochs": 0,
                             "fit_seconds": 0.0, "errors": {}, "stopped_early": False, "done": False}
    if not resume:
        return state
    if not ckpt_path.is_file():
        if not quiet:
            print(f"fxtl: no checkpoint in {ckpt_path.parent}; starting the run", file=sys.stderr)
        return state
    ckpt = _load_checkpoint(ckpt_path)
    old = ckpt.get("config", {})
    defaults = {"flip": True}  # keys a checkpoint holds only when they differ from these
    diff = [k for k in _RESUME_KEYS if old.get(k, defaults.get(k)) != cfg.get(k, defaults.get(k))]
    if diff:
        raise ProvenanceError(f"{ckpt_path} was made with other settings ({diff[0]}: "
                              f"{old.get(diff[0])!r}, now {cfg.get(diff[0])!r}); resume with the "
                              "same options, or start a new run without --resume")
    trainer.load_state(ckpt)
    _set_rng_state(ckpt["rng"])
    state = {k: ckpt[k] for k in state}
    if not quiet:
        print(f"fxtl: resuming {ckpt_path.parent.name} after epoch {state['epoch']}/{cfg['epochs']}",
          file=sys.stderr)
    return state


class _Run:
    """The data side of one fine-tune: loaders per split, one epoch, the final report."""

    def __init__(self, images: ImageSet, splits: _Splits, labels: np.ndarray, *,
                 pre: Preprocessing, cfg: dict[str, Any], device: str, workers: int | None,
                 progress: bool, group: TrainingGroup):
        self.images, self.splits, self.labels, self.cfg = images, splits, labels, cfg
        self.pre, self.device, self.group = pre, device, group
        self.progress = progress and group.is_primary
        if workers is None:
            # On two cores the compute threads need both: a decoding worker only preempts them
            # (lite0 training on hymenoptera: 15.8 images/s with one worker, 17.6 without).
            workers = 0 if device == "cpu" and available_cores() <= 2 else default_workers(device)
        self.workers = workers
        self.paths = [str(images.abspath(s)) for s in images.samples]
        bs = self.batch_size = cfg["batch_size"] // group.world_size  # per process
        self.train_ds = _TrainImages([self.paths[i] for i in splits.train],
                                     TrainTransform(pre, scale=tuple(cfg["crop_scale"]),
                                                    flip=cfg.get("flip", True)))
        self.sampler = _epoch_sampler(len(self.train_ds), cfg["seed"], rank=group.rank,
                                      world_size=group.world_size)
        self.train_loader = _make_loader(self.train_ds, batch_size=bs, sampler=self.sampler,
                                         seed=cfg["seed"], device=device,
                                         workers=min(workers, max(1, len(self.train_ds) // bs)))
        self.val_loader = self.eval_loader(splits.val, persistent=True) if splits.val is not None else None

    def _my_rows(self, rows: np.ndarray) -> np.ndarray:
        """This rank's share of an evaluation split (every world_size-th row)."""
        return rows[self.group.rank::self.group.world_size]

    def eval_loader(self, rows: np.ndarray, *, persistent: bool = False):
        return _make_loader(ImageDataset([self.paths[i] for i in self._my_rows(rows)], self.pre),
                            batch_size=self.batch_size * 2, device=self.device,
                            workers=self.workers, persistent=persistent)

    def train_epoch(self, trainer: _Trainer, state: dict[str, Any], run_dir: Path, *,
                    on_step: Callable[[dict[str, Any]], None] | None) -> None:
        """Train one epoch, validate, keep the best weights, checkpoint; updates ``state``."""
        import torch

        cfg, errors = self.cfg, state["errors"]
        group = self.group
        epoch = state["epoch"] + 1
        self.sampler.set_epoch(epoch)
        trainer.train_mode()
        train_labels = self.labels[self.splits.train]
        t0 = time.perf_counter()
        loss_sum, correct, seen = 0.0, 0, 0
        bar = _progress(len(self.train_ds), f"epoch {epoch}/{cfg['epochs']}", self.progress)
        for step, (x, idx, errs) in enumerate(self.train_loader, start=1):
            keep = _note_errors(idx, errs, errors, self.train_ds.paths)
            n_keep = int(keep.sum())
            bar.update(min(len(idx) * group.world_size, bar.total - bar.n))
            # Every batch advances the schedule. One that cannot train is skipped by every rank
            # together: a rank with no usable image (or a single one while BatchNorm learns batch
            # statistics: it cannot normalise one image).
            counts = group.counts(n_keep)
            if min(counts) == 0 or (min(counts) == 1 and cfg["bn"] == "train"):
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
                on_step({"epoch": epoch, "step": step, "loss": loss, "images": n_keep})
        bar.close()
        train_seconds = time.perf_counter() - t0
        # The whole batch's numbers, from every rank (and the images any rank skipped).
        everyone = group.gather((loss_sum, correct, seen, errors))
        loss_sum, correct, seen = (sum(e[i] for e in everyone) for i in range(3))
        for e in everyone:
            errors.update({k: v for k, v in e[3].items() if k not in errors})
        if seen == 0:
            raise DataError(f"no training image under {self.images.root} could be decoded "
                            f"(first: {next(iter(errors.items()), ('?', '?'))}); fix the files")
        row = {"epoch": epoch, "train_loss": loss_sum / seen, "train_accuracy": correct / seen,
               "train_seconds": round(train_seconds, 3), "train_images": int(seen),
               "train_images_per_second": seen / train_seconds,
               "lr": trainer.opt.param_groups[-1]["lr"]}
        improved = True  # without a val split the last epoch is kept
        if self.val_loader is not None:
            ev = self.evaluate(trainer, self.splits.val, self.val_loader, errors)
            row.update(val_loss=ev["loss"], val_accuracy=ev["accuracy"],
                       val_seconds=round(ev["seconds"], 3))
            improved = _improved(ev["accuracy"], ev["loss"], state["best"], cfg["monitor"])
            if self.progress:
                print(f"fxtl: epoch {epoch}: val loss {ev['loss']:.4f}, val accuracy "
                      f"{ev['accuracy']:.4f}{' (best)' if improved else ''}", file=sys.stderr)
        state["fit_seconds"] += time.perf_counter() - t0
        state["history"].append(row)
        state["epoch"] = epoch
        if improved:
            state["best"] = {"epoch": epoch, "accuracy": row.get("val_accuracy"),
                             "loss": row.get("val_loss")}
            state["bad_epochs"] = 0
            if group.is_primary:
                _torch_save(trainer.net.state_dict(), run_dir / "model.pt")
        else:
            state["bad_epochs"] += 1
            patience = cfg["patience"]
            if patience is not None and state["bad_epochs"] >= patience and epoch < cfg["epochs"]:
                state["stopped_early"] = True
                if group.is_primary:
                    print(f"fxtl: early stop after epoch {epoch}: no val improvement in {patience} "
                          f"epoch(s); keeping epoch {state['best']['epoch']}", file=sys.stderr)
        state["done"] = state["stopped_early"] or epoch == cfg["epochs"]
        if group.is_primary:  # one writer; every rank holds the same state
            _torch_save({"format": CHECKPOINT_FORMAT, "format_version": CHECKPOINT_VERSION,
                         "config": cfg, **trainer.state(), "rng": _rng_state(), **state},
                        run_dir / "checkpoint-last.pt")

    def evaluate(self, trainer: _Trainer, rows: np.ndarray, loader, errors: dict[str, str]) -> dict[str, Any]:
        """Loss, accuracy, predictions (in ``rows`` order) and speed over ``rows``.

        Each rank evaluates its share (:meth:`_my_rows`); the pieces are gathered, so every
        rank returns the numbers of the whole split.
        """
        mine = self._my_rows(rows)
        ev = _evaluate(trainer, loader, self.labels[mine], errors, [self.paths[i] for i in mine])
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

    def report(self, trainer: _Trainer, state: dict[str, Any], run_dir: Path) -> dict[str, Any]:
        """Metrics of the kept weights on the reported split (the ``metrics.json`` content)."""
        import torch

        from ..report.metrics import classification_metrics

        model_file = run_dir / "model.pt"
        self.group.barrier()  # rank 0 has written model.pt
        if state["best"] is not None:
            trainer.net.load_state_dict(torch.load(model_file, map_location=self.device,
                                                   weights_only=True))
        elif self.group.is_primary:  # epochs == 0: the initial model is the result
            _torch_save(trainer.net.state_dict(), model_file)
        rows, errors = self.splits.report, state["errors"]
        # Reporting on the selection split: reuse its loader (its workers are running already).
        loader = self.val_loader if rows is self.splits.val else self.eval_loader(rows)
        ev = self.evaluate(trainer, rows, loader, errors)
        good = ev["preds"] >= 0
        if not good.any():
            raise DataError(f"none of the {self.splits.report_name} images under "
                            f"{self.images.root} could be decoded; fix the files")
        m = classification_metrics(self.labels[rows][good], ev["preds"][good], self.images.class_names)
        history, cfg, bb = state["history"], self.cfg, trainer.bb
        train_time = sum(h["train_seconds"] for h in history)
        return {
            "kind": "finetune", "model": f"finetune:{cfg['trainable']}", "backbone": bb.spec.name,
            "architecture": bb.spec.arch, "base_weights_sha256": bb.weights_sha256,
            "dataset": self.images.name, "dataset_root": str(self.images.root),
            # Like a cache's fingerprint: the data plus what shapes the result.
            "dataset_fingerprint": fingerprint(self.images, backbone=bb.spec.name),
            "data_fingerprint": cfg["data_fingerprint"], "split": self.splits.report_name,
            "selection_split": self.splits.val_name or None, **m,
            "fit_seconds": round(state["fit_seconds"], 3), "epochs": int(state["epoch"]),
            "best_epoch": int(state["best"]["epoch"]) if state["best"] else 0,
            "stopped_early": bool(state["stopped_early"]),
            "trainable_params": int(trainer.trainable_params),
            "total_params": int(sum(p.numel() for p in trainer.net.parameters())),
            "train_images_per_second": (sum(h["train_images"] for h in history) / train_time
                                        if train_time > 0 else 0.0),
            "inference_images_per_second": ev["images_per_second"],
            "history": history, "n_train": int(len(self.splits.train)),
            "errors": [{"path": p, "reason": r} for p, r in sorted(errors.items())],
            "notes": list(self.splits.notes), "bn": cfg["bn"], "precision": trainer.precision,
            "device": self.device, "world_size": self.group.world_size,
            "batch_size_per_process": self.batch_size, "config": cfg, "run_dir": str(run_dir),
            "created": now_iso(),
            "versions": versions(),
        }


def _write_outputs(run_dir: Path, metrics: dict[str, Any], bb: Backbone, *, pre: Preprocessing,
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
    atomic_write_json(run_dir / MODEL_MANIFEST, manifest)


def plot_learning_curves(history: Sequence[dict[str, Any]], path: Path, *, best_epoch: int = 0,
                         title: str = "") -> Path:
    """Loss and accuracy per epoch, train and val, side by side (PNG)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(9, 3.6))
    ep = [h["epoch"] for h in history]
    for ax, key, label in ((axes[0], "loss", "loss"), (axes[1], "accuracy", "accuracy")):
        ax.plot(ep, [h[f"train_{key}"] for h in history], "o-", label=f"train {label} (augmented)")
        if history and f"val_{key}" in history[0]:
            ax.plot(ep, [h[f"val_{key}"] for h in history], "s-", label=f"val {label}")
        if best_epoch:
            ax.axvline(best_epoch, color="grey", linestyle=":", label=f"kept (epoch {best_epoch})")
        ax.set_xlabel("epoch")
        ax.set_ylabel(label)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    return save_figure(fig, path, title=title)
