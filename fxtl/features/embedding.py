"""Images in, features out: decoding batches and running a frozen backbone over them.

Speed comes from what the field knows: DataLoader workers decode (with JPEG draft mode) while
the main process computes on CUDA; on the CPU a thread pool decodes each batch on all cores and
then the network computes on all cores, so the two phases never contend. uint8 tensors cross
process boundaries; ``inference_mode``, ``channels_last`` and bf16 autocast where the hardware
runs it natively; pinned memory and non-blocking copies on CUDA.
"""
from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Iterator, Sequence

import numpy as np

from .._util import progress_bar
from ..data.discovery import ImageDataset
from ..data.images import collate_images
from ..runtime import autocast, default_workers, resolve_device, resolve_precision

if TYPE_CHECKING:  # importing the class imports torch
    from ..backbones.network import Backbone

__all__ = ["embed_paths", "embed_layers", "default_batch_size", "default_workers", "ThreadedBatches"]


def default_batch_size(device: str, precision: str = "bf16") -> int:
    """Images per forward pass: 128 on CUDA; on CPU 16 for bf16 and 4 for fp32.

    On the CPU the fastest size per image is small: fp32 slows down as activations outgrow the
    caches, bf16 (half the bytes) later (benchmarks/extract_speed.py measures it).
    """
    if device.startswith("cuda"):
        return 128
    return 4 if precision == "fp32" else 16


def make_loader(dataset, *, batch_size: int, workers: int, device: str):
    """Batches of ``(uint8 images, indices, errors)``: worker processes, or a decode thread pool."""
    import torch

    if workers == 0:
        return ThreadedBatches(dataset, batch_size=batch_size, threads=torch.get_num_threads())
    return torch.utils.data.DataLoader(dataset, batch_size=batch_size, shuffle=False,
                                       collate_fn=collate_images,
                                       num_workers=workers, pin_memory=device.startswith("cuda"),
                                       prefetch_factor=4, persistent_workers=False)


class ThreadedBatches:
    """Decode each batch with ``threads`` threads (Pillow releases the GIL while decoding and
    resizing), in order; the same batches as a DataLoader with ``shuffle=False``."""

    def __init__(self, dataset, *, batch_size: int, threads: int):
        self.dataset, self.batch_size, self.threads = dataset, batch_size, max(1, threads)

    def __len__(self) -> int:
        return (len(self.dataset) + self.batch_size - 1) // self.batch_size

    def __iter__(self):
        from concurrent.futures import ThreadPoolExecutor

        n = len(self.dataset)
        with ThreadPoolExecutor(self.threads, thread_name_prefix="fxtl-decode") as pool:
            for lo in range(0, n, self.batch_size):
                yield collate_images(list(pool.map(self.dataset.__getitem__,
                                                   range(lo, min(n, lo + self.batch_size)))))


def embed_paths(backbone: Backbone, paths: Sequence[str | Path], *, device: str = "auto",
                precision: str = "auto", batch_size: int | None = None, workers: int | None = None,
                with_logits: bool = False, progress: bool = False,
                desc: str = "embed") -> Iterator[tuple[np.ndarray, np.ndarray, np.ndarray | None,
                                                       list[tuple[int, str]]]]:
    """Run ``backbone`` over image files, batch by batch.

    Yields ``(indices, features, logits_or_None, errors)`` per batch, where ``errors`` lists
    ``(index, reason)`` for images that could not be decoded (their feature rows are garbage
    and must be dropped by the caller). Used by ``extract`` and ``predict``.
    """
    def step(bb, x):
        if with_logits:
            feats, logits = bb.forward_with_logits(x)
            return feats, logits.float().cpu().numpy()
        return bb(x), None

    yield from _batches(backbone, paths, step, device=device, precision=precision,
                        batch_size=batch_size, workers=workers, progress=progress, desc=desc)


def embed_layers(backbone: Backbone, paths: Sequence[str | Path], *, device: str = "auto",
                 precision: str = "auto", batch_size: int | None = None,
                 workers: int | None = None, progress: bool = False,
                 desc: str = "embed") -> Iterator[tuple[np.ndarray, np.ndarray,
                                                        dict[str, np.ndarray], list[tuple[int, str]]]]:
    """As :func:`embed_paths`, with the pooled outputs of ``backbone.extra_layers`` from the
    same forward pass: yields ``(indices, features, {layer: float32 [B, D_layer]}, errors)``."""
    def step(bb, x):
        feats, layers = bb.forward_layers(x)
        return feats, {name: v.float().cpu().numpy() for name, v in layers.items()}

    yield from _batches(backbone, paths, step, device=device, precision=precision,
                        batch_size=batch_size, workers=workers, progress=progress, desc=desc)


def _batches(backbone: Backbone, paths: Sequence[str | Path], step, *, device: str,
             precision: str, batch_size: int | None, workers: int | None, progress: bool,
             desc: str):
    """Decode ``paths`` in batches and run ``step(backbone, x) -> (features, extra)`` on each."""
    import torch

    device = resolve_device(device)
    precision = resolve_precision(precision, device)
    batch_size = batch_size or default_batch_size(device, precision)
    workers = default_workers(device) if workers is None else workers
    backbone = backbone.to(device=device, memory_format=torch.channels_last).eval()
    loader = make_loader(ImageDataset(paths, backbone.preprocessing), batch_size=batch_size,
                         workers=min(workers, max(0, (len(paths) + batch_size - 1) // batch_size)),
                         device=device)
    bar = progress_bar(len(paths), desc, progress, smoothing=0.1)
    try:
        with torch.inference_mode(), autocast(device, precision):
            for x, idx, errs in loader:
                x = x.to(device, non_blocking=True).contiguous(memory_format=torch.channels_last)
                feats, extra = step(backbone, x)
                bad = [(int(i), e) for i, e in zip(idx.tolist(), errs) if e]
                bar.update(len(idx))
                yield idx.numpy(), feats.float().cpu().numpy(), extra, bad
    finally:
        bar.close()


