"""What trains: a network's blocks in forward order and which block owns each parameter.

A *block* is a stage of the network in forward order: the children of its top-level
``Sequential``/``ModuleList`` containers (``blocks.0`` .. ``blocks.6`` for EfficientNet,
``features.k`` for torchvision's), other top-level modules as they are (``layer1`` .. ``layer4``
for ResNets); a normalisation layer joins the block before it (``conv_head`` + ``bn2``), so
lite0 has 9 blocks.
"""
from __future__ import annotations

from typing import Any

from .config import parse_trainable

__all__ = ["block_groups", "param_owner", "parse_trainable"]


def block_groups(model, classifier_name: str) -> list[tuple[str, list[str]]]:
    """The network's blocks in forward order, without the classifier: ``[(label, modules)]``.

    ``modules`` are dotted module names. Parameters of the model itself (e.g. a ViT's class
    token) belong to the first block.
    """
    import torch.nn as nn

    head_top = classifier_name.split(".")[0]
    norms = (nn.modules.batchnorm._BatchNorm, nn.LayerNorm, nn.GroupNorm)
    units: list[tuple[str, Any]] = []
    for name, child in model.named_children():
        if name == head_top or not any(True for _ in child.parameters()):
            continue
        if isinstance(child, (nn.Sequential, nn.ModuleList)) and len(child) > 1:
            units += [(f"{name}.{n}", c) for n, c in child.named_children()
                      if any(True for _ in c.parameters())]
        else:
            units.append((name, child))
    groups: list[tuple[str, list[str]]] = []
    for name, module in units:
        if groups and isinstance(module, norms):
            label, members = groups[-1]
            groups[-1] = (f"{label}+{name}", members + [name])
        else:
            groups.append((name, [name]))
    return groups


def param_owner(groups: list[tuple[str, list[str]]], head_top: str):
    """Function: parameter name -> block index (len(groups) for the head)."""
    prefixes = [(m + ".", gi) for gi, (_, members) in enumerate(groups) for m in members]
    prefixes.append((head_top + ".", len(groups)))
    prefixes.sort(key=lambda p: -len(p[0]))

    def owner(param_name: str) -> int:
        for prefix, gi in prefixes:
            if param_name.startswith(prefix):
                return gi
        return 0  # parameters of the model itself: with the stem

    return owner


