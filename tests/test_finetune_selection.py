"""A fine-tune of train + val data (val reported) selects on a hold-out of train (issue 23, item 4).

hymenoptera's own layout has no split to select on: val is the reported one. The fine-tune then
carves a seeded hold-out of train (``holdout-selection``, as train-only data gets its second
one), scores its fitted start there as epoch 0, keeps the best epoch, stops early, and refits a
kept start on train + the hold-out (every train image: fit-head's head). The reported rows are
all of val, as fit-head's, whose plan does not change. Tiny on purpose: timm's test network,
32-pixel inputs, generated images of named classes.
"""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from click.testing import CliRunner

import fxtl
from fxtl.cli import cli
from fxtl.data.discovery import discover
from fxtl.data.splits import SELECTION_HOLDOUT, hash_holdout, load_rows, plan_splits
from fxtl.training import rows as ft_rows
from fxtl.training.config import FinetuneConfig
from fxtl.training.loop import finetune

TINY = dict(image_size=32, batch_size=4, workers=0, progress=False, precision="fp32")
CLASSES = ("ants", "honey bée")  # a space and a non-ASCII letter, as real folders have
N_TRAIN, N_VAL = 10, 4  # per class


def _image(path: Path, cls: int, i: int, split: str) -> None:
    from PIL import Image

    rng = np.random.default_rng([cls, i, len(split)])
    arr = rng.integers(0, 60, size=(40, 40, 3), dtype=np.uint8)
    arr[8:32, 8:32, cls] = 140 + int(rng.integers(0, 100))  # one colour per class: learnable
    Image.fromarray(arr).save(path)


def _write(root: Path, per_split: dict[str, dict[str, int]]) -> Path:
    for split, counts in per_split.items():
        for c, name in enumerate(CLASSES):
            folder = root / split / name
            folder.mkdir(parents=True, exist_ok=True)
            for i in range(counts[name]):
                _image(folder / f"{name.split()[0]}_{i}.png", c, i, split)
    return root


def _train_val(root: Path, *, n_train: int = N_TRAIN) -> Path:
    return _write(root, {"train": dict.fromkeys(CLASSES, n_train), "val": dict.fromkeys(CLASSES, N_VAL)})


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> Path:
    """train/ and val/ folders of two named classes, 10 and 4 images each."""
    return _train_val(tmp_path_factory.mktemp("insects") / "insects")


def _state(run_dir: Path) -> dict[str, torch.Tensor]:
    return torch.load(run_dir / "model.pt", weights_only=True)


def _expected_holdout(data: Path, *, seed: int = 0) -> tuple[set[str], set[str], set[str]]:
    """(train rows, selection rows, val rows) as paths: the hold-out computed independently."""
    images = discover(data)
    labels = np.array([s.label for s in images.samples])
    keys = [s.path for s in images.samples]
    train = np.array([i for i, s in enumerate(images.samples) if s.split == "train"])
    fit, select = hash_holdout(train, labels, keys, test_size=0.2, seed=seed, salt="selection",
                               source="t")
    val = {s.path for s in images.samples if s.split == "val"}
    return {keys[i] for i in fit}, {keys[i] for i in select}, val


def test_train_val_finetune_selects_on_a_holdout_of_train(data, tiny, tmp_path):
    res = finetune(data, backbone=tiny, trainable="head", epochs=2, lr=0.05, patience=None,
                   cache_dir=tmp_path, **TINY)
    rows = load_rows(res.run_dir)
    fit, select, val = _expected_holdout(data)
    assert rows.selection is not None and rows.selection.split == SELECTION_HOLDOUT
    assert set(rows.selection.paths) == select and 2 <= len(select) < 2 * N_TRAIN // 2
    assert set(rows.train.paths) == fit and rows.train.split == "train"
    assert not set(rows.train.paths) & set(rows.selection.paths)
    # val is all reported, never selected on or learned from; train is all learned from
    assert rows.report.split == res.split == "val" and set(rows.report.paths) == val
    assert len(val) == 2 * N_VAL and not rows.learned_from() & val
    assert all(p.startswith("train/") for p in rows.learned_from()) and \
        len(rows.learned_from()) == 2 * N_TRAIN
    m = res.metrics
    assert m["selection_split"] == SELECTION_HOLDOUT and m["n"] == 2 * N_VAL
    assert m["n_train"] == len(fit) and m["config"]["selection_holdout"] is True
    # epoch 0 (the probe) competes with the trained epochs on the hold-out
    assert m["initial"]["val_accuracy"] is not None
    assert all(h["val_accuracy"] is not None for h in m["history"])
    scores = [m["initial"]["val_accuracy"]] + [h["val_accuracy"] for h in m["history"]]
    assert scores[res.best_epoch] == max(scores)
    assert any("selecting on a 20% hold-out of train" in n for n in m["notes"])


def test_val_labels_never_select(data, tiny, tmp_path):
    """Every val label flipped: the same kept model (val chooses nothing), its score flips."""
    flipped = tmp_path / "flipped"
    shutil.copytree(data / "train", flipped / "train")
    for a, b in (CLASSES, CLASSES[::-1]):
        shutil.copytree(data / "val" / a, flipped / "val" / b)
    kw = dict(backbone=tiny, trainable="head", epochs=2, lr=0.05, patience=None, **TINY)
    res = finetune(data, cache_dir=tmp_path / "a", **kw)
    again = finetune(flipped, cache_dir=tmp_path / "b", **kw)
    assert again.best_epoch == res.best_epoch
    a, b = _state(res.run_dir), _state(again.run_dir)
    assert a.keys() == b.keys() and all(torch.allclose(a[k].float(), b[k].float()) for k in a)
    sel = [h[k] for h in res.metrics["history"] for k in ("val_loss", "val_accuracy")]
    assert [h[k] for h in again.metrics["history"] for k in ("val_loss", "val_accuracy")] == \
        pytest.approx(sel)
    assert again.accuracy == pytest.approx(1 - res.accuracy)


def test_a_kept_start_is_refitted_on_train_and_the_holdout(data, tiny, tmp_path):
    # A rate too small to change anything: no trained epoch beats the probe on the hold-out,
    # patience stops the run, and the start is refitted on every train image.
    res = finetune(data, backbone=tiny, trainable="head", epochs=3, lr=1e-12, patience=1,
                   monitor="loss", cache_dir=tmp_path, **TINY)
    m = res.metrics
    assert res.best_epoch == 0 and res.stopped_early and res.epochs == 1
    assert m["init_probe"]["refit_rows"] == m["n_train"] < 2 * N_TRAIN
    refit = m["final_refit"]
    assert refit["refit_rows"] == 2 * N_TRAIN and refit["refit_split"] == f"train+{SELECTION_HOLDOUT}"
    assert any(f"refitted on the {2 * N_TRAIN} train+{SELECTION_HOLDOUT} images (every train image"
               in n for n in m["notes"])


def test_kept_init_head_is_fit_heads_head(data, tiny, tmp_path):
    """LP-FT from fit-head's logreg, kept at epoch 0: refitted on every train image, it is that
    head: the same predictions on the same val images."""
    from fxtl.heads.fitting import fit_head

    cache = fxtl.extract(data, backbone=tiny, cache_dir=tmp_path, progress=False, workers=0,
                         precision="fp32").cache
    fitted = fit_head(cache, model="logreg", cache_dir=tmp_path, search=False)
    assert fitted.metrics["split"] == "val" and fitted.metrics["n_fit"] == 2 * N_TRAIN
    res = finetune(data, backbone=tiny, init_head=fitted.run_dir, epochs=0, cache_dir=tmp_path,
                   precision="fp32", workers=0, progress=False)
    m = res.metrics
    assert m["init_head"]["refit_rows"] == m["n_train"] < 2 * N_TRAIN
    assert m["final_refit"]["refit_rows"] == 2 * N_TRAIN
    assert res.split == "val" and res.accuracy == pytest.approx(fitted.metrics["accuracy"])
    assert m["confusion_matrix"] == fitted.metrics["confusion_matrix"]


def test_fit_head_plan_is_unchanged():
    """fit-head (select_holdout=False) learns from all of train and reports on val; the
    fine-tune's plan reports on the same rows."""
    from fxtl.heads.planning import plan_head

    labels = np.array([0, 1] * 10 + [0, 1] * 4)
    split = np.array(["train"] * 20 + ["val"] * 8)
    keys = [f"{s}/{'ants' if y == 0 else 'honey bée'}/{i}.png"
            for i, (s, y) in enumerate(zip(split, labels))]
    head = plan_splits(labels, split, keys, seed=0, test_size=0.2, select_holdout=False, source="t")
    assert head.val is None and head.train.tolist() == list(range(20))
    assert head.report.tolist() == list(range(20, 28)) and head.report_name == "val"
    hp = plan_head(labels, split, paths=keys)
    assert sorted(hp.fit_rows.tolist()) == list(range(20)) and hp.eval_split == "val"
    ft = plan_splits(labels, split, keys, seed=0, test_size=0.2, select_holdout=True, source="t")
    assert ft.report.tolist() == head.report.tolist() and ft.val_name == SELECTION_HOLDOUT
    assert sorted(ft.train.tolist() + ft.val.tolist()) == list(range(20))
    # train + test: the same rule, test reported
    test = np.where(split == "val", "test", split)
    tt = plan_splits(labels, test, keys, seed=0, test_size=0.2, select_holdout=True, source="t")
    assert tt.report_name == "test" and tt.val.tolist() == ft.val.tolist()


def test_tiny_class_falls_back_to_every_train_image_with_a_note(tmp_path):
    """A class with 2 train images cannot spare one for selection: all of train trains,
    nothing selects, and the notes say which class and why."""
    data = _write(tmp_path / "d", {"train": {"ants": 8, "honey bée": 2},
                                   "val": dict.fromkeys(CLASSES, 2)})
    plan = ft_rows.plan_splits(discover(data), seed=0, test_size=0.2)
    assert plan.val is None and len(plan.train) == 10 and plan.report_name == "val"
    assert any("class 'honey bée' has 2 train images, too few for a selection hold-out" in n
               for n in plan.notes)
    assert any("the last epoch is kept" in n for n in plan.notes)
    one = _write(tmp_path / "e", {"train": {"ants": 8, "honey bée": 1},
                                  "val": dict.fromkeys(CLASSES, 2)})
    plan1 = ft_rows.plan_splits(discover(one), seed=0, test_size=0.2)
    assert plan1.val is None and any("'honey bée' has 1 train image(s)" in n for n in plan1.notes)
    # 3 images: the hash decides. Seed 0 holds one out and keeps 2 to train on; seed 11 would
    # hold 2 out and keep 1, so it falls back too.
    three = _write(tmp_path / "f", {"train": {"ants": 8, "honey bée": 3},
                                    "val": dict.fromkeys(CLASSES, 2)})
    images = discover(three)
    labels = np.array([s.label for s in images.samples])
    plan3 = ft_rows.plan_splits(images, seed=0, test_size=0.2)
    assert plan3.val is not None and np.bincount(labels[plan3.train]).tolist() == [7, 2]
    split = np.array([s.split for s in images.samples])
    keys = [s.path for s in images.samples]
    plan6 = plan_splits(labels, split, keys, seed=11, test_size=0.2, select_holdout=True,
                        source="t", class_names=list(CLASSES))
    assert plan6.val is None and len(plan6.train) == 11
    assert plan6.notes == ("class 'honey bée' has 3 train images, too few for a selection hold-out "
                           "(it would keep 1 to train on): every train image trains, nothing "
                           "selects",)


def test_opt_out_trains_on_every_train_image_and_keeps_the_last_epoch(data, tiny, tmp_path):
    args = ["finetune", str(data), "--backbone", tiny, "--cache-dir", str(tmp_path),
            "--epochs", "2", "--image-size", "32", "--batch-size", "4", "--workers", "0",
            "--precision", "fp32", "--trainable", "head", "--no-selection-holdout", "--json"]
    r = CliRunner().invoke(cli, args)
    assert r.exit_code == 0, r.output
    out = json.loads(r.stdout)
    run = Path(out["run_dir"])
    rows = load_rows(run)
    m = json.loads((run / "metrics.json").read_text())
    assert rows.selection is None and len(rows.train.paths) == 2 * N_TRAIN
    assert out["best_epoch"] == 2 and m["selection_split"] is None and "initial" not in m
    assert all("val_accuracy" not in h for h in m["history"])
    # the record of a run that selects on nothing is the one such runs always had
    assert "selection_holdout" not in m["config"]
    assert any("selection_holdout is off" in n for n in m["notes"])


def test_record_stores_selection_holdout_only_where_it_changes_the_rows():
    cfg = FinetuneConfig()
    assert cfg.record(data_fingerprint="f", two_splits=True)["selection_holdout"] is True
    assert "selection_holdout" not in cfg.record(data_fingerprint="f")
    off = cfg.replace(selection_holdout=False)
    assert "selection_holdout" not in off.record(data_fingerprint="f", two_splits=True)
    assert off.record(data_fingerprint="f")["selection_holdout"] is False
    with pytest.raises(fxtl.ParameterError) as err:
        cfg.replace(selection_holdout="no")
    assert err.value.param == "selection_holdout"


def test_a_checkpoint_that_selected_on_nothing_never_resumes_on_a_holdout(data, tiny, tmp_path):
    """A two-split checkpoint trained on every train image (as every such run did before the
    hold-out): resuming with the hold-out is refused, resuming without it finishes that plan."""
    kw = dict(backbone=tiny, trainable="head", epochs=2, cache_dir=tmp_path, run_name="old", **TINY)

    def stop_in_epoch_2(info):
        if info["epoch"] == 2:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        finetune(data, selection_holdout=False, on_step=stop_in_epoch_2, **kw)
    ckpt = torch.load(tmp_path / "runs" / "old" / "checkpoint-last.pt", weights_only=True)
    assert "selection_holdout" not in ckpt["config"] and ckpt["epoch"] == 1
    with pytest.raises(fxtl.ProvenanceError, match="selected on nothing") as err:
        finetune(data, resume=True, **kw)
    assert "selection_holdout=False" in str(err.value) and "\n" not in str(err.value)
    res = finetune(data, selection_holdout=False, resume=True, **kw)
    assert res.resumed_from_epoch == 1 and res.best_epoch == 2
    assert load_rows(res.run_dir).selection is None
    assert res.metrics["n_train"] == 2 * N_TRAIN


def test_only_a_higher_accuracy_replaces_the_fitted_start():
    """The start's loss (a logistic regression's, often strongly penalised) does not compare with
    a trained network's: against epoch 0 an accuracy tie keeps the start; later ties go to the
    lower loss, and monitor="loss" compares losses as asked."""
    from fxtl.training.epochs import is_improvement

    start = {"epoch": 0, "accuracy": 0.9375, "loss": 0.53}
    assert not is_improvement(0.9375, 0.21, start, "accuracy")
    assert is_improvement(0.9583, 0.60, start, "accuracy")
    trained = {**start, "epoch": 2}
    assert is_improvement(0.9375, 0.21, trained, "accuracy")
    assert not is_improvement(0.9375, 0.60, trained, "accuracy")
    assert is_improvement(0.9, 0.21, start, "loss") and is_improvement(0.5, 0.1, None, "accuracy")
