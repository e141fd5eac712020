"""Device and precision choice, in one place (never hard-coded elsewhere)."""
from __future__ import annotations

import contextlib
import functools
import os
from pathlib import Path

from .errors import FxtlError

__all__ = ["resolve_device", "resolve_precision", "autocast", "cpu_supports_bf16", "PRECISIONS",
           "DEVICES", "keep_freed_memory"]

PRECISIONS = ("auto", "fp32", "bf16", "fp16")
DEVICES = ("auto", "cpu", "cuda")


@functools.lru_cache(maxsize=1)
def cpu_supports_bf16() -> bool:
    """True when the CPU has native bf16 matrix instructions (AVX512-BF16 or AMX).

    Without them bf16 autocast on CPU is emulated and slower than fp32, so ``auto`` keeps fp32.
    """
    try:
        flags = Path("/proc/cpuinfo").read_text()
    except OSError:
        return False
    return "avx512_bf16" in flags or "amx_bf16" in flags


def resolve_device(device: str = "auto") -> str:
    import torch

    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise FxtlError("--device cuda was asked for but no CUDA GPU is visible; use --device cpu")
    if device not in ("cpu",) and not device.startswith("cuda"):
        raise FxtlError(f"unknown device {device!r}; use auto, cpu or cuda")
    return device


def resolve_precision(precision: str, device: str) -> str:
    """``auto`` -> the fastest precision the hardware runs natively."""
    import torch

    if precision not in PRECISIONS:
        raise FxtlError(f"unknown precision {precision!r}; use one of {', '.join(PRECISIONS)}")
    if precision != "auto":
        if precision == "fp16" and not device.startswith("cuda"):
            raise FxtlError("--precision fp16 needs a CUDA device; on CPU use bf16 or fp32")
        return precision
    if device.startswith("cuda"):
        return "bf16" if torch.cuda.is_bf16_supported() else "fp16"
    return "bf16" if cpu_supports_bf16() else "fp32"


def autocast(device: str, precision: str):
    """The autocast context for ``precision`` on ``device`` (a no-op for fp32)."""
    import torch

    if precision == "fp32":
        return contextlib.nullcontext()
    dtype = torch.bfloat16 if precision == "bf16" else torch.float16
    return torch.autocast(device_type="cuda" if device.startswith("cuda") else "cpu", dtype=dtype)


@functools.lru_cache(maxsize=1)
def keep_freed_memory() -> bool:
    """Let glibc's malloc reuse freed activation buffers instead of returning them to the OS.

    By default glibc serves blocks above ~32 MB with ``mmap`` and unmaps them on free, so every
    CPU forward/backward pass maps its activations afresh and the kernel zero-fills each page:
    a lite0 training step at batch 32 took 0.56-0.98 million page faults and 1-2 s of system
    time per 6 steps on the 2-core machine (35-75 thousand and 0.1-0.2 s with this), 5-14 %
    more images/s. Called by ``extract`` and ``finetune`` on CPU; the process keeps its peak
    heap (peak RSS is unchanged). ``FXTL_MALLOC_TUNING=0`` leaves malloc alone; jemalloc or
    tcmalloc via ``LD_PRELOAD`` do the same job. Returns whether the setting was applied
    (only on glibc).
    """
    if os.environ.get("FXTL_MALLOC_TUNING", "1") == "0":
        return False
    try:
        import ctypes

        libc = ctypes.CDLL("libc.so.6")
        mallopt = libc.mallopt
    except (OSError, AttributeError):  # not glibc (macOS, Windows, musl)
        return False
    M_TRIM_THRESHOLD, M_MMAP_THRESHOLD = -1, -3
    return bool(mallopt(M_MMAP_THRESHOLD, 1 << 30)) and bool(mallopt(M_TRIM_THRESHOLD, (1 << 31) - 1))
