"""Damaged or forged fine-tuned run folders: refused in one line, before any weights are loaded."""
from __future__ import annotations

import hashlib
import json
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner

from fxtl.backbones.registry import load_backbone, parse_backbone_name
from fxtl.cli import cli
from fxtl.errors import BackboneError, FxtlError, ProvenanceError

_PRE = {"resize": 72, "crop": 64, "interpolation": "bilinear", "mean": [0.5, 0.5, 0.5],
        "std": [0.5, 0.5, 0.5]}


def _sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


@pytest.fixture()
def run(tmp_path) -> Path:
    """A fine-tuned run folder as `fxtl finetune` writes it: resnet18 with a 2-class head."""
    import torchvision

    folder = tmp_path / "run"
    folder.mkdir()
    torch.manual_seed(0)
    torch.save(torchvision.models.resnet18(weights=None, num_classes=2).state_dict(), folder / "model.pt")
    manifest = {"backbone": "resnet18", "architecture": "resnet18", "state_dict": "model.pt",
                "weights_sha256": _sha(folder / "model.pt"), "num_classes": 2,
                "class_names": ["ants", "bees"], "classifier": "fc", "preprocessing": _PRE}
    (folder / "fxtl-model.json").write_text(json.dumps(manifest))
    return folder


def _edit(run: Path, **changes) -> None:
    path = run / "fxtl-model.json"
    manifest = json.loads(path.read_text())
    manifest.update(changes)
    path.write_text(json.dumps(manifest))


def _one_line(args) -> str:
    r = CliRunner().invoke(cli, args)
    assert r.exit_code == 1, r.output
    lines = [line for line in r.output.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("fxtl: error:"), r.output
    return lines[0]


def test_a_valid_run_loads(run):
    bb = load_backbone(str(run))
    assert bb.categories == ["ants", "bees"] and bb.model.fc.out_features == 2


def test_altered_weights_are_refused_before_loading(run, monkeypatch, shapes_dir):
    sd = torch.load(run / "model.pt", weights_only=True)
    torch.save({k: torch.zeros_like(v) for k, v in sd.items()}, run / "model.pt")
    loaded = []
    real_load = torch.load
    monkeypatch.setattr(torch, "load", lambda *a, **k: loaded.append(a) or real_load(*a, **k))
    with pytest.raises(ProvenanceError, match="altered"):
        load_backbone(str(run))
    assert loaded == []  # the hash is checked before torch.load sees the file
    line = _one_line(["predict", str(run), str(shapes_dir / "val")])
    assert "model.pt" in line and "sha256" in line


@pytest.mark.parametrize("where", ["../outside.pt", "/etc/passwd", "sub/../../outside.pt"])
def test_state_dict_outside_the_run_is_refused(run, where):
    (run.parent / "outside.pt").write_bytes((run / "model.pt").read_bytes())
    _edit(run, state_dict=where)
    with pytest.raises(ProvenanceError, match="outside the run folder"):
        parse_backbone_name(str(run))


def test_backbone_pointing_at_the_run_itself_is_one_line(run):
    _edit(run, backbone=str(run))
    with pytest.raises(BackboneError, match="loop"):
        parse_backbone_name(str(run))
    other = run.parent / "other"
    other.mkdir()
    (other / "fxtl-model.json").write_text((run / "fxtl-model.json").read_text())
    _edit(run, backbone=str(other))  # run -> other -> run
    _edit(other, backbone=str(run))
    with pytest.raises(BackboneError, match="loop"):
        parse_backbone_name(str(run))


@pytest.mark.parametrize("changes, text", [
    ({"num_classes": 3, "class_names": ["a", "b", "c"]}, "does not match model.pt"),
    ({"num_classes": 3}, "class_names"),
    ({"num_classes": "two"}, "num_classes"),
    ({"num_classes": 0}, "num_classes"),
    ({"classifier": 7}, "classifier"),
    ({"classifier": ["fc"]}, "classifier"),
    ({"classifier": "no.such.layer"}, "does not match"),
])
def test_damaged_manifest_fields_are_one_line(run, shapes_dir, changes, text):
    _edit(run, **changes)
    with pytest.raises(FxtlError, match=text):
        load_backbone(str(run))
    assert text.split()[0] in _one_line(["predict", str(run), str(shapes_dir / "val")])


def test_predict_on_a_killed_finetune_says_what_it_is(tmp_path, shapes_dir):
    run = tmp_path / "ft-killed"
    run.mkdir()
    (run / "checkpoint-last.pt").write_bytes(b"half a checkpoint")
    line = _one_line(["predict", str(run), str(shapes_dir / "val")])
    assert "did not finish" in line and "fxtl finetune DATA --resume --run-name ft-killed" in line and "joblib" not in line


def test_a_run_without_weights_sha256_is_refused_unless_trusted(run, shapes_dir):
    """No `weights_sha256` in `fxtl-model.json` means `model.pt` cannot be checked: refused like
    an old pickle head, naming the manifest, the field and the fix; `--trust` loads it."""
    manifest = json.loads((run / "fxtl-model.json").read_text())
    del manifest["weights_sha256"]
    (run / "fxtl-model.json").write_text(json.dumps(manifest))
    with pytest.raises(FxtlError, match=r"fxtl-model.json records no weights_sha256, so nothing "
                                        r"shows that model.pt is the file the fine-tune wrote; "
                                        r"re-run the fine-tune, or load it with trust=True") as exc:
        load_backbone(str(run))
    assert exc.value.param == "trust"
    assert load_backbone(str(run), trust=True).categories == ["ants", "bees"]
    r = CliRunner().invoke(cli, ["predict", str(run), str(shapes_dir / "val"), "--json"])
    assert r.exit_code == 2 and "Traceback" not in r.output, r.output
    assert "Invalid value for '--trust'" in r.stderr and "records no weights_sha256" in r.stderr
    ok = CliRunner().invoke(cli, ["predict", str(run), str(shapes_dir / "val"), "--trust", "--json"])
    assert ok.exit_code == 0, ok.output
    assert len(json.loads(ok.stdout)["predictions"]) == 12
