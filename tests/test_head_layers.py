"""Heads that choose their layers (`HeadConfig.layers`): the choice is made on the selection rows
only, recorded in the run, and predict on images scores what the head saw in the cache."""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import h5py
import numpy as np
import pytest

import fxtl
from fxtl.errors import ParameterError
from fxtl.features.store import load_features
from fxtl.heads import HeadConfig, fit_head, load_head
from fxtl.heads.layers import choose_layers, layer_matrix
from fxtl.heads.planning import plan_head
from fxtl.prediction import predict

# fp32, as the predictions on images below: "auto" is bf16 on a CPU with avx512_bf16.
KW = dict(batch_size=4, chunk_batches=1, workers=0, progress=False, precision="fp32")


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> Path:
    """Shapes in train/val/test folders, one class name with a space and a non-ASCII letter."""
    from fxtl.data.samples import write_shapes

    flat = write_shapes(tmp_path_factory.mktemp("hl-flat"), per_class=9, splits=("train",),
                        size=32) / "train"
    root = tmp_path_factory.mktemp("hl-data")
    for k, cls in enumerate(sorted(p for p in flat.iterdir() if p.is_dir())):
        name = "café shape" if k == 0 else cls.name
        for i, img in enumerate(sorted(cls.iterdir())):
            split = "train" if i < 5 else "val" if i < 7 else "test"
            (root / split / name).mkdir(parents=True, exist_ok=True)
            shutil.copy(img, root / split / name / img.name)
    return root


@pytest.fixture(scope="module")
def cache(data, tiny, tmp_path_factory) -> Path:
    return fxtl.extract(data, backbone=tiny, layers="auto",
                        cache_dir=tmp_path_factory.mktemp("hl-cache"), **KW).cache


def test_config_layers_validated_and_stored():
    assert HeadConfig().layers == "auto"
    cfg = HeadConfig(layers=["pooled", "blocks.3"])
    assert cfg.layers == ("pooled", "blocks.3")
    assert cfg.to_dict()["layers"] == ["pooled", "blocks.3"]
    assert HeadConfig.from_dict(cfg.to_dict()) == cfg
    with pytest.raises(ParameterError, match="layers must be"):
        HeadConfig(layers="top")
    with pytest.raises(ParameterError, match="layers must be"):
        HeadConfig(layers=("pooled", "pooled"))


def test_choice_uses_selection_rows_only(cache, tmp_path):
    """Flipping every test label changes no layer choice and no selection score."""
    fc = load_features(cache)
    plan = plan_head(fc.labels, np.asarray(fc.split).astype(str), paths=fc.paths)
    assert plan.selection == "val" and plan.eval_split == "test"
    a = choose_layers(fc, plan, layers="auto")
    flipped_path = tmp_path / "flipped.h5"
    shutil.copy(cache, flipped_path)
    with h5py.File(flipped_path, "r+") as f:
        test = np.asarray([s.decode() if isinstance(s, bytes) else s for s in f["split"][...]]) == "test"
        labels = f["labels"][...]
        labels[test] = (labels[test] + 1) % len(fc.class_names)
        f["labels"][...] = labels
    fl = load_features(flipped_path)
    assert (fl.labels != fc.labels).sum() == test.sum() > 0
    b = choose_layers(fl, plan_head(fl.labels, np.asarray(fl.split).astype(str), paths=fl.paths),
                      layers="auto")
    assert a.layers == b.layers and a["steps"] == b["steps"]
    assert a.layers[0] == "pooled" and set(a.layers) <= {"pooled", "blocks.2", "blocks.3", "blocks.4"}
    assert a["steps"][0]["layers"] == ["pooled"] and len(a["steps"]) >= 2
    assert set(a["steps"][1]["tried"]) == {"blocks.2", "blocks.3", "blocks.4"}


def test_penultimate_equals_a_plain_cache_fit(cache, data, tiny, tmp_path):
    plain = fxtl.extract(data, backbone=tiny, cache_dir=tmp_path, **KW).cache
    want = fit_head(plain, model="logreg", search=False)
    got = fit_head(cache, model="logreg", search=False, layers="penultimate")
    assert got.metrics["layers"] == ["pooled"]
    assert got.metrics["accuracy"] == want.metrics["accuracy"]
    np.testing.assert_array_equal(got.predictions["scores"], want.predictions["scores"])
    assert "layers" not in got.head.provenance


def test_run_records_layers_and_predict_matches_the_cache(cache, data, tmp_path):
    res = fit_head(cache, model="logreg", search=False, layers=("pooled", "blocks.3"),
                   runs_dir=tmp_path / "runs")
    fc = load_features(cache)
    assert res.metrics["layers"] == ["pooled", "blocks.3"]
    assert res.head.feature_dim == fc.dim + fc.layer("blocks.3").shape[1] == 256 + 48
    metrics = json.loads((res.run_dir / "metrics.json").read_text())
    sidecar = json.loads(next(res.run_dir.glob("head*.json")).read_text())
    assert metrics["layers"] == sidecar["layers"] == ["pooled", "blocks.3"]
    assert metrics["config"]["layers"] == ["pooled", "blocks.3"]
    head = load_head(res.run_dir)
    want = head.scores(layer_matrix(fc, ["pooled", "blocks.3"]))
    by_cache = predict(res.run_dir, [cache])
    np.testing.assert_allclose([p["probability"] for p in by_cache.predictions], want.max(axis=1),
                               atol=1e-6)
    images = [data / p for p in fc.paths]
    by_image = predict(res.run_dir, images, precision="fp32", batch_size=4, workers=0)
    got = np.array([p["probability"] for p in by_image.predictions])
    np.testing.assert_allclose(got, want.max(axis=1), atol=1e-4)
    assert [p["label"] for p in by_image.predictions] == \
        [head.class_names[j] for j in want.argmax(axis=1)]


def test_auto_fit_records_the_steps(cache):
    # search=False has no selection rows, so nothing honest chooses: the penultimate features
    assert fit_head(cache, model="logreg", search=False).metrics["layers"] == ["pooled"]
    res = fit_head(cache, model="logreg")
    sel = res.metrics["layer_selection"]
    assert res.metrics["layers"] == sel["layers"] and sel["selection"] == "val"
    assert sel["steps"][0]["layers"] == ["pooled"]
    if len(res.metrics["layers"]) > 1:
        assert res.head.provenance["layers"] == res.metrics["layers"]


def test_a_layer_the_cache_lacks_is_refused(cache):
    from fxtl.errors import CacheError

    with pytest.raises(CacheError, match="stores no layer blocks.9"):
        fit_head(cache, model="logreg", search=False, layers=("pooled", "blocks.9"))


def test_export_model_outputs_the_concatenated_layers(cache, data, tmp_path):
    from fxtl.deploy.onnx_graph import export_model

    res = fit_head(cache, model="logreg", search=False, layers=("blocks.4", "pooled"),
                   runs_dir=tmp_path / "runs")
    out = export_model(res.run_dir, output=tmp_path / "m.onnx")
    assert out.max_abs_diff < 1e-4
    fc = load_features(cache)
    images = [data / p for p in fc.paths[:6]]
    want = predict(res.run_dir, images, precision="fp32", batch_size=4, workers=0).predictions
    got = predict(tmp_path / "m.onnx", images).predictions
    assert [p["label"] for p in got] == [p["label"] for p in want]
    np.testing.assert_allclose([p["probability"] for p in got],
                               [p["probability"] for p in want], atol=1e-4)
    meta = json.loads((tmp_path / "m.onnx.json").read_text())
    assert meta["provenance"]["layers"] == ["blocks.4", "pooled"]


def test_compare_pairs_a_layered_head_with_a_plain_one(cache, tmp_path):
    from fxtl.report.comparison import compare

    runs = tmp_path / "runs"
    plain = fit_head(cache, model="logreg", search=False, layers="penultimate", runs_dir=runs)
    layered = fit_head(cache, model="logreg", search=False, layers=("pooled", "blocks.2"),
                       runs_dir=runs)
    res = compare(runs=[plain.run_dir, layered.run_dir], chart=False,
                  pairs=[(plain.run_dir, layered.run_dir)])
    assert len(res.rows) == 2 and not res.skipped
    assert {round(r["accuracy"], 6) for r in res.rows} == \
        {round(plain.metrics["accuracy"], 6), round(layered.metrics["accuracy"], 6)}
    assert len(res.paired) == 1


def test_cli_layers_option_reaches_the_run(cache, tmp_path):
    from click.testing import CliRunner

    from fxtl.cli import cli

    runner = CliRunner()
    r = runner.invoke(cli, ["fit-head", str(cache), "--layers", "pooled, blocks.4", "--no-search",
                            "--cache-dir", str(tmp_path), "--json"])
    assert r.exit_code == 0, r.output
    run = Path(json.loads(r.stdout)["runs"][0]["run_dir"])
    metrics = json.loads((run / "metrics.json").read_text())
    assert metrics["layers"] == ["pooled", "blocks.4"]
    assert metrics["config"]["layers"] == ["pooled", "blocks.4"]
    bad = runner.invoke(cli, ["fit-head", str(cache), "--layers", " , ", "--cache-dir", str(tmp_path)])
    assert bad.exit_code == 2 and "--layers" in bad.stderr


# ----------------------------------------------------------------------------- the choice rule
def _synthetic(layers: dict[str, int], *, informative: str | None, seed: int = 0):
    """A FeatureCache in memory: 3 classes, 40 rows each (24 train, 8 val, 8 test); the
    penultimate features carry a weak class signal, ``informative`` (if any) a strong one, the
    other layers none."""
    from fxtl.features.store import FeatureCache

    rng = np.random.default_rng(seed)
    y = np.repeat(np.arange(3), 40)
    split = np.array((["train"] * 24 + ["val"] * 8 + ["test"] * 8) * 3)

    def block(dim: int, signal: float) -> np.ndarray:
        centres = rng.normal(size=(3, dim))
        return (rng.normal(size=(len(y), dim)) + signal * centres[y]).astype(np.float32)

    fc = FeatureCache(path=Path("synthetic.h5"), features=block(64, 0.25), labels=y,
                      paths=[f"c{c}/{i}.png" for i, c in enumerate(y)], split=split,
                      class_names=["a", "b é", "c"], attrs={"layer": "pooled", "layers": list(layers)})
    fc._layers.update({n: block(d, 1.5 if n == informative else 0.0) for n, d in layers.items()})
    return fc


def _plan(fc):
    return plan_head(fc.labels, np.asarray(fc.split).astype(str), paths=fc.paths)


def test_a_layer_with_signal_is_added_and_noise_layers_are_not():
    fc = _synthetic({"blocks.2": 16, "blocks.3": 8, "blocks.4": 32}, informative="blocks.3")
    choice = choose_layers(fc, _plan(fc), layers="auto")
    assert choice.layers == ["pooled", "blocks.3"]
    step = choice["steps"][1]
    assert step["best"] == "blocks.3" and step["added"] and step["gained"] > step["lost"]
    assert not choice["steps"][2]["added"]  # neither noise layer beats the noise threshold
    assert choice["steps"][-1]["all"] and not choice["steps"][-1]["added"]
    assert "leave-one-out on 96 train+val rows" == choice["probe"]


def test_penultimate_is_kept_when_no_layer_helps():
    fc = _synthetic({"blocks.2": 16, "blocks.3": 8}, informative=None, seed=1)
    choice = choose_layers(fc, _plan(fc), layers="auto")
    assert choice.layers == ["pooled"]
    assert choice["steps"][1]["added"] is False


def test_leave_one_out_equals_refitting_without_each_row(monkeypatch):
    """The closed form is exact: it agrees row by row with a ridge refitted n times."""
    from sklearn.linear_model import Ridge

    from fxtl.heads import layers as lay

    rng = np.random.default_rng(3)
    X = rng.normal(size=(30, 5)) + np.repeat(rng.normal(size=(3, 5)), 10, axis=0)
    y = np.repeat(np.arange(3), 10)
    Xs = (X - X.mean(0)) / X.std(0)
    K = lay._gram(X)
    np.testing.assert_allclose(K, Xs @ Xs.T, atol=1e-9)
    w = np.clip(np.linalg.eigvalsh(K - K.mean(0) - K.mean(1)[:, None] + K.mean()), 0, None)
    monkeypatch.setattr(lay, "_ALPHAS", (1.0,))
    got = lay._loo_correct(K, y)
    T = np.where(y[:, None] == np.arange(3)[None, :], 1.0, -1.0)
    want = np.zeros(len(y), dtype=bool)
    for i in range(len(y)):
        rest = np.arange(len(y)) != i
        r = Ridge(alpha=w.mean()).fit(Xs[rest], T[rest])
        want[i] = r.predict(Xs[i:i + 1]).argmax() == y[i]
    np.testing.assert_array_equal(got, want)
    assert 0.3 < want.mean() < 1.0  # neither trivial nor perfect: the comparison means something
