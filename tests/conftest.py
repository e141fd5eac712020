"""Shared fixtures: tiny generated datasets, made once per session (no network, no GPU)."""
from __future__ import annotations

import os
from pathlib import Path

import pytest

os.environ.setdefault("OMP_NUM_THREADS", "2")


@pytest.fixture(scope="session", autouse=True)
def _cache_outside_the_checkout(tmp_path_factory):
    """Every default cache (``./cache``, ``$FXTL_CACHE``) of a test lands in pytest's tmp dir."""
    old = os.environ.get("FXTL_CACHE")
    os.environ["FXTL_CACHE"] = str(tmp_path_factory.mktemp("fxtl-cache"))
    yield
    if old is None:
        os.environ.pop("FXTL_CACHE", None)
    else:
        os.environ["FXTL_CACHE"] = old


@pytest.fixture(scope="session")
def shapes_dir(tmp_path_factory) -> Path:
    """train/val split folders, 2 classes (circle, square), 6 images each per split."""
    from fxtl.data.samples import write_shapes

    return write_shapes(tmp_path_factory.mktemp("shapes"), per_class=6)


@pytest.fixture(scope="session")
def shapes3_dir(tmp_path_factory) -> Path:
    """train/val/test split folders, 2 classes, 6 images each per split: a fine-tune early-stops
    on val and reports on test (with train/val only, val is reported on and a hold-out of train
    selects)."""
    from fxtl.data.samples import write_shapes

    return write_shapes(tmp_path_factory.mktemp("shapes3"), per_class=6,
                        splits=("train", "val", "test"))


@pytest.fixture(scope="session")
def digits_dir(tmp_path_factory) -> Path:
    """scikit-learn digits 0-2 as PNG folders: 12 per class, train/val."""
    from fxtl.data.samples import write_digits

    return write_digits(tmp_path_factory.mktemp("digits"), classes=3, per_class=12, val_fraction=0.34)


@pytest.fixture(scope="session")
def shapes_cache(shapes_dir, tmp_path_factory) -> Path:
    """A feature cache of ``shapes_dir`` made by the real lite0 backbone."""
    import fxtl

    res = fxtl.extract(shapes_dir, cache_dir=tmp_path_factory.mktemp("cache"), progress=False)
    return res.cache


def tiny_backbone(folder: Path, *, seed: int, name: str = "test_efficientnet.pth") -> str:
    """``timm:test_efficientnet=<file>``: the tiny architecture with weights seeded by ``seed``."""
    import timm
    import torch

    torch.manual_seed(seed)
    path = folder / name
    torch.save(timm.create_model("test_efficientnet").state_dict(), path)
    return f"timm:test_efficientnet={path}"


@pytest.fixture(scope="session")
def tiny(tmp_path_factory) -> str:
    """``timm:test_efficientnet=<file>``: seeded random weights, offline, a fraction of lite0's cost."""
    return tiny_backbone(tmp_path_factory.mktemp("weights"), seed=0)
