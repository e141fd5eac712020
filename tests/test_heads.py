"""Heads: registry, honest selection, every model on a tiny cache, persistence, large caches, CLI."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner
from sklearn.linear_model import LogisticRegression
from sklearn.metrics import accuracy_score, f1_score
from sklearn.neighbors import KNeighborsClassifier
from sklearn.pipeline import make_pipeline
from sklearn.preprocessing import StandardScaler

from fxtl.cli import cli
from fxtl.errors import CacheError, FxtlError, ProvenanceError
from fxtl.heads.fitting import fit_head, fit_heads
from fxtl.heads.persistence import load_head
from fxtl.heads.planning import plan_head
from fxtl.heads.registry import (HEADS, build_pipeline, check_params, get_head, parse_params,
                                 register_head)
from fxtl.features.store import load_features, write_cache

PRE = {"resize": 256, "crop": 224, "interpolation": "bicubic", "mean": [0.5] * 3, "std": [0.5] * 3}


def write_synthetic_cache(path: Path, *, splits=(("train", 60), ("val", 30), ("test", 30)),
                          dim: int = 8, classes: int = 3, seed: int = 0, sep: float = 4.0,
                          backbone: str = "synthetic", weights: str = "0" * 64,
                          features_of=None) -> Path:
    """A cache of Gaussian blobs, one per class (rows ordered by split then class, like extract).

    ``features_of(split, X)`` may replace a split's features (used to poison a split).
    """
    rng = np.random.default_rng(seed)
    centers = rng.normal(size=(classes, dim)) * sep
    feats, labels, paths, split = [], [], [], []
    for name, n in splits:
        y = np.repeat(np.arange(classes), int(np.ceil(n / classes)))[:n]
        X = (centers[y] + rng.normal(size=(n, dim))).astype(np.float32)
        if features_of is not None:
            X = features_of(name, X)
        feats.append(X)
        labels += y.tolist()
        paths += [f"{name}/c{c}/{i}.png" for i, c in enumerate(y)]
        split += [name] * n
    X = np.concatenate(feats)
    attrs = {"backbone": backbone, "weights_sha256": weights, "preprocessing": PRE,
             "precision": "fp32", "layer": "pooled", "fingerprint": f"fp-{seed}-{dim}",
             "created": "2025-01-01T00:00:00", "fxtl_version": "test", "dataset_name": "blobs",
             "timings": {"compute_seconds": 1.5}}
    return write_cache(path, chunks=[X], n=len(X), dim=dim, labels=labels, paths=paths, split=split,
                       class_names=[f"class{c}" for c in range(classes)], errors=[], attrs=attrs)


@pytest.fixture()
def blobs(tmp_path) -> Path:
    return write_synthetic_cache(tmp_path / "blobs.h5")


# ----------------------------------------------------------------------------- registry
def test_registry_refuses_duplicates_and_returns_copies():
    with pytest.raises(ValueError, match="already registered"):
        register_head(HEADS["logreg"])
    spec = get_head("logreg")
    spec.defaults["C"] = 123.0
    assert HEADS["logreg"].defaults["C"] == 1.0
    with pytest.raises(FxtlError, match="unknown head model 'forest'"):
        get_head("forest")


def test_build_pipeline_steps_and_params():
    p = build_pipeline("logreg", params={"C": 0.1}, l2_normalize=True, pca=4)
    assert [n for n, _ in p.steps] == ["l2", "scale", "pca", "est"]
    assert p.named_steps["est"].C == 0.1
    svm = build_pipeline("svm", seed=3).named_steps["est"]
    assert type(svm).__name__ == "CalibratedClassifierCV" and svm.estimator.random_state == 3


def test_parse_and_check_params():
    assert parse_params(["C=0.1", "hidden_layer_sizes=(64, 32)", "gamma=scale", "fit_intercept=False"]) == \
        {"C": 0.1, "hidden_layer_sizes": (64, 32), "gamma": "scale", "fit_intercept": False}
    with pytest.raises(FxtlError, match="KEY=VALUE"):
        parse_params(["C"])
    check_params(["logreg", "knn"], {"C": 1.0, "n_neighbors": 3})
    with pytest.raises(FxtlError, match="not a parameter of knn"):
        check_params(["knn"], {"C": 1.0})


# ----------------------------------------------------------------------------- splits
@pytest.mark.parametrize("layout, selection, reported", [
    (("train", "val", "test"), "val", "test"),
    (("train", "test"), "cv5", "test"),
    (("train", "val"), "cv5", "val"),
    (("train",), "cv5", "holdout"),
])
def test_plan_never_shares_rows_with_the_reported_split(layout, selection, reported):
    split = np.array([s for s in layout for _ in range(30)])
    labels = np.tile(np.arange(3), len(split) // 3)
    paths = [f"{s}/c{y}/{i}.png" for i, (s, y) in enumerate(zip(split, labels))]
    plan = plan_head(labels, split, paths=paths, seed=1, test_size=0.2)
    assert (plan.selection, plan.eval_split) == (selection, reported)
    assert not set(plan.eval_rows) & set(plan.search_rows)
    assert not set(plan.eval_rows) & set(plan.fit_rows)
    if reported in ("test", "val"):
        assert set(plan.eval_rows) == set(np.flatnonzero(split == reported))
    else:  # each image placed by a hash of its path: about 20%, every class on both sides
        assert len(plan.eval_rows) + len(plan.fit_rows) == 30 and 2 <= len(plan.eval_rows) <= 12
        assert sorted(set(labels[plan.eval_rows])) == sorted(set(labels[plan.fit_rows])) == [0, 1, 2]
        # An image's side does not depend on the others: drop five rows, the rest stay put.
        keep = np.arange(5, 30)
        again = plan_head(labels[keep], split[keep], paths=[paths[i] for i in keep], seed=1,
                          test_size=0.2)
        assert set(keep[again.eval_rows]) == set(plan.eval_rows) - set(range(5))


def test_plan_refuses_a_cache_without_train():
    with pytest.raises(CacheError, match="no labelled train rows"):
        plan_head(np.array([0, 1]), np.array(["val", "val"]))


@pytest.mark.parametrize("layout", [
    (("train", 60), ("val", 30), ("test", 30)),
    (("train", 60), ("val", 30)),
    (("train", 90),),
])
def test_selection_never_touches_the_reported_split(tmp_path, layout):
    """Poison the reported rows' features: search, chosen parameters and fitted head must not move."""
    clean = write_synthetic_cache(tmp_path / "clean.h5", splits=layout, sep=1.0)
    c = load_features(clean)
    plan = plan_head(c.labels, c.split, paths=c.paths, seed=0)
    poisoned_rows = plan.eval_rows
    X = c.features.copy()
    X[poisoned_rows] = np.random.default_rng(9).normal(size=(len(poisoned_rows), c.dim)) * 50
    poisoned = write_cache(tmp_path / "poisoned.h5", chunks=[X], n=c.n, dim=c.dim, labels=c.labels,
                           paths=c.paths, split=c.split, class_names=c.class_names, errors=[],
                           attrs={k: v for k, v in c.attrs.items()
                                  if k not in ("format", "format_version", "n", "dim", "complete", "class_names")})
    for model in ("logreg", "svm"):
        a = fit_head(clean, model=model, seed=0, save=False)
        b = fit_head(poisoned, model=model, seed=0, save=False)
        assert a.metrics["split"] == b.metrics["split"] == plan.eval_split
        assert a.metrics["best_params"] == b.metrics["best_params"]
        assert a.metrics["selection_score"] == b.metrics["selection_score"]
        probe = c.features[plan.fit_rows[:10]]
        np.testing.assert_allclose(a.head.scores(probe), b.head.scores(probe), rtol=1e-6, atol=1e-9)
        # ... while the reported score did see the poison (so the test can fail).
        assert b.metrics["accuracy"] < a.metrics["accuracy"]


# ----------------------------------------------------------------------------- each model
@pytest.mark.parametrize("model", list(HEADS))
def test_each_model_fits_a_tiny_cache(tmp_path, blobs, model):
    res = fit_head(blobs, model=model, seed=0, jobs=1, cache_dir=tmp_path / "home")
    m = res.metrics
    assert m["split"] == "test" and m["selection"] == "val" and m["n"] == 30
    assert m["accuracy"] >= 0.9 and m["macro_f1"] >= 0.9
    assert m["n_candidates"] > 1 and m["best_params"]
    assert m["n_fit"] == 90  # refit on train + val, the selection data
    assert (m["trainable_params"] > 0) == (model != "knn")
    for key in ("kind", "model", "backbone", "dataset", "dataset_fingerprint", "balanced_accuracy",
                "per_class", "confusion_matrix", "class_names", "fit_seconds", "predict_seconds",
                "extract_seconds", "trainable_params", "best_params", "selection", "cache"):
        assert key in m, key
    assert m["kind"] == "head" and m["extract_seconds"] == 1.5 and m["dataset_fingerprint"] == "fp-0-8"
    run = res.run_dir
    assert run.parent == tmp_path / "home" / "runs"
    on_disk = json.loads((run / "metrics.json").read_text())
    assert on_disk["accuracy"] == m["accuracy"] and on_disk["head"] == str(run / "head.skops")
    assert (run / "confusion.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    rows = (run / "predictions.csv").read_text().splitlines()
    assert len(rows) == 31
    # The saved head reproduces the evaluation exactly.
    head = load_head(run)
    c = load_features(blobs)
    test_rows = np.flatnonzero(c.split == "test")
    names = np.array(c.class_names)
    assert (head.predict(c.features[test_rows]) == names[res.predictions["y_pred"]]).all()
    scores = head.scores(c.features[test_rows])
    np.testing.assert_allclose(scores.sum(axis=1), 1.0, rtol=1e-6)


def test_no_search_fits_defaults_and_params_are_fixed(blobs):
    res = fit_head(blobs, model="logreg", search=False, save=False)
    assert res.metrics["selection"] == "none" and res.metrics["n_candidates"] == 1
    assert res.head.pipeline.named_steps["est"].C == 1.0
    res = fit_head(blobs, model="svm", params={"C": 0.5}, save=False)
    assert res.metrics["best_params"]["C"] == 0.5
    assert res.head.pipeline.named_steps["est"].estimator.C == 0.5
    assert res.metrics["n_candidates"] == 4  # only gamma searched


def test_holdout_when_only_train_and_seeded(tmp_path):
    path = write_synthetic_cache(tmp_path / "t.h5", splits=(("train", 100),), sep=1.5)
    a = fit_head(path, model="mlp", test_size=0.2, seed=4, save=False)
    b = fit_head(path, model="mlp", test_size=0.2, seed=4, save=False)
    assert a.metrics["split"] == "holdout" and a.metrics["n"] + a.metrics["n_fit"] == 100
    assert 10 <= a.metrics["n"] <= 30  # each image placed by a hash of its path: about 20%
    assert a.head.pipeline.named_steps["est"].early_stopping
    assert a.metrics["best_params"] == b.metrics["best_params"]
    np.testing.assert_array_equal(a.predictions["scores"], b.predictions["scores"])
    c = fit_head(path, model="mlp", test_size=0.2, seed=5, save=False)
    assert not np.array_equal(np.sort(c.predictions["rows"]), np.sort(a.predictions["rows"]))


def test_fit_heads_all_and_run_names(tmp_path, blobs):
    results = fit_heads(blobs, models=["all"], jobs=1, cache_dir=tmp_path, run_name="exp")
    assert [r.metrics["model"] for r in results] == list(HEADS)
    assert sorted(p.name for p in (tmp_path / "runs").iterdir()) == sorted(f"exp-{m}" for m in HEADS)
    with pytest.raises(FxtlError, match="already exists"):
        fit_head(blobs, model="knn", cache_dir=tmp_path, run_name="exp-knn")


def test_fit_head_on_real_lite0_features(shapes_cache):
    res = fit_head(shapes_cache, model="logreg", save=False)
    assert res.metrics["backbone"] == "lite0" and res.metrics["split"] == "val"
    assert res.head.feature_dim == 1280
    assert res.metrics["accuracy"] >= 0.75  # circles vs squares, 6 val images each


# ----------------------------------------------------------------------------- large caches
def test_large_cache_uses_streaming_estimators(tmp_path):
    path = write_synthetic_cache(tmp_path / "big.h5", splits=(("train", 600), ("val", 150)), dim=12)
    log = []
    results = fit_heads(path, models=["all"], large_threshold=500, save=False, log=log.append)
    assert [r.metrics["model"] for r in results] == ["logreg", "svm", "linear-svm", "mlp"]
    assert any("skipping knn" in line for line in log)
    by = {r.metrics["model"]: r.metrics for r in results}
    assert by["logreg"]["estimator"] == "SGDClassifier" and by["mlp"]["estimator"] == "MLPClassifier"
    for m in by.values():
        assert m["scalable"] is True and m["split"] == "val"
        assert m["selection"] == "train-holdout10" and len(m["search"]) >= 2
        assert any("large_threshold" in n for n in m["notes"])
        assert m["accuracy"] >= 0.9
    # logreg's streamed head has probabilities; the hinge one a softmax of margins.
    assert results[0].head.calibrated and not results[1].head.calibrated
    with pytest.raises(FxtlError, match="does not scale"):
        fit_head(path, model="knn", large_threshold=500, save=False)


def test_large_cache_selects_on_val_when_test_exists(tmp_path):
    path = write_synthetic_cache(tmp_path / "big.h5", dim=6,
                                 splits=(("train", 300), ("val", 90), ("test", 90)))
    res = fit_head(path, model="linear-svm", large_threshold=100, save=False)
    assert res.metrics["selection"] == "val" and res.metrics["split"] == "test"
    assert res.metrics["n_fit"] == 390 and res.metrics["accuracy"] >= 0.9
    # Parameters of the scalable stand-in are accepted (and fixed); the kernel SVM's are noted.
    res = fit_head(path, model="svm", params={"alpha": 1e-3, "C": 2.0}, large_threshold=100, save=False)
    assert res.metrics["best_params"] == {"alpha": 1e-3} and res.metrics["n_candidates"] == 1
    assert any("ignored params C" in n for n in res.metrics["notes"])


# ----------------------------------------------------------------------------- persistence
def test_tampered_or_unverified_head_is_refused(tmp_path, blobs):
    run = fit_head(blobs, model="logreg", cache_dir=tmp_path).run_dir
    head_file = run / "head.skops"
    head_file.write_bytes(head_file.read_bytes() + b"\0")
    with pytest.raises(ProvenanceError, match="sha256"):
        load_head(run)
    assert load_head(run, trust=True).model == "logreg"  # trailing byte: still a readable zip
    sidecar = run / "head.json"
    side = json.loads(sidecar.read_text())
    sidecar.write_text(json.dumps({**side, "format": "other"}))
    with pytest.raises(ProvenanceError, match="not an fxtl head sidecar"):
        load_head(head_file)
    sidecar.unlink()
    with pytest.raises(ProvenanceError, match="no sidecar head.json"):
        load_head(head_file)


def test_head_refuses_mismatched_features(tmp_path, blobs):
    head = fit_head(blobs, model="logreg", save=False).head
    c = load_features(blobs)
    head.check_features(c.attrs, c.dim, source="same")  # no error
    other = {**c.attrs}
    with pytest.raises(ProvenanceError, match="expects 8-d features but x has 16-d"):
        head.check_features(other, 16, source="x")
    for key, value in (("backbone", "resnet50"), ("weights_sha256", "f" * 64), ("layer", "blocks.5"),
                       ("preprocessing", {**PRE, "crop": 192})):
        with pytest.raises(ProvenanceError, match=key):
            head.check_features({**c.attrs, key: value}, c.dim, source="x")


# ----------------------------------------------------------------------------- CLI
def test_cli_fit_head_json_and_human(tmp_path, blobs):
    """Each run's test scores are those of a plain scikit-learn pipeline with the chosen
    parameters, fitted on the same train + val rows; the best is the most accurate."""
    runner = CliRunner()
    # overlapping blobs: logreg 23/30, knn 24/30 on the test rows, so the pick can be wrong
    hard = write_synthetic_cache(tmp_path / "hard.h5", seed=1, sep=1.0)
    r = runner.invoke(cli, ["fit-head", str(hard), "--model", "logreg", "--model", "knn",
                            "--jobs", "1", "--cache-dir", str(tmp_path), "--json"])
    assert r.exit_code == 0, r.output
    d = json.loads(r.stdout)
    assert [x["model"] for x in d["runs"]] == ["logreg", "knn"]
    c = load_features(hard)
    fit, test = np.isin(c.split, ["train", "val"]), c.split == "test"
    names = np.array(c.class_names)
    plain = {"logreg": lambda p: LogisticRegression(max_iter=2000, **p),
             "knn": lambda p: KNeighborsClassifier(**p)}
    scores = {}
    for run in d["runs"]:
        for key in ("model", "split", "accuracy", "macro_f1", "head", "run_dir", "fit_seconds"):
            assert key in run
        assert Path(run["head"]).is_file()
        params = json.loads((Path(run["run_dir"]) / "metrics.json").read_text())["best_params"]
        pipe = make_pipeline(StandardScaler(), plain[run["model"]](params))
        pred = pipe.fit(c.features[fit], names[c.labels[fit]]).predict(c.features[test])
        truth = names[c.labels[test]]
        assert run["accuracy"] == pytest.approx(accuracy_score(truth, pred))
        assert run["macro_f1"] == pytest.approx(f1_score(truth, pred, average="macro"))
        scores[run["model"]] = (run["accuracy"], run["macro_f1"])
    assert scores["logreg"] != scores["knn"]
    assert d["best"] == max(scores, key=scores.get)
    r = runner.invoke(cli, ["fit-head", str(blobs), "-m", "linear-svm", "--param", "C=0.01",
                            "--pca", "4", "--l2-normalize", "--cache-dir", str(tmp_path)])
    assert r.exit_code == 0, r.output
    assert "linear-svm" in r.stdout and "best: linear-svm" in r.stdout and "class0" in r.stdout
    m = json.loads((sorted((tmp_path / "runs").glob("*linear-svm*"))[0] / "metrics.json").read_text())
    assert m["pipeline"] == ["l2", "scale", "pca", "est"] and m["best_params"]["C"] == 0.01


@pytest.mark.parametrize("args, fragment", [
    (["--model", "forest"], "Invalid value for '--model'"),
    (["--param", "C"], "KEY=VALUE"),
    (["--model", "knn", "--param", "C=1"], "not a parameter of knn"),
    (["--pca", "-3"], "--pca"),
    (["--test-size", "1.5"], "--test-size"),
])
def test_cli_usage_errors_exit_2(blobs, args, fragment):
    r = CliRunner().invoke(cli, ["fit-head", str(blobs), *args])
    assert r.exit_code == 2 and fragment in r.output


def test_cli_runtime_errors_exit_1_with_one_line(tmp_path):
    not_a_cache = tmp_path / "notes.h5"
    not_a_cache.write_text("hello")
    r = CliRunner().invoke(cli, ["fit-head", str(not_a_cache), "--cache-dir", str(tmp_path)])
    assert r.exit_code == 1
    assert r.stderr.startswith("fxtl: error: ") and r.stderr.count("\n") == 1
    assert "not an HDF5 file" in r.stderr
    one_class = write_synthetic_cache(tmp_path / "odd.h5", splits=(("val", 6),))
    r = CliRunner().invoke(cli, ["fit-head", str(one_class), "--cache-dir", str(tmp_path)])
    assert r.exit_code == 1 and "no labelled train rows" in r.stderr


def test_cli_plot_embedding(tmp_path, blobs):
    runner = CliRunner()
    for method in ("pca", "tsne"):
        out = tmp_path / f"{method}.png"
        r = runner.invoke(cli, ["plot-embedding", str(blobs), "--method", method, "-o", str(out), "--json"])
        assert r.exit_code == 0, r.output
        d = json.loads(r.stdout)
        assert d["plot"] == str(out) and d["n"] == 120 and d["method"] == method
        assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert len(d["explained_variance"]) == 0
    r = runner.invoke(cli, ["plot-embedding", str(blobs), "--split", "val", "--max-points", "12",
                            "--cache-dir", str(tmp_path), "--json"])
    d = json.loads(r.stdout)
    assert d["n"] == 12 and d["n_total"] == 30 and len(d["explained_variance"]) == 2
    assert Path(d["plot"]).parent == tmp_path / "plots"


@pytest.mark.parametrize("train", [8, 6])
def test_streamed_search_on_a_tiny_cache_selects_on_a_row_per_class(tmp_path, train):
    """10% of 8 rows rounds to none: the streamed search holds out one row per class instead
    (3 rows), so it still selects. The blobs are separable: every candidate classifies the
    hold-out and the test rows perfectly, and the tie goes to the first (most regularised)."""
    cache = write_synthetic_cache(tmp_path / "t.h5", splits=(("train", train), ("test", 6)),
                                  dim=8, classes=3, sep=4.0)
    res = fit_head(cache, model="logreg", large_threshold=2, seed=0)
    m = res.metrics
    assert m["scalable"] and m["selection"] == "train-holdout10"
    assert [c["mean_score"] for c in m["search"]] == [1.0, 1.0, 1.0]
    assert m["selection_score"] == 1.0 and m["best_params"] == {"alpha": 1e-3}
    c = load_features(cache)
    test = c.split == "test"
    assert (res.head.predict(c.features[test]) == np.array(c.class_names)[c.labels[test]]).all()
    assert m["accuracy"] == 1.0 and m["n"] == 6
