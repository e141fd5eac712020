"""Where a head's run goes: HeadConfig, one validator for run names, names checked before the fit,
no half or empty folder left by a killed fit-head, and fitting apart from saving."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from click.testing import CliRunner

from fxtl.cli import cli
from fxtl.data.splits import check_run_name, load_rows
from fxtl.errors import ParameterError
from fxtl.heads import HeadConfig, destination, fit_head, fit_heads, save_runs
from fxtl.heads.registry import head_names
from fxtl.training.checkpoints import choose_run_dir

from .test_heads import write_synthetic_cache

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def blobs(tmp_path_factory) -> Path:
    return write_synthetic_cache(tmp_path_factory.mktemp("c") / "blobs.h5")


# ----------------------------------------------------------------------------- HeadConfig
def test_config_validates_normalises_and_round_trips():
    cfg = HeadConfig(models=["all"], params={"C": 0.5}, budget="2m", pca=0.9)
    assert cfg.models == tuple(head_names()) and cfg.budget == 120.0
    assert HeadConfig.from_dict(json.loads(json.dumps(cfg.to_dict()))) == cfg
    assert cfg.for_model("knn").params == {} and dict(cfg.for_model("svm").params) == {"C": 0.5}
    for bad in (dict(seed=-1), dict(test_size=1.0), dict(cv_folds=1), dict(jobs=0), dict(pca=0),
                dict(solver="gpu"), dict(backend="spark"), dict(budget="soon"),
                dict(models=["forest"]), dict(models=["knn"], params={"C": 1.0}),
                dict(scheduler="tcp://h:1")):
        with pytest.raises(ParameterError):
            HeadConfig(**bad)
    with pytest.raises(TypeError, match="unknown head option"):
        cfg.replace(epochs=3)


def test_the_run_stores_its_own_config(tmp_path, blobs):
    res = fit_head(blobs, config=HeadConfig(models=("logreg",), search=False, seed=3),
                   cache_dir=tmp_path)
    stored = json.loads((res.run_dir / "metrics.json").read_text())["config"]
    assert stored == res.config.to_dict() and stored["seed"] == 3 and stored["models"] == ["logreg"]
    assert HeadConfig.from_dict(stored) == res.config


def test_fitting_writes_nothing_saving_is_a_step(tmp_path, blobs, monkeypatch):
    monkeypatch.chdir(tmp_path)
    results = fit_heads(blobs, config=HeadConfig(models=("logreg", "knn"), search=False))
    assert list(tmp_path.iterdir()) == [] and all(r.run_dir is None for r in results)
    assert results[0].rows is not None and results[0].rows.report.split == "test"
    folders = save_runs(results, destination(runs_dir=tmp_path / "runs", run_name="exp"))
    assert [f.name for f in folders] == ["exp-logreg", "exp-knn"]
    assert load_rows(folders[0]) == results[0].rows
    assert not (tmp_path / "runs" / ".fxtl-partial").exists()  # staging cleaned up


def test_fit_head_all_returns_the_best_by_selection_score(blobs):
    res = fit_head(blobs, model="all", jobs=1)
    assert res.metrics["model"] in head_names()
    chosen = [n for n in res.metrics["notes"] if n.startswith("chosen among 5 heads")]
    assert chosen, res.metrics["notes"]
    listed = dict(item.rsplit(" ", 1) for item in chosen[0].split("(")[1].split(")")[0].split(", "))
    assert max(float(v) for v in listed.values()) == pytest.approx(res.metrics["selection_score"],
                                                                   abs=1e-4)
    with pytest.raises(ParameterError, match="nothing honest"):
        fit_head(blobs, model="all", search=False)


# ----------------------------------------------------------------------------- run names
@pytest.mark.parametrize("name", ["../../x", "/tmp/fxtl-abs", "a\nb", ".hidden", "a/b"])
def test_fit_head_refuses_run_names_as_finetune_does(tmp_path, blobs, name):
    with pytest.raises(ParameterError) as lib:
        check_run_name(name)
    with pytest.raises(ParameterError) as ft:
        choose_run_dir(tmp_path / "ft", "base", run_name=name, resume=False)
    assert str(ft.value) == str(lib.value)
    home = tmp_path / "home"
    r = CliRunner().invoke(cli, ["fit-head", str(blobs), "--no-search", "--run-name", name,
                                 "--cache-dir", str(home)])
    assert r.exit_code == 2 and "--run-name" in r.output and "letters, digits" in r.output
    assert not (home / "runs").exists() and not Path("/tmp/fxtl-abs").exists()
    assert not (tmp_path / "x").exists() and not (tmp_path.parent / "x").exists()
    with pytest.raises(ParameterError):
        fit_head(blobs, search=False, cache_dir=home, run_name=name)


def test_a_taken_run_name_is_refused_before_the_fit(tmp_path, blobs):
    taken = tmp_path / "runs" / "exp"
    taken.mkdir(parents=True)
    (taken / "notes.txt").write_text("mine")
    r = CliRunner().invoke(cli, ["fit-head", str(blobs), "--run-name", "exp",
                                 "--cache-dir", str(tmp_path)])
    assert r.exit_code == 1 and "already exists" in r.stderr and "--run-name" in r.stderr
    assert "fxtl: fitting" not in r.stderr  # refused before any head was fitted
    assert sorted(p.name for p in taken.iterdir()) == ["notes.txt"]
    (taken / "notes.txt").unlink()  # an empty folder (an older fxtl's leftover) is taken over
    r = CliRunner().invoke(cli, ["fit-head", str(blobs), "--no-search", "--run-name", "exp",
                                 "--cache-dir", str(tmp_path)])
    assert r.exit_code == 0, r.output and (taken / "metrics.json").is_file()


# ----------------------------------------------------------------------------- killed fits
def _start_fit(cache: Path, home: Path) -> subprocess.Popen:
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    return subprocess.Popen([sys.executable, "-m", "fxtl", "fit-head", str(cache), "--model", "all",
                             "--jobs", "1", "--run-name", "r", "--cache-dir", str(home)],
                            env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def _wait_for_fitting(proc: subprocess.Popen) -> None:
    """Read stderr until the first head starts fitting (the run's name is checked by then)."""
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        line = proc.stderr.readline()
        if "fxtl: fitting" in line:
            return
        if not line and proc.poll() is not None:
            break
    proc.kill()
    pytest.fail("fit-head never started fitting")


@pytest.fixture(scope="module")
def slow_cache(tmp_path_factory) -> Path:
    return write_synthetic_cache(tmp_path_factory.mktemp("slow") / "slow.h5", dim=64, sep=0.3,
                                 splits=(("train", 1500), ("test", 300)))


def test_a_killed_fit_head_leaves_nothing_in_the_way(tmp_path, slow_cache):
    home = tmp_path / "home"
    proc = _start_fit(slow_cache, home)
    _wait_for_fitting(proc)
    proc.send_signal(signal.SIGKILL)
    proc.wait(timeout=60)
    runs = home / "runs"
    assert not runs.exists() or [p.name for p in runs.iterdir()] == [], list(runs.iterdir())
    r = CliRunner().invoke(cli, ["fit-head", str(slow_cache), "--model", "knn", "--no-search",
                                 "--run-name", "r", "--cache-dir", str(home)])
    assert r.exit_code == 0, r.output
    assert (runs / "r" / "metrics.json").is_file()


def test_sigterm_says_what_a_rerun_does(tmp_path, slow_cache):
    home = tmp_path / "home"
    proc = _start_fit(slow_cache, home)
    _wait_for_fitting(proc)
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 130, err
    last = err.strip().splitlines()[-1]
    assert "no run folder was written" in last and "fits the heads from the start" in last
    assert "resume" not in last
    assert not (home / "runs" / "r").exists()
