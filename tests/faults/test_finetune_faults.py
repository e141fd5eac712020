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
from pathlib import Path

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
    assert (run / "fxtl-model.json").is_file() and _temporaries(run) == []
    assert not (run / "checkpoint-last.pt").exists()  # finished: removed


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
    assert_one_line_error(r.exit_code, r.stderr, str(ckpt), "cannot be read", "start the run afresh")
    assert not marker.exists()
    assert ckpt.read_bytes() == before  # left for the user to inspect or delete


# ----------------------------------------------------------------------------- issue 14
def _ft_args(data, backbone, home, *extra: str) -> list[str]:
    return ["finetune", str(data), "--backbone", backbone, "--cache-dir", str(home), "--epochs", "1",
            "--image-size", "32", "--batch-size", "4", "--workers", "0", "--precision", "fp32",
            "--trainable", "head", *extra]


@pytest.mark.parametrize("files", [
    {"head.joblib": b"joblib", "head.json": b"{}", "metrics.json": b'{"kind": "head"}',
     "confusion.png": b"png"},  # a fit-head run
    {"notes.txt": b"mine"},  # anything else
])
@pytest.mark.parametrize("resume", [False, True])
def test_run_name_of_another_run_is_refused_and_kept(tmp_path, tiny, files, resume):
    """Issue 14 item 2: --run-name naming a head run (or any other files) never overwrites them."""
    backbone, data = tiny
    run = tmp_path / "home" / "runs" / "mix"
    run.mkdir(parents=True)
    for name, content in files.items():
        (run / name).write_bytes(content)
    extra = ["--run-name", "mix", *(["--resume"] if resume else [])]
    r = CliRunner().invoke(cli, _ft_args(data, backbone, tmp_path / "home", *extra))
    assert_one_line_error(r.exit_code, r.stderr, str(run), "another run")
    assert sorted(p.name for p in run.iterdir() if p.name != ".lock") == sorted(files)
    assert all((run / n).read_bytes() == c for n, c in files.items())


def _full_disk(monkeypatch, root) -> None:
    """Every write under ``root`` fails as on a full file system (ENOSPC).

    ``torch.save`` to a path there fails like PyTorch's zip writer does (a RuntimeError, after
    leaving a partial file); a plain write raises ``OSError(ENOSPC)``.
    """
    import errno
    from pathlib import Path

    root = str(root)
    real_write, real_save, real_savefig = Path.write_bytes, torch.save, None

    def under(p) -> bool:
        return isinstance(p, (str, os.PathLike)) and os.path.abspath(p).startswith(root)

    def write_bytes(self, data):
        if under(self):
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(self))
        return real_write(self, data)

    def save(obj, f, *args, **kwargs):
        if under(f):
            real_write(Path(f), b"PK\x03\x04")
            raise RuntimeError("[enforce fail at inline_container.cc:664] . unexpected pos 64 vs 0")
        return real_save(obj, f, *args, **kwargs)

    monkeypatch.setattr(Path, "write_bytes", write_bytes)
    monkeypatch.setattr(torch, "save", save)


def test_disk_full_in_a_new_run_says_no_space_and_leaves_no_half_run(tmp_path, tiny, monkeypatch):
    """Issue 14 item 9: one line saying 'no space'; no run folder holding only model.pt."""
    backbone, data = tiny
    home = tmp_path / "home"
    _full_disk(monkeypatch, home / "runs")
    r = CliRunner().invoke(cli, _ft_args(data, backbone, home, "--run-name", "r"))
    line = assert_one_line_error(r.exit_code, r.stderr, str(home / "runs" / "r"))
    assert "no space" in line.lower()
    assert not (home / "runs" / "r").exists()


def test_disk_full_while_resuming_keeps_the_previous_state(tmp_path, tiny, monkeypatch):
    from fxtl.training.loop import finetune

    backbone, data = tiny
    home = tmp_path / "home"

    def stop_in_epoch_2(info):
        if info["epoch"] == 2:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        finetune(data, backbone=backbone, cache_dir=home, run_name="r", epochs=2, image_size=32,
                 batch_size=4, workers=0, precision="fp32", trainable="head", progress=False,
                 on_step=stop_in_epoch_2)
    run = home / "runs" / "r"
    before = {p.name: p.read_bytes() for p in run.iterdir() if p.is_file() and p.name != ".lock"}
    assert {"checkpoint-last.pt", "model.pt"} <= set(before)
    _full_disk(monkeypatch, home / "runs")
    args = _ft_args(data, backbone, home, "--run-name", "r", "--resume")
    args[args.index("--epochs") + 1] = "2"
    r = CliRunner().invoke(cli, args)
    line = assert_one_line_error(r.exit_code, r.stderr)
    assert "no space" in line.lower()
    after = {p.name: p.read_bytes() for p in run.iterdir() if p.is_file() and p.name != ".lock"}
    assert after == before
    ckpt = torch.load(run / "checkpoint-last.pt", map_location="cpu", weights_only=True)
    assert ckpt["epoch"] == 1


def test_non_utf8_file_name_trains_and_is_recorded(tmp_path, tiny):
    """Issue 14 item 10: a file name that is not UTF-8 neither crashes nor gets lost."""
    import shutil

    from fxtl.data.splits import load_rows

    backbone, data = tiny
    copy = tmp_path / "data"
    shutil.copytree(data, copy)
    src = next((copy / "train" / "circle").iterdir())
    bad = os.fsdecode(b"bad\xff\xfe.png")
    shutil.copy(src, copy / "train" / "circle" / bad)
    # Every train image trains (no selection hold-out), so the file is among the training rows.
    r = CliRunner().invoke(cli, _ft_args(copy, backbone, tmp_path / "home", "--json",
                                         "--no-selection-holdout"))
    assert r.exit_code == 0, r.output[-3000:]
    out = json.loads(r.stdout)
    rows = load_rows(out["run_dir"])
    assert f"train/circle/{bad}" in rows.train.paths
    m = json.loads((Path(out["run_dir"]) / "metrics.json").read_text())
    assert m["n_train"] == 13 and m["errors"] == []
