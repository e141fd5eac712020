"""fxtl compare: collecting head and fine-tune runs, the table, the chart, the CLI."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
from click.testing import CliRunner

import fxtl
from fxtl.cli import cli
from fxtl.report.comparison import collect_runs, compare, comparison_rows, format_table

PNG = b"\x89PNG\r\n\x1a\n"


def _write_run(cache: Path, name: str, **metrics) -> Path:
    run = cache / "runs" / name
    run.mkdir(parents=True)
    base = {"split": "val", "dataset": "ds", "backbone": "lite0", "macro_f1": 0.5, "n": 10,
            "dataset_fingerprint": "ab" * 32, "trainable_params": 100}
    (run / "metrics.json").write_text(json.dumps({**base, **metrics}))
    return run


@pytest.fixture
def runs(tmp_path) -> Path:
    cache = tmp_path / "cache"
    _write_run(cache, "logreg", kind="head", model="logreg", accuracy=0.90, macro_f1=0.89,
               fit_seconds=0.5, extract_seconds=10.0, trainable_params=2562,
               inference_images_per_second=80.0)
    _write_run(cache, "ft", kind="finetune", model="finetune:all", accuracy=0.95, macro_f1=0.94,
               fit_seconds=120.0, epochs=5, trainable_params=3_373_570,
               inference_images_per_second=60.0)
    _write_run(cache, "lpft", kind="finetune", model="finetune:all", accuracy=0.85, fit_seconds=100.0,
               config={"init_head": "/somewhere/runs/logreg"})
    _write_run(cache, "knn", kind="head", model="knn", accuracy=0.80, fit_seconds=0.1,
               extract_seconds=10.0, trainable_params=0)
    _write_run(cache, "elsewhere", kind="head", model="logreg", accuracy=0.5, fit_seconds=1.0,
               dataset="other", dataset_fingerprint="cd" * 32)
    (cache / "runs" / "junk").mkdir()
    (cache / "runs" / "junk" / "metrics.json").write_text("{not json")
    (cache / "runs" / "plain").mkdir()
    (cache / "runs" / "plain" / "metrics.json").write_text(json.dumps({"accuracy": 1.0}))
    return cache


def test_collect_filters_by_dataset_name_or_fingerprint(runs):
    assert len(collect_runs(cache_dir=runs)) == 5  # junk and non-run metrics are skipped
    assert sorted(m["model"] for m in collect_runs(cache_dir=runs, dataset="ds")) == \
        ["finetune:all", "finetune:all", "knn", "logreg"]
    assert [m["dataset"] for m in collect_runs(cache_dir=runs, dataset="cdcd")] == ["other"]
    explicit = collect_runs(runs=[runs / "runs" / "ft", runs / "runs" / "knn" / "metrics.json"])
    assert [m["model"] for m in explicit] == ["finetune:all", "knn"]
    with pytest.raises(fxtl.FxtlError, match="metrics.json"):
        collect_runs(runs=[runs / "runs" / "plain"])


def test_rows_count_extraction_once_per_head(runs):
    rows = comparison_rows(collect_runs(cache_dir=runs, dataset="ds"))
    assert [r["method"] for r in rows] == ["finetune:all", "head:logreg", "finetune:all (LP-FT)",
                                           "head:knn"]
    by = {r["method"]: r for r in rows}
    assert by["head:logreg"]["train_seconds"] == pytest.approx(10.5)
    assert by["head:knn"]["train_seconds"] == pytest.approx(10.1)
    assert by["finetune:all"]["train_seconds"] == pytest.approx(120.0)
    assert by["finetune:all"]["trainable_params"] == 3_373_570
    assert by["head:knn"]["inference_images_per_second"] is None  # no cache to estimate from
    table = format_table(rows)
    assert "finetune:all" in table and "3.37M" in table and "0.9500" in table
    assert "finetune:all (LP-FT)" in table and len(table.splitlines()) == 2 + 4 + 1


def test_compare_chart_and_notes(runs, tmp_path):
    res = compare(cache_dir=runs, dataset="ds")
    assert res.chart == runs / "comparison-ds.png" and res.chart.read_bytes()[:8] == PNG
    assert res.notes == []
    everything = compare(cache_dir=runs, output=tmp_path / "all.png")
    assert everything.chart.read_bytes()[:8] == PNG and len(everything.rows) == 5
    assert any("2 datasets" in n for n in everything.notes)
    _write_run(runs, "holdout", kind="head", model="svm", accuracy=0.7, fit_seconds=1.0,
               split="holdout")
    mixed = compare(cache_dir=runs, dataset="ds", chart=False)
    assert mixed.chart is None and any("different splits" in n for n in mixed.notes)
    with pytest.raises(fxtl.FxtlError, match="no head or fine-tune runs"):
        compare(cache_dir=runs, dataset="nothing")


def test_cli_compare(runs):
    runner = CliRunner()
    r = runner.invoke(cli, ["compare", "--cache-dir", str(runs), "--dataset", "ds", "--json"])
    assert r.exit_code == 0, r.output
    d = json.loads(r.stdout)
    assert [row["method"] for row in d["rows"]] == ["finetune:all", "head:logreg",
                                                    "finetune:all (LP-FT)", "head:knn"]
    assert Path(d["chart"]).is_file()
    human = runner.invoke(cli, ["compare", str(runs / "runs" / "ft"), str(runs / "runs" / "logreg"),
                                "--cache-dir", str(runs)])
    assert human.exit_code == 0 and "head:logreg" in human.stdout and "chart:" in human.stdout
    none = runner.invoke(cli, ["compare", "--cache-dir", str(runs / "empty")])
    assert none.exit_code == 1 and "no head or fine-tune runs" in none.stderr


def test_compare_real_head_and_finetune(shapes_dir, shapes_cache, tmp_path):
    """A fit-head run and a fine-tune of the same data line up on the same split."""
    heads = pytest.importorskip("fxtl.heads.fitting")
    from fxtl.training.loop import finetune

    heads.fit_head(shapes_cache, model="logreg", cache_dir=tmp_path, search=False)
    ft = finetune(shapes_dir, trainable="head", epochs=1, image_size=64, batch_size=4, workers=0,
                  cache_dir=tmp_path, progress=False)
    res = compare(cache_dir=tmp_path, dataset=Path(shapes_dir).name)
    by = {r["method"]: r for r in res.rows}
    assert set(by) == {"head:logreg", "finetune:head"} and res.notes == []
    assert by["finetune:head"]["accuracy"] == ft.accuracy
    assert by["finetune:head"]["trainable_params"] == 1280 * 2 + 2
    head = by["head:logreg"]
    assert head["split"] == by["finetune:head"]["split"] == "val"
    assert head["extract_seconds"] > 0 and head["train_seconds"] > head["fit_seconds"]
    assert head["inference_images_per_second"] > 0
