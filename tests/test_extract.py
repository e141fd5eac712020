"""fxtl extract end to end: cache contents, reuse, invalidation, bad images, kill and resume."""
from __future__ import annotations

import json
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import h5py
import numpy as np
import pytest
from click.testing import CliRunner

import fxtl
from fxtl.cli import cli
from fxtl.features.store import load_features

from . import _images as img

ROOT = Path(__file__).resolve().parents[1]


def test_cache_contents_match_dataset(shapes_cache, shapes_dir):
    fc = load_features(shapes_cache)
    assert fc.n == 24 and fc.dim == 1280
    assert fc.splits == {"train": 12, "val": 12}
    assert fc.class_names == ["circle", "square"]
    assert fc.paths[0] == "train/circle/circle_0.png"
    assert np.isfinite(fc.features).all() and fc.features.std() > 0
    for key in ("backbone", "weights_sha256", "preprocessing", "precision", "layer", "fingerprint",
                "created", "fxtl_version", "complete", "versions"):
        assert key in fc.attrs, key
    assert fc.attrs["backbone"] == "lite0" and fc.attrs["layer"] == "pooled"


def test_features_separate_classes(shapes_cache):
    """Real pretrained features: a nearest-centroid rule trained on train is right on val."""
    fc = load_features(shapes_cache)
    X, y = fc.subset("train")
    Xv, yv = fc.subset("val")
    centroids = np.stack([X[y == c].mean(0) for c in (0, 1)])
    pred = np.argmin(((Xv[:, None] - centroids[None]) ** 2).sum(-1), axis=1)
    assert (pred == yv).mean() >= 0.9


def test_reuse_and_invalidation(tmp_path):
    from fxtl.data.samples import write_shapes

    data = write_shapes(tmp_path / "d", per_class=3)
    cache = tmp_path / "cache"
    first = fxtl.extract(data, cache_dir=cache, progress=False)
    assert not first.cache_hit
    again = fxtl.extract(data, cache_dir=cache, progress=False)
    assert again.cache_hit and again.cache == first.cache and again.n == first.n
    # another precision is another cache (auto is fp32 on a CPU without native bf16)
    other = "bf16" if first.precision == "fp32" else "fp32"
    redo = fxtl.extract(data, cache_dir=cache, precision=other, progress=False)
    assert not redo.cache_hit and redo.cache != first.cache and redo.precision == other
    # a file added to the dataset: a new cache, never the stale one
    img.photo(seed=42).save(data / "train" / "circle" / "new.png")
    changed = fxtl.extract(data, cache_dir=cache, progress=False)
    assert not changed.cache_hit and changed.cache != first.cache and changed.n == first.n + 1
    assert first.cache.exists()  # the old cache is left for whoever still uses it


def test_bad_images_recorded_and_skipped(tmp_path, capfd):
    root = tmp_path / "messy"
    for cls in ("a", "b"):
        (root / cls).mkdir(parents=True)
        for i in range(2):
            img.photo(seed=i + (10 if cls == "b" else 0)).save(root / cls / f"ok{i}.jpg")
    a = root / "a"
    img.write_zero_bytes(a / "zero.jpg")
    img.write_truncated_jpeg(a / "trunc.jpg")
    img.write_text_as_jpg(a / "text.jpg")
    img.write_bomb(a / "bomb.png")
    img.write_grayscale(root / "b" / "gray.png")
    img.write_palette(root / "b" / "pal.png")
    img.write_rgba(root / "b" / "rgba.png")
    img.write_cmyk_jpeg(root / "b" / "cmyk.jpg")
    img.write_16bit_png(root / "b" / "deep.png")
    img.write_exif_rotated(root / "b" / "rot.jpg")
    res = fxtl.extract(root, cache_dir=tmp_path / "cache", progress=False, batch_size=4)
    err = capfd.readouterr().err
    reasons = {e["path"]: e["reason"] for e in res.errors}
    assert set(reasons) == {"a/zero.jpg", "a/trunc.jpg", "a/text.jpg", "a/bomb.png"}
    assert "empty file" in reasons["a/zero.jpg"] and "truncated" in reasons["a/trunc.jpg"]
    assert "not an image" in reasons["a/text.jpg"] and "bomb" in reasons["a/bomb.png"]
    for p in reasons:
        assert sum(p in line for line in err.splitlines()) == 1
    fc = load_features(res.cache)
    assert fc.n == 4 + 6 and sorted(p for p, _ in fc.errors) == sorted(reasons)
    assert "b/cmyk.jpg" in fc.paths and "a/trunc.jpg" not in fc.paths


def test_uninterruptible_equivalence_after_sigkill(tmp_path):
    """Kill (SIGKILL) after the first chunk, run again: it resumes, features are identical."""
    from fxtl.data.samples import write_shapes

    data = write_shapes(tmp_path / "d", per_class=5)  # 20 images -> 3 chunks of 8 rows
    kw = dict(batch_size=4, chunk_batches=2, workers=0, progress=False)
    ref = fxtl.extract(data, cache_dir=tmp_path / "ref", **kw)
    # The child kills itself (SIGKILL) right after chunk 1 is on disk: no cleanup can run.
    code = ("import os, signal, sys, fxtl\n"
            "import fxtl.features.chunks as C\n"
            "save = C.save_chunk\n"
            "def save_then_die(parts, k, *a, **kw):\n"
            "    save(parts, k, *a, **kw)\n"
            "    if k == 1:\n"
            "        os.kill(os.getpid(), signal.SIGKILL)\n"
            "C.save_chunk = save_then_die\n"
            "fxtl.extract(sys.argv[1], cache_dir=sys.argv[2], batch_size=4, chunk_batches=2, "
            "workers=0, progress=False)\n")
    proc = subprocess.run([sys.executable, "-c", code, str(data), str(tmp_path / "run")],
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == -signal.SIGKILL, proc.stderr
    left = sorted(p.name for p in (tmp_path / "run").iterdir())
    assert not any(name.endswith(".h5") for name in left), left  # nothing at the final path
    parts = [p for p in (tmp_path / "run").iterdir() if p.name.endswith(".parts")]
    assert len(parts) == 1 and len(list(parts[0].glob("chunk-*.npz"))) == 2
    resumed = fxtl.extract(data, cache_dir=tmp_path / "run", **kw)
    assert resumed.resumed_rows == 16 and not resumed.cache_hit
    a, b = load_features(ref.cache), load_features(resumed.cache)
    assert a.paths == b.paths
    np.testing.assert_array_equal(a.features, b.features)
    assert not parts[0].exists()


# ----------------------------------------------------------------------------- CLI
def test_cli_extract_json_and_hit(shapes_dir, tmp_path):
    runner = CliRunner()
    args = ["extract", str(shapes_dir), "--cache-dir", str(tmp_path), "--json"]
    r = runner.invoke(cli, args)
    assert r.exit_code == 0, r.output
    d = json.loads(r.stdout)
    for key in ("cache", "n", "dim", "splits", "errors", "seconds", "images_per_second", "cache_hit"):
        assert key in d
    assert d["n"] == 24 and d["dim"] == 1280 and d["cache_hit"] is False
    assert d["images_per_second"] > 0
    r2 = runner.invoke(cli, args)
    assert json.loads(r2.stdout)["cache_hit"] is True


def test_cli_info_and_export(shapes_cache, tmp_path):
    runner = CliRunner()
    r = runner.invoke(cli, ["info", str(shapes_cache), "--json"])
    assert r.exit_code == 0, r.output
    d = json.loads(r.stdout)
    assert d["n"] == 24 and d["backbone"] == "lite0" and d["class_counts"] == {"circle": 12, "square": 12}
    r = runner.invoke(cli, ["info", str(shapes_cache)])
    assert "weights sha256" in r.stdout and "lite0" in r.stdout
    fc = load_features(shapes_cache)
    for fmt in ("npz", "csv", "parquet"):
        out = tmp_path / f"f.{fmt}"
        r = runner.invoke(cli, ["export", str(shapes_cache), "--format", fmt, "-o", str(out), "--json"])
        assert r.exit_code == 0, r.output
        assert json.loads(r.stdout)["output"] == str(out)
        if fmt == "npz":
            z = np.load(out)
            np.testing.assert_array_equal(z["features"], fc.features)
            assert list(z["paths"]) == fc.paths
        else:
            import pandas as pd

            df = pd.read_csv(out) if fmt == "csv" else pd.read_parquet(out)
            assert list(df.columns[:4]) == ["path", "split", "label", "label_name"]
            assert df.shape == (24, 4 + 1280)
            np.testing.assert_allclose(df[[f"f{i}" for i in range(1280)]].to_numpy(), fc.features, rtol=1e-6)
            assert df["label_name"].tolist()[0] == "circle"


@pytest.mark.parametrize("args, code, text", [
    (["extract", "/no/such/dir"], 2, "does not exist"),
    (["extract", ".", "--batch-size", "-1"], 2, "-1"),
    (["extract", ".", "--precision", "fp8"], 2, "fp8"),
    (["info", __file__], 1, "not an HDF5 file"),
])
def test_cli_errors(args, code, text):
    r = CliRunner().invoke(cli, args)
    assert r.exit_code == code
    assert text in r.output
    assert "Traceback" not in r.output


def test_cli_empty_dataset_is_one_line_error(tmp_path):
    (tmp_path / "a").mkdir()
    r = CliRunner().invoke(cli, ["extract", str(tmp_path), "--cache-dir", str(tmp_path / "c")])
    assert r.exit_code == 1
    lines = [l for l in r.output.splitlines() if l.strip()]
    assert len(lines) == 1 and lines[0].startswith("fxtl: error:") and "holds no images" in lines[0]


def test_cli_shim_runs_from_checkout():
    r = subprocess.run([sys.executable, str(ROOT / "cli.py"), "--help"], capture_output=True, text=True)
    assert r.returncode == 0 and "extract" in r.stdout


def test_output_never_overwrites_a_foreign_file(shapes_dir, tmp_path):
    target = tmp_path / "notes.h5"
    target.write_text("my notes")
    with pytest.raises(fxtl.FxtlError, match="not an fxtl cache"):
        fxtl.extract(shapes_dir, output=target, progress=False)
    assert target.read_text() == "my notes"
    res = fxtl.extract(shapes_dir, output=target, progress=False, force=True)
    assert load_features(res.cache).n == 24


def test_stale_temporaries_are_removed(shapes_dir, tmp_path):
    from fxtl.data.samples import write_shapes

    data = write_shapes(tmp_path / "d", per_class=2)
    out = tmp_path / "c.h5"
    stale = tmp_path / "c.h5.abc123.partial"
    stale.write_bytes(b"half a file")
    fxtl.extract(data, output=out, progress=False)
    assert not stale.exists() and out.exists()
