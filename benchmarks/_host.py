"""What a benchmark ran on, written beside its numbers: wall times mean little across hosts
(the same fxtl took 4.3 s on one 2-core machine and 7.8 s on another for the same command)."""
from __future__ import annotations

import os
import platform
from pathlib import Path

__all__ = ["cpu_model", "host"]


def cpu_model() -> str:
    """The CPU's model name from /proc/cpuinfo (Linux), else what :mod:`platform` knows."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def host() -> dict:
    """CPU model, core count, whether it has bf16 instructions (fxtl's CPU precision then
    defaults to bf16) and the memory, for a results file."""
    flags: set[str] = set()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("flags"):
                flags = set(line.split(":", 1)[1].split())
                break
    except OSError:
        pass
    try:
        mem = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30
    except (ValueError, OSError, AttributeError):
        mem = None
    return {"cpu": cpu_model(), "cpus": os.cpu_count(), "avx512_bf16": "avx512_bf16" in flags,
            "memory_gib": round(mem, 1) if mem else None, "python": platform.python_version()}
