"""BatchNorm folding (the inference graph of extract / predict / advise): same function, faster."""
from __future__ import annotations

import pytest
import torch
import torch.nn as nn

from fxtl.backbones.folding import fold_batchnorm
from fxtl.backbones.registry import load_backbone


def _randomise_bn(model: nn.Module) -> None:
    g = torch.Generator().manual_seed(1)
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.running_mean.copy_(torch.randn(m.num_features, generator=g))
            m.running_var.copy_(torch.rand(m.num_features, generator=g) + 0.5)
            m.weight.data.copy_(torch.randn(m.num_features, generator=g))
            m.bias.data.copy_(torch.randn(m.num_features, generator=g))


@pytest.fixture(scope="module")
def lite0_pair():
    return load_backbone("lite0"), load_backbone("lite0", inference=True)


def test_lite0_inference_graph_computes_the_same_features(lite0_pair):
    plain, folded = lite0_pair
    assert plain.graph == "as-trained" and folded.graph.startswith("bn-folded:")
    assert int(folded.graph.split(":")[1]) == 49  # stem, 16 blocks' BNs, head
    assert not any(isinstance(m, nn.BatchNorm2d) for m in folded.model.modules())
    x = torch.randint(0, 256, (3, 3, 224, 224), dtype=torch.uint8)
    with torch.inference_mode():
        f0, l0 = plain.forward_with_logits(x)
        f1, l1 = folded.forward_with_logits(x)
    torch.testing.assert_close(f1, f0, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(l1, l0, atol=1e-4, rtol=1e-4)
    assert folded.provenance["graph"] == folded.graph


def test_hooked_conv_layer_keeps_its_own_output():
    """--layer conv_head: the features are the conv's output, so its BN must not be folded in."""
    plain = load_backbone("lite0", layer="conv_head")
    folded = load_backbone("lite0", layer="conv_head", inference=True)
    assert folded.graph == "bn-folded:48"
    x = torch.randint(0, 256, (2, 3, 224, 224), dtype=torch.uint8)
    with torch.inference_mode():
        torch.testing.assert_close(folded(x), plain(x), atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("arch", ["resnet18", "densenet121"])
def test_torchvision_pairs_follow_the_data_flow(arch):
    """DenseNet's norm1 sees a concatenation, not the conv registered before it: left alone."""
    import torchvision

    model = torchvision.models.get_model(arch, weights=None).eval()
    _randomise_bn(model)
    x = torch.randn(2, 3, 64, 64)
    with torch.inference_mode():
        ref = model(x)
    n_bn = sum(isinstance(m, nn.BatchNorm2d) for m in model.modules())
    n = fold_batchnorm(model, size=64)
    with torch.inference_mode():
        out = model(x)
    torch.testing.assert_close(out, ref, atol=1e-4, rtol=1e-4)
    if arch == "resnet18":
        assert n == n_bn == 20
    else:
        assert 0 < n < n_bn  # norm2 after conv1 folds, norm1 / norm5 after concatenations don't


class _Shared(nn.Module):
    """The conv's output feeds the BN *and* a skip connection: folding would change the skip."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 3, 3, padding=1)
        self.bn = nn.BatchNorm2d(3)

    def forward(self, x):
        y = self.conv(x)
        return self.bn(y) + y


def test_a_conv_output_used_twice_is_not_folded():
    model = _Shared().eval()
    _randomise_bn(model)
    x = torch.randn(2, 3, 16, 16)
    with torch.inference_mode():
        ref = model(x)
    assert fold_batchnorm(model, size=16) == 0
    assert isinstance(model.bn, nn.BatchNorm2d)  # restored
    with torch.inference_mode():
        torch.testing.assert_close(model(x), ref)


def test_graph_is_part_of_the_cache_provenance(shapes_cache):
    from fxtl.features.store import read_attrs

    attrs = read_attrs(shapes_cache)
    assert str(attrs["graph"]).startswith("bn-folded:")


def test_malloc_tuning_is_glibc_only_and_the_command_can_turn_it_off(monkeypatch, tmp_path):
    import platform

    from click.testing import CliRunner
    from fxtl import runtime
    from fxtl.cli import cli

    runtime.keep_freed_memory.cache_clear()
    assert runtime.keep_freed_memory() is (platform.libc_ver()[0] == "glibc")
    # The library never reads FXTL_MALLOC_TUNING; the command does (click's envvar).
    calls = []
    monkeypatch.setattr(runtime, "keep_freed_memory", lambda: calls.append(1) or True)
    empty = tmp_path / "empty"
    empty.mkdir()
    for env, expected in (({"FXTL_MALLOC_TUNING": "0"}, []), ({}, [1])):
        calls.clear()
        r = CliRunner().invoke(cli, ["extract", str(empty), "--cache-dir", str(tmp_path / "c")],
                               env=env)
        assert r.exit_code == 1 and calls == expected, (r.output, calls)
