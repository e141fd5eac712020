"""Device and precision choice, in one place (never hard-coded elsewhere)."""
from __future__ import annotations

import contextlib
import functools
from pathlib import Path

from .errors import FxtlError

__all__ = ["resolve_device", "resolve_precision", "autocast", "cpu_supports_bf16", "PRECISIONS",
           "DEVICES"]

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
