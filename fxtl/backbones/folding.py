"""Inference-graph rewrites: BatchNorm folded into the convolution that feeds it.

The pairs are found by running the network with hooks, so they follow the real data flow; the
folded network is compared with the original before it is kept.
"""
from __future__ import annotations

from typing import Any

__all__ = ["fold_batchnorm", "INFERENCE_GRAPH"]

# Names the inference-graph recipe in a cache's fingerprint: the graph follows from the weights
# and this code, so a cache hit needs no network built to know it.
INFERENCE_GRAPH = "bn-folded"


def _conv_bn_pairs(model, example) -> list[tuple[str, str]]:
    """``(conv, batchnorm)`` module names where the BN's input *is* the conv's output tensor.

    Found by running ``example`` through the network with hooks, so the pairing follows the real
    data flow rather than the order modules were registered in (DenseNet registers ``norm1``
    after the previous layer's ``conv2`` but feeds it a concatenation).
    """
    import torch
    import torch.nn as nn

    produced: dict[int, tuple[str, Any]] = {}
    pairs: list[tuple[str, str]] = []
    hooks = []

    def conv_hook(name):
        def hook(module, args, out):
            produced[id(out)] = (name, out)  # the tensor is kept so its id cannot be reused
        return hook

    def bn_hook(name):
        def hook(module, args):
            src = produced.get(id(args[0]))
            if src is not None and src[1] is args[0]:
                pairs.append((src[0], name))
        return hook

    for name, m in model.named_modules():
        if type(m) is nn.Conv2d or (isinstance(m, nn.Conv2d) and type(m).__name__ == "Conv2dSame"):
            hooks.append(m.register_forward_hook(conv_hook(name)))
        elif _foldable_bn(m):
            hooks.append(m.register_forward_pre_hook(bn_hook(name)))
    try:
        with torch.inference_mode():
            model(example)
    finally:
        for h in hooks:
            h.remove()
    seen: set[str] = set()
    unique = []
    for conv, bn in pairs:  # a module called twice (shared weights) is left alone
        if conv in seen or bn in seen:
            unique = [p for p in unique if conv not in p and bn not in p]
            continue
        seen.update((conv, bn))
        unique.append((conv, bn))
    return unique


def _foldable_bn(m) -> bool:
    import torch.nn as nn

    if type(m) is nn.BatchNorm2d:
        return m.running_mean is not None
    # timm's BatchNorm + activation in one module (EfficientNet, RegNet...)
    return type(m).__name__ == "BatchNormAct2d" and isinstance(m, nn.BatchNorm2d) and \
        m.running_mean is not None and hasattr(m, "act") and hasattr(m, "drop")


def _fold_pair(model, conv_name: str, bn_name: str) -> None:
    import torch
    import torch.nn as nn

    conv, bn = model.get_submodule(conv_name), model.get_submodule(bn_name)
    with torch.no_grad():
        scale = (bn.weight if bn.affine else torch.ones_like(bn.running_var)) / torch.sqrt(bn.running_var + bn.eps)
        shift = bn.bias if bn.affine else torch.zeros_like(bn.running_mean)
        bias = conv.bias if conv.bias is not None else torch.zeros_like(bn.running_mean)
        conv.weight = nn.Parameter((conv.weight * scale.reshape(-1, 1, 1, 1)).detach(), requires_grad=False)
        conv.bias = nn.Parameter(((bias - bn.running_mean) * scale + shift).detach(), requires_grad=False)
    replacement = nn.Identity() if type(bn) is nn.BatchNorm2d else nn.Sequential(bn.drop, bn.act)
    parent_name, _, child = bn_name.rpartition(".")
    setattr(model.get_submodule(parent_name) if parent_name else model, child, replacement)


def fold_batchnorm(model, *, size: int = 224, keep: tuple[str, ...] = ()) -> int:
    """Fold every eval-mode BatchNorm into the convolution that feeds it; returns how many.

    ``y = bn(conv(x))`` becomes ``y = conv'(x)`` with ``W' = W * g / sqrt(var + eps)`` and
    ``b' = (b - mean) * g / sqrt(var + eps) + beta``: the same function with one pass over the
    activations instead of two (TensorRT, ONNX Runtime and ``torch.fx`` do the same).

    Only for inference: the network can no longer be trained as before. Convolutions named in
    ``keep`` (a hooked feature layer) keep their own output. The folded network is checked
    against the original on a random batch (fp32); if they differ, nothing is folded
    (``model`` is left as it was) and 0 is returned.

    Parameters
    ----------
    model : torch.nn.Module
        The network, changed in place.
    size : int
        Side of the random probe images.
    keep : tuple of str
        Module names whose output must stay observable.

    Returns
    -------
    int
        The number of (conv, BatchNorm) pairs folded.

    Examples
    --------
    >>> import torch.nn as nn
    >>> net = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4)).eval()
    >>> fold_batchnorm(net, size=8)
    1
    """
    import torch

    gen = torch.Generator().manual_seed(0)
    example = torch.randn(2, 3, size, size, generator=gen)
    model.eval()
    pairs = [p for p in _conv_bn_pairs(model, example) if p[0] not in keep]
    if not pairs:
        return 0
    with torch.inference_mode():
        ref = model(example)
    saved = {}
    for conv_name, bn_name in pairs:
        conv = model.get_submodule(conv_name)
        saved[conv_name] = (conv.weight, conv.bias)
        saved[bn_name] = model.get_submodule(bn_name)
        _fold_pair(model, conv_name, bn_name)
    with torch.inference_mode():
        out = model(example)
    tol = 1e-3 * max(1.0, float(ref.abs().max()))
    if out.shape == ref.shape and float((out - ref).abs().max()) <= tol:
        return len(pairs)
    for conv_name, bn_name in pairs:  # undo: a conv output feeds something else too
        conv = model.get_submodule(conv_name)
        conv.weight, conv.bias = saved[conv_name]
        parent_name, _, child = bn_name.rpartition(".")
        setattr(model.get_submodule(parent_name) if parent_name else model, child, saved[bn_name])
    return 0
