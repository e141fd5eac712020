"""What an export starts from: a head run or a fine-tuned run, loaded and checked.

The only module of :mod:`fxtl.deploy` that calls fxtl's loaders (``load_head``,
``load_backbone``), so a rename there is one edit here. Every check that a user's file is what
its sidecar says (head sha256, weights sha256, backbone of the head) happens on load; a run that
does not check raises :class:`~fxtl.errors.ProvenanceError`.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import numpy as np

from .._util import read_json, sha256_file
from ..backbones.registry import load_backbone
from ..errors import FxtlError, ProvenanceError
from ..heads.persistence import load_head
from ..inference import head_backbone

__all__ = ["RunSource", "load_run"]


@dataclass(frozen=True)
class RunSource:
    """A loaded run ready for export.

    Attributes
    ----------
    kind : {"head", "finetune"}
    run : Path -- the run folder (or head file) as given
    backbone : torch.nn.Module -- fxtl's backbone wrapper (uint8 NCHW in; features out)
    class_names : list of str -- output columns, in order
    provenance : dict -- JSON-ready: backbone, weights hash, head hash, preprocessing, layer...
    head : object -- the head's fitted scikit-learn pipeline (None for a fine-tune)
    head_model : str -- the head's kind (``logreg``...) or ``finetune``
    scores : callable -- uint8 images ``[N, 3, H, W]`` -> probabilities, the way
        ``fxtl predict`` computes them (the reference an export is checked against)
    """

    kind: str
    run: Path
    backbone: Any
    class_names: list[str]
    provenance: dict[str, Any]
    head: Any = None
    head_model: str = "finetune"
    scores: Callable[[np.ndarray], np.ndarray] | None = field(default=None, repr=False)


def load_run(run: Path, *, manifest_name: str) -> RunSource:
    """Load the head run or fine-tuned run at ``run`` (``manifest_name`` marks a fine-tune)."""
    if run.is_dir() and (run / manifest_name).is_file():
        return _load_finetuned(run, run / manifest_name)
    return _load_head_run(run)


def _load_head_run(run: Path) -> RunSource:
    import torch

    head = load_head(run)  # checks the head file against the sha256 in its sidecar
    bb = head_backbone(head)  # the weights found here must be the ones the features came from
    prov = dict(head.provenance)

    def scores(x: np.ndarray) -> np.ndarray:
        with torch.inference_mode():
            feats = bb(torch.from_numpy(x)).numpy()
        return head.scores(feats)

    provenance = {**bb.provenance, "head_model": head.model, "head_file": Path(head.path).name,
                  "head_sha256": sha256_file(Path(head.path)),
                  "head_fitted_on": prov.get("cache_fingerprint"), "dataset": prov.get("dataset")}
    return RunSource(kind="head", run=run, backbone=bb, class_names=list(head.class_names),
                     provenance=provenance, head=head.pipeline, head_model=head.model, scores=scores)


def _load_finetuned(run: Path, manifest_path: Path) -> RunSource:
    import torch

    try:
        manifest = read_json(manifest_path)
        weights = run / manifest.get("state_dict", "model.pt")
        recorded = manifest["weights_sha256"]
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise FxtlError(f"{manifest_path} is unreadable ({exc}); re-run the fine-tune") from None
    if not weights.is_file() or sha256_file(weights) != recorded:
        raise ProvenanceError(f"{weights} does not match the weights_sha256 in {manifest_path.name} "
                              "(missing, modified or replaced); re-run the fine-tune")
    bb = load_backbone(str(run), inference=True)
    names = list(bb.categories)
    n_out = int(getattr(bb.model.get_submodule(bb.classifier_name), "out_features", 0))
    if len(names) != n_out:
        raise FxtlError(f"{manifest_path} names {len(names)} classes but the network has {n_out} "
                        "outputs; re-run the fine-tune")

    def scores(x: np.ndarray) -> np.ndarray:
        with torch.inference_mode():
            _, logits = bb.forward_with_logits(torch.from_numpy(x))
        z = logits.numpy().astype(np.float64)
        e = np.exp(z - z.max(axis=1, keepdims=True))
        return e / e.sum(axis=1, keepdims=True)

    provenance = {**bb.provenance, "base_backbone": manifest.get("backbone"),
                  "base_weights_sha256": manifest.get("base_weights_sha256"),
                  "dataset": manifest.get("dataset"),
                  "dataset_fingerprint": manifest.get("dataset_fingerprint")}
    return RunSource(kind="finetune", run=run, backbone=bb, class_names=names,
                     provenance=provenance, scores=scores)
