"""The network a backbone name builds: :class:`Backbone`, an ``nn.Module`` that eats uint8
images and returns pooled features, with its provenance attached.

This module imports torch; :func:`fxtl.backbones.registry.load_backbone` imports it only when a
network is built, so ``import fxtl`` and a cache hit stay free of torch.
"""
from __future__ import annotations

from typing import Any, Sequence

import torch
import torch.nn as nn

from ..data.images import Preprocessing
from ..errors import BackboneError
from .building import build_network
from .folding import fold_batchnorm
from .spec import BackboneSpec

__all__ = ["Backbone", "build_backbone", "auto_layers", "PENULTIMATE"]

# The name of the default feature: the pooled input of the final linear classifier.
PENULTIMATE = "pooled"
# Containers whose children are a network's stages, as timm and torchvision name them.
_STAGE_CONTAINERS = ("blocks", "stages", "features", "layers", "encoder.layers", "encoder.layer")
# `auto` keeps the stages at least this many times smaller than the input: the later ones,
# whose features are less ImageNet-specific than the top's and more than the edges' below.
_AUTO_MIN_REDUCTION = 8


class _StopForward(Exception):
    """Raised by a hook to end the forward pass once the wanted layer has run."""


def _last_linear(model) -> tuple[str, Any]:
    last = None
    for name, module in model.named_modules():
        if isinstance(module, nn.Linear):
            last = (name, module)
    if last is None:
        raise BackboneError(f"{type(model).__name__} has no final linear classifier to pool before")
    return last


def _pool(output) -> torch.Tensor:
    """A module's output, averaged over space (``[N, C, H, W]``) or tokens (``[N, T, C]``)."""
    if isinstance(output, (tuple, list)):
        output = output[0]
    if output.ndim == 4:
        return output.mean(dim=(2, 3), dtype=torch.float32)
    if output.ndim == 3:
        return output.mean(dim=1, dtype=torch.float32)
    return output.float()


class Backbone(nn.Module):
    """A frozen (or trainable) pretrained network that eats uint8 images.

    ``forward(x)`` returns the features of ``layer`` (default: the pooled penultimate features,
    i.e. the input of the final linear classifier). ``forward_with_logits(x)`` also returns the
    network's own classifier output (ImageNet logits for pretrained weights).
    ``forward_layers(x)`` also returns the pooled outputs of ``extra_layers``, from the same pass.

    Attributes
    ----------
    model : nn.Module -- the underlying network, classifier included
    classifier_name : str -- dotted name of the final ``nn.Linear``
    preprocessing : Preprocessing
    feature_dim : int
    extra_layers : tuple of str -- modules pooled beside the features by ``forward_layers``
    layer_dims : dict -- extra layer name -> its pooled width
    provenance : dict -- backbone, weights_sha256, preprocessing, layer (JSON-ready)
    categories : list of str -- names of the classifier's outputs, when known
    """

    # "as-trained", or "bn-folded:N" for the inference graph (see build_backbone)
    graph = "as-trained"

    def __init__(self, spec: BackboneSpec, model, preprocessing: Preprocessing, weights_sha256: str,
                 *, layer: str | None = None, extra_layers: Sequence[str] = (),
                 meta: dict | None = None):
        super().__init__()
        self.spec = spec
        self.model = model
        self.preprocessing = preprocessing
        self.weights_sha256 = weights_sha256
        self.meta = dict(meta or {})
        self.classifier_name, classifier = _last_linear(model)
        self.layer = layer or PENULTIMATE
        mean = torch.tensor(preprocessing.mean).view(1, 3, 1, 1) * 255.0
        std = torch.tensor(preprocessing.std).view(1, 3, 1, 1) * 255.0
        self.register_buffer("_mean", mean, persistent=False)
        self.register_buffer("_inv_std", 1.0 / std, persistent=False)
        self._captured: dict[str, Any] = {}
        self._stop_early = True
        self.concat: tuple[str, ...] = ()  # see concatenate()
        modules = dict(model.named_modules())
        if self.layer == PENULTIMATE:
            classifier.register_forward_pre_hook(self._capture_pooled)
        else:
            modules[self._module(modules, self.layer)].register_forward_hook(self._capture_layer)
        self.extra_layers = tuple(extra_layers)
        for name in self.extra_layers:
            modules[self._module(modules, name)].register_forward_hook(self._extra_hook(name))
        self.layer_dims: dict[str, int] = {}
        if self.layer == PENULTIMATE:
            self.feature_dim = int(classifier.in_features)
        if self.layer != PENULTIMATE or self.extra_layers:
            self._probe_dims()

    def _module(self, modules: dict[str, Any], name: str) -> str:
        if not name or name not in modules:
            raise BackboneError(f"{self.spec.name} has no layer {name!r}; "
                                f"`fxtl backbones --layers {self.spec.name}` lists them")
        return name

    @property
    def categories(self) -> list[str]:
        cats = self.meta.get("categories")
        if cats:
            return list(cats)
        if self.spec.source == "package" or self.meta.get("imagenet"):
            from timm.data import ImageNetInfo

            info = ImageNetInfo()
            return [info.index_to_description(i) for i in range(1000)]
        return []

    @property
    def provenance(self) -> dict[str, Any]:
        prov = {"backbone": self.spec.name, "architecture": self.spec.arch,
                "weights_sha256": self.weights_sha256, "preprocessing": self.preprocessing.to_dict(),
                "layer": self.layer, "feature_dim": self.feature_dim, "graph": self.graph}
        if self.concat:
            prov["layers"] = list(self.concat)
        return prov

    def concatenate(self, names: Sequence[str]) -> "Backbone":
        """Make ``forward`` return the pooled outputs of ``names`` side by side, in that order
        (``layer``'s name for the features, else names of ``extra_layers``), as a head fitted on
        several layers of a cache expects them; returns ``self``."""
        names = tuple(names)
        unknown = [n for n in names if n != self.layer and n not in self.extra_layers]
        if not names or unknown:
            raise BackboneError(f"{self.spec.name} was built without layer(s) "
                                f"{', '.join(unknown) or '(none given)'}; build it with layers= naming them")
        dims = {self.layer: self.feature_dim, **self.layer_dims}
        self.concat, self.feature_dim = names, sum(dims[n] for n in names)
        return self

    def _capture_pooled(self, module, args):
        self._captured["features"] = args[0]

    def _capture_layer(self, module, args, output):
        self._captured["features"] = _pool(output)
        if self._stop_early:
            raise _StopForward

    def _extra_hook(self, name: str):
        def hook(module, args, output):
            if "layers" in self._captured:
                self._captured["layers"][name] = _pool(output)
        return hook

    def _probe_dims(self) -> None:
        c = self.preprocessing.crop
        with torch.inference_mode():
            feats, layers = self.forward_layers(torch.zeros(1, 3, c, c, dtype=torch.uint8))
        self.feature_dim = int(feats.shape[1])
        self.layer_dims = {name: int(v.shape[1]) for name, v in layers.items()}

    def normalize(self, x):
        """uint8 (or 0..255 float) images -> normalised float tensor."""
        return (x.float() - self._mean) * self._inv_std

    def forward(self, x):
        if self.concat:
            feats, layers = self.forward_layers(x)
            parts = {**layers, self.layer: feats}
            return torch.cat([parts[n].float() for n in self.concat], dim=1)
        self._captured.clear()
        try:
            self.model(self.normalize(x))
        except _StopForward:
            pass
        return self._captured.pop("features").float()

    def forward_with_logits(self, x):
        """``(features, logits)`` in one pass (features of ``layer``, logits of the classifier)."""
        self._captured.clear()
        self._stop_early = False
        try:
            logits = self.model(self.normalize(x))
        finally:
            self._stop_early = True
        return self._captured.pop("features").float(), logits.float()

    def forward_layers(self, x) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """``(features, {extra layer: pooled output})`` from one pass, layers in ``extra_layers``
        order."""
        self._captured.clear()
        self._captured["layers"] = {}
        self._stop_early = False
        try:
            self.model(self.normalize(x))
        finally:
            self._stop_early = True
        layers = self._captured.pop("layers")
        return self._captured.pop("features").float(), {n: layers[n] for n in self.extra_layers}

    def layer_names(self) -> list[str]:
        """Modules whose output can be used with ``layer=`` (blocks and stages)."""
        names = []
        for name, module in self.model.named_modules():
            if name and name.count(".") <= 1 and len(list(module.children())) > 0 or \
                    name in ("conv_head", "bn2", "avgpool", "global_pool"):
                names.append(name)
        return names


def auto_layers(model, *, size: int) -> list[str]:
    """The later stages of ``model``: the children of its stage container (``blocks``,
    ``stages``, ``features``...; else ``layer1``...) whose output is at least
    ``_AUTO_MIN_REDUCTION`` times smaller than a ``size`` input, found by one probe pass.
    A last stage that the penultimate features already pool (ResNet's ``layer4``) is left out."""
    modules = dict(model.named_modules())
    stages: list[str] = []
    for container in _STAGE_CONTAINERS:
        children = list(getattr(modules.get(container), "named_children", lambda: [])())
        if len(children) >= 3:
            stages = [f"{container}.{name}" for name, _ in children]
            break
    if not stages:
        stages = [name for name, _ in model.named_children() if name.startswith("layer")]
    if not stages:
        raise BackboneError(f"{type(model).__name__}: no stages to choose layers from; "
                            "name them instead (`fxtl backbones --layers NAME` lists them)")
    shapes: dict[str, tuple[int, ...]] = {}
    hooks = [modules[s].register_forward_hook(
        lambda m, a, out, s=s: shapes.__setitem__(s, tuple((out[0] if isinstance(out, (tuple, list))
                                                            else out).shape)))
        for s in stages]
    try:
        with torch.inference_mode():
            model(torch.zeros(1, 3, size, size))
    finally:
        for h in hooks:
            h.remove()
    tokens = [s for s in stages if len(shapes.get(s, ())) == 3]
    if tokens:  # a transformer: no spatial size, take the later half of its blocks
        return tokens[len(tokens) // 2:]
    chosen = [s for s in stages if len(shapes.get(s, ())) == 4
              and shapes[s][-1] * _AUTO_MIN_REDUCTION <= size]
    _, classifier = _last_linear(model)
    if chosen and shapes[chosen[-1]][1] == classifier.in_features and \
            not any(m is not modules[chosen[-1]] and isinstance(m, nn.Conv2d)
                    for m in _after(model, chosen[-1])):
        chosen = chosen[:-1]
    return chosen


def _after(model, name: str) -> list[Any]:
    """Modules registered after ``name`` and outside it (what runs on its output)."""
    seen, out = False, []
    for n, m in model.named_modules():
        if n == name:
            seen = True
        elif seen and not n.startswith(name + "."):
            out.append(m)
    return out


def build_backbone(spec: BackboneSpec, *, layer: str | None = None, layers: Sequence[str] = (),
                   inference: bool = False, trust: bool = False) -> Backbone:
    """Build ``spec``'s network in eval mode, on CPU (see
    :func:`fxtl.backbones.registry.load_backbone`); ``layers``: module names, or ``("auto",)``
    for :func:`auto_layers`."""
    model, pre, sha, meta = build_network(spec, trust=trust)
    model.eval()
    if spec.source == "package" or (spec.meta.get("base_source") == "package" and spec.source == "file"):
        meta = {**meta, "imagenet": True}
    if spec.source == "timm" or spec.meta.get("base_source") == "timm":
        if getattr(model, "num_classes", 0) == 1000:
            meta = {**meta, "imagenet": True}
    extra = auto_layers(model, size=pre.crop) if tuple(layers) == ("auto",) else list(layers)
    graph = "as-trained"
    if inference:
        keep = tuple(extra) + ((layer,) if layer else ())
        folded = fold_batchnorm(model, size=pre.crop, keep=keep)
        graph = f"bn-folded:{folded}" if folded else graph
    bb = Backbone(spec, model, pre, sha, layer=layer, extra_layers=extra, meta=meta).eval()
    bb.graph = graph
    return bb
