"""Issue 14, the heads' items: pickles never run without trust (8), damaged sidecars (12),
bad --param values (13), SIGTERM stops the search's workers (16), and --run-name never writes
into another run's folder (2, fit-head side)."""
from __future__ import annotations

import json
import os
import pickle
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner

from fxtl.cli import cli
from fxtl.features.store import write_cache

from ..test_heads import PRE
from ._cli import ROOT, RunsCode, assert_one_line_error


# ----------------------------------------------------------------------------- 8: no pickle
def test_heads_are_saved_without_pickle(genuine):
    run, _ = genuine
    assert (run / "head.skops").is_file() and not list(run.glob("*.joblib"))
    side = json.loads((run / "head.json").read_text())
    assert side["serialization"] == "skops" and side["format_version"] == 2


def test_forged_sidecar_matching_a_malicious_joblib_does_not_run_it(tmp_path, genuine):
    """A head.json whose sha256 is the malicious file's own: refused unless --trust."""
    import hashlib

    _, cache = genuine
    marker = tmp_path / "pwned"
    evil = tmp_path / "evil"
    evil.mkdir()
    payload = pickle.dumps({"format": "fxtl-head", "pipeline": RunsCode(marker), "class_names": ["a"]})
    (evil / "head.joblib").write_bytes(payload)
    (evil / "head.json").write_text(json.dumps({
        "format": "fxtl-head", "format_version": 1, "joblib_file": "head.joblib",
        "joblib_sha256": hashlib.sha256(payload).hexdigest(), "class_names": ["a"]}))
    r = CliRunner().invoke(cli, ["predict", str(evil), str(cache)])
    assert r.exit_code == 2 and "--trust" in r.output and "pickle" in r.output
    assert not marker.exists()


# ----------------------------------------------------------------------------- 12: sidecars
@pytest.mark.parametrize("text", ["[1, 2]", "null", "42", '"head"'])
def test_sidecar_that_is_not_an_object_is_one_line(tmp_path, genuine, text):
    import shutil

    run, cache = genuine
    copy = tmp_path / "copy"
    shutil.copytree(run, copy)
    (copy / "head.json").write_text(text)
    r = CliRunner().invoke(cli, ["predict", str(copy), str(cache)])
    assert_one_line_error(r.exit_code, r.stderr, "head.json", "not an fxtl head sidecar")


# ----------------------------------------------------------------------------- 13: --param
@pytest.mark.parametrize("value", ["C=abc", "C=-1", "n_neighbors=0"])
def test_bad_param_values_are_usage_errors(genuine, value):
    _, cache = genuine
    model = "knn" if value.startswith("n_") else "logreg"
    r = CliRunner().invoke(cli, ["fit-head", str(cache), "-m", model, "--param", value])
    assert r.exit_code == 2, r.output
    assert "'--param'" in r.output and value.split("=")[0] in r.output
    assert "Traceback" not in r.output


# ----------------------------------------------------------------------------- 2: run names
def test_run_name_never_writes_into_another_runs_folder(tmp_path, genuine):
    _, cache = genuine
    other = tmp_path / "runs" / "mix"
    other.mkdir(parents=True)
    (other / "metrics.json").write_text('{"kind": "finetune"}')
    r = CliRunner().invoke(cli, ["fit-head", str(cache), "--run-name", "mix",
                                 "--cache-dir", str(tmp_path)])
    assert_one_line_error(r.exit_code, r.stderr, str(other), "already exists")
    assert sorted(p.name for p in other.iterdir()) == ["metrics.json"]
    assert (other / "metrics.json").read_text() == '{"kind": "finetune"}'


# ----------------------------------------------------------------------------- 16: SIGTERM
def _children(pid: int) -> set[int]:
    out = subprocess.run(["ps", "-o", "pid=", "--ppid", str(pid)], capture_output=True, text=True)
    return {int(x) for x in out.stdout.split()}


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    stat = Path(f"/proc/{pid}/stat")
    return not (stat.exists() and stat.read_text().split()[2] == "Z")


def test_sigterm_mid_search_ends_at_once_and_leaves_no_process(tmp_path):
    """The search runs in threads of the command itself: SIGTERM while candidates are being
    fitted ends fit-head within seconds (no thread is waited for) and leaves no child process."""
    rng = np.random.default_rng(0)
    n, dim = 4000, 2048
    y = np.repeat(np.arange(3), n // 3 + 1)[:n]
    X = (rng.normal(size=(3, dim))[y] * 0.05 + rng.normal(size=(n, dim))).astype(np.float32)
    cache = write_cache(tmp_path / "big.h5", chunks=[X], n=n, dim=dim, labels=y.tolist(),
                        paths=[f"c{c}/{i}.png" for i, c in enumerate(y)], split=["train"] * n,
                        class_names=["a", "b", "c"], errors=[],
                        attrs={"backbone": "synthetic", "weights_sha256": "0" * 64,
                               "preprocessing": PRE, "precision": "fp32", "layer": "pooled",
                               "fingerprint": "big", "created": "2025-01-01T00:00:00",
                               "fxtl_version": "test"})
    proc = subprocess.Popen([sys.executable, "-m", "fxtl", "fit-head", str(cache), "-m", "svm",
                             "--jobs", "2", "--solver", "sklearn", "--cache-dir", str(tmp_path)],
                            cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    seen: list[str] = []
    reader = threading.Thread(target=lambda: seen.extend(proc.stderr), daemon=True)
    reader.start()
    deadline = time.time() + 120
    while time.time() < deadline and proc.poll() is None and not any("fitting svm" in s for s in seen):
        time.sleep(0.1)
    time.sleep(0.5)  # inside the search (or the final fit): both take seconds here
    assert proc.poll() is None, "fit-head ended before it could be interrupted: make the data bigger"
    kids = _children(proc.pid)
    t0 = time.time()
    proc.send_signal(signal.SIGTERM)
    proc.wait(timeout=60)
    took = time.time() - t0
    reader.join(5)
    assert took < 10, f"fit-head took {took:.1f} s to stop after SIGTERM"
    assert proc.returncode != 0
    assert not any("Traceback" in s for s in seen), "".join(seen)
    left = [k for k in kids if _alive(k)]
    for k in left:  # do not leave them spinning if the test fails
        os.kill(k, signal.SIGKILL)
    assert not left, f"processes still running after SIGTERM: {left}"


class _Doubler:
    """A step of a type neither skops nor fxtl trusts (its code would run when built)."""

    def fit(self, X, y=None):
        return self

    def transform(self, X):
        return np.asarray(X) * 2.0


def test_a_skops_head_with_an_untrusted_type_loads_only_with_trust(tmp_path):
    """The trust model's third column: without trust the foreign type is named and refused;
    trust=True builds it (for files you made yourself)."""
    from sklearn.linear_model import LogisticRegression
    from sklearn.pipeline import Pipeline

    from fxtl.errors import ProvenanceError
    from fxtl.heads.model import Head
    from fxtl.heads.persistence import load_head, save_head

    X = np.random.default_rng(0).normal(size=(20, 3))
    y = np.arange(20) % 2
    pipe = Pipeline([("double", _Doubler()), ("est", LogisticRegression())]).fit(X, y)
    path = save_head(Head(model="logreg", pipeline=pipe, class_names=["a", "b"], provenance={}),
                     tmp_path / "head.skops")
    with pytest.raises(ProvenanceError, match=r"_Doubler.*trust=True"):
        load_head(path)
    back = load_head(path, trust=True)
    assert type(back.pipeline[0]).__name__ == "_Doubler"
    np.testing.assert_array_equal(back.pipeline.predict(X), pipe.predict(X))


def test_a_head_holding_a_scikit_learn_estimator_no_head_holds_needs_trust(tmp_path):
    """skops trusts every scikit-learn estimator by default; fxtl loads only those its heads hold
    (fxtl.heads.persistence.SKLEARN_CLASSES): a forged head.skops with a random forest (whose
    tree arrays are read without bounds checks) is refused without trust."""
    from sklearn.ensemble import RandomForestClassifier

    from fxtl.errors import ProvenanceError
    from fxtl.heads.model import Head
    from fxtl.heads.persistence import load_head, save_head

    X = np.random.default_rng(0).normal(size=(20, 3))
    y = np.arange(20) % 2
    forest = RandomForestClassifier(n_estimators=2, random_state=0).fit(X, y)
    path = save_head(Head(model="logreg", pipeline=forest, class_names=["a", "b"], provenance={}),
                     tmp_path / "head.skops")
    with pytest.raises(ProvenanceError, match=r"RandomForestClassifier.*trust=True"):
        load_head(path)
    assert type(load_head(path, trust=True).pipeline).__name__ == "RandomForestClassifier"


_SKOPS_IMPORT = """
import sys
import sklearn.utils, sklearn.utils.discovery
before = sklearn.utils.all_estimators
from fxtl.heads.persistence import skops_io, trusted_types
sio = skops_io()
print(sklearn.utils.all_estimators is before and sklearn.utils.discovery.all_estimators is before,
      sorted(m for m in ("sklearn.cross_decomposition", "sklearn.semi_supervised",
                         "sklearn.gaussian_process", "dask", "torch") if m in sys.modules),
      "sklearn.linear_model._logistic.LogisticRegression" in trusted_types())
"""


def test_skops_is_imported_without_walking_scikit_learn():
    """Importing skops lists every scikit-learn estimator by importing every scikit-learn
    module (seconds per command); fxtl's import skips that walk and puts scikit-learn back."""
    run = subprocess.run([sys.executable, "-c", _SKOPS_IMPORT], capture_output=True, text=True)
    assert run.returncode == 0, run.stderr[-1500:]
    assert run.stdout.split() == ["True", "[]", "True"]
