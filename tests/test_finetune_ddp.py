"""DDP fine-tuning under torchrun (gloo on CPU): one writer, single-process results, resumable
across world sizes."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import fxtl
from fxtl.training.loop import epoch_sampler, finetune

ROOT = Path(__file__).resolve().parents[1]
# fp32 and frozen BatchNorm: a 2-process step computes the single-process step's gradient.
# Every one of the 12 train images trains (no selection hold-out): an even count, so no rank
# pads its share with a repeated image (the sampler pads like torch's DistributedSampler).
TINY = dict(image_size=32, batch_size=4, workers=0, progress=False, precision="fp32", bn="frozen",
            selection_holdout=False)
CLI_TINY = ["--image-size", "32", "--batch-size", "4", "--precision", "fp32", "--bn", "frozen",
            "--no-selection-holdout"]



def torchrun(*args: str) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
           "-m", "fxtl", "finetune", *args, "--json"]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=300, cwd=ROOT,
                          env={k: v for k, v in os.environ.items() if k not in ("WORLD_SIZE", "RANK")})


def weights(run_dir: Path) -> dict[str, torch.Tensor]:
    return torch.load(run_dir / "checkpoint-last.pt", weights_only=True)["model"]


def assert_same_weights(a: dict, b: dict, tol: float = 1e-5) -> None:
    assert a.keys() == b.keys()
    for k in a:
        torch.testing.assert_close(a[k].float(), b[k].float(), atol=tol, rtol=tol, msg=k)


def test_rank_batches_together_are_the_single_process_batch():
    n, seed, bs, world = 11, 3, 4, 2
    single = list(epoch_sampler(n, seed))
    ranks = [list(epoch_sampler(n, seed, rank=r, world_size=world)) for r in range(world)]
    assert [len(r) for r in ranks] == [6, 6]  # padded to 12, like torch's DistributedSampler
    for k in range(2):  # the full batches (the last one holds the padding)
        together = sorted(x for r in ranks for x in r[k * bs // world:(k + 1) * bs // world])
        assert together == sorted(single[k * bs:(k + 1) * bs])
    assert set(x for r in ranks for x in r) == set(single)  # every image, with its augmentation seed
    s = epoch_sampler(n, seed, rank=1, world_size=world)
    s.set_epoch(1)
    assert list(s) != ranks[1]  # a new order each epoch


def test_global_batch_must_split_over_the_ranks(shapes_dir, tmp_path, monkeypatch):
    for k, v in {"WORLD_SIZE": "3", "RANK": "0", "LOCAL_RANK": "0", "LOCAL_WORLD_SIZE": "3"}.items():
        monkeypatch.setenv(k, v)
    with pytest.raises(fxtl.FxtlError, match="multiple of 3"):
        finetune(shapes_dir, epochs=1, cache_dir=tmp_path, **TINY)
    # WORLD_SIZE without torchrun's rendezvous variables: one line saying so, no hang
    for k in ("MASTER_ADDR", "MASTER_PORT"):
        monkeypatch.delenv(k, raising=False)
    threads = torch.get_num_threads()  # placing the rank gives it its share of the cores
    try:
        with pytest.raises(fxtl.FxtlError, match="MASTER_ADDR, MASTER_PORT is not; launch with torchrun"):
            finetune(shapes_dir, epochs=1, cache_dir=tmp_path, **{**TINY, "batch_size": 3})
    finally:
        torch.set_num_threads(threads)


def test_two_processes_equal_one_and_resume_across_world_sizes(shapes_dir, tmp_path, tiny):
    # One epoch on 2 processes: one run folder, one checkpoint, one JSON result, the same
    # weights as one process.
    one = finetune(shapes_dir, backbone=tiny, epochs=1, cache_dir=tmp_path / "one", run_name="r",
                   keep_checkpoint=True, **TINY)
    proc = torchrun(str(shapes_dir), "--backbone", tiny, "--epochs", "1", "--cache-dir",
                    str(tmp_path / "ddp"), "--run-name", "r", "--keep-checkpoint", *CLI_TINY)
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = json.loads(proc.stdout)  # rank 0 alone reports
    runs = list((tmp_path / "ddp" / "runs").iterdir())
    assert [r.name for r in runs] == ["r"]
    assert sorted(p.name for p in runs[0].glob("*.pt")) == ["checkpoint-last.pt", "model.pt"]
    metrics = json.loads((runs[0] / "metrics.json").read_text())
    assert metrics["world_size"] == 2 and metrics["batch_size_per_process"] == 2
    assert out["epochs"] == 1 and out["accuracy"] == one.accuracy
    assert metrics["history"][0]["train_images"] == one.metrics["history"][0]["train_images"]
    assert_same_weights(weights(runs[0]), weights(one.run_dir))

    # Two epochs on one process, against: one process stopped in epoch 2, resumed on two.
    full = finetune(shapes_dir, backbone=tiny, epochs=2, cache_dir=tmp_path / "full", run_name="r",
                    keep_checkpoint=True, **TINY)

    class Stop(Exception):
        pass

    def stop(info):
        if info["epoch"] == 2:
            raise Stop

    with pytest.raises(Stop):
        finetune(shapes_dir, backbone=tiny, epochs=2, cache_dir=tmp_path / "cut", run_name="r",
                 on_step=stop, **TINY)
    assert torch.load(tmp_path / "cut" / "runs" / "r" / "checkpoint-last.pt", weights_only=True)["epoch"] == 1
    proc = torchrun(str(shapes_dir), "--backbone", tiny, "--epochs", "2", "--cache-dir",
                    str(tmp_path / "cut"), "--run-name", "r", "--resume", "--keep-checkpoint",
                    *CLI_TINY)
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = json.loads(proc.stdout)
    assert out["resumed_from_epoch"] == 1 and out["epochs"] == 2
    assert_same_weights(weights(tmp_path / "cut" / "runs" / "r"), weights(full.run_dir))
