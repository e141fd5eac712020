"""Device and precision choice, in one place (never hard-coded elsewhere)."""
from __future__ import annotations

import contextlib
import functools
import os
from pathlib import Path

from .distributed import available_cores
from .errors import ParameterError

__all__ = ["resolve_device", "resolve_precision", "autocast", "cpu_supports_bf16", "PRECISIONS",
           "DEVICES", "keep_freed_memory", "gpu_driver_present", "default_workers"]

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


def gpu_driver_present() -> bool:
    """Whether a CUDA/ROCm driver could be there at all (device nodes or the driver's /proc entry).

    Without one, torch cannot see a GPU, so ``auto`` resolves to the CPU without importing torch.
    """
    return any(os.path.exists(p) for p in ("/dev/nvidiactl", "/dev/nvidia0", "/proc/driver/nvidia",
                                           "/dev/kfd", "/dev/dxg"))


def resolve_device(device: str = "auto") -> str:
    """``auto`` -> ``cuda`` when a GPU is visible, else ``cpu``; a CUDA request without one fails.

    Raises
    ------
    ParameterError
        ``device`` is unknown, or names CUDA on a machine without a visible GPU.
    """
    if device == "cpu":
        return device
    if device == "auto" and not gpu_driver_present():
        return "cpu"
    if device != "auto" and not device.startswith("cuda"):
        raise ParameterError("device", f"unknown device {device!r}; use auto, cpu or cuda")
    import torch

    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if not torch.cuda.is_available():
        raise ParameterError("device", f"device {device!r} was asked for but no CUDA GPU is "
                                       "visible; use device='cpu'")
    return device


def resolve_precision(precision: str, device: str) -> str:
    """``auto`` -> the fastest precision the hardware runs natively.

    Raises
    ------
    ParameterError
        ``precision`` is unknown, or fp16 is asked for on the CPU.
    """
    if precision not in PRECISIONS:
        raise ParameterError("precision", f"unknown precision {precision!r}; use one of "
                                          f"{', '.join(PRECISIONS)}")
    if precision != "auto":
        if precision == "fp16" and not device.startswith("cuda"):
            raise ParameterError("precision", "precision 'fp16' needs a CUDA device; on CPU use "
                                              "bf16 or fp32")
        return precision
    if device.startswith("cuda"):
        import torch

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

    By default glibc serves large blocks with ``mmap`` and unmaps them on free, so every CPU
    forward pass maps its activations afresh and the kernel zero-fills each page. This changes
    the whole process (it keeps its peak heap), so no library call makes it: the ``fxtl``
    command turns it on for the commands that run a network on the CPU; a Python caller may
    call it once at start-up (the command skips it under ``FXTL_MALLOC_TUNING=0``); jemalloc or
    tcmalloc via ``LD_PRELOAD`` do the same job. Returns whether the setting was applied (only on
    glibc).
    """
    try:
        import ctypes

        libc = ctypes.CDLL("libc.so.6")
        mallopt = libc.mallopt
    except (OSError, AttributeError):  # not glibc (macOS, Windows, musl)
        return False
    M_TRIM_THRESHOLD, M_MMAP_THRESHOLD = -1, -3
    return bool(mallopt(M_MMAP_THRESHOLD, 1 << 30)) and bool(mallopt(M_TRIM_THRESHOLD, (1 << 31) - 1))


def release_freed_memory() -> bool:
    """Hand memory that Python has freed back to the OS now (glibc's ``malloc_trim``).

    Unlike :func:`keep_freed_memory` this changes no setting: it only returns pages that are
    already free, in every malloc arena (search threads each get one), so a long run of heads
    does not keep the high-water mark of each one. Returns whether anything was released.
    """
    try:
        import ctypes

        return bool(ctypes.CDLL("libc.so.6").malloc_trim(0))
    except (OSError, AttributeError):  # not glibc
        return False


def default_workers(device: str) -> int:
    """Decoding worker processes: up to 8 on CUDA (decode overlaps the GPU), none on CPU.

    On CPU every core is already busy computing, and a worker process stealing a core makes
    torch's OpenMP threads wait for each other. Instead each batch is decoded by a thread pool
    on all cores, then computed on all cores: the two phases take turns and nothing contends.
    """
    if device.startswith("cuda"):
        return max(1, min(8, available_cores() - 1))
    return 0
