"""What a benchmark ran on, written beside its numbers: wall times mean little across hosts
(the same fxtl took 4.3 s on one 2-core machine and 7.8 s on another for the same command)."""
from __future__ import annotations

import os
import platform
import subprocess
import time
from pathlib import Path

__all__ = ["cpu_model", "host", "provenance"]


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


def provenance(benchmark: str, argv: list[str]) -> dict:
    """The head of a results file: which benchmark, at which commit, run how, where and when,
    and the load average before it (other jobs on a shared machine stretch wall times)."""
    repo = Path(__file__).resolve().parents[1]
    commit = subprocess.run(["git", "rev-parse", "HEAD"], cwd=repo, capture_output=True,
                            text=True).stdout.strip()
    return {"benchmark": benchmark, "git_commit": commit,
            "command": f"python benchmarks/{benchmark}.py " + " ".join(argv),
            "machine": platform.machine(), "cpus": os.cpu_count(), "host": host(),
            "date": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
            "load_before": [round(v, 2) for v in os.getloadavg()]}
