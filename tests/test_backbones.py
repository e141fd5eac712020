"""The backbone registry and the real pretrained lite0 weights."""
from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import torch

from fxtl.backbones import registry, weights
from fxtl.backbones.registry import (BackboneSpec, get_backbone, list_backbones, load_backbone,
                                     parse_backbone_name, register_backbone, weights_identity)
from fxtl.errors import BackboneError, ProvenanceError
from fxtl.data.images import EvalTransform


@pytest.fixture(scope="module")
def lite0():
    return load_backbone("lite0")


def test_registry_refuses_duplicates():
    with pytest.raises(ValueError, match="already registered"):
        register_backbone(BackboneSpec(name="lite0", source="package", arch="x"))


def test_lookups_return_copies_whose_meta_cannot_change_the_registry():
    spec = get_backbone("lite0")
    assert spec is not get_backbone("lite0") and spec == get_backbone("lite0")
    with pytest.raises(TypeError):
        spec.meta["metrics"] = {}  # read-only: a caller cannot edit the shared entry
    with pytest.raises(dataclasses.FrozenInstanceError):
        spec.feature_dim = 1
    given = {"metrics": {"x": 1}}
    derived = dataclasses.replace(spec, meta=given)
    given["metrics"] = "changed later"  # the spec keeps its own copy
    assert derived.meta["metrics"] == {"x": 1}
    fresh = get_backbone("lite0")
    assert fresh.meta["metrics"] == {"imagenet-1k": {"acc@1": 75.1}} and fresh.feature_dim == 1280
    assert "75.1" not in fresh.description  # the number lives in meta
    assert not hasattr(registry, "BACKBONES") and "BACKBONES" not in registry.__all__


def test_lite0_weights_hash_is_pinned_and_checked(monkeypatch, tmp_path):
    spec = get_backbone("lite0")
    from fxtl._util import sha256_file

    assert sha256_file(weights.package_file(spec)) == spec.meta["weights_sha256"]
    assert weights_identity(spec).weights_sha256 == spec.meta["weights_sha256"]
    altered = tmp_path / "lite0.pth"
    data = bytearray(weights.package_file(spec).read_bytes())
    data[len(data) // 2] ^= 0xFF
    altered.write_bytes(bytes(data))
    monkeypatch.setattr(weights, "package_file", lambda spec: altered)
    with pytest.raises(ProvenanceError, match="pins 579344248a93"):
        load_backbone("lite0")


def test_name_grammar(tmp_path):
    assert parse_backbone_name("resnet50").source == "torchvision"
    tv = parse_backbone_name("tv:resnet18.IMAGENET1K_V1")
    assert (tv.arch, tv.weights) == ("resnet18", "IMAGENET1K_V1")
    assert parse_backbone_name("timm:convnext_tiny").source == "timm"
    w = tmp_path / "w.pth"
    w.write_bytes(b"x")
    spec = parse_backbone_name(f"resnet18={w}")
    assert spec.source == "file" and spec.file == str(w.resolve())
    with pytest.raises(BackboneError, match="unknown backbone"):
        parse_backbone_name("no_such_net")
    with pytest.raises(BackboneError, match="not found"):
        parse_backbone_name(f"resnet18={tmp_path / 'missing.pth'}")


def test_list_backbones_reports_offline_availability():
    rows = {r["name"]: r for r in list_backbones()}
    assert rows["lite0"]["available_offline"] is True
    assert rows["lite0"]["feature_dim"] == 1280


def test_lite0_weights_are_real_imagenet(lite0):
    """The shipped ImageNet head names scikit-learn's bundled photos correctly."""
    from PIL import Image
    from sklearn.datasets import load_sample_image

    t = EvalTransform(lite0.preprocessing)
    x = torch.stack([t(Image.fromarray(load_sample_image(n))) for n in ("china.jpg", "flower.jpg")])
    with torch.inference_mode():
        feats, logits = lite0.forward_with_logits(x)
    top = [lite0.categories[i] for i in logits.argmax(1).tolist()]
    assert top == ["palace", "daisy"]
    assert feats.shape == (2, 1280)
    assert len(lite0.weights_sha256) == 64


def test_lite0_preprocessing_from_design(lite0):
    pre = lite0.preprocessing
    assert (pre.resize, pre.crop, pre.interpolation) == (256, 224, "bicubic")
    assert pre.mean == (0.5, 0.5, 0.5) and pre.std == (0.5, 0.5, 0.5)


def test_intermediate_layer_is_pooled():
    bb = load_backbone("lite0", layer="blocks.3")
    x = torch.randint(0, 255, (2, 3, 224, 224), dtype=torch.uint8)
    with torch.inference_mode():
        f = bb(x)
    assert f.shape == (2, bb.feature_dim) and bb.feature_dim == 80
    assert "blocks.3" in bb.layer_names()
    with pytest.raises(BackboneError, match="no layer"):
        load_backbone("lite0", layer="blocks.99")


def test_offline_download_fails_with_one_line(monkeypatch, tmp_path):
    monkeypatch.setattr(weights, "online", lambda *a, **k: False)
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    with pytest.raises(BackboneError) as exc:
        load_backbone("resnet18")
    msg = str(exc.value)
    assert "\n" not in msg and "no network" in msg
    assert str(tmp_path / "torch" / "hub" / "checkpoints" / "resnet18-") in msg


def test_offline_timm_fails_with_one_line(monkeypatch):
    monkeypatch.setattr(weights, "online", lambda *a, **k: False)
    monkeypatch.setattr(weights, "timm_cached_file", lambda spec: None)
    with pytest.raises(BackboneError, match="no network") as exc:
        load_backbone("timm:resnet18.a1_in1k")
    assert "\n" not in str(exc.value)


def test_local_weights_file_for_torchvision_arch(tmp_path):
    """ARCH=PATH loads a local file into the architecture without any download."""
    import torchvision

    model = torchvision.models.resnet18(weights=None, num_classes=1000)
    w = tmp_path / "r18.pth"
    torch.save(model.state_dict(), w)
    bb = load_backbone(f"resnet18={w}")
    assert bb.feature_dim == 512 and bb.preprocessing.crop == 224
    assert torch.equal(bb.model.fc.weight, model.fc.weight)


def test_naming_and_finding_weights_do_not_import_torch():
    """The registry, specs, weights sources and builders load without torch (a cache hit needs
    none of it); the network class is a plain module-level class where torch is imported."""
    import subprocess
    import sys

    code = ("import sys\n"
            "import fxtl.backbones.registry as r, fxtl.backbones.building, fxtl.backbones.weights\n"
            "spec = r.get_backbone('lite2')\n"
            "assert r.weights_identity(spec).preprocessing.crop == 260\n"
            "print('torch' in sys.modules)\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.strip() == "False"
    from fxtl.backbones.network import Backbone

    assert Backbone.__qualname__ == "Backbone" and Backbone.__module__ == "fxtl.backbones.network"
    assert not hasattr(registry, "Backbone") and not hasattr(registry, "_lite0_file")


def test_auto_layers_are_the_later_stages(lite0):
    """lite0's stages at stride 8 and beyond; a ResNet leaves out layer4 (the penultimate
    features pool it already)."""
    import torchvision

    from fxtl.backbones.network import auto_layers

    assert auto_layers(lite0.model, size=224) == [f"blocks.{i}" for i in range(2, 7)]
    assert auto_layers(torchvision.models.resnet18(), size=224) == ["layer2", "layer3"]
