"""The settings of one fine-tune: a frozen, validated :class:`FinetuneConfig`.

The config is the one list of options. ``fxtl finetune`` builds it from its flags,
:func:`fxtl.finetune` from keyword arguments, the run folder stores its resolved form
(:meth:`FinetuneConfig.record`, in ``metrics.json`` and the checkpoint) and ``resume`` compares
the stored record field by field (:data:`RESUME_KEYS`, derived from the fields). Adding an
option is adding a field here (and its flag in ``fxtl/cli/training.py``).
"""
from __future__ import annotations

import dataclasses
import re
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

from ..data.splits import SELECTION_HOLDOUT  # the selection hold-out's name, decided there
from ..errors import ParameterError

__all__ = ["FinetuneConfig", "RESUME_KEYS", "BN_FROZEN_BELOW", "OPTIMIZERS", "BN_MODES", "MONITORS",
           "INITS", "DEFAULT_LR", "PROBE_LR_FACTOR", "SELECTION_HOLDOUT", "parse_trainable"]

# bn="auto" freezes BatchNorm statistics when the smallest class has fewer training images than
# this: statistics of a few batches are noisier than the pretrained ones.
BN_FROZEN_BELOW = 200
OPTIMIZERS = ("adamw", "sgd")
BN_MODES = ("auto", "train", "frozen")
MONITORS = ("accuracy", "loss")
# How the new classifier starts: a logistic-regression probe fitted on the training rows' own
# features (LP-FT), or zeros.
INITS = ("probe", "zero")
# Default peak learning rate (the classifier's) per optimizer (benchmarks/finetune_accuracy.py).
DEFAULT_LR = {"adamw": 5e-4, "sgd": 1e-2}
# From a fitted classifier the default rate is this fraction of DEFAULT_LR: the classifier needs
# no large steps, and Adam's steps do not shrink with the small gradients of a good start, so
# the full rate moves the pretrained features away from what the probe was fitted on
# (docs/finetune.md).
PROBE_LR_FACTOR = 0.4

_TRAINABLE = re.compile(r"all|head|last:(\d+)")
# Fields that only say where or how fast a run computes, or what it keeps once finished: a
# resumed run may change them, and they are not part of the stored record (nor the run name).
_NOT_COMPARED = "resume"


def _fail(param: str, message: str) -> None:
    raise ParameterError(param, message)


@dataclass(frozen=True)
class FinetuneConfig:
    """Every option of a fine-tune; validated on construction (and on ``dataclasses.replace``).

    Parameters
    ----------
    backbone : str
        Backbone name (``fxtl backbones``) or a fine-tuned run folder; default ``lite0``.
    trainable : str
        ``all``, ``head`` or ``last:N`` (the last N blocks and the classifier).
    epochs : int
        Epochs of training (0: only evaluate the initial model, e.g. an ``init_head`` probe).
    lr : float, optional
        Peak learning rate of the classifier (default :data:`DEFAULT_LR` of the optimizer).
    batch_size : int
        Images per optimizer step (under torchrun, of all processes together).
    image_size : int, optional
        Input side (default: the backbone's, 224 for lite0).
    optimizer : {"adamw", "sgd"}
    weight_decay, momentum, label_smoothing : float
    warmup_epochs : float
        Linear warm-up length before the cosine decay (per step).
    lr_decay : float
        Discriminative learning rates: the block at depth d (the classifier is 0) trains at
        ``lr * lr_decay**d``; 1.0 gives every block the same rate.
    bn : {"auto", "train", "frozen"}
        BatchNorm statistics; ``auto`` freezes them when the smallest class has fewer than
        :data:`BN_FROZEN_BELOW` training images.
    patience : int, optional
        Stop after this many epochs without improvement on the selection split (None: never;
        no selection split, see ``selection_holdout``: never).
    monitor : {"accuracy", "loss"}
        What "improvement" means (accuracy ties are broken by lower loss, except against
        the fitted start, epoch 0, which only a higher accuracy replaces).
    crop_scale : (float, float)
        Area fraction range of the random resized crop.
    flip : bool
        Random horizontal flips (turn off where a mirror image is another class: digits, text).
    init : {"probe", "zero"}
        How the new classifier starts. ``probe`` (the default, LP-FT): a standardised logistic
        regression fitted on the training rows' features (one pass of the pretrained network,
        no augmentation; C by cross-validation on those rows), folded into the classifier; when
        a selection split exists that start is epoch 0, kept unless a trained epoch beats it.
        ``zero``: a zero classifier (the recipe before LP-FT became the default).
    init_head : path, optional
        A ``fit-head`` logistic-regression run on this backbone's features: the classifier starts
        from it refitted on this fine-tune's training rows (LP-FT with that head's
        hyper-parameters; overrides ``init``).
    selection_holdout : bool
        Where the data has no val split to select on (train only; train and one reported split,
        e.g. train + val with val reported), select on a ``test_size`` hold-out of train
        (:data:`SELECTION_HOLDOUT`): the fitted start is epoch 0 there, the best epoch is kept,
        ``patience`` stops early, and a kept start is refitted on train plus the hold-out. False:
        every training image trains, nothing selects and the last epoch is kept. Data with
        train, val and test selects on val either way.
    refit : bool
        Where the selection rows are a hold-out of train and a trained epoch k won there, retrain
        from the same start on every train image (training rows plus the hold-out) for exactly k
        epochs, with the run's own schedule (warm-up and cosine over ``epochs``, stopped after
        epoch k) and seed, and report that model: the hold-out chooses, then all rows train, as
        ``fit-head`` refits the head its selection chose. False: report epoch k as trained on
        the rows beside the hold-out. A kept start (epoch 0) is refitted either way.
    seed : int
        Seeds the classifier, the shuffling, the augmentation and the hold-outs.
    test_size : float
        Fraction of train held out: to report on when the data has only a train split, and to
        select on (``selection_holdout``).
    device, precision : str
        ``auto`` picks CUDA when present and bf16 where the hardware runs it natively.
    workers : int, optional
        Decoding processes (default: none on a CPU with at most 2 cores, else one per spare core).
    keep_checkpoint : bool
        Keep ``checkpoint-last.pt`` (the whole training state, about 3x the model) once the run
        has finished. By default it is removed then: only an unfinished run needs it to resume.

    Examples
    --------
    >>> cfg = FinetuneConfig(epochs=3, trainable="last:2")
    >>> cfg.epochs, cfg.crop_scale, cfg.init, cfg.peak_lr
    (3, (0.25, 1.0), 'probe', 0.0002)
    >>> dataclasses.replace(cfg, lr=-1)
    Traceback (most recent call last):
    ...
    fxtl.errors.ParameterError: lr must be > 0, got -1
    """

    backbone: str = "lite0"
    trainable: str = "all"
    epochs: int = 10
    lr: float | None = None
    batch_size: int = 32
    image_size: int | None = None
    optimizer: str = "adamw"
    weight_decay: float = 0.05
    momentum: float = 0.9
    label_smoothing: float = 0.1
    warmup_epochs: float = 1.0
    lr_decay: float = 0.5
    bn: str = "auto"
    patience: int | None = 3
    monitor: str = "accuracy"
    crop_scale: tuple[float, float] = (0.25, 1.0)
    flip: bool = True
    init: str = "probe"
    init_head: str | None = None
    selection_holdout: bool = True
    refit: bool = True
    seed: int = 0
    test_size: float = 0.2
    device: str = field(default="auto", metadata={_NOT_COMPARED: False})
    precision: str = "auto"
    workers: int | None = field(default=None, metadata={_NOT_COMPARED: False})
    keep_checkpoint: bool = field(default=False, metadata={_NOT_COMPARED: False})

    def __post_init__(self) -> None:
        for name, allowed in (("optimizer", OPTIMIZERS), ("bn", BN_MODES), ("monitor", MONITORS),
                              ("init", INITS)):
            if getattr(self, name) not in allowed:
                _fail(name, f"unknown {name} {getattr(self, name)!r}; use one of {', '.join(allowed)}")
        trainable = str(self.trainable).strip().lower()
        if not _TRAINABLE.fullmatch(trainable):
            _fail("trainable", f"trainable {self.trainable!r} is not all, head or last:N (e.g. last:2)")
        try:
            crop = (float(self.crop_scale[0]), float(self.crop_scale[1]))
        except (TypeError, ValueError, IndexError):
            crop = (-1.0, -1.0)
        if not (len(self.crop_scale) == 2 and 0 < crop[0] <= crop[1] <= 1):
            _fail("crop_scale", f"crop_scale must be (low, high) with 0 < low <= high <= 1, got "
                                f"{self.crop_scale!r}")
        # Normalised forms, so equal settings compare (and hash) equal.
        object.__setattr__(self, "trainable", trainable)
        object.__setattr__(self, "crop_scale", crop)
        if self.init_head is not None:
            object.__setattr__(self, "init_head", str(Path(self.init_head).resolve()))
        checks = [
            ("epochs", _is_int(self.epochs) and self.epochs >= 0, "must be an integer >= 0"),
            ("batch_size", _is_int(self.batch_size) and self.batch_size >= 1, "must be an integer >= 1"),
            ("lr", self.lr is None or _is_num(self.lr) and self.lr > 0, "must be > 0"),
            ("lr_decay", _is_num(self.lr_decay) and 0 < self.lr_decay <= 1, "must be in (0, 1]"),
            ("label_smoothing", _is_num(self.label_smoothing) and 0 <= self.label_smoothing < 1,
             "must be in [0, 1)"),
            ("weight_decay", _is_num(self.weight_decay) and self.weight_decay >= 0, "must be >= 0"),
            ("momentum", _is_num(self.momentum) and 0 <= self.momentum <= 1, "must be in [0, 1]"),
            ("warmup_epochs", _is_num(self.warmup_epochs) and self.warmup_epochs >= 0, "must be >= 0"),
            ("image_size", self.image_size is None or _is_int(self.image_size) and self.image_size >= 16,
             "must be an integer >= 16"),
            ("patience", self.patience is None or _is_int(self.patience) and self.patience >= 1,
             "must be an integer >= 1 (or None: never stop early)"),
            ("test_size", _is_num(self.test_size) and 0 < self.test_size < 1, "must be in (0, 1)"),
            ("seed", _is_int(self.seed), "must be an integer"),
            ("workers", self.workers is None or _is_int(self.workers) and self.workers >= 0,
             "must be an integer >= 0"),
            ("flip", isinstance(self.flip, bool), "must be True or False"),
            ("selection_holdout", isinstance(self.selection_holdout, bool), "must be True or False"),
            ("refit", isinstance(self.refit, bool), "must be True or False"),
            ("keep_checkpoint", isinstance(self.keep_checkpoint, bool), "must be True or False"),
        ]
        for name, ok, rule in checks:
            if not ok:
                _fail(name, f"{name} {rule}, got {getattr(self, name)!r}")

    @property
    def starts_fitted(self) -> bool:
        """Does the classifier start from a fitted head (``init_head`` or the probe)?"""
        return self.init_head is not None or self.init == "probe"

    @property
    def peak_lr(self) -> float:
        """``lr``, or the optimizer's default (times :data:`PROBE_LR_FACTOR` from the probe;
        an ``init_head`` start keeps the rate advise's LP-FT plan was measured with)."""
        if self.lr is not None:
            return float(self.lr)
        probe = self.init == "probe" and self.init_head is None
        return DEFAULT_LR[self.optimizer] * (PROBE_LR_FACTOR if probe else 1.0)

    def record(self, *, data_fingerprint: str, two_splits: bool = False,
               holdout_selection: bool = False) -> dict[str, Any]:
        """The stored form (``metrics.json["config"]``, the checkpoint): every compared field.

        ``flip`` appears only when off and ``init`` only when not ``zero``, so runs and
        checkpoints made before those options keep their names and resume with the settings they
        were made with. ``selection_holdout`` appears only where it gives other rows than runs
        made without the option had: on with ``two_splits`` (the data has train and one reported
        split, and no val split to select on), off without. So a two-split checkpoint that
        selected on nothing resumes only with ``selection_holdout=False``, never silently on a
        hold-out of its training rows. ``refit`` appears only where it changes the answer: on,
        and the selection rows are a hold-out of train (``holdout_selection``); runs made before
        the refit, and runs with it off, hold no ``refit`` and keep their names.
        """
        d: dict[str, Any] = {f.name: getattr(self, f.name) for f in fields(self)
                             if f.metadata.get(_NOT_COMPARED, True)}
        d["lr"] = self.peak_lr
        for name in ("weight_decay", "momentum", "label_smoothing", "warmup_epochs", "lr_decay",
                     "test_size"):
            d[name] = float(d[name])
        d["crop_scale"] = list(self.crop_scale)
        if self.flip:
            del d["flip"]
        if self.init == "zero" or self.init_head is not None:
            del d["init"]
        if self.selection_holdout != two_splits:
            del d["selection_holdout"]
        if not (self.refit and holdout_selection):
            del d["refit"]
        d["data_fingerprint"] = data_fingerprint
        return d

    def replace(self, **changes: Any) -> "FinetuneConfig":
        """A copy with ``changes`` (validated); unknown names raise :class:`TypeError`."""
        unknown = sorted(set(changes) - {f.name for f in fields(self)})
        if unknown:
            raise TypeError(f"unknown fine-tune option(s) {', '.join(unknown)}; the options are "
                            f"{', '.join(f.name for f in fields(self))}")
        return dataclasses.replace(self, **changes)


# Stored settings that must match for ``resume`` (the rest may change between sessions).
RESUME_KEYS: tuple[str, ...] = tuple(f.name for f in fields(FinetuneConfig)
                                     if f.metadata.get(_NOT_COMPARED, True)) + ("data_fingerprint",)


def parse_trainable(trainable: str, n_blocks: int) -> int:
    """``all`` -> n_blocks, ``head`` -> 0, ``last:N`` -> N: how many blocks train (plus the head).

    Examples
    --------
    >>> parse_trainable("last:2", 9), parse_trainable("all", 9), parse_trainable("head", 9)
    (2, 9, 0)
    """
    text = str(trainable).strip().lower()
    m = _TRAINABLE.fullmatch(text)
    if not m:
        _fail("trainable", f"trainable {trainable!r} is not all, head or last:N (e.g. last:2)")
    if text == "all":
        return n_blocks
    if text == "head":
        return 0
    k = int(m.group(1))
    if not 1 <= k <= n_blocks:
        _fail("trainable", f"trainable {trainable}: this backbone has {n_blocks} blocks; use "
                           f"last:1 .. last:{n_blocks}, or all")
    return k


def _is_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _is_num(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)
