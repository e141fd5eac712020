"""fxtl finetune: outputs, reuse as a backbone, partial training, resume, bad images, LP-FT init.

Tiny on purpose: 48-pixel shapes at --image-size 32, batch 4, one or two epochs, fp32 (on a CPU
each new batch shape costs a kernel warm-up, several times longer in bf16 than the few steps
these tests take). lite0 itself is fine-tuned where its structure matters (outputs, reuse as a
backbone, last:2); the mechanics (resume, errors, early stopping, splits) run on timm's
100k-parameter ``test_efficientnet`` (same layout as lite0) given as a local weights file.
"""
from __future__ import annotations

import json
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
import torch
from click.testing import CliRunner

import fxtl
from fxtl.cli import cli
from fxtl.training.loop import (TrainTransform, block_groups, finetune, linear_head_weights,
                           parse_trainable)
from fxtl.data.images import Preprocessing

ROOT = Path(__file__).resolve().parents[1]
TINY = dict(image_size=32, batch_size=4, workers=0, progress=False, precision="fp32")
PNG = b"\x89PNG\r\n\x1a\n"



@pytest.fixture(scope="module")
def run2(shapes_dir, tmp_path_factory):
    """Two epochs of a full fine-tune of lite0 on shapes (train/val), default precision."""
    return finetune(shapes_dir, epochs=2, cache_dir=tmp_path_factory.mktemp("ft"),
                    **{**TINY, "precision": "auto"})


def test_run_folder_and_metrics(run2, shapes_dir):
    d = run2.run_dir
    for name in ("fxtl-model.json", "model.pt", "metrics.json", "learning_curves.png",
                 "confusion.png"):
        assert (d / name).is_file(), name
    assert not (d / "checkpoint-last.pt").exists()  # finished: nothing to resume
    assert (d / "learning_curves.png").read_bytes()[:8] == PNG
    assert (d / "confusion.png").read_bytes()[:8] == PNG
    m = json.loads((d / "metrics.json").read_text())
    assert m["kind"] == "finetune" and m["model"] == "finetune:all" and m["backbone"] == "lite0"
    assert m["dataset"] == Path(shapes_dir).name and m["split"] == "val" and m["n"] == 12
    assert len(m["dataset_fingerprint"]) == 64
    assert 0.0 <= m["accuracy"] <= 1.0 and 0.0 <= m["macro_f1"] <= 1.0
    assert np.asarray(m["confusion_matrix"]).sum() == 12
    assert set(m["per_class"]) == {"circle", "square"} and m["class_names"] == ["circle", "square"]
    assert m["epochs"] == 2 and [h["epoch"] for h in m["history"]] == [1, 2]
    # train + val: val is the reported split, so the epoch (the probe's start included) is
    # selected on a hold-out of train, never on the images reported on
    assert all({"train_loss", "train_accuracy", "val_accuracy"} <= set(h) for h in m["history"])
    assert m["selection_split"] == "holdout-selection" and m["n_train"] < 12
    scores = [m["initial"]["val_accuracy"]] + [h["val_accuracy"] for h in m["history"]]
    assert scores[m["best_epoch"]] == max(scores)
    assert any("val is the reported split, so selecting on a 20% hold-out of train" in n
               for n in m["notes"])
    model = fxtl.load_backbone("lite0").model
    assert m["trainable_params"] == m["total_params"] == \
        sum(p.numel() for n, p in model.named_parameters() if not n.startswith("classifier")) + 1281 * 2
    assert m["fit_seconds"] > 0 and m["inference_images_per_second"] > 0
    assert m["bn"] == "frozen"  # 6 images per class: statistics frozen by default
    d2 = run2.to_dict()
    for key in ("run_dir", "model", "split", "accuracy", "macro_f1", "epochs", "seconds"):
        assert key in d2
    json.dumps(d2)


def test_run_folder_is_a_backbone(run2, shapes_dir):
    """load_backbone(run) rebuilds the fine-tuned network: it reproduces the reported accuracy."""
    from fxtl.data.discovery import discover
    from fxtl.features.extraction import embed_paths

    bb = fxtl.load_backbone(str(run2.run_dir))
    assert bb.categories == ["circle", "square"] and bb.preprocessing.crop == 32
    images = discover(shapes_dir)
    val = [s for s in images.samples if s.split == "val"]
    preds = []
    for _, _, logits, bad in embed_paths(bb, [images.abspath(s) for s in val], with_logits=True,
                                         precision=run2.metrics["precision"], workers=0):
        assert not bad and logits.shape[1] == 2
        preds.extend(logits.argmax(1).tolist())
    acc = np.mean(np.array(preds) == np.array([s.label for s in val]))
    assert acc == pytest.approx(run2.accuracy)
    state = torch.load(run2.run_dir / "model.pt", weights_only=True)
    for k, v in bb.model.state_dict().items():
        assert torch.equal(v, state[k]), k


def test_extract_with_finetuned_backbone(run2, shapes_dir, tmp_path):
    res = fxtl.extract(shapes_dir, backbone=str(run2.run_dir), cache_dir=tmp_path, progress=False,
                       workers=0)
    assert res.n == 24 and res.dim == 1280 and res.backbone == str(run2.run_dir)
    fc = fxtl.load_features(res.cache)
    base = fxtl.extract(shapes_dir, cache_dir=tmp_path, progress=False, workers=0)
    assert fc.attrs["preprocessing"]["crop"] == 32
    assert not np.allclose(fc.features[:2], fxtl.load_features(base.cache).features[:2])


def test_block_groups_and_trainable_parsing():
    model = fxtl.load_backbone("lite0").model
    groups = block_groups(model, "classifier")
    assert [g for g, _ in groups] == ["conv_stem+bn1"] + [f"blocks.{i}" for i in range(7)] + ["conv_head+bn2"]
    assert parse_trainable("all", 9) == 9 and parse_trainable("head", 9) == 0
    assert parse_trainable("last:2", 9) == 2
    for bad in ("last:0", "last:10", "some", "last:-1"):
        with pytest.raises(fxtl.FxtlError):
            parse_trainable(bad, 9)


def test_last2_trains_only_the_last_blocks(shapes_dir, tmp_path):
    # No selection, so the trained epoch is the one saved (a hold-out could keep the start).
    res = finetune(shapes_dir, trainable="last:2", epochs=1, lr=1e-2, bn="train",
                   selection_holdout=False, cache_dir=tmp_path, **TINY)
    before = fxtl.load_backbone("lite0").model.state_dict()
    after = torch.load(res.run_dir / "model.pt", weights_only=True)
    trained_prefixes = ("blocks.6.", "conv_head.", "bn2.", "classifier.")
    changed, n_trained = [], 0
    for k, v in after.items():
        if k.startswith("classifier."):
            n_trained += v.numel()
            continue
        same = torch.equal(before[k], v)
        if k.startswith(trained_prefixes):
            if not k.endswith("num_batches_tracked"):
                n_trained += v.numel() if "running_" not in k else 0
            changed.append(not same)
        else:  # frozen: weights AND BatchNorm statistics untouched, even with --bn train
            assert same, f"frozen tensor {k} changed"
    assert sum(changed) > len(changed) // 2  # the trained blocks did move
    assert res.trainable_params == n_trained
    assert res.model == "finetune:last:2"


def test_head_only_keeps_backbone(shapes_dir, tmp_path, tiny):
    res = finetune(shapes_dir, backbone=tiny, trainable="head", epochs=1, bn="train",
                   cache_dir=tmp_path, **TINY)
    bb = fxtl.load_backbone(tiny)
    before = bb.model.state_dict()
    after = torch.load(res.run_dir / "model.pt", weights_only=True)
    assert all(torch.equal(before[k], v) for k, v in after.items() if not k.startswith("classifier."))
    assert res.trainable_params == bb.feature_dim * 2 + 2


_KILL_SCRIPT = textwrap.dedent("""
    import os, signal, sys
    from fxtl.training.loop import finetune

    def kill(info):
        if info["epoch"] == 2 and info["step"] == 2:
            os.kill(os.getpid(), signal.SIGKILL)

    finetune(sys.argv[1], backbone=sys.argv[3], cache_dir=sys.argv[2], run_name="r", epochs=2,
             image_size=32, batch_size=4, workers=0, progress=False, precision="fp32", bn="train",
             on_step=kill)
""")


def test_sigkill_in_epoch_2_then_resume_equals_uninterrupted(shapes_dir, tmp_path, tiny):
    full = finetune(shapes_dir, backbone=tiny, cache_dir=tmp_path / "a", run_name="r", epochs=2,
                    bn="train", keep_checkpoint=True, **TINY)
    proc = subprocess.run([sys.executable, "-c", _KILL_SCRIPT, str(shapes_dir), str(tmp_path / "b"),
                           tiny],
                          cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert proc.returncode == -9, proc.stderr[-2000:]
    run_dir = tmp_path / "b" / "runs" / "r"
    ckpt = torch.load(run_dir / "checkpoint-last.pt", weights_only=True)
    assert ckpt["epoch"] == 1 and not ckpt["done"]  # killed inside epoch 2
    assert not (run_dir / "fxtl-model.json").exists()
    result = CliRunner().invoke(cli, ["finetune", str(shapes_dir), "--backbone", tiny,
                                      "--cache-dir", str(tmp_path / "b"),
                                      "--run-name", "r", "--resume", "--epochs", "2",
                                      "--image-size", "32", "--batch-size", "4", "--workers", "0",
                                      "--precision", "fp32", "--bn", "train", "--keep-checkpoint",
                                      "--json"])
    assert result.exit_code == 0, result.output
    out = json.loads(result.stdout)
    assert out["resumed_from_epoch"] == 1 and out["epochs"] == 2
    for name in ("model.pt", "checkpoint-last.pt"):
        a = torch.load(full.run_dir / name, weights_only=True)
        b = torch.load(run_dir / name, weights_only=True)
        a, b = (a["model"], b["model"]) if name == "checkpoint-last.pt" else (a, b)
        assert a.keys() == b.keys()
        for k in a:
            assert torch.equal(a[k], b[k]), f"{name}: {k} differs after resume"
    hist_a = json.loads((full.run_dir / "metrics.json").read_text())["history"]
    hist_b = json.loads((run_dir / "metrics.json").read_text())["history"]
    assert [h["train_loss"] for h in hist_a] == [h["train_loss"] for h in hist_b]
    assert out["accuracy"] == full.accuracy
    assert fxtl.load_backbone(str(run_dir)).categories == ["circle", "square"]

    # The finished run: resuming has nothing to do (its results come back, nothing is trained);
    # other settings are refused, and so is starting over in the same folder.
    kw = dict(backbone=tiny, cache_dir=tmp_path / "b", run_name="r", epochs=2, bn="train", **TINY)
    again = finetune(shapes_dir, **kw, resume=True)
    assert again.resumed_from_epoch == 2 and again.accuracy == full.accuracy
    assert torch.equal(torch.load(run_dir / "model.pt", weights_only=True)["classifier.weight"],
                       torch.load(full.run_dir / "model.pt", weights_only=True)["classifier.weight"])
    with pytest.raises(fxtl.ProvenanceError, match="other settings"):
        finetune(shapes_dir, **{**kw, "lr": 0.5}, resume=True)
    with pytest.raises(fxtl.FxtlError, match="already holds a run"):
        finetune(shapes_dir, **kw)


def test_bad_images_are_skipped(shapes_dir, tmp_path, tiny):
    data = tmp_path / "data"
    shutil.copytree(shapes_dir, data)
    (data / "train" / "circle" / "broken.jpg").write_bytes(b"\xff\xd8\xff\xe0 not a jpeg")
    (data / "val" / "square" / "empty.png").write_bytes(b"")
    res = finetune(data, backbone=tiny, epochs=1, cache_dir=tmp_path / "c", **TINY)
    reasons = {Path(e["path"]).name: e["reason"] for e in res.errors}
    assert set(reasons) == {"broken.jpg", "empty.png"}
    assert "empty" in reasons["empty.png"]
    assert res.metrics["n"] == 12  # the unreadable val image is not scored
    # the 12 readable train images: those that train, and the hold-out that selects
    rows = json.loads((res.run_dir / "rows.json").read_text())
    assert res.metrics["history"][0]["train_images"] == rows["train"]["n"]
    assert rows["train"]["n"] + rows["selection"]["n"] == 12


def test_early_stopping_keeps_best_epoch(shapes3_dir, tmp_path, tiny):
    # A learning rate too small to change anything: no val loss improvement after epoch 1.
    # From a zero classifier (from the probe, epoch 0 would be the one kept: see below).
    res = finetune(shapes3_dir, backbone=tiny, trainable="head", epochs=4, lr=1e-12, patience=1,
                   monitor="loss", init="zero", cache_dir=tmp_path, **TINY)
    assert res.stopped_early and res.epochs == 2 and res.best_epoch == 1


def test_holdout_when_only_train(tmp_path, tiny):
    from fxtl.data.discovery import discover
    from fxtl.data.samples import write_shapes
    from fxtl.data.splits import hash_holdout

    data = write_shapes(tmp_path / "d", per_class=5, splits=("train",))
    res = finetune(data / "train", backbone=tiny, epochs=1, cache_dir=tmp_path / "c", seed=3, **TINY)
    images = discover(data / "train")
    labels = np.array([s.label for s in images.samples])
    keys = [s.path for s in images.samples]
    rest, held = hash_holdout(np.arange(10), labels, keys, test_size=0.2, seed=3, source="t")
    fit, select = hash_holdout(rest, labels, keys, test_size=0.2, seed=3, salt="selection",
                               source="t")
    assert res.split == "holdout" and res.metrics["n"] == len(held) >= 2  # a class: >= 1 each
    assert res.metrics["n_train"] == len(fit) == 10 - len(held) - len(select)
    assert np.asarray(res.metrics["confusion_matrix"]).sum(1).tolist() == \
        np.bincount(np.asarray(labels)[held], minlength=2).tolist()


def test_train_transform_is_seeded_and_sized():
    from PIL import Image

    pre = Preprocessing(resize=73, crop=64, interpolation="bilinear")
    t = TrainTransform(pre, scale=(0.2, 1.0))
    im = Image.fromarray(np.random.default_rng(0).integers(0, 256, (90, 120, 3), dtype=np.uint8))
    a = t(im, np.random.default_rng(7))
    b = t(im, np.random.default_rng(7))
    c = t(im, np.random.default_rng(8))
    assert a.dtype == torch.uint8 and tuple(a.shape) == (3, 64, 64)
    assert torch.equal(a, b) and not torch.equal(a, c)
    # flip=False never mirrors: with the whole image as the crop, every seed gives one image
    whole = dict(scale=(1.0, 1.0), ratio=(120 / 90, 120 / 90))
    plain = {TrainTransform(pre, flip=False, **whole)(im, np.random.default_rng(s)).numpy().tobytes()
             for s in range(20)}
    flipped = {TrainTransform(pre, **whole)(im, np.random.default_rng(s)).numpy().tobytes() for s in range(20)}
    assert len(plain) == 1 and len(flipped) == 2
    for seed in range(50):
        left, top, right, bottom = t.crop_box(120, 90, np.random.default_rng(seed))
        assert 0 <= left < right <= 120 and 0 <= top < bottom <= 90
        assert 0.2 * 0.99 <= (right - left) * (bottom - top) / (120 * 90) <= 1.0


@pytest.mark.parametrize("n_classes", [2, 3])
def test_linear_head_folding_matches_predict_proba(n_classes):
    from sklearn.linear_model import LogisticRegression
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    rng = np.random.default_rng(0)
    X = rng.normal(3.0, 2.0, size=(60, 5)) * np.array([1, 10, 0.1, 5, 1])
    y = np.arange(60) % n_classes
    X[np.arange(60), y] += 4
    pipe = make_pipeline(StandardScaler(), LogisticRegression(C=1.0)).fit(X, y)
    names = ["a", "b", "c"][:n_classes]
    # the dataset lists the classes in another order than the head
    target = names[::-1]
    W, b = linear_head_weights(pipe, names, target, feature_dim=5)
    logits = X @ W.T.astype(np.float64) + b
    p = np.exp(logits - logits.max(1, keepdims=True))
    p /= p.sum(1, keepdims=True)
    np.testing.assert_allclose(p[:, ::-1], pipe.predict_proba(X), atol=1e-5)


def test_linear_head_refuses_nonlinear_steps():
    from sklearn.decomposition import PCA
    from sklearn.pipeline import make_pipeline
    from sklearn.svm import SVC

    X = np.random.default_rng(0).normal(size=(20, 4))
    y = np.arange(20) % 2
    with pytest.raises(fxtl.FxtlError, match="logistic"):
        linear_head_weights(make_pipeline(SVC()).fit(X, y), ["a", "b"], ["a", "b"], feature_dim=4)
    from sklearn.linear_model import LogisticRegression

    with pytest.raises(fxtl.FxtlError, match="cannot be folded"):
        linear_head_weights(make_pipeline(PCA(2), LogisticRegression()).fit(X, y), ["a", "b"],
                            ["a", "b"], feature_dim=4)


def test_init_head_from_fit_head_run(shapes_dir, shapes_cache, tmp_path):
    """LP-FT: with 0 epochs the network is the logistic head on top of the backbone."""
    heads = pytest.importorskip("fxtl.heads.fitting")
    from fxtl.features.store import load_features

    fc = load_features(shapes_cache)
    fitted = heads.fit_head(shapes_cache, model="logreg", cache_dir=tmp_path, search=False)
    res = finetune(shapes_dir, init_head=fitted.run_dir, epochs=0, cache_dir=tmp_path,
                   precision=fc.attrs["precision"], workers=0, progress=False)
    head_pred = fitted.predictions["y_pred"]
    assert res.split == fitted.metrics["split"] == "val"
    assert res.accuracy == pytest.approx(fitted.metrics["accuracy"])
    assert res.metrics["confusion_matrix"] == fitted.metrics["confusion_matrix"]
    assert len(head_pred) == res.metrics["n"]


def test_init_head_at_another_input_size_warns(shapes_dir, shapes_cache, tmp_path):
    heads = pytest.importorskip("fxtl.heads.fitting")

    fitted = heads.fit_head(shapes_cache, model="logreg", cache_dir=tmp_path, search=False)
    with pytest.warns(UserWarning, match="fitted on 224-px features but this fine-tune runs at 64 px") as w:
        finetune(shapes_dir, init_head=fitted.run_dir, epochs=0, cache_dir=tmp_path, image_size=64,
                 workers=0, progress=False)
    assert "image_size=224" in str(w[0].message) and "--" not in str(w[0].message)


def test_config_is_validated_and_errors_name_parameters(shapes_dir, tmp_path):
    """fxtl.finetune(lr=-1) speaks of the parameter lr, never of a flag; the CLI of the flag."""
    import dataclasses

    from fxtl.training.config import RESUME_KEYS, FinetuneConfig

    for kw, param in ((dict(lr=-1), "lr"), (dict(epochs=-1), "epochs"), (dict(bn="x"), "bn"),
                      (dict(trainable="some"), "trainable"), (dict(crop_scale=(0.9, 0.1)), "crop_scale"),
                      (dict(test_size=1.5), "test_size"), (dict(patience=0), "patience")):
        with pytest.raises(fxtl.ParameterError) as err:
            finetune(shapes_dir, cache_dir=tmp_path, **kw)
        assert err.value.param == param and "--" not in str(err.value) and param in str(err.value)
    with pytest.raises(TypeError, match="unknown fine-tune option"):
        finetune(shapes_dir, cache_dir=tmp_path, learning_rate=1e-3)
    cfg = FinetuneConfig(epochs=3, init_head=None, trainable="LAST:2", init="zero")
    assert cfg.trainable == "last:2" and cfg.peak_lr == 5e-4
    with pytest.raises(dataclasses.FrozenInstanceError):
        cfg.epochs = 4  # type: ignore[misc]
    rec = cfg.record(data_fingerprint="f")
    assert set(rec) == set(RESUME_KEYS) - {"flip", "init", "selection_holdout", "refit"}
    assert "device" not in rec and "workers" not in rec
    assert cfg.replace(flip=False).record(data_fingerprint="f")["flip"] is False
    r = CliRunner().invoke(cli, ["finetune", str(shapes_dir), "--cache-dir", str(tmp_path),
                                 "--test-size", "0.999999", "--patience", "-1"])
    assert r.exit_code == 2 and "--patience" in r.output


def test_cli_json_and_errors(shapes_dir, tmp_path, tiny):
    runner = CliRunner()
    args = ["finetune", str(shapes_dir), "--backbone", tiny, "--cache-dir", str(tmp_path), "--epochs", "1",
            "--image-size", "32", "--batch-size", "4", "--workers", "0", "--precision", "fp32",
            "--trainable", "head"]
    result = runner.invoke(cli, args + ["--json"])
    assert result.exit_code == 0, result.output
    d = json.loads(result.stdout)
    assert {"run_dir", "model", "split", "accuracy", "macro_f1", "epochs", "seconds"} <= set(d)
    assert d["model"] == "finetune:head" and Path(d["run_dir"]).parent == tmp_path / "runs"
    assert "flip" not in json.loads((Path(d["run_dir"]) / "metrics.json").read_text())["config"]
    no_flip = runner.invoke(cli, args + ["--no-flip", "--json"])
    assert no_flip.exit_code == 0, no_flip.output
    cfg = json.loads((Path(json.loads(no_flip.stdout)["run_dir"]) / "metrics.json").read_text())["config"]
    assert cfg["flip"] is False
    bad = runner.invoke(cli, args[:-2] + ["--trainable", "last:99"])
    # The library names the parameter; the CLI reports it as a usage error on the option.
    assert bad.exit_code == 2 and "has 7 blocks" in bad.output and "--trainable" in bad.output
    assert "Traceback" not in bad.output
    usage = runner.invoke(cli, args[:-2] + ["--trainable", "middle"])
    assert usage.exit_code == 2


def test_depthwise_convs_train_in_fp32_and_infer_in_bf16():
    import torch.nn as nn

    from fxtl.training.trainer import depthwise_fp32_when_training

    net = nn.Sequential(nn.Conv2d(3, 8, 1), nn.Conv2d(8, 8, 3, groups=8), nn.Conv2d(8, 4, 1))
    depthwise_fp32_when_training(net)
    x = torch.randn(2, 3, 6, 6)
    dtypes = []
    net[1].register_forward_hook(lambda m, i, o: dtypes.append(o.dtype))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = net(x)
        out.float().sum().backward()
        with torch.inference_mode():
            net(x)
    assert dtypes == [torch.float32, torch.bfloat16]
    assert out.dtype == torch.bfloat16 and net[1].weight.grad is not None
    assert list(net.state_dict()) == ["0.weight", "0.bias", "1.weight", "1.bias", "2.weight", "2.bias"]


# ----------------------------------------------------------------------------- the default start
def _classifier(run_dir: Path) -> torch.Tensor:
    return torch.load(run_dir / "model.pt", weights_only=True)["classifier.weight"]


def _flipped(src: Path, dst: Path, splits: tuple[str, ...]) -> Path:
    """A copy of ``src`` (circle/square) with every label of ``splits`` swapped."""
    for split in ("train", "val", "test"):
        for cls in ("circle", "square"):
            other = {"circle": "square", "square": "circle"}[cls] if split in splits else cls
            shutil.copytree(src / split / cls, dst / split / other)
    return dst


def test_default_starts_from_a_probe_fitted_on_the_training_rows_only(shapes3_dir, tmp_path, tiny):
    """The start that val judges learns from train alone (scrambling val and test leaves it
    unchanged); once val keeps it, it is refitted on train+val, and test takes no part."""
    res = finetune(shapes3_dir, backbone=tiny, epochs=0, cache_dir=tmp_path / "a", **TINY)
    m = res.metrics
    assert m["config"]["init"] == "probe" and m["config"]["lr"] == pytest.approx(2e-4)
    probe = m["init_probe"]
    assert probe["refit_rows"] == m["n_train"] == 12 and probe["refit_split"] == "train"
    assert probe["folds"] == 5 and probe["C"] in [pytest.approx(c) for c in
                                                  np.logspace(-4, 2, 13)]
    assert res.best_epoch == 0 and m["initial"]["val_accuracy"] is not None
    refit = m["final_refit"]
    assert refit["refit_rows"] == 24 and refit["refit_split"] == "train+val" and refit["folds"] == 5
    assert any("refitted on the 24 train+val images" in n for n in m["notes"])
    w = _classifier(res.run_dir)
    assert w.abs().sum() > 0  # not the zero start
    # test labels flipped: nothing learned from or chosen on them, so the same classifier
    again = finetune(_flipped(shapes3_dir, tmp_path / "test-flipped", ("test",)), backbone=tiny,
                     epochs=0, cache_dir=tmp_path / "b", **TINY)
    assert torch.allclose(_classifier(again.run_dir), w)
    assert again.accuracy == pytest.approx(1 - res.accuracy)
    # val labels flipped too: the start val judged is the same (train only), its val score flips
    both = finetune(_flipped(shapes3_dir, tmp_path / "flipped", ("val", "test")), backbone=tiny,
                    epochs=0, cache_dir=tmp_path / "c", **TINY)
    assert both.metrics["init_probe"]["C"] == probe["C"]
    assert both.metrics["init_probe"]["cv_accuracy"] == probe["cv_accuracy"]
    assert both.metrics["initial"]["val_accuracy"] == pytest.approx(1 - m["initial"]["val_accuracy"])


def test_kept_init_head_is_the_fit_head_head_on_the_same_rows(shapes3_dir, tmp_path, tiny):
    """LP-FT from a fit-head logreg run, the start kept by val: the reported model is that head
    (same C, refitted on the same train+val rows), so it scores what the head scores."""
    from fxtl.heads.fitting import fit_head

    cache = fxtl.extract(shapes3_dir, backbone=tiny, cache_dir=tmp_path, progress=False,
                         workers=0, precision="fp32").cache
    fitted = fit_head(cache, model="logreg", cache_dir=tmp_path)
    assert fitted.metrics["split"] == "test" and fitted.metrics["n_fit"] == 24
    res = finetune(shapes3_dir, backbone=tiny, init_head=fitted.run_dir, epochs=0,
                   cache_dir=tmp_path, precision="fp32", workers=0, progress=False)
    m = res.metrics
    assert m["init_head"]["refit_rows"] == 12 and m["final_refit"]["refit_rows"] == 24
    assert m["final_refit"]["refit_split"] == "train+val"
    got = _classifier(res.run_dir).numpy()
    W, _ = linear_head_weights(fitted.estimator, fitted.head.class_names, ["circle", "square"],
                               feature_dim=got.shape[1])
    # the same fit up to the solver's tolerance (the rows come in another order)
    np.testing.assert_allclose(got, W, rtol=1e-3, atol=1e-3 * np.abs(W).max())
    assert res.split == "test" and res.accuracy == pytest.approx(fitted.metrics["accuracy"])
    assert m["confusion_matrix"] == fitted.metrics["confusion_matrix"]


def test_epoch_0_is_kept_unless_an_epoch_beats_it_on_val(shapes3_dir, tmp_path, tiny):
    # A rate too small to change anything: no trained epoch beats the probe, which is kept.
    res = finetune(shapes3_dir, backbone=tiny, trainable="head", epochs=3, lr=1e-12, patience=1,
                   monitor="loss", cache_dir=tmp_path, **TINY)
    assert res.best_epoch == 0 and res.stopped_early and res.epochs == 1
    probe = finetune(shapes3_dir, backbone=tiny, epochs=0, cache_dir=tmp_path, **TINY)
    assert torch.equal(_classifier(res.run_dir), _classifier(probe.run_dir))
    assert res.accuracy == probe.accuracy
    assert res.metrics["initial"]["val_loss"] == pytest.approx(res.metrics["history"][0]["val_loss"],
                                                              abs=1e-4)
    # A rate that learns: a trained epoch beats the start on val and is kept.
    fast = finetune(shapes3_dir, backbone=tiny, trainable="head", epochs=2, lr=0.05, patience=None,
                    monitor="loss", cache_dir=tmp_path, **TINY)
    losses = [h["val_loss"] for h in fast.metrics["history"]]
    assert fast.best_epoch == (int(np.argmin(losses)) + 1 if min(losses) <
                               fast.metrics["initial"]["val_loss"] - 1e-4 else 0)


def test_init_zero_is_the_recipe_before(shapes_dir, tmp_path, tiny):
    res = finetune(shapes_dir, backbone=tiny, epochs=0, init="zero", cache_dir=tmp_path, **TINY)
    assert torch.count_nonzero(_classifier(res.run_dir)) == 0
    m = res.metrics
    assert "init" not in m["config"] and m["config"]["lr"] == 5e-4 and "init_probe" not in m
    r = CliRunner().invoke(cli, ["finetune", str(shapes_dir), "--init", "nope"])
    assert r.exit_code == 2 and "--init" in r.output
    with pytest.raises(fxtl.ParameterError) as err:
        finetune(shapes_dir, init="nope", cache_dir=tmp_path)
    assert err.value.param == "init"


def test_fit_probe_chooses_c_by_cv_on_its_rows_and_falls_back_on_tiny_classes():
    from fxtl.training.lpft import fit_probe

    rng = np.random.default_rng(0)
    X = rng.normal(size=(60, 8))
    y = (X[:, 0] > 0).astype(int)
    pipe, info = fit_probe(X, y, seed=0)
    assert info["folds"] == 5 and info["refit_rows"] == 60 and info["cv_accuracy"] > 0.8
    assert (pipe.predict(X) == y).mean() > 0.9
    y1 = y.copy()
    y1[:] = 0
    y1[0] = 1  # one row in class 1: no folds, C stays 1
    _, info1 = fit_probe(X, y1, seed=0)
    assert info1["folds"] == 0 and info1["C"] == 1.0
