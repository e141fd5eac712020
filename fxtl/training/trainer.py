"""The network, optimizer and schedule of one run, one optimizer step, and evaluation.

The recipe: AdamW (or SGD with Nesterov momentum), linear warm-up then cosine decay per step,
label smoothing, weight decay on weights only (not biases or norms), discriminative learning
rates (``lr * lr_decay**depth``, depth 0 = the classifier, 1 = the last block...). BatchNorm
statistics may be frozen (running statistics kept, affine weights still trained); frozen blocks
always keep theirs. bf16 autocast where the hardware runs it natively (fp16 with a gradient
scaler on older GPUs), except depthwise convolutions while training on CPU.
"""
from __future__ import annotations

import math
import sys
import time
from typing import TYPE_CHECKING, Any, Sequence

import numpy as np

from ..distributed import TrainingGroup
from ..runtime import autocast
from .blocks import param_owner
from .config import FinetuneConfig

if TYPE_CHECKING:
    from ..backbones.registry import Backbone

__all__ = ["Trainer", "depthwise_fp32_when_training", "evaluate_loader", "note_errors"]


class Trainer:
    """Holds the network, optimizer and schedule of one run (``cfg`` is the resolved config)."""

    def __init__(self, bb: Backbone, *, groups, n_train_blocks: int, cfg: FinetuneConfig,
                 device: str, steps_per_epoch: int, group: TrainingGroup):
        import torch

        precision = cfg.precision  # resolved: fp32, bf16 or fp16
        self.bb, self.device, self.precision = bb, device, precision
        self.net = bb.model
        bb.to(device=device, memory_format=torch.channels_last)
        head_top = bb.classifier_name.split(".")[0]
        n_blocks = len(groups)
        owner = param_owner(groups, head_top)
        first_trained = n_blocks - n_train_blocks
        self.frozen_modules = [bb.model.get_submodule(m) for gi, (_, members) in enumerate(groups)
                               if gi < first_trained for m in members]
        self.bn_frozen = cfg.bn == "frozen"
        self.param_groups: dict[tuple[int, bool], list] = {}
        self.trainable_params = 0
        for name, p in self.net.named_parameters():
            gi = owner(name)
            train = gi >= first_trained
            p.requires_grad_(train)
            if train:
                self.trainable_params += p.numel()
                self.param_groups.setdefault((gi, p.ndim > 1), []).append(p)
        self.n_blocks, self.cfg = n_blocks, cfg
        self.restart(steps_per_epoch)
        if device == "cpu" and precision == "bf16":
            depthwise_fp32_when_training(self.net)
        # Summed, then divided by the images of the whole (all-rank) batch: DDP averages the
        # ranks' gradients, so each rank scales its sum by world_size / global count.
        self.criterion = torch.nn.CrossEntropyLoss(label_smoothing=cfg.label_smoothing,
                                                   reduction="sum")
        self.world_size = group.world_size
        self.train_net = group.wrap(self.net)  # DistributedDataParallel under torchrun

    def restart(self, steps_per_epoch: int) -> None:
        """A fresh optimizer, schedule (and fp16 scaler) for ``steps_per_epoch`` steps an epoch:
        warm-up over ``warmup_epochs`` epochs, then a cosine over the rest of ``epochs``. The
        refit trains other rows with it (more steps an epoch, the same schedule per epoch)."""
        import torch

        cfg, n_blocks = self.cfg, self.n_blocks
        lr, decay = cfg.peak_lr, cfg.lr_decay
        opt_groups = [{"params": ps, "lr": lr * decay ** (n_blocks - gi),
                       "weight_decay": cfg.weight_decay if wd else 0.0}
                      for (gi, wd), ps in sorted(self.param_groups.items())]
        if cfg.optimizer == "sgd":
            self.opt = torch.optim.SGD(opt_groups, lr=lr, momentum=cfg.momentum, nesterov=True)
        else:
            self.opt = torch.optim.AdamW(opt_groups, lr=lr)
        total = max(1, cfg.epochs * steps_per_epoch)
        warm = min(int(round(cfg.warmup_epochs * steps_per_epoch)), total - 1)

        def schedule(step: int) -> float:
            if step < warm:
                return (step + 1) / (warm + 1)
            return 0.5 * (1.0 + math.cos(math.pi * min(1.0, (step - warm) / max(1, total - warm))))

        self.sched = torch.optim.lr_scheduler.LambdaLR(self.opt, schedule)
        self.scaler = torch.amp.GradScaler("cuda") if self.precision == "fp16" else None

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


def depthwise_fp32_when_training(model) -> None:
    """Run depthwise convolutions outside bf16 autocast while gradients are recorded.

    On CPU, oneDNN's bf16 depthwise backward is slower than its fp32 one while the forward costs
    the same (benchmarks/finetune_speed.py). Inference (no gradients) keeps bf16, so evaluation
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


def evaluate_loader(trainer: Trainer, loader, labels: np.ndarray, errors: dict[str, str],
              paths: Sequence[str]) -> dict[str, Any]:
    """Summed cross-entropy, predictions and time over a loader of ``ImageDataset`` items."""
    import torch

    trainer.net.eval()
    preds = np.full(len(labels), -1, dtype=np.int64)
    loss_sum, n = 0.0, 0
    t0 = time.perf_counter()
    with torch.inference_mode(), autocast(trainer.device, trainer.precision):
        for x, idx, errs in loader:
            keep = note_errors(idx, errs, errors, paths)
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


def note_errors(idx, errs, errors: dict[str, str], paths: Sequence[str]) -> np.ndarray:
    keep = np.array([not e for e in errs], dtype=bool)
    for i, e in zip(idx.tolist(), errs):
        if e and paths[i] not in errors:
            errors[paths[i]] = e
            print(f"fxtl: skipped {paths[i]}: {e}", file=sys.stderr)
    return keep


