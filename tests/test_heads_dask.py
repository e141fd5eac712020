"""fit-head on a Dask cluster (--backend dask): same selection, work really on the workers, errors.

An in-process LocalCluster (processes=False, one worker with two threads) keeps this file fast
on a 2-core machine; dask.distributed comes with the dev extra (`pip install -e .[dev]`).
"""
from __future__ import annotations

import json
import re
import sys
from pathlib import Path

import pytest
from click.testing import CliRunner

from fxtl.heads import dask_backend
from fxtl.cli import cli
from fxtl.errors import FxtlError
from fxtl.heads.fitting import fit_heads

MODELS = ["logreg", "knn"]


@pytest.fixture(scope="module")
def cluster():
    import distributed  # not skipped when missing: the dev extra must bring it

    with distributed.LocalCluster(n_workers=1, threads_per_worker=2, processes=False,
                                  dashboard_address=":0") as c, \
            distributed.Client(c, set_as_default=False) as client:
        yield c, client


@pytest.fixture(scope="module")
def both(shapes_cache, cluster, tmp_path_factory):
    """The same search with the default backend and on the cluster (its task stream recorded)."""
    from distributed import get_task_stream

    c, client = cluster
    # threading: the default backend walks logreg's C path warm-started in this process instead
    local = fit_heads(shapes_cache, models=MODELS, backend="threading", save=False)
    with get_task_stream(client) as ts:
        remote = fit_heads(shapes_cache, models=MODELS, backend="dask", scheduler=c.scheduler_address,
                           cache_dir=tmp_path_factory.mktemp("runs"))
    return local, remote, ts.data, c


def test_dask_backend_selects_and_scores_like_the_default(both):
    local, remote, _, c = both
    for a, b in zip(local, remote, strict=True):
        assert b.metrics["best_params"] == a.metrics["best_params"]
        assert b.metrics["accuracy"] == a.metrics["accuracy"]
        assert b.metrics["selection_score"] == a.metrics["selection_score"]
        assert b.metrics["search"] == a.metrics["search"]
        assert a.metrics["backend"] == "threading" and a.metrics["search_backend"] == "threading"
        assert a.metrics["dask"] is None
    # provenance: metrics.json says where the search ran
    saved = json.loads((remote[0].run_dir / "metrics.json").read_text())
    assert saved["backend"] == "dask" and saved["search_backend"] == "dask"
    assert saved["dask"]["scheduler"] == c.scheduler_address
    assert saved["dask"]["workers"] == 1 and saved["dask"]["threads"] == 2


def test_dask_backend_runs_every_candidate_fit_on_the_workers(both):
    _, remote, tasks, c = both
    # joblib names each task batch_of__fit_and_score_<n>_calls: the calls over all tasks the
    # scheduler ran must be every (candidate, fold) fit of both searches. A silent fallback to a
    # local backend leaves the task stream empty.
    calls = [int(m.group(1)) for t in tasks
             if (m := re.search(r"batch_of__fit_and_score_(\d+)_calls", str(t["key"])))]
    expected = sum(len(r.metrics["search"]) * int(r.metrics["selection"].removeprefix("cv"))
                   for r in remote)
    assert expected > 0 and sum(calls) == expected
    assert {t["worker"] for t in tasks} <= set(c.scheduler_info["workers"])


def test_missing_dask_is_one_line_naming_the_fix(shapes_cache, monkeypatch, tmp_path):
    monkeypatch.setitem(sys.modules, "distributed", None)  # `import distributed` -> ImportError
    with pytest.raises(FxtlError) as exc:
        fit_heads(shapes_cache, models=["logreg"], backend="dask", save=False)
    assert "\n" not in str(exc.value) and 'pip install "fxtl[dask]"' in str(exc.value)
    r = CliRunner().invoke(cli, ["fit-head", str(shapes_cache), "--backend", "dask",
                                 "--cache-dir", str(tmp_path)])
    assert r.exit_code == 1, r.output
    assert r.stderr.startswith("fxtl: error: ") and r.stderr.count("\n") == 1
    assert 'pip install "fxtl[dask]"' in r.stderr and "Traceback" not in r.output
    assert not (tmp_path / "runs").exists()


def test_unreachable_scheduler_is_one_line_naming_the_address(shapes_cache, monkeypatch):
    monkeypatch.setattr(dask_backend, "DASK_CONNECT_TIMEOUT", 2.0)
    with pytest.raises(FxtlError) as exc:
        fit_heads(shapes_cache, models=["logreg"], backend="dask", scheduler="tcp://127.0.0.1:1",
                  save=False)
    assert "\n" not in str(exc.value) and "tcp://127.0.0.1:1" in str(exc.value)
    with pytest.raises(FxtlError, match="not a Dask scheduler address"):
        fit_heads(shapes_cache, models=["logreg"], backend="dask", scheduler="nonsense", save=False)


def test_streamed_fit_says_the_backend_does_not_apply(shapes_cache):
    # Streamed fits never contact the cluster: an unreachable address is not an error here.
    (res,) = fit_heads(shapes_cache, models=["logreg"], backend="dask", large_threshold=1,
                       scheduler="tcp://127.0.0.1:1", save=False)
    assert res.metrics["scalable"] and res.metrics["search_backend"] == "streamed in this process"
    assert any("backend dask does not apply" in n for n in res.metrics["notes"])


def test_cli_backend_dask_json(shapes_cache, cluster, monkeypatch, tmp_path):
    c, _ = cluster
    monkeypatch.setenv("DASK_SCHEDULER_ADDRESS", c.scheduler_address)  # the default scheduler
    r = CliRunner().invoke(cli, ["fit-head", str(shapes_cache), "--model", "logreg", "--backend",
                                 "dask", "--json", "--cache-dir", str(tmp_path)])
    assert r.exit_code == 0, r.output
    d = json.loads(r.stdout)
    (run,) = d["runs"]
    assert run["backend"] == "dask" and run["search_backend"] == "dask"
    saved = json.loads((Path(run["run_dir"]) / "metrics.json").read_text())
    assert saved["dask"]["scheduler"] == c.scheduler_address
    assert saved["dask"]["origin"] == "DASK_SCHEDULER_ADDRESS"
    # --scheduler without --backend dask is a usage error
    r = CliRunner().invoke(cli, ["fit-head", str(shapes_cache), "--scheduler", "tcp://h:8786"])
    assert r.exit_code == 2 and "--backend dask" in r.stderr


def test_without_an_address_a_local_cluster_is_started_and_closed(shapes_cache, monkeypatch):
    from fxtl.distributed import available_cores

    monkeypatch.delenv("DASK_SCHEDULER_ADDRESS", raising=False)
    (res,) = fit_heads(shapes_cache, models=["linear-svm"], backend="dask", save=False)
    info = res.metrics["dask"]
    assert info["origin"] == "LocalCluster started by fxtl"
    assert info["workers"] == available_cores() and info["threads"] == available_cores()
    assert res.metrics["search_backend"] == "dask"
