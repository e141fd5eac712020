"""fxtl predict: saved heads on images and caches, fine-tuned run folders, refusals, bad images."""
from __future__ import annotations

import csv
import json
import shutil
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner

from fxtl.cli import cli
from fxtl.errors import FxtlError, ProvenanceError
from fxtl.heads.fitting import fit_head
from fxtl.prediction import collect_images, predict
from fxtl.features.store import load_features

from .test_heads import write_synthetic_cache


@pytest.fixture(scope="module")
def shapes_run(shapes_cache, tmp_path_factory) -> Path:
    """A logreg head fitted (with search) on the real lite0 shapes cache, saved as a run folder."""
    home = tmp_path_factory.mktemp("home")
    return fit_head(shapes_cache, model="logreg", cache_dir=home, jobs=1).run_dir


def _eval_predictions(run: Path) -> dict[str, str]:
    with open(run / "predictions.csv", newline="") as fh:
        return {row["path"]: row["predicted"] for row in csv.DictReader(fh)}


def test_predict_images_gives_the_labels_of_fit_head_evaluation(shapes_run, shapes_dir):
    """The head's backbone is rebuilt and the val images re-embedded: same labels as fit-head."""
    r = CliRunner().invoke(cli, ["predict", str(shapes_run), str(shapes_dir / "val"), "--json",
                                 "--top-k", "2"])
    assert r.exit_code == 0, r.output
    d = json.loads(r.stdout)
    expected = _eval_predictions(shapes_run)
    assert len(d["predictions"]) == len(expected) == 12 and d["errors"] == []
    got = {str(Path(p["path"]).relative_to(shapes_dir)): p["label"] for p in d["predictions"]}
    assert got == expected
    for p in d["predictions"]:
        assert [t["label"] for t in p["top_k"]][0] == p["label"]
        assert p["top_k"][0]["probability"] >= p["top_k"][1]["probability"]
        assert abs(sum(t["probability"] for t in p["top_k"]) - 1.0) < 1e-5
    assert d["precision"] == load_features(json.loads(
        (shapes_run / "metrics.json").read_text())["cache"]).attrs["precision"]


def test_predict_on_the_cache_itself_and_human_output(shapes_run, shapes_cache):
    res = predict(shapes_run, [shapes_cache])
    val = {p["path"]: p["label"] for p in res.predictions if p["split"] == "val"}
    assert val == _eval_predictions(shapes_run)
    assert all(p["true_label"] in ("circle", "square") for p in res.predictions)
    r = CliRunner().invoke(cli, ["predict", str(shapes_run / "head.skops"), str(shapes_cache)])
    assert r.exit_code == 0 and "val/circle/circle_0.png" in r.stdout


def test_bad_images_are_reported_and_skipped(tmp_path, shapes_run, shapes_dir):
    folder = tmp_path / "mixed"
    folder.mkdir()
    good = sorted((shapes_dir / "val" / "square").iterdir())[0]
    shutil.copy(good, folder / good.name)
    (folder / "broken.jpg").write_bytes(b"\xff\xd8\xff\xe0 this is not a jpeg")
    (folder / "empty.png").write_bytes(b"")
    r = CliRunner().invoke(cli, ["predict", str(shapes_run), str(folder), str(tmp_path / "missing.jpg"),
                                 "--json"])
    assert r.exit_code == 0, r.output
    d = json.loads(r.stdout)
    assert [Path(p["path"]).name for p in d["predictions"]] == [good.name]
    assert sorted(Path(e["path"]).name for e in d["errors"]) == ["broken.jpg", "empty.png", "missing.jpg"]
    assert all(e["reason"] for e in d["errors"])
    r = CliRunner().invoke(cli, ["predict", str(shapes_run), str(folder / "broken.jpg")])
    assert r.exit_code == 1 and "none of the 1 input(s) could be used" in r.stderr


def test_tampered_head_is_refused_unless_trusted(tmp_path, shapes_run, shapes_cache):
    run = tmp_path / "copy"
    shutil.copytree(shapes_run, run)
    head_file = run / "head.skops"
    head_file.write_bytes(head_file.read_bytes() + b"\0\0")
    runner = CliRunner()
    r = runner.invoke(cli, ["predict", str(run), str(shapes_cache)])
    assert r.exit_code == 1
    assert r.stderr.startswith("fxtl: error: ") and r.stderr.count("\n") == 1 and "sha256" in r.stderr
    r = runner.invoke(cli, ["predict", str(run), str(shapes_cache), "--trust", "--json"])
    assert r.exit_code == 0 and json.loads(r.stdout)["predictions"]
    (run / "head.json").unlink()
    r = runner.invoke(cli, ["predict", str(head_file), str(shapes_cache)])
    assert r.exit_code == 1 and "no sidecar head.json" in r.stderr


def test_head_with_mismatched_cache_is_refused(tmp_path, shapes_cache):
    blobs = write_synthetic_cache(tmp_path / "blobs.h5", dim=1280)
    run = fit_head(blobs, model="knn", cache_dir=tmp_path, search=False).run_dir
    r = CliRunner().invoke(cli, ["predict", str(run), str(shapes_cache)])
    assert r.exit_code == 1 and "backbone 'synthetic'" in r.stderr and "'lite0'" in r.stderr
    narrow = write_synthetic_cache(tmp_path / "narrow.h5", dim=8)
    with pytest.raises(ProvenanceError, match="expects 1280-d features but .* has 8-d"):
        predict(run, [narrow])
    # Images need the head's backbone, which 'synthetic' is not.
    with pytest.raises(FxtlError, match="synthetic"):
        predict(run, [tmp_path / "blobs.h5", Path(__file__)])


def test_predict_with_a_finetuned_run_folder(tmp_path, shapes_dir):
    """A folder with fxtl-model.json predicts with its own classifier (softmax of its logits)."""
    import torch

    from fxtl.backbones.building import replace_linear
    from fxtl.backbones.registry import load_backbone

    bb = load_backbone("lite0")
    replace_linear(bb.model, bb.classifier_name, 2)
    fc = bb.model.get_submodule(bb.classifier_name)
    with torch.no_grad():  # logits (0, 3) for every image: "square", p = 1 / (1 + e^-3)
        fc.weight.zero_()
        fc.bias.copy_(torch.tensor([0.0, 3.0]))
    run = tmp_path / "ft"
    run.mkdir()
    torch.save(bb.model.state_dict(), run / "model.pt")
    from fxtl._util import sha256_file

    (run / "fxtl-model.json").write_text(json.dumps({
        "backbone": "lite0", "state_dict": "model.pt", "num_classes": 2,
        "weights_sha256": sha256_file(run / "model.pt"),  # without it, only trust=True loads it
        "class_names": ["circle", "square"], "classifier": bb.classifier_name}))
    res = predict(run, [shapes_dir / "val" / "circle"], top_k=2)
    assert res.kind == "finetune" and len(res.predictions) == 6
    for p in res.predictions:
        assert p["label"] == "square"
        assert p["probability"] == pytest.approx(1 / (1 + np.exp(-3.0)), abs=1e-5)
        assert [t["label"] for t in p["top_k"]] == ["square", "circle"]
    with pytest.raises(FxtlError, match="fine-tuned network"):
        predict(run, [write_synthetic_cache(tmp_path / "x.h5")])


def test_collect_images_walks_folders_and_reports_missing(tmp_path):
    (tmp_path / "a" / ".hidden").mkdir(parents=True)
    (tmp_path / "a" / "b").mkdir()
    for name in ("a/1.jpg", "a/b/2.PNG", "a/notes.txt", "a/.hidden/3.jpg"):
        (tmp_path / name).write_bytes(b"x")
    (tmp_path / "empty").mkdir()
    images, caches, errors = collect_images([tmp_path / "a", tmp_path / "c.h5", tmp_path / "empty"])
    assert [p.relative_to(tmp_path).as_posix() for p in images] == ["a/1.jpg", "a/b/2.PNG"]
    assert caches == [] and [Path(e["path"]).name for e in errors] == ["c.h5", "empty"]
    r = CliRunner().invoke(cli, ["predict", str(tmp_path / "nothing"), str(tmp_path / "a")])
    assert r.exit_code == 1 and "no such head or run folder" in r.stderr
    r = CliRunner().invoke(cli, ["predict", str(tmp_path)])
    assert r.exit_code == 2  # INPUTS missing: usage error
