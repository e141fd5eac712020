"""checkpoint-last.pt (the training state, ~3x the model) lives only as long as a run can resume.

Removed once the run has finished (its fxtl-model.json, written last, is in place), kept with
``keep_checkpoint`` / ``--keep-checkpoint``, kept by a run stopped at any earlier point so that
``--resume`` finishes it; ``--resume`` of a finished run has nothing to do and says so.
Tiny on purpose: timm's test network, 32-pixel inputs, one or two epochs on CPU.
"""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner

import fxtl
from fxtl.cli import cli
from fxtl.data.samples import write_shapes
from fxtl.training import loop
from fxtl.training.loop import finetune

TINY = dict(image_size=32, batch_size=4, workers=0, progress=False, precision="fp32",
            trainable="head", epochs=2)
CLI_TINY = ["--image-size", "32", "--batch-size", "4", "--workers", "0", "--precision", "fp32",
            "--trainable", "head", "--epochs", "2"]
CKPT = "checkpoint-last.pt"
CLASSES = ["ants", "honey bée"]  # a space and a non-ASCII letter, as real folders have


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> Path:
    """train/val split folders of two named classes, 6 images each per split."""
    root = write_shapes(tmp_path_factory.mktemp("named") / "insects", per_class=6)
    for split in ("train", "val"):
        for old, new in zip(("circle", "square"), CLASSES):
            (root / split / old).rename(root / split / new)
    return root


def _files(run: Path) -> set[str]:
    return {p.name for p in run.iterdir() if p.name != ".lock"}


def test_finished_run_removes_its_checkpoint_and_resume_has_nothing_to_do(data, tiny, tmp_path,
                                                                          capsys):
    res = finetune(data, backbone=tiny, cache_dir=tmp_path, **TINY)
    run = res.run_dir
    assert _files(run) == {"fxtl-model.json", "model.pt", "metrics.json", "rows.json",
                           "predictions.csv", "learning_curves.png", "confusion.png"}
    assert CKPT not in res.to_dict()["artifacts"] and "model.pt" in res.to_dict()["artifacts"]
    assert fxtl.load_backbone(str(run)).categories == CLASSES  # the run is whole without it
    model_bytes = (run / "model.pt").read_bytes()
    capsys.readouterr()

    # --resume without a run name finds the finished run of these settings: nothing is trained,
    # no second run folder appears, its stored results come back.
    again = finetune(data, backbone=tiny, cache_dir=tmp_path, resume=True, **TINY)
    err = capsys.readouterr().err
    assert again.run_dir == run and [p.name for p in (tmp_path / "runs").iterdir()] == [run.name]
    assert f"{run.name} is finished" in err and "nothing to resume" in err
    assert (again.accuracy, again.epochs, again.resumed_from_epoch) == (res.accuracy, 2, 2)
    assert again.metrics["history"] == res.metrics["history"]
    assert (run / "model.pt").read_bytes() == model_bytes and not (run / CKPT).exists()

    # By name, from the CLI: exit 0, the run's JSON, the sentence on stderr.
    args = ["finetune", str(data), "--backbone", tiny, "--cache-dir", str(tmp_path), *CLI_TINY,
            "--run-name", run.name]
    r = CliRunner().invoke(cli, [*args, "--resume", "--json"])
    assert r.exit_code == 0, r.output
    out = json.loads(r.stdout)
    assert out["run_dir"] == str(run) and out["accuracy"] == res.accuracy
    assert out["resumed_from_epoch"] == 2 and CKPT not in out["artifacts"]
    assert "is finished" in r.stderr and "nothing to resume" in r.stderr

    # Other settings are refused (the stored record says which), and so is training over it.
    with pytest.raises(fxtl.ProvenanceError, match=r"metrics.json was made with other settings \(lr"):
        finetune(data, backbone=tiny, cache_dir=tmp_path, run_name=run.name, resume=True,
                 **{**TINY, "lr": 0.5})
    r = CliRunner().invoke(cli, args)
    assert r.exit_code == 1 and "already holds a run, finished" in r.stderr, r.output
    assert (run / "model.pt").read_bytes() == model_bytes


def test_keep_checkpoint_keeps_the_final_state(data, tiny, tmp_path):
    r = CliRunner().invoke(cli, ["finetune", str(data), "--backbone", tiny, "--cache-dir",
                                 str(tmp_path), *CLI_TINY, "--keep-checkpoint", "--json"])
    assert r.exit_code == 0, r.output
    run = Path(json.loads(r.stdout)["run_dir"])
    ckpt = torch.load(run / CKPT, map_location="cpu", weights_only=True)
    assert ckpt["epoch"] == 2 and ckpt["done"] and (run / "fxtl-model.json").is_file()
    assert json.loads(r.stdout)["artifacts"][CKPT] == str(run / CKPT)
    # Not part of the run's settings: the name (config hash) and the record do not change.
    plain = finetune(data, backbone=tiny, cache_dir=tmp_path / "plain", **TINY)
    assert plain.run_dir.name == run.name
    assert "keep_checkpoint" not in json.loads((run / "metrics.json").read_text())["config"]


def test_interrupted_run_keeps_its_checkpoint_and_resume_finishes_it(data, tiny, tmp_path):
    def stop_in_epoch_2(info):
        if info["epoch"] == 2:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        finetune(data, backbone=tiny, cache_dir=tmp_path, run_name="r", on_step=stop_in_epoch_2,
                 **TINY)
    run = tmp_path / "runs" / "r"
    assert torch.load(run / CKPT, map_location="cpu", weights_only=True)["epoch"] == 1
    assert not (run / "fxtl-model.json").exists()

    res = finetune(data, backbone=tiny, cache_dir=tmp_path, run_name="r", resume=True, **TINY)
    assert res.resumed_from_epoch == 1 and res.epochs == 2
    assert [h["epoch"] for h in res.metrics["history"]] == [1, 2]
    assert (run / "fxtl-model.json").is_file() and not (run / CKPT).exists()


def test_run_stopped_before_its_last_file_keeps_its_checkpoint(data, tiny, tmp_path, monkeypatch):
    """A disk that fills at learning_curves.png (before fxtl-model.json): the run is not finished,
    so the checkpoint stays and --resume writes the missing files."""
    def full_disk(*args, **kwargs):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(loop, "plot_learning_curves", full_disk)
    with pytest.raises(OSError, match="No space"):
        finetune(data, backbone=tiny, cache_dir=tmp_path, run_name="r", **TINY)
    run = tmp_path / "runs" / "r"
    assert {CKPT, "model.pt", "metrics.json"} <= _files(run)
    assert not (run / "fxtl-model.json").exists()
    ckpt = torch.load(run / CKPT, map_location="cpu", weights_only=True)
    assert ckpt["epoch"] == 2 and ckpt["done"]

    monkeypatch.undo()
    res = finetune(data, backbone=tiny, cache_dir=tmp_path, run_name="r", resume=True, **TINY)
    assert res.resumed_from_epoch == 2 and res.epochs == 2  # nothing retrained
    assert (run / "fxtl-model.json").is_file() and (run / "learning_curves.png").is_file()
    assert not (run / CKPT).exists()
