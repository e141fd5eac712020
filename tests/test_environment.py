"""The environment is read at the boundary: the CLI (click's ``envvar=``) and a torchrun launch.

Library code takes arguments; an ``FXTL_*`` variable read deep inside it is a setting no caller
can see or override. The scan below lists every read of one in fxtl/ and allows only the places
named in ALLOWED, each with why.
"""
from __future__ import annotations

import ast
from pathlib import Path

import pytest

from fxtl.distributed import torchrun_env
from fxtl.errors import FxtlError

PACKAGE = Path(__file__).resolve().parents[1] / "fxtl"

ALLOWED = {
    # the command line: click options with envvar= (FXTL_CACHE, FXTL_CACHE_PROBE, FXTL_MALLOC_TUNING)
    "cli.py",
    # a torchrun launch hands every rank one environment: RANK, WORLD_SIZE... and FXTL_DIST_TIMEOUT
    "distributed.py",
    # default_cache_dir(): the library's default home follows $FXTL_CACHE as the CLI's does
    "_util.py",
}


def _environment_reads(path: Path) -> list[str]:
    """``FXTL_*`` names read through os.environ / os.getenv in ``path``."""
    found = []
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Constant) and isinstance(node.value, str) \
                and node.value.startswith("FXTL_"):
            found.append(node.value)
    text = path.read_text()
    reads = "environ" in text or "getenv" in text
    return found if reads else []


def test_only_the_boundary_reads_fxtl_environment_variables():
    offenders = {str(p.relative_to(PACKAGE)): names for p in sorted(PACKAGE.rglob("*.py"))
                 if (names := _environment_reads(p)) and str(p.relative_to(PACKAGE)) not in ALLOWED}
    assert offenders == {}


def test_the_scan_finds_a_read(tmp_path):
    bad = tmp_path / "x.py"
    bad.write_text("import os\nPROBE = os.environ.get('FXTL_CACHE_PROBE', '')\n")
    assert _environment_reads(bad) == ["FXTL_CACHE_PROBE"]


def test_the_barrier_timeout_comes_with_the_torchrun_environment():
    launch = {"WORLD_SIZE": "2", "RANK": "1", "LOCAL_RANK": "1", "LOCAL_WORLD_SIZE": "2"}
    assert torchrun_env(launch).timeout_s == 7 * 24 * 3600
    assert torchrun_env({**launch, "FXTL_DIST_TIMEOUT": "90"}).timeout_s == 90.0
    for raw in ("soon", "0", "-5"):
        with pytest.raises(FxtlError, match="FXTL_DIST_TIMEOUT"):
            torchrun_env({**launch, "FXTL_DIST_TIMEOUT": raw})
