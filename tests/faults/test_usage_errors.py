"""Nonsensical options are usage errors: exit status 2, the option named, nothing run or written.

Each row is an option value that cannot mean anything (a negative size, an unknown name, an
empty range). click refuses them while parsing, before any model is loaded or file written.
"""
from __future__ import annotations

import pytest
from click.testing import CliRunner

from fxtl.cli import cli

from .. import _images as img
from ._cli import assert_usage_error

# (command and arguments, the parameter click must name). {data}: a valid dataset folder,
# {cache}: an existing file, {missing}: a path that does not exist.
CASES = [
    (["extract", "{data}", "--batch-size", "-1"], "--batch-size"),
    (["extract", "{data}", "--batch-size", "0"], "--batch-size"),
    (["extract", "{data}", "--workers", "-1"], "--workers"),
    (["extract", "{data}", "--precision", "fp8"], "--precision"),
    (["extract", "{data}", "--device", "tpu"], "--device"),
    (["extract", "{data}", "--backbone", "no-such-net"], "--backbone"),
    (["extract", "{data}", "--backbone", "resnet50={missing}"], "--backbone"),
    (["extract", "{data}", "--shard", "2/2"], "--shard"),
    (["extract", "{data}", "--shard", "half"], "--shard"),
    (["extract", "{missing}"], "DATA_DIR"),
    (["merge"], "SHARDS..."),
    (["info", "{data}"], "CACHE"),
    (["export", "{cache}", "--format", "xls"], "--format"),
    (["backbones", "--layers", "no-such-net"], "--layers"),
    (["advise", "{data}", "--sample", "5"], "--sample"),
    (["advise", "{data}", "--large-per-class", "0"], "--large-per-class"),
    (["advise", "{data}", "--backbone", "no-such-net"], "--backbone"),
    (["demo", "--per-class", "2"], "--per-class"),
    (["demo", "--epochs", "0"], "--epochs"),
    (["demo", "--image-size", "8"], "--image-size"),
    (["fit-head", "{cache}", "--model", "forest"], "--model"),
    (["fit-head", "{cache}", "--jobs", "0"], "--jobs"),
    (["fit-head", "{cache}", "--cv-folds", "1"], "--cv-folds"),
    (["fit-head", "{cache}", "--test-size", "0"], "--test-size"),
    (["fit-head", "{cache}", "--pca", "0"], "--pca"),
    (["fit-head", "{cache}", "--large-threshold", "0"], "--large-threshold"),
    (["predict", "{cache}", "{data}", "--top-k", "0"], "--top-k"),
    (["predict", "{cache}", "{data}", "--batch-size", "-4"], "--batch-size"),
    (["predict", "{cache}", "{data}", "--precision", "fp64"], "--precision"),
    (["predict", "{cache}"], "INPUTS..."),
    (["plot-embedding", "{cache}", "--method", "umap"], "--method"),
    (["plot-embedding", "{cache}", "--max-points", "2"], "--max-points"),
    (["plot-embedding", "{cache}", "--perplexity", "0"], "--perplexity"),
    (["plot-embedding", "{cache}", "--split", "holdout"], "--split"),
    (["finetune", "{data}", "--epochs", "-1"], "--epochs"),
    (["finetune", "{data}", "--batch-size", "-8"], "--batch-size"),
    (["finetune", "{data}", "--lr", "0"], "--lr"),
    (["finetune", "{data}", "--lr", "-0.1"], "--lr"),
    (["finetune", "{data}", "--image-size", "8"], "--image-size"),
    (["finetune", "{data}", "--optimizer", "lion"], "--optimizer"),
    (["finetune", "{data}", "--weight-decay", "-1"], "--weight-decay"),
    (["finetune", "{data}", "--momentum", "1.5"], "--momentum"),
    (["finetune", "{data}", "--label-smoothing", "1"], "--label-smoothing"),
    (["finetune", "{data}", "--warmup-epochs", "-1"], "--warmup-epochs"),
    (["finetune", "{data}", "--lr-decay", "0"], "--lr-decay"),
    (["finetune", "{data}", "--bn", "sometimes"], "--bn"),
    (["finetune", "{data}", "--patience", "-1"], "--patience"),
    (["finetune", "{data}", "--monitor", "f1"], "--monitor"),
    (["finetune", "{data}", "--crop-scale", "0", "1"], "--crop-scale"),
    (["finetune", "{data}", "--trainable", "middle"], "--trainable"),
    (["finetune", "{data}", "--test-size", "1"], "--test-size"),
    (["finetune", "{data}", "--backbone", "no-such-net"], "--backbone"),
    (["finetune", "{data}", "--init-head", "{missing}"], "--init-head"),
    (["compare", "{missing}"], "[RUNS]..."),
]


@pytest.fixture(scope="module")
def places(tmp_path_factory):
    base = tmp_path_factory.mktemp("usage")
    for cls in ("a", "b"):
        (base / "data" / cls).mkdir(parents=True)
        img.photo((16, 16)).save(base / "data" / cls / "1.png")
    (base / "some.h5").write_text("exists; never opened, the options are refused first\n")
    return {"data": str(base / "data"), "cache": str(base / "some.h5"),
            "missing": str(base / "no" / "such" / "path")}


@pytest.mark.parametrize("args, param", CASES, ids=[" ".join(a[:1] + a[2:]) for a, _ in CASES])
def test_nonsensical_option_is_a_usage_error(tmp_path, places, args, param):
    home = tmp_path / "home"
    r = CliRunner().invoke(cli, [a.format(**places) for a in args], env={"FXTL_CACHE": str(home)})
    assert_usage_error(r, param)
    assert not home.exists()  # nothing ran: no cache, run folder or lock was created
