"""fxtl.heads.torch_heads: torch solvers that must give scikit-learn's answers (CPU, seconds)."""
from __future__ import annotations

import json
import subprocess
import sys
import warnings

import numpy as np
import pytest
from sklearn.base import clone
from sklearn.calibration import CalibratedClassifierCV
from sklearn.datasets import load_digits
from sklearn.exceptions import ConvergenceWarning
from sklearn.frozen import FrozenEstimator
from sklearn.linear_model import LogisticRegression
from sklearn.model_selection import train_test_split
from sklearn.neural_network import MLPClassifier
from sklearn.pipeline import make_pipeline
from sklearn.preprocessing import StandardScaler
from sklearn.svm import LinearSVC

from fxtl.heads.torch_heads import TorchLinearSVC, TorchLogisticRegression, TorchMLPClassifier

pytest.importorskip("torch")


@pytest.fixture(scope="module")
def digits():
    X, y = load_digits(return_X_y=True)
    return StandardScaler().fit_transform(X), y


@pytest.fixture(scope="module", params=["multiclass", "binary"])
def problem(request, digits):
    X, y = digits
    return X, (y if request.param == "multiclass" else (y >= 5).astype(int))


def test_logreg_matches_sklearn(problem):
    X, y = problem[0][:900], problem[1][:900]
    ref = LogisticRegression(C=0.1, tol=1e-8, max_iter=5000).fit(X, y)
    got = TorchLogisticRegression(C=0.1, tol=1e-8, max_iter=5000, device="cpu").fit(X, y)
    assert got.coef_.shape == ref.coef_.shape == ((1, 64) if len(ref.classes_) == 2 else (10, 64))
    np.testing.assert_array_equal(got.classes_, ref.classes_)
    assert np.mean(got.predict(X) == ref.predict(X)) >= 0.99
    # both converged tightly: the same optimum to ~1e-4 in probability
    assert np.abs(got.predict_proba(X) - ref.predict_proba(X)).max() < 1e-3
    np.testing.assert_allclose(got.coef_, ref.coef_, atol=2e-3)
    # at the default tolerance, still the same predictions and probabilities within 0.02
    loose = TorchLogisticRegression(C=0.1, device="cpu").fit(X, y)
    assert np.mean(loose.predict(X) == ref.predict(X)) >= 0.99
    assert np.abs(loose.predict_proba(X) - ref.predict_proba(X)).max() < 0.02


def test_linear_svc_matches_sklearn(problem):
    X, y = problem
    ref = LinearSVC(C=0.01, tol=1e-6, max_iter=20_000).fit(X, y)
    got = TorchLinearSVC(C=0.01, tol=1e-6, max_iter=5000, device="cpu").fit(X, y)
    assert got.coef_.shape == ref.coef_.shape and got.intercept_.shape == ref.intercept_.shape
    assert np.mean(got.predict(X) == ref.predict(X)) >= 0.98
    np.testing.assert_allclose(got.decision_function(X), ref.decision_function(X), atol=0.02)
    np.testing.assert_allclose(got.intercept_, ref.intercept_, atol=0.01)


def test_mlp_is_as_accurate_as_sklearn(digits):
    X, y = digits
    Xa, Xb, ya, yb = train_test_split(X, y, test_size=0.3, stratify=y, random_state=0)
    kw = dict(hidden_layer_sizes=(32,), alpha=1e-2, batch_size=128, learning_rate_init=3e-3,
              early_stopping=True, n_iter_no_change=3, max_iter=60, random_state=0)
    ref = MLPClassifier(**kw).fit(Xa, ya)
    got = TorchMLPClassifier(**kw, device="cpu").fit(Xa, ya)
    assert got.score(Xb, yb) >= ref.score(Xb, yb) - 0.03
    assert got.out_activation_ == "softmax" and got.n_layers_ == 3 and got.n_outputs_ == 10
    assert [w.shape for w in got.coefs_] == [(64, 32), (32, 10)]
    # early stopping as sklearn: the kept weights are the best epoch's, patience respected
    scores = got.validation_scores_
    assert got.best_validation_score_ == max(scores) and got.best_loss_ is None
    assert len(scores) == got.n_iter_ == len(got.loss_curve_) and got.n_iter_ < 60
    assert got.n_iter_ - 1 - int(np.argmax(scores)) <= kw["n_iter_no_change"] + 1
    # same seed, same network
    again = TorchMLPClassifier(**kw, device="cpu").fit(Xa, ya)
    np.testing.assert_array_equal(again.coefs_[0], got.coefs_[0])


def test_mlp_binary_has_one_logistic_output(digits):
    X, y = digits
    yb = np.where(y >= 5, "high", "low")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ConvergenceWarning)
        got = TorchMLPClassifier(hidden_layer_sizes=(16,), max_iter=10, random_state=0,
                                 batch_size=128, early_stopping=False, device="cpu").fit(X, yb)
    assert got.out_activation_ == "logistic" and got.coefs_[-1].shape == (16, 1)
    proba = got.predict_proba(X)
    assert proba.shape == (len(X), 2) and np.allclose(proba.sum(1), 1)
    assert set(got.predict(X)) <= {"high", "low"} and got.score(X, yb) > 0.9
    assert got.validation_scores_ is None and got.best_loss_ == min(got.loss_curve_)


def test_clone_and_params():
    for cls, params in ((TorchLogisticRegression, {"C": 0.3, "warm_start": True}),
                        (TorchLinearSVC, {"C": 1e-3, "tol": 1e-5}),
                        (TorchMLPClassifier, {"alpha": 10.0, "hidden_layer_sizes": (32,)})):
        est = cls(**params, device="cpu")
        copy = clone(est)
        assert type(copy) is cls and copy.get_params() == est.get_params()
        assert {k: copy.get_params()[k] for k in params} == params
        assert "device" in copy.get_params() and "solver" not in copy.get_params()
    assert set(TorchLogisticRegression().get_params()) == {
        "C", "tol", "max_iter", "warm_start", "device", "random_state", "polish"}


@pytest.mark.parametrize("cls,bad", [(TorchLogisticRegression, {"C": -1.0}),
                                     (TorchLinearSVC, {"max_iter": -3}),
                                     (TorchMLPClassifier, {"alpha": -1.0}),
                                     (TorchLogisticRegression, {"device": "gpu"})])
def test_bad_parameters_are_refused_like_sklearn(cls, bad, digits):
    X, y = digits
    # registry.check_params treats InvalidParameterError as the user's mistake
    with pytest.raises(ValueError) as err:
        cls(**bad).fit(X[:50], y[:50])
    assert type(err.value).__name__ == "InvalidParameterError"
    assert list(bad)[0] in str(err.value)


def test_warm_start_reuses_the_previous_solution(digits):
    X, y = digits[0][:600], digits[1][:600]
    # one half-decade step of the C path the search walks
    cold = TorchLogisticRegression(C=0.1, device="cpu").fit(X, y)
    warm = TorchLogisticRegression(C=0.03, warm_start=True, device="cpu").fit(X, y)
    warm.set_params(C=0.1).fit(X, y)
    assert warm.n_iter_[0] < cold.n_iter_[0]
    assert np.mean(warm.predict(X) == cold.predict(X)) >= 0.99
    # another number of classes: the old solution does not fit, a cold start is made
    warm.fit(X, y >= 5)
    assert warm.coef_.shape == (1, 64) and warm.n_iter_[0] > 0


def test_float32_and_float64_input_give_the_same_model(digits):
    X, y = digits[0][:400], digits[1][:400]
    for cls in (TorchLogisticRegression, TorchLinearSVC):
        a = cls(C=0.05, device="cpu").fit(X.astype(np.float32), y)
        b = cls(C=0.05, device="cpu").fit(X, y)
        assert a.coef_.dtype == np.float64
        np.testing.assert_allclose(a.coef_, b.coef_, atol=1e-3)
    m = TorchMLPClassifier(hidden_layer_sizes=(16,), max_iter=3, batch_size=128, device="cpu",
                           random_state=0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ConvergenceWarning)
        p32 = m.fit(X.astype(np.float32), y).predict_proba(X)
        p64 = clone(m).fit(X, y).predict_proba(X)
    np.testing.assert_allclose(p32, p64, atol=1e-4)


def test_max_iter_reached_warns(digits):
    X, y = digits
    with pytest.warns(ConvergenceWarning):
        TorchLogisticRegression(C=10.0, max_iter=2, device="cpu").fit(X, y)


_LOAD = """
import json, sys
import numpy as np
from fxtl.heads import load_head
X = np.load(sys.argv[2])
out = {}
for name in sys.argv[1].split(","):
    head = load_head(name)
    out[name] = head.estimator.predict_proba(X).tolist()
out["torch_loaded"] = "torch" in sys.modules
print(json.dumps(out))
"""


def test_saved_heads_load_and_predict_without_torch(digits, tmp_path):
    from fxtl.heads import Head, save_head

    X, y = digits[0][:400], digits[1][:400]
    names = [str(c) for c in range(10)]
    pipes = {
        "logreg": make_pipeline(StandardScaler(), TorchLogisticRegression(C=0.1, device="cpu")),
        "mlp": make_pipeline(StandardScaler(), TorchMLPClassifier(
            hidden_layer_sizes=(16,), batch_size=128, max_iter=5, random_state=0, device="cpu")),
        "svc": make_pipeline(StandardScaler(), CalibratedClassifierCV(
            FrozenEstimator(TorchLinearSVC(C=0.01, device="cpu").fit(X, y)), method="sigmoid")),
    }
    paths = []
    for name, pipe in pipes.items():
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", ConvergenceWarning)
            pipe.fit(X, y)
        paths.append(str(save_head(Head(model=name, pipeline=pipe, class_names=names,
                                        provenance={}), tmp_path / f"{name}.skops")))
    np.save(tmp_path / "X.npy", X[:20])
    run = subprocess.run([sys.executable, "-c", _LOAD, ",".join(paths), str(tmp_path / "X.npy")],
                         capture_output=True, text=True)
    assert run.returncode == 0, run.stderr[-1500:]
    got = json.loads(run.stdout)
    assert got.pop("torch_loaded") is False
    for path, pipe in zip(paths, pipes.values()):
        np.testing.assert_allclose(got[path], pipe.predict_proba(X[:20]), atol=1e-12)


@pytest.mark.parametrize("kind", ["logreg", "logreg-binary", "svc", "mlp", "mlp-binary"])
def test_onnx_export_gives_predict_proba(kind, digits):
    ort = pytest.importorskip("onnxruntime")
    from fxtl.deploy.heads_onnx import convert_head, convert_with_skl2onnx

    X, y = digits
    X = (X * 3 + 5).astype(np.float32)  # raw-looking features: the scaler is in the graph
    y = (y >= 5).astype(int) if kind.endswith("binary") else y
    est = {"logreg": TorchLogisticRegression(C=0.1, device="cpu"),
           "svc": CalibratedClassifierCV(FrozenEstimator(
               TorchLinearSVC(C=0.01, device="cpu").fit(StandardScaler().fit_transform(X), y))),
           "mlp": TorchMLPClassifier(hidden_layer_sizes=(16,), random_state=0, device="cpu",
                                     batch_size=256, max_iter=10)}[kind.split("-")[0]]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ConvergenceWarning)
        pipe = make_pipeline(StandardScaler(), est).fit(X, y)
    k = len(pipe.classes_)
    kw = dict(class_positions=list(range(k)), n_classes=k, feature_dim=X.shape[1], opset=17)
    converters = [convert_head] + ([convert_with_skl2onnx] if kind != "svc" else [])
    for convert in converters:
        model = convert(pipe, **kw)
        sess = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
        (p,) = sess.run(["probabilities"], {"features": X[:50]})
        np.testing.assert_allclose(p, pipe.predict_proba(X[:50]), atol=1e-4)


@pytest.mark.parametrize("cls", [TorchLogisticRegression, TorchLinearSVC])
def test_sample_weight_is_row_repetition(cls, digits):
    X, y = digits
    X, y = X[:200], y[:200]
    w = np.random.default_rng(0).integers(0, 3, len(y))
    weighted = cls(C=0.05, tol=1e-7, device="cpu").fit(X, y, sample_weight=w)
    repeated = cls(C=0.05, tol=1e-7, device="cpu").fit(np.repeat(X, w, 0), np.repeat(y, w))
    np.testing.assert_allclose(weighted.coef_, repeated.coef_, atol=1e-4)
    with pytest.raises(ValueError, match="zero"):
        cls(device="cpu").fit(X, y, sample_weight=np.zeros(len(y)))


def test_mlp_sample_weight(digits):
    X, y = digits
    w = (y != 3).astype(float)  # class 3 weighs nothing: it is never learned
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ConvergenceWarning)
        got = TorchMLPClassifier(hidden_layer_sizes=(16,), batch_size=256, n_iter_no_change=3,
                                 max_iter=25, random_state=0, device="cpu").fit(X, y, sample_weight=w)
    assert (got.predict(X[y == 3]) == 3).mean() < 0.2 and got.score(X[y != 3], y[y != 3]) > 0.9


def test_polish_false_stops_in_float32_with_the_same_predictions():
    """fxtl's search fits candidates without the float64 stage: fewer iterations, same labels."""
    from sklearn.datasets import load_digits
    from sklearn.preprocessing import StandardScaler

    X, y = load_digits(return_X_y=True)
    X = StandardScaler().fit_transform(X)
    full = TorchLogisticRegression(C=0.1, device="cpu").fit(X[:1000], y[:1000])
    quick = TorchLogisticRegression(C=0.1, device="cpu", polish=False).fit(X[:1000], y[:1000])
    assert quick.n_iter_[0] < full.n_iter_[0]
    assert (quick.predict(X[1000:]) == full.predict(X[1000:])).mean() >= 0.99
