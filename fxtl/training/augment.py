"""Training-time augmentation and the per-epoch sampler: seeded by ``(seed, epoch, image)`` only.

The shuffling order and every augmentation draw come from the run's seed and the epoch, not from
worker or global RNG state, so a run does not depend on the number of workers or processes.
"""
from __future__ import annotations

import math
from pathlib import Path
from typing import Sequence

import numpy as np

from ..data.images import INTERPOLATION, ImageDecodeError, Preprocessing, open_image, to_chw

__all__ = ["TrainTransform", "TrainImages", "epoch_sampler"]


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


class TrainImages:
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


def epoch_sampler(n: int, seed: int, *, rank: int = 0, world_size: int = 1):
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


