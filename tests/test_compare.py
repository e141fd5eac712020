"""fxtl compare: collecting head and fine-tune runs, the table, the chart, the CLI."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
from click.testing import CliRunner

import fxtl
from fxtl.cli import cli
from fxtl.data.splits import RowSet, RunRows, save_rows
from fxtl.report.comparison import collect_runs, compare, comparison_rows, format_table
from fxtl.report.metrics import write_predictions

PNG = b"\x89PNG\r\n\x1a\n"


def _write_run(cache: Path, name: str, **metrics) -> Path:
    run = cache / "runs" / name
    run.mkdir(parents=True)
    base = {"split": "val", "dataset": "ds", "backbone": "lite0", "macro_f1": 0.5, "n": 10,
            "dataset_fingerprint": "ab" * 32, "trainable_params": 100}
    (run / "metrics.json").write_text(json.dumps({**base, **metrics}))
    if metrics.get("kind") == "finetune":  # a finished fine-tune holds its manifest
        (run / "fxtl-model.json").write_text("{}")
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
    assert "finetune:all (LP-FT)" in table and len(table.splitlines()) == 1 + 2 + 4 + 1 + 1
    # intervals: recorded ones are kept; older runs get Wilson's from accuracy and n
    assert by["head:logreg"]["accuracy_ci95"] == pytest.approx([0.5958, 0.9821], abs=1e-4)
    assert "[0.596, 0.982]" in table
    assert [r["rank"] for r in rows] == [1, 2, 3, 4] and {r["rows"] for r in rows} == {"unknown"}


def test_compare_chart_and_notes(runs, tmp_path):
    res = compare(cache_dir=runs, dataset="ds")
    assert res.chart == runs / "comparison-ds.png" and res.chart.read_bytes()[:8] == PNG
    assert [n.split(":")[0] for n in res.notes] == [f"skipped {runs / 'runs' / 'junk'}",
                                                   "rows unknown (no rows.json, made before fxtl recorded them)"]
    assert res.paired[0]["p_value"] is None and "no per-image predictions" in res.paired[0]["note"]
    everything = compare(cache_dir=runs, output=tmp_path / "all.png")
    assert everything.chart.read_bytes()[:8] == PNG and len(everything.rows) == 5
    assert any("2 groups" in n for n in everything.notes) and len(everything.groups) == 2
    _write_run(runs, "holdout", kind="head", model="svm", accuracy=0.7, fit_seconds=1.0,
               split="holdout")
    mixed = compare(cache_dir=runs, dataset="ds", chart=False)
    assert mixed.chart is None and any("2 groups" in n for n in mixed.notes)
    by = {Path(r["run_dir"]).name: r for r in mixed.rows}
    assert by["holdout"]["rank"] == 1 and by["holdout"]["group"] != by["logreg"]["group"]
    with pytest.raises(fxtl.FxtlError, match="no usable head or fine-tune runs"):
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
    assert none.exit_code == 1 and "no usable head or fine-tune runs" in none.stderr
    # the CLI's option, and no Python-only hint (runs_dir has no option)
    assert none.stderr.rstrip().endswith("or pass --cache-dir FOLDER whose runs/ holds them")


def test_compare_real_head_and_finetune(shapes_dir, shapes_cache, tmp_path):
    """A fit-head run and a fine-tune of the same data line up on the same split."""
    heads = pytest.importorskip("fxtl.heads.fitting")
    from fxtl.training.loop import finetune

    heads.fit_head(shapes_cache, model="logreg", cache_dir=tmp_path, search=False)
    ft = finetune(shapes_dir, trainable="head", epochs=1, image_size=64, batch_size=4, workers=0,
                  cache_dir=tmp_path, progress=False)
    from fxtl.data.discovery import discover, fingerprint
    from fxtl.data.splits import load_rows

    images = discover(shapes_dir)
    val = tuple(s.path for s in images.samples if s.split == "val")
    train = tuple(s.path for s in images.samples if s.split == "train")
    for run in (tmp_path / "runs").iterdir():  # what every new run records (rows.json)
        if load_rows(run) is None:
            save_rows(run, RunRows(fingerprint(images), RowSet("train", train), RowSet("val", val),
                                   RowSet("val", val)))
    res = compare(cache_dir=tmp_path, dataset=Path(shapes_dir).name)
    by = {r["method"]: r for r in res.rows}
    assert set(by) == {"head:logreg", "finetune:head"} and len(res.groups) == 1
    assert [(p["a"], p["b"]) for p in res.paired] == [(by["head:logreg"]["run_dir"],
                                                      by["finetune:head"]["run_dir"])]
    assert by["finetune:head"]["accuracy"] == ft.accuracy
    assert by["finetune:head"]["trainable_params"] == 1280 * 2 + 2
    head = by["head:logreg"]
    assert head["split"] == by["finetune:head"]["split"] == "val"
    assert head["extract_seconds"] > 0 and head["train_seconds"] > head["fit_seconds"]
    assert head["inference_images_per_second"] > 0


def test_compare_never_ranks_different_fingerprints_together(tmp_path):
    """Same dataset name, different images (the data changed): two tables, two rank-1 rows."""
    cache = tmp_path / "cache"
    _write_run(cache, "before", kind="head", model="logreg", accuracy=0.95)
    _write_run(cache, "after", kind="head", model="logreg", accuracy=0.70,
               dataset_fingerprint="ef" * 32)
    res = compare(cache_dir=cache, chart=False)
    assert len(res.groups) == 2 and [r["rank"] for r in res.rows] == [1, 1]
    assert {r["group"] for r in res.rows} == {"ds [abababab] val", "ds [efefefef] val"}
    assert any("ranked separately" in n for n in res.notes)
    assert format_table(res.rows).count("== ds [") == 2


def test_bad_metrics_are_skipped_and_named(runs, tmp_path):
    for name, acc in (("null", None), ("text", "0.9"), ("nan", float("nan")), ("big", 3.0)):
        _write_run(runs, name, kind="head", model="svm", accuracy=acc)
    _write_run(runs, "nanf1", kind="head", model="mlp", accuracy=0.6, macro_f1=float("nan"),
               fit_seconds=float("nan"))
    res = compare(cache_dir=runs, dataset="ds", chart=False)
    assert sorted(Path(s["run_dir"]).name for s in res.skipped) == ["big", "junk", "nan", "null", "text"]
    assert any("null" in n and "accuracy is None" in n for n in res.notes)
    assert "head:mlp" in [r["method"] for r in res.rows]
    r = CliRunner().invoke(cli, ["compare", "--cache-dir", str(runs), "--dataset", "ds", "--json"])
    assert r.exit_code == 0, r.output

    def no_nan(c):
        raise AssertionError(f"bare {c} in --json output")

    d = json.loads(r.stdout, parse_constant=no_nan)
    mlp = next(row for row in d["rows"] if row["method"] == "head:mlp")
    assert mlp["macro_f1"] is None and len(d["skipped"]) == 5
    only_bad = runs / "only_bad"
    _write_run(only_bad, "null", kind="head", model="svm", accuracy=None)
    with pytest.raises(fxtl.FxtlError, match="1 skipped as damaged"):
        compare(cache_dir=only_bad)


def _predict(run: Path, truth: list[int], right: list[bool]) -> None:
    paths = [f"c{t}/{i}.png" for i, t in enumerate(truth)]
    pred = [t if ok else 1 - t for t, ok in zip(truth, right)]
    write_predictions(run, paths=paths, y_true=truth, y_pred=pred, class_names=["c0", "c1"],
                      split="test")


def test_paired_mcnemar_best_head_vs_best_finetune(tmp_path):
    cache = tmp_path / "cache"
    truth = [0, 1] * 10
    # head right on 18 of 20, fine-tune right on 14: 5 images only the head got, 1 only the FT
    head = _write_run(cache, "head", kind="head", model="logreg", accuracy=0.9, n=20, split="test")
    _predict(head, truth, [True] * 18 + [False] * 2)
    ft = _write_run(cache, "ft", kind="finetune", model="finetune:all", accuracy=0.7, n=20,
                    split="test")
    _predict(ft, truth, [True] * 13 + [False] * 5 + [True, False])
    worse = _write_run(cache, "knn", kind="head", model="knn", accuracy=0.5, n=20, split="test")
    _predict(worse, truth, [True, False] * 10)
    res = compare(cache_dir=cache, chart=False)
    assert len(res.paired) == 1
    p = res.paired[0]
    assert (p["a"], p["b"]) == (str(head), str(ft))
    assert (p["n"], p["a_only_correct"], p["b_only_correct"]) == (20, 5, 1)
    assert p["p_value"] == pytest.approx(14 / 64) and p["test"] == "mcnemar-exact"
    assert "0.900 vs 0.700 on 20 test images: not significant, p = 0.22" in p["text"]
    assert "5 images right only for the first, 1 only for the second" in p["text"]
    ft_row = next(r for r in res.rows if r["kind"] == "finetune")
    assert ft_row["macro_f1_ci95"] is not None  # bootstrapped from predictions.csv
    r = CliRunner().invoke(cli, ["compare", "--cache-dir", str(cache), "--json",
                                 "--pair", "knn", "head"])
    d = json.loads(r.stdout)
    assert [(Path(x["a"]).name, Path(x["b"]).name) for x in d["paired"]] == [("head", "ft"), ("knn", "head")]
    assert (d["paired"][1]["a_only_correct"], d["paired"][1]["b_only_correct"]) == (1, 9)
    assert set(d["rows"][0]) >= {"accuracy_ci95", "macro_f1_ci95"}
    human = CliRunner().invoke(cli, ["compare", "--cache-dir", str(cache), "--pair", "knn", "ft"])
    assert "paired: head:logreg vs finetune:all: 0.900 vs 0.700" in human.stdout
    bad = CliRunner().invoke(cli, ["compare", "--cache-dir", str(cache), "--pair", "knn", "nope"])
    assert bad.exit_code == 2 and "nope" in bad.output


def test_paired_runs_are_picked_on_their_selection_scores_not_on_test(tmp_path):
    """The head and fine-tune that are tested against each other are the best on their own
    selection split: picking the larger test score and testing it on the same images would
    favour it (issue 13)."""
    cache = tmp_path / "cache"
    truth = [0, 1] * 10
    lucky = _write_run(cache, "lucky", kind="head", model="knn", accuracy=0.9, n=20, split="test",
                       selection_score=0.60, fit_seconds=0.1)
    _predict(lucky, truth, [True] * 18 + [False] * 2)
    chosen = _write_run(cache, "chosen", kind="head", model="logreg", accuracy=0.8, n=20,
                        split="test", selection_score=0.85, fit_seconds=0.5)
    _predict(chosen, truth, [True] * 16 + [False] * 4)
    ft_hist = [{"val_accuracy": 0.7}, {"val_accuracy": 0.9}, {"val_accuracy": 0.8}]
    ft = _write_run(cache, "ft", kind="finetune", model="finetune:all", accuracy=0.7, n=20,
                    split="test", selection_split="val", best_epoch=2, history=ft_hist)
    _predict(ft, truth, [True] * 14 + [False] * 6)
    ft_test = _write_run(cache, "ft-test", kind="finetune", model="finetune:last:2", accuracy=0.75,
                         n=20, split="test", selection_split="val", best_epoch=1, history=ft_hist)
    _predict(ft_test, truth, [True] * 15 + [False] * 5)
    res = compare(cache_dir=cache, chart=False)
    rows = {Path(r["run_dir"]).name: r for r in res.rows}
    assert rows["chosen"]["selection_score"] == 0.85 and rows["ft"]["selection_score"] == 0.9
    assert rows["ft-test"]["selection_score"] == 0.7
    (p,) = res.paired
    assert (Path(p["a"]).name, Path(p["b"]).name) == ("chosen", "ft")
    assert p["picked_by"] == "selection score"
    assert "[picked by selection score]" in format_table(res.rows, paired=res.paired)
    # without any selection score (old runs, fit-head --no-search) the reported score decides
    for run in (lucky, chosen):
        m = json.loads((run / "metrics.json").read_text())
        del m["selection_score"]
        (run / "metrics.json").write_text(json.dumps(m))
    (p,) = compare(cache_dir=cache, chart=False).paired
    assert Path(p["a"]).name == "lucky"
    assert p["picked_by"] == "head: reported accuracy (no selection score); fine-tune: selection score"


def test_compare_flags_a_run_learned_on_another_runs_report_rows(tmp_path):
    cache = tmp_path / "cache"
    fp = "ab" * 32
    head = _write_run(cache, "head", kind="head", model="logreg", accuracy=0.9, split="val")
    save_rows(head, RunRows(fp, RowSet("train+val", ("a", "b", "v1", "v2")), None,
                            RowSet("val", ("v1", "v2"))))
    ft = _write_run(cache, "ft", kind="finetune", model="finetune:all", accuracy=0.8, split="val")
    save_rows(ft, RunRows(fp, RowSet("train", ("a", "b")), RowSet("val", ("v1", "v2")),
                          RowSet("val", ("v1", "v2"))))
    res = compare(cache_dir=cache, chart=False)
    by = {Path(r["run_dir"]).name: r for r in res.rows}
    assert by["ft"]["leaked_from"] == [{"run_dir": str(head), "method": "head:logreg", "images": 2}]
    assert by["head"]["leaked_from"] == [{"run_dir": str(ft), "method": "finetune:all", "images": 2}]
    assert any("ft reports on 2 images that head learned from" in n for n in res.notes)
    assert by["ft"]["rows"] == "recorded" and by["ft"]["data_fingerprint"] == fp
    assert "LEAK" in format_table(res.rows)
