"""Helpers shared by the fault tests: run fxtl as a user would, check the one-line contract."""
from __future__ import annotations

import ctypes
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]

# Linux capabilities that let root read any file and list any folder.
_CAP_DAC_OVERRIDE, _CAP_DAC_READ_SEARCH = 1, 2
_PR_CAPBSET_DROP = 24


def _drop_read_override() -> None:
    """preexec_fn: take root's power to ignore file modes (the child then obeys chmod 0)."""
    libc = ctypes.CDLL(None, use_errno=True)
    for cap in (_CAP_DAC_OVERRIDE, _CAP_DAC_READ_SEARCH):
        if libc.prctl(_PR_CAPBSET_DROP, cap, 0, 0, 0) != 0:
            raise OSError(ctypes.get_errno(), "prctl(PR_CAPBSET_DROP) refused")


def run_fxtl(*args, unprivileged: bool = False, env: dict | None = None, timeout: float = 300,
             code: str | None = None) -> subprocess.CompletedProcess:
    """``python -m fxtl ARGS`` (or ``python -c CODE ARGS``) in a fresh process, text output.

    ``unprivileged``: when running as root (CI), the child loses the capabilities that bypass
    file permissions, so a ``chmod 0`` file is really unreadable to it, as to any user.
    """
    cmd = [sys.executable, *(["-c", code] if code else ["-m", "fxtl"]), *map(str, args)]
    preexec = _drop_read_override if unprivileged and os.geteuid() == 0 else None
    try:
        return subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=timeout,
                              env={**os.environ, **(env or {})}, preexec_fn=preexec)
    except subprocess.SubprocessError as exc:
        if preexec is not None and "preexec" in str(exc):
            pytest.skip("cannot drop CAP_DAC_OVERRIDE here, so root would read chmod-0 files")
        raise


def lines(text: str) -> list[str]:
    """Non-empty lines (progress bars rewrite their line with \\r: each rewrite is a line)."""
    return [line for line in text.splitlines() if line.strip()]


def assert_one_line_error(exit_code: int, stderr: str, *fragments: str, code: int = 1) -> str:
    """The CLI contract for a user's mistake: status ``code``, one stderr line, no traceback."""
    assert exit_code == code, f"exit {exit_code}, expected {code}; stderr:\n{stderr[-3000:]}"
    assert "Traceback" not in stderr, stderr[-3000:]
    errors = [line for line in lines(stderr) if line.startswith("fxtl: error:")]
    assert len(errors) == 1 and lines(stderr)[-1] == errors[0], stderr[-3000:]
    for fragment in fragments:
        assert fragment in errors[0], f"{fragment!r} not in {errors[0]!r}"
    return errors[0]


def assert_usage_error(result, option: str) -> None:
    """click's usage error: status 2, the option named, nothing else run."""
    assert result.exit_code == 2, (result.exit_code, result.output[-2000:])
    assert "Traceback" not in result.output
    assert f"Invalid value for '{option}'" in result.output or \
        f"No such option: {option}" in result.output or f"Missing argument '{option}'" in result.output, \
        result.output[-2000:]


class RunsCode:
    """Unpickling this creates ``marker``: a stand-in for any code an attacker would run."""

    def __init__(self, marker: Path):
        self.marker = str(marker)

    def __reduce__(self):
        return (open, (self.marker, "w"))
