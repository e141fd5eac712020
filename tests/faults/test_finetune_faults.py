"""Faults around `fxtl finetune`: SIGKILL mid-epoch then --resume, damaged or hostile checkpoints.

tests/test_finetune.py proves that a resumed run equals an uninterrupted one weight for weight
(library level). Here the real command is killed from outside and resumed by the real command:
exit statuses, the checkpoint left behind, what the resumed run reports, and that no
half-written file ever sits at a final path.
"""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time

import pytest
import torch
from click.testing import CliRunner

from fxtl.cli import cli
from fxtl.data.samples import write_shapes

from ._cli import ROOT, assert_one_line_error, run_fxtl

# The real CLI, with one test hook: at step 2 of epoch 2 it says so and waits to be killed.
_PAUSE_IN_EPOCH_2 = r"""
import importlib, sys, time
ft = importlib.import_module("fxtl.training.loop")
real = ft.finetune

def pause(info):
    if info["epoch"] == 2 and info["step"] == 2:
        print("TEST: inside epoch 2", file=sys.stderr, flush=True)
        time.sleep(600)

ft.finetune = lambda *a, **k: real(*a, **{**k, "on_step": pause})
from fxtl.cli import cli
cli(sys.argv[1:], prog_name="fxtl")
"""


# One thread per process: the CI machine is small and shared; results do not depend on it.
_ENV = {**os.environ, "OMP_NUM_THREADS": "1"}


def _kill_inside_epoch_2(args: list[str], timeout: float = 240) -> tuple[int, str]:
    proc = subprocess.Popen([sys.executable, "-c", _PAUSE_IN_EPOCH_2, *args], cwd=ROOT, env=_ENV,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    seen: list[bytes] = []
    reader = threading.Thread(target=lambda: seen.extend(iter(lambda: proc.stderr.read1(4096), b"")),
                              daemon=True)
    reader.start()
    deadline = time.monotonic() + timeout
    try:
        while b"TEST: inside epoch 2" not in b"".join(seen):
            if proc.poll() is not None or time.monotonic() > deadline:
                pytest.fail("the run did not reach epoch 2:\n" + b"".join(seen).decode(errors="replace")[-3000:])
            time.sleep(0.05)
        os.kill(proc.pid, signal.SIGKILL)
        return proc.wait(timeout=60), b"".join(seen).decode(errors="replace")
    finally:
        if proc.poll() is None:
            proc.kill()
        reader.join(timeout=10)


def _temporaries(folder) -> list[str]:
    return sorted(p.name for p in folder.iterdir() if p.name.endswith((".tmp", ".partial")))


@pytest.fixture(scope="module")
def tiny(tmp_path_factory) -> tuple[str, object]:
    """A dataset and timm's 'test_efficientnet' with seeded weights: offline, quick to build."""
    import timm

    base = tmp_path_factory.mktemp("tiny")
    torch.manual_seed(0)
    weights = base / "test_efficientnet.pth"
    torch.save(timm.create_model("test_efficientnet").state_dict(), weights)
    return f"timm:test_efficientnet={weights}", write_shapes(base / "data", per_class=6)


def test_sigkill_inside_epoch_2_then_resume_finishes_from_the_checkpoint(tmp_path, tiny):
    backbone, data = tiny  # 12 train images: 3 steps of 4 per epoch
    args = ["finetune", str(data), "--backbone", backbone, "--cache-dir", str(tmp_path / "home"),
            "--run-name", "r", "--epochs", "3", "--image-size", "32", "--batch-size", "4",
            "--workers", "0", "--precision", "fp32", "--json"]
    status, err = _kill_inside_epoch_2(args)
    assert status == -signal.SIGKILL, err[-3000:]
    run = tmp_path / "home" / "runs" / "r"
    ckpt = torch.load(run / "checkpoint-last.pt", map_location="cpu", weights_only=True)
    assert ckpt["epoch"] == 1 and not ckpt["done"]  # the last complete epoch, whole and loadable
    assert (run / "model.pt").is_file()  # epoch 1's weights, kept as the best so far
    assert not (run / "fxtl-model.json").exists() and not (run / "metrics.json").exists()
    assert _temporaries(run) == []

    proc = run_fxtl(*args, "--resume", env=_ENV, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "Traceback" not in proc.stderr
    assert "fxtl: resuming r after epoch 1/3" in proc.stderr
    out = json.loads(proc.stdout)
    assert out["resumed_from_epoch"] == 1 and out["epochs"] == 3 and out["run_dir"] == str(run)
    history = json.loads((run / "metrics.json").read_text())["history"]
    assert [h["epoch"] for h in history] == [1, 2, 3]  # epoch 1 not retrained, 2 and 3 run once
    ckpt = torch.load(run / "checkpoint-last.pt", map_location="cpu", weights_only=True)
    assert ckpt["epoch"] == 3 and ckpt["done"]
    assert (run / "fxtl-model.json").is_file() and _temporaries(run) == []


class _RunsCode:
    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return (open, (self.marker, "w"))


@pytest.mark.parametrize("kind", ["truncated", "runs code"])
def test_resume_refuses_a_damaged_or_hostile_checkpoint(tmp_path, tiny, kind):
    backbone, data = tiny
    run = tmp_path / "home" / "runs" / "r"
    run.mkdir(parents=True)
    marker = tmp_path / "pwned"
    ckpt = run / "checkpoint-last.pt"
    if kind == "truncated":
        torch.save({"format": "x", "weights": torch.zeros(1000)}, ckpt)
        ckpt.write_bytes(ckpt.read_bytes()[:1500])
    else:
        torch.save({"format": "fxtl-finetune-checkpoint", "rng": _RunsCode(marker)}, ckpt)
    before = ckpt.read_bytes()
    r = CliRunner().invoke(cli, ["finetune", str(data), "--backbone", backbone, "--cache-dir",
                                 str(tmp_path / "home"), "--run-name", "r", "--resume", "--epochs", "1",
                                 "--image-size", "32", "--batch-size", "4", "--workers", "0"])
    assert_one_line_error(r.exit_code, r.stderr, str(ckpt), "cannot be read", "without --resume")
    assert not marker.exists()
    assert ckpt.read_bytes() == before  # left for the user to inspect or delete
