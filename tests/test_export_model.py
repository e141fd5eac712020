"""fxtl export-model: runs -> one ONNX file that gives fxtl predict's answers under onnxruntime."""
from __future__ import annotations

import json
import re
import shutil
import sys
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner

pytest.importorskip("onnxruntime")
pytest.importorskip("onnx")

from fxtl.cli import cli  # noqa: E402
from fxtl.deploy import export_model, load_onnx  # noqa: E402
from fxtl.deploy.heads_onnx import convert_head  # noqa: E402
from fxtl.errors import FxtlError, ProvenanceError  # noqa: E402
from fxtl.prediction import predict  # noqa: E402

DOCS = Path(__file__).resolve().parent.parent / "docs" / "onnx.md"


@pytest.fixture(scope="module")
def runs(digits_dir, tiny, tmp_path_factory) -> dict[str, Path]:
    """Head runs of every kind and a 1-epoch fine-tune, all on the tiny backbone's digits."""
    import fxtl

    home = tmp_path_factory.mktemp("home")
    cache = fxtl.extract(digits_dir, backbone=tiny, precision="fp32", cache_dir=home,
                         progress=False).cache
    out = {m: fxtl.fit_head(cache, model=m, search=False, cache_dir=home, run_name=m).run_dir
           for m in ("logreg", "mlp", "linear-svm", "svm", "knn")}
    out["logreg-l2-pca"] = fxtl.fit_head(cache, model="logreg", search=False, l2_normalize=True,
                                         pca=5, cache_dir=home, run_name="logreg-l2-pca").run_dir
    out["finetune"] = fxtl.finetune(digits_dir, backbone=tiny, epochs=1, image_size=64,
                                    cache_dir=home, device="cpu", precision="fp32",
                                    progress=False).run_dir
    return out


def _probs(res) -> dict[str, np.ndarray]:
    names = res.class_names
    out = {}
    for p in res.predictions:
        v = np.zeros(len(names))
        for t in p["top_k"]:
            v[names.index(t["label"])] = t["probability"]
        out[p["path"]] = v
    return out


def _assert_same(run: Path, onnx_file: Path, images: list[Path]) -> None:
    ref = predict(run, images, top_k=3, device="cpu", precision="fp32", workers=0)
    got = predict(onnx_file, images, top_k=3)
    assert got.kind == "onnx" and got.class_names == ref.class_names
    assert [p["label"] for p in got.predictions] == [p["label"] for p in ref.predictions]
    a, b = _probs(ref), _probs(got)
    assert a.keys() == b.keys() and len(a) == len(images)
    assert max(float(np.abs(a[k] - b[k]).max()) for k in a) < 1e-3


@pytest.mark.parametrize("kind", ["logreg", "mlp", "linear-svm", "logreg-l2-pca", "svm", "knn",
                                  "finetune"])
def test_export_gives_the_answers_of_predict(kind, runs, digits_dir, tmp_path):
    val = sorted((digits_dir / "val").rglob("*.png"))
    res = export_model(runs[kind], output=tmp_path / "m.onnx")
    assert res.kind == ("finetune" if kind == "finetune" else "head")
    assert res.converter == {"svm": "skl2onnx", "finetune": "torch"}.get(kind, "exact")
    assert res.class_names == ["0", "1", "2"] and res.max_abs_diff < 1e-4
    _assert_same(runs[kind], res.output, val)
    # dynamic batch: a batch of one gives the row it gets in a batch of five
    net = load_onnx(res.output)
    assert net.session.get_inputs()[0].shape[0] == "batch"
    x = np.random.default_rng(1).integers(0, 256, (5, *net.session.get_inputs()[0].shape[1:]),
                                          dtype=np.uint8)
    np.testing.assert_allclose(net.scores(x[:1])[0], net.scores(x)[0], atol=1e-6)


def test_cli_export_metadata_sidecar_and_predict(runs, digits_dir, tmp_path):
    out = tmp_path / "logreg.onnx"
    r = CliRunner().invoke(cli, ["export-model", str(runs["logreg"]), "-o", str(out), "--json"])
    assert r.exit_code == 0, r.output
    d = json.loads(r.stdout)
    assert d["output"] == str(out) and d["opset"] == 17 and d["input"]["dtype"] == "uint8"
    side = json.loads((tmp_path / "logreg.onnx.json").read_text())
    head_json = json.loads((runs["logreg"] / "head.json").read_text())
    assert side["class_names"] == ["0", "1", "2"] and side["opset"] == 17
    assert side["provenance"]["weights_sha256"] == head_json["weights_sha256"]
    assert side["provenance"]["head_sha256"] == head_json["sha256"]
    assert side["preprocessing"]["crop"] == head_json["preprocessing"]["crop"]
    meta = load_onnx(out).meta
    assert meta["provenance"] == side["provenance"] and meta["format"] == "fxtl-onnx"
    r = CliRunner().invoke(cli, ["predict", str(out), str(digits_dir / "val"), "--json"])
    assert r.exit_code == 0, r.output
    p = json.loads(r.stdout)
    ref = predict(runs["logreg"], [digits_dir / "val"], precision="fp32", workers=0).to_dict()
    assert set(p) == set(ref) and p["n"] == ref["n"] == 12
    assert [x["label"] for x in p["predictions"]] == [x["label"] for x in ref["predictions"]]


def test_float_input_and_default_output(runs, digits_dir, tmp_path):
    run = tmp_path / "run"
    shutil.copytree(runs["mlp"], run)
    res = export_model(run, input_dtype="float32")
    assert res.output == run / "model.onnx"
    assert "float" in load_onnx(res.output).session.get_inputs()[0].type
    _assert_same(runs["mlp"], res.output, sorted((digits_dir / "val").rglob("*.png"))[:4])


def test_refused_head_kind_says_which_heads_export(runs, tmp_path, monkeypatch):
    from fxtl.deploy import heads_onnx, onnx_graph

    def no_skl2onnx(*a, **k):
        raise heads_onnx.UnsupportedHead("skl2onnx is not installed")

    monkeypatch.setattr(onnx_graph, "convert_with_skl2onnx", no_skl2onnx)
    r = CliRunner().invoke(cli, ["export-model", str(runs["svm"]), "-o", str(tmp_path / "k.onnx")])
    assert r.exit_code == 1
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and "svm head cannot be exported" in lines[0]
    assert "logreg, linear-svm, mlp, knn (exact)" in lines[0] and "Traceback" not in r.output
    assert not (tmp_path / "k.onnx").exists()


def test_damaged_runs_refuse_to_export(runs, tmp_path):
    head = tmp_path / "head"
    shutil.copytree(runs["logreg"], head)
    with open(head / json.loads((head / "head.json").read_text())["file"], "ab") as fh:
        fh.write(b"\0")
    with pytest.raises(ProvenanceError, match="sha256"):
        export_model(head, output=tmp_path / "h.onnx")
    ft = tmp_path / "ft"
    shutil.copytree(runs["finetune"], ft)
    with open(ft / "model.pt", "ab") as fh:
        fh.write(b"\0")
    r = CliRunner().invoke(cli, ["export-model", str(ft), "-o", str(tmp_path / "f.onnx")])
    assert r.exit_code == 1 and "does not match the weights_sha256" in r.stderr
    assert len(r.stderr.strip().splitlines()) == 1
    assert not (tmp_path / "h.onnx").exists() and not (tmp_path / "f.onnx").exists()


def test_missing_extra_names_it(runs, tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "onnxruntime", None)
    r = CliRunner().invoke(cli, ["export-model", str(runs["logreg"]), "-o", str(tmp_path / "x.onnx")])
    assert r.exit_code == 1 and "pip install 'fxtl[onnx]'" in r.stderr
    assert len(r.stderr.strip().splitlines()) == 1


def test_bad_arguments(runs, tmp_path):
    r = CliRunner().invoke(cli, ["export-model", str(runs["logreg"]), "-o", str(tmp_path / "x.txt")])
    assert r.exit_code == 2 and "--output" in r.output
    with pytest.raises(FxtlError, match="no such head or run"):
        export_model(tmp_path / "nothing", output=tmp_path / "x.onnx")
    (tmp_path / "other.onnx").write_bytes(b"not onnx")
    with pytest.raises(ProvenanceError, match="not a readable ONNX model"):
        predict(tmp_path / "other.onnx", [tmp_path])


def _snippet() -> str:
    text = DOCS.read_text()
    blocks = re.findall(r"```python\n(.*?)```", text, flags=re.S)
    found = [b for b in blocks if "InferenceSession" in b]
    assert found, "docs/onnx.md has no onnxruntime snippet"
    return found[0]


def test_docs_snippet_runs_without_fxtl(runs, digits_dir, tmp_path):
    """The README/docs lines (onnxruntime + PIL + numpy only) give fxtl predict's answer."""
    res = export_model(runs["mlp"], output=tmp_path / "model.onnx")
    image = sorted((digits_dir / "val").rglob("*.png"))[0]
    code = _snippet().replace('"model.onnx"', repr(str(res.output))).replace('"bee.jpg"', repr(str(image)))
    assert "import fxtl" not in code and "from fxtl" not in code
    scope: dict = {}
    exec(compile(code, "docs/onnx.md", "exec"), scope)  # noqa: S102 - our own documentation
    ref = predict(runs["mlp"], [image], top_k=3, precision="fp32", workers=0).predictions[0]
    assert scope["label"] == ref["label"]
    assert float(scope["probs"][0].max()) == pytest.approx(ref["probability"], abs=1e-3)


def _reference(pipe, X):
    """fxtl's Head.scores rule: predict_proba, else a softmax of decision margins."""
    if hasattr(pipe, "predict_proba"):
        return pipe.predict_proba(X)
    d = pipe.decision_function(X)
    z = np.c_[-d, d] if d.ndim == 1 else d
    e = np.exp(z - z.max(axis=1, keepdims=True))
    return e / e.sum(axis=1, keepdims=True)


@pytest.mark.parametrize("n_classes", [2, 4])
def test_converter_covers_sklearn_steps_by_class(n_classes):
    """Steps convert by class and attributes: binary and multiclass, each estimator kind."""
    import onnxruntime as ort
    from sklearn.calibration import CalibratedClassifierCV
    from sklearn.decomposition import PCA
    from sklearn.linear_model import LogisticRegression, SGDClassifier
    from sklearn.neural_network import MLPClassifier
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import Normalizer, StandardScaler
    from sklearn.svm import LinearSVC

    rng = np.random.default_rng(0)
    X = rng.normal(size=(80, 6)).astype(np.float32)
    y = np.arange(80) % n_classes
    X[np.arange(80), y] += 2.0
    estimators = [LogisticRegression(), MLPClassifier((8,), activation="tanh", max_iter=300, random_state=0),
                  CalibratedClassifierCV(LinearSVC(), method="sigmoid", ensemble=False, cv=3),
                  CalibratedClassifierCV(LinearSVC(), method="sigmoid", cv=3),
                  SGDClassifier(loss="log_loss", random_state=0), SGDClassifier(loss="hinge", random_state=0)]
    for est in estimators:
        pipe = make_pipeline(Normalizer(), StandardScaler(), PCA(4, whiten=True), est).fit(X, y)
        model = convert_head(pipe, class_positions=range(n_classes), n_classes=n_classes, feature_dim=6,
                             opset=17)
        got = ort.InferenceSession(model.SerializeToString()).run(None, {"features": X})[0]
        # float32 here, float64 in scikit-learn: SGD's large weights amplify the rounding
        np.testing.assert_allclose(got, _reference(pipe, X), atol=1e-3, err_msg=repr(est))
    for norm, opset in (("l1", 17), ("max", 17), ("max", 18)):
        pipe = make_pipeline(Normalizer(norm=norm), LogisticRegression()).fit(X, y)
        model = convert_head(pipe, class_positions=range(n_classes), n_classes=n_classes, feature_dim=6,
                             opset=opset)
        got = ort.InferenceSession(model.SerializeToString()).run(None, {"features": X})[0]
        np.testing.assert_allclose(got, _reference(pipe, X), atol=1e-5, err_msg=norm)
