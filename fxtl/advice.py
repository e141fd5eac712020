"""Which of the lecture's four scenarios is a dataset in? (``fxtl advise``)

The decision table (CS231n "Transfer Learning" notes, the lecture fxtl comes from):

=========  ===========================  ==================================================
scenario   data                         what to do
=========  ===========================  ==================================================
1          small, similar to ImageNet   transfer learning: train only a classifier head
2          large, similar               fine-tune the whole network
3          small, different             train as few layers as possible (last blocks, or
                                        a head on earlier-layer features)
4          large, different             fine-tune everything from pretrained weights (from
                                        scratch is possible, but rarely better)
=========  ===========================  ==================================================

Size is measured from the file list: training images per class (median) against
``large_per_class`` (default 1,000, about ImageNet's 1,300 per class: below it a network of
millions of parameters overfits when fully fine-tuned).

Similarity is estimated on a stratified sample (default 240 images; the rest are never
decoded, so advice on 30k images takes seconds), with one forward pass that yields, per image,
the backbone's own ImageNet prediction and its pooled features:

* **ImageNet familiarity** ``1 - H(p)/log(1000)``: one minus the mean normalised entropy of the
  ImageNet classifier's softmax. Photos of things ImageNet knows give confident, low-entropy
  predictions; digits, X-rays or synthetic renderings do not.
* **Feature advantage** ``(acc_deep - acc_pixels) / (1 - chance)``: 5-fold cross-validated
  accuracy of a linear probe (standardised ridge classifier) on the frozen pooled features,
  minus that of the same probe on raw pixels (16x16 thumbnails), as a fraction of the room
  above chance. Features learnt on a similar domain beat pixels by far; on a different domain
  they can even lose to them.

``similarity = 0.5 * clip((familiarity - 0.4) / 0.4) + 0.5 * clip(0.5 + advantage)``, in
[0, 1]; a dataset is *similar* at ``similarity >= 0.5``. A bootstrap over the sampled images
gives the score's 95% interval (``score_ci95``); when it straddles 0.5, or the size is near its
boundary, the explanation says the advice is not sure (:func:`certainty`). How the constants
were chosen, and on which data (five real datasets, with a paired test of head against
fine-tune), is in docs/advise.md.

Which backbone: the same sampled images are embedded by every compared backbone (by default the
installed Lite backbones, :func:`backbones_to_compare`) and the same probe is cross-validated on
the same folds; the commands switch from ``backbone`` to another one only when it is clearly
better (:data:`BACKBONE_RULE`, :func:`choose_backbone`). The scenario is always measured with
``backbone``.

The commands name the files they will write (the cache through
:func:`fxtl.features.extraction.planned_cache_path`, the run folders through ``--run-name``),
so they can be run as printed; ``Advice.outputs`` lists them.
"""
from __future__ import annotations

import shlex
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np

from ._util import default_cache_dir, slug
from .backbones.registry import (DEFAULT_BACKBONE, WeightsIdentity, load_backbone,
                                 packaged_backbones, parse_backbone_name)
from .data.discovery import ImageSet, discover
from .data.splits import check_run_name
from .errors import DataError, FxtlError, ParameterError
from .features.extraction import embed_paths, planned_cache_path
from .heads.config import HeadConfig
from .heads.params import check_seed
from .heads.registry import get_head
from .heads.source import LARGE_ROWS
from .heads.runs import Destination
from .report.comparison import SIGNIFICANCE
from .report.metrics import mcnemar_exact, wilson_interval

__all__ = ["advise", "Advice", "measure_similarity", "SCENARIOS", "certainty", "advised_method",
           "advice_verdict", "SIZE_NEAR_FACTOR", "choose_backbone", "backbones_to_compare",
           "BACKBONE_RULE"]

SCENARIOS = {
    1: ("small", "similar", "Transfer learning: train only a classifier on frozen features; "
        "fine-tuning this little data would overfit."),
    2: ("large", "similar", "Fine-tune the whole network: there is enough data, and the "
        "pretrained features are a good start."),
    3: ("small", "different", "Train as few layers as possible: fit heads on the frozen features "
        "of several layers (extract --layers auto; each head chooses its layers on the selection "
        "split, as earlier layers often transfer better to data unlike ImageNet), then fine-tune "
        "only the last blocks starting from a logistic-regression head on the penultimate features "
        "(LP-FT: --init-head with that run folder), and keep whichever wins on held-out data."),
    4: ("large", "different", "Fine-tune everything from the pretrained weights: training from "
        "scratch is possible with this much data, but pretrained initialisation is usually better."),
}
# Constants of the similarity score (see module docstring and docs/advise.md).
FAMILIARITY_FLOOR, FAMILIARITY_SPAN = 0.4, 0.4
SIMILAR_AT = 0.5
LARGE_PER_CLASS = 1000
# A median within this factor of large_per_class is "near" the size boundary: the lecture's
# small/large line is an order of magnitude, not a sharp threshold.
SIZE_NEAR_FACTOR = 2.0
PIXELS_SIDE = 16
# Scenario 3's fine-tune starts from the fitted logistic-regression head (LP-FT) with a milder
# random crop than finetune's default (0.25, 1): the head was fitted on centre crops, and on
# heavily cropped digits it is confidently wrong (first-epoch train loss 17.5 at (0.25, 1), 3.7
# at (0.8, 1) on the demo's digits). It runs at the input size the head's features were
# extracted at: folded into the network at 128 instead of 224 px the digits head scores 0.11.
# Measurements: docs/advise.md.
LP_FT_CROP_SCALE = (0.8, 1.0)
# When the Next commands switch to another backbone than the one the scenario was measured with:
# only when the sample says so beyond its noise. Probe accuracies on ~240 images have intervals
# about 6 points wide, so a larger network "winning" by a point or two is no reason to pay its
# slower extraction.
BACKBONE_RULE = ("a compared backbone replaces {reference} in the commands only when its probe is "
                 "more accurate on the same sampled images and the exact McNemar test against "
                 "{reference}'s probe gives p < {level}; otherwise the commands keep {reference}")


@dataclass
class Advice:
    """What ``advise`` found; ``to_dict()`` is the ``--json`` output."""

    scenario: int
    size: dict[str, Any]
    similarity: dict[str, Any]
    explanation: str
    commands: list[str]
    seconds: float
    data: str
    backbone: str
    extra: dict[str, Any] = field(default_factory=dict)
    # The linear probe of every compared backbone on the sampled images, the best and the one
    # the commands use (:func:`choose_backbone`).
    backbones: dict[str, Any] = field(default_factory=dict)
    # What the commands will write: the cache file, the run folders ("Next:" names them).
    outputs: dict[str, Any] = field(default_factory=dict)

    @property
    def recommended_backbone(self) -> str:
        """The backbone the commands use: :attr:`backbone` unless another probed clearly better."""
        return self.backbones.get("recommended") or self.backbone

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def _size(images: ImageSet, large_per_class: int) -> dict[str, Any]:
    train = [s for s in images.samples if s.split == "train"] or images.samples
    counts = np.bincount([s.label for s in train], minlength=len(images.class_names))
    median = float(np.median(counts))
    return {"images": len(images), "train_images": len(train), "classes": len(images.class_names),
            "images_per_class_median": median, "images_per_class_min": int(counts.min()),
            "images_per_class_max": int(counts.max()),
            "imbalance": float(counts.max() / max(counts.min(), 1)), "splits": images.splits,
            "large_per_class": large_per_class,
            "category": "large" if median >= large_per_class else "small"}


def _stratified_sample(images: ImageSet, n: int, seed: int) -> list[int]:
    rng = np.random.default_rng(seed)
    train = [i for i, s in enumerate(images.samples) if s.split == "train"] or list(range(len(images)))
    by_class: dict[int, list[int]] = {}
    for i in train:
        by_class.setdefault(images.samples[i].label, []).append(i)
    per = max(2, n // max(len(by_class), 1))
    chosen: list[int] = []
    for label in sorted(by_class):
        members = np.array(by_class[label])
        rng.shuffle(members)
        chosen += members[:per].tolist()
    return sorted(chosen)


def _probe_correct(X: np.ndarray, y: np.ndarray, seed: int) -> np.ndarray | None:
    """Per image: did the cross-validated linear probe get it right? (``None``: too few images)."""
    from sklearn.linear_model import RidgeClassifierCV
    from sklearn.model_selection import StratifiedKFold, cross_val_predict
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    folds = int(min(5, np.bincount(y)[np.bincount(y) > 0].min()))
    if folds < 2:
        return None
    probe = make_pipeline(StandardScaler(), RidgeClassifierCV(alphas=np.logspace(-1, 4, 11)))
    cv = StratifiedKFold(folds, shuffle=True, random_state=seed)
    return cross_val_predict(probe, X, y, cv=cv) == y


def _refuse_too_few(images: ImageSet, labels: list[int], *, after_decoding: bool = False) -> None:
    """The similarity probe is cross-validated: every class needs 2 usable images or the
    score would be NaN (and the advice a guess)."""
    counts = np.bincount(np.asarray(labels, dtype=int), minlength=len(images.class_names))
    present = counts[counts > 0]
    if len(present) >= 2 and present.min() >= 2:
        return
    what = "decodable " if after_decoding else ""
    if len(present) < 2:
        raise DataError(f"too few images to measure similarity in {images.root}: fewer than 2 "
                        f"classes have {what}training images; add images")
    few = [images.class_names[i] for i, c in enumerate(counts) if c == 1][:3]
    raise DataError(f"too few images to measure similarity in {images.root}: class(es) "
                    f"{', '.join(repr(c) for c in few)} have 1 {what}training image (the probe "
                    "needs 2 per class); add images")


def _similarity_score(familiarity: float | None, advantage: float) -> float:
    s_adv = float(np.clip(0.5 + advantage, 0, 1))
    if familiarity is None:  # backbone without an ImageNet head: features alone decide
        return s_adv
    s_fam = float(np.clip((familiarity - FAMILIARITY_FLOOR) / FAMILIARITY_SPAN, 0, 1))
    return 0.5 * s_fam + 0.5 * s_adv


def _score_interval(fam_i: np.ndarray | None, deep_ok: np.ndarray, pix_ok: np.ndarray,
                    chance: float, seed: int, resamples: int = 1000) -> list[float]:
    """95% percentile-bootstrap interval of the similarity score over the sampled images: how
    much another sample of the same data could move it."""
    rng = np.random.default_rng(seed)
    n = len(deep_ok)
    idx = rng.integers(0, n, size=(resamples, n))
    adv = (deep_ok[idx].mean(1) - pix_ok[idx].mean(1)) / max(1e-9, 1.0 - chance)
    fam = fam_i[idx].mean(1) if fam_i is not None else [None] * resamples
    scores = np.array([_similarity_score(f, a) for f, a in zip(fam, adv)])
    return [round(float(np.quantile(scores, 0.025)), 4), round(float(np.quantile(scores, 0.975)), 4)]


@dataclass(frozen=True)
class _Sample:
    """The sampled images as the first backbone embedded them: what the others are probed on."""

    paths: list[str]  # the images that decoded, in probe order
    labels: np.ndarray
    correct: np.ndarray | None  # per image: did the cross-validated probe get it right?
    identity: WeightsIdentity  # of the network that embedded them (names its cache)
    input_size: int | None
    seconds: float


def measure_similarity(images: ImageSet, *, backbone: str = DEFAULT_BACKBONE, sample: int = 240,
                       seed: int = 0, device: str = "auto", precision: str = "auto",
                       progress: bool = False) -> dict[str, Any]:
    """Similarity of ``images`` to the backbone's source domain, measured on a sample."""
    return _measure(images, backbone=backbone, sample=sample, seed=seed, device=device,
                    precision=precision, progress=progress)[0]


def _measure(images: ImageSet, *, backbone: str, sample: int, seed: int, device: str,
             precision: str, progress: bool) -> tuple[dict[str, Any], _Sample]:
    import torch
    from PIL import Image

    from .data.images import ImageDecodeError, open_image

    t0 = time.perf_counter()
    idx = _stratified_sample(images, sample, seed)
    _refuse_too_few(images, [images.samples[i].label for i in idx])
    bb = load_backbone(backbone, inference=True)
    paths = [str(images.abspath(images.samples[i])) for i in idx]
    feats, logits, keep = [], [], []
    for rows, f, lg, bad in embed_paths(bb, paths, device=device, precision=precision,
                                        with_logits=True, progress=progress, desc="advise"):
        bad_rows = {i for i, _ in bad}
        ok = [k for k, r in enumerate(rows.tolist()) if r not in bad_rows]
        feats.append(f[ok])
        logits.append(lg[ok])
        keep += [int(rows[k]) for k in ok]
    if not keep:
        raise FxtlError(f"none of the {len(paths)} sampled images under {images.root} could be decoded")
    F, L = np.concatenate(feats), np.concatenate(logits)
    y = np.array([images.samples[idx[k]].label for k in keep])
    _refuse_too_few(images, y.tolist(), after_decoding=True)
    seconds = time.perf_counter() - t0
    pixels = []
    for k in keep:
        try:
            im = open_image(paths[k], draft_size=64).convert("L").resize((PIXELS_SIDE, PIXELS_SIDE),
                                                                          Image.Resampling.BILINEAR)
        except ImageDecodeError:  # pragma: no cover - decoded fine a moment ago
            im = Image.new("L", (PIXELS_SIDE, PIXELS_SIDE))
        pixels.append(np.asarray(im, dtype=np.float32).ravel() / 255.0)
    P = np.stack(pixels)
    familiarity, fam_i = None, None
    if L.shape[1] == 1000 and bb.categories:
        p = torch.from_numpy(L).float().softmax(-1).numpy()
        fam_i = 1.0 - (-(p * np.log(p + 1e-12)).sum(1) / np.log(p.shape[1]))
        familiarity = float(fam_i.mean())
        top = np.bincount(p.argmax(1), minlength=p.shape[1])
        top_classes = [(bb.categories[i], int(c)) for i, c in
                       sorted(enumerate(top), key=lambda t: -t[1])[:3] if c]
        mean_max = float(p.max(1).mean())
    deep_ok, pix_ok = _probe_correct(F, y, seed), _probe_correct(P, y, seed)
    acc_deep = float(deep_ok.mean()) if deep_ok is not None else float("nan")
    acc_pix = float(pix_ok.mean()) if pix_ok is not None else float("nan")
    chance = float(np.bincount(y).max() / len(y))
    advantage = (acc_deep - acc_pix) / max(1e-9, 1.0 - chance)
    score = _similarity_score(familiarity, advantage)
    out = {"score": round(float(score), 4), "category": "similar" if score >= SIMILAR_AT else "different",
           "sample": len(keep), "probe_accuracy_features": round(acc_deep, 4),
           "probe_accuracy_pixels": round(acc_pix, 4), "chance": round(chance, 4),
           "feature_advantage": round(float(advantage), 4), "similar_at": SIMILAR_AT,
           "score_ci95": (_score_interval(fam_i, deep_ok, pix_ok, chance, seed)
                          if deep_ok is not None and pix_ok is not None else None)}
    if familiarity is not None:
        out.update({"imagenet_familiarity": round(familiarity, 4),
                    "imagenet_mean_max_softmax": round(mean_max, 4),
                    "imagenet_top_predictions": top_classes})
    crop = getattr(bb.preprocessing, "crop", None)
    return out, _Sample(paths=[paths[k] for k in keep], labels=y, correct=deep_ok,
                        identity=WeightsIdentity(bb.weights_sha256, bb.preprocessing),
                        input_size=crop, seconds=seconds)


# --------------------------------------------------------------------- which backbone probes best
def backbones_to_compare(backbones: str | Sequence[str], *, reference: str = DEFAULT_BACKBONE
                         ) -> tuple[list[str], list[dict[str, Any]]]:
    """The backbones whose probes advise compares, and the packaged ones it cannot (not installed).

    ``"auto"``: ``reference`` and, when it is one of the registry's packaged backbones (``lite0``,
    ``lite1``, ``lite2``), the other packaged ones that are installed. A name or a list: those,
    ``reference`` first (the scenario is measured with it).

    Returns
    -------
    (list of str, list of dict)
        The names to probe, and :func:`~fxtl.backbones.registry.packaged_backbones` rows of those
        ``"auto"`` left out because their weights package is missing.

    Examples
    --------
    >>> backbones_to_compare("lite2, lite0", reference="lite0")
    (['lite0', 'lite2'], [])
    """
    if isinstance(backbones, str) and backbones.strip() == "auto":
        packaged = packaged_backbones()
        if reference not in {p["name"] for p in packaged}:
            return [reference], []
        names = [reference] + [p["name"] for p in packaged if p["installed"] and p["name"] != reference]
        return names, [p for p in packaged if not p["installed"] and p["name"] != reference]
    given = backbones.split(",") if isinstance(backbones, str) else list(backbones)
    if not all(isinstance(b, str) for b in given):
        raise ParameterError("backbones", f"backbones must be 'auto' or backbone names, got {backbones!r}")
    names = [reference]
    for name in (b.strip() for b in given):
        if name and name not in names:
            parse_backbone_name(name)  # an unknown name fails here, before any network is built
            names.append(name)
    return names, []


def _probe_backbone(name: str, sample: _Sample, *, seed: int, device: str, precision: str,
                    progress: bool) -> tuple[np.ndarray | None, dict[str, Any], WeightsIdentity]:
    """Embed the sampled images with ``name`` and cross-validate the same probe on the same folds."""
    t0 = time.perf_counter()
    bb = load_backbone(name, inference=True)
    order, parts, failed = [], [], 0
    for rows, f, _, bad in embed_paths(bb, sample.paths, device=device, precision=precision,
                                       progress=progress, desc=f"advise {Path(name).name}"):
        bad_rows = {i for i, _ in bad}
        failed += len(bad_rows)
        ok = [k for k, r in enumerate(rows.tolist()) if r not in bad_rows]
        parts.append(f[ok])
        order += [int(rows[k]) for k in ok]
    identity = WeightsIdentity(bb.weights_sha256, bb.preprocessing)
    info = {"backbone": name, "input_size": getattr(bb.preprocessing, "crop", None),
            "seconds": round(time.perf_counter() - t0, 2)}  # as the first's: build + embed
    if failed or order != list(range(len(sample.paths))):
        # Same decoder as the first backbone; a file that changed in between is not compared.
        return None, {**info, "note": f"{failed} sampled image(s) failed to decode: not compared"}, identity
    correct = _probe_correct(np.concatenate(parts), sample.labels, seed)
    return correct, info, identity


def _probe_row(info: dict[str, Any], correct: np.ndarray, reference_correct: np.ndarray | None,
               reference: str) -> dict[str, Any]:
    n, k = int(correct.size), int(correct.sum())
    lo, hi = wilson_interval(k, n)
    row = {**info, "n": n, "correct": k, "probe_accuracy": round(k / n, 4),
           "probe_accuracy_ci95": [round(lo, 4), round(hi, 4)]}
    if reference_correct is not None and info["backbone"] != reference:
        t = mcnemar_exact(correct, reference_correct)
        row["paired"] = {"against": reference, "only_this_correct": t["a_only_correct"],
                         "only_reference_correct": t["b_only_correct"],
                         "p_value": round(float(t["p_value"]), 4), "test": t["test"]}
    return row


def choose_backbone(rows: Sequence[dict[str, Any]], *, reference: str) -> dict[str, str]:
    """The best probe, and the backbone the commands use under :data:`BACKBONE_RULE`.

    ``rows`` are the per-backbone probe results (``backbone``, ``probe_accuracy`` and, for every
    backbone but ``reference``, ``paired`` with the exact McNemar ``p_value`` against it).

    Examples
    --------
    >>> rows = [{"backbone": "lite0", "probe_accuracy": 0.95},
    ...         {"backbone": "lite2", "probe_accuracy": 0.97, "paired": {"p_value": 0.18}}]
    >>> choose_backbone(rows, reference="lite0")
    {'best': 'lite2', 'recommended': 'lite0'}
    >>> rows[1]["paired"]["p_value"] = 0.01
    >>> choose_backbone(rows, reference="lite0")["recommended"]
    'lite2'
    """
    scored = [r for r in rows if r.get("probe_accuracy") is not None]
    ref = next((r for r in scored if r["backbone"] == reference), None)
    if ref is None:
        return {"best": reference, "recommended": reference}
    # ties go to the reference, then to the earlier (listed first: usually smaller) backbone
    best = max(scored, key=lambda r: (r["probe_accuracy"], r is ref, -scored.index(r)))
    clear = [r for r in scored if r is not ref and r["probe_accuracy"] > ref["probe_accuracy"]
             and r.get("paired", {}).get("p_value", 1.0) < SIGNIFICANCE]
    chosen = max(clear, key=lambda r: (r["probe_accuracy"], -scored.index(r))) if clear else ref
    return {"best": best["backbone"], "recommended": chosen["backbone"]}


def _compare_backbones(names: list[str], missing: list[dict[str, Any]], sample: _Sample, *,
                       reference: str, seed: int, device: str, precision: str, progress: bool
                       ) -> tuple[dict[str, Any], dict[str, WeightsIdentity]]:
    identities = {reference: sample.identity}
    rows = []
    if sample.correct is not None:
        rows.append(_probe_row({"backbone": reference, "input_size": sample.input_size,
                                "seconds": round(sample.seconds, 2)}, sample.correct, None, reference))
    for name in names[1:]:
        try:
            correct, info, identities[name] = _probe_backbone(
                name, sample, seed=seed, device=device, precision=precision, progress=progress)
        except FxtlError as exc:  # a comparison that cannot run leaves the advice standing
            rows.append({"backbone": name, "note": f"not compared: {exc}"})
            continue
        rows.append(_probe_row(info, correct, sample.correct, reference) if correct is not None else info)
    pick = choose_backbone(rows, reference=reference)
    rule = BACKBONE_RULE.format(reference=reference, level=SIGNIFICANCE)
    extras = sorted({p["extra"] for p in missing if p["extra"]})
    install = " or ".join(f"pip install 'fxtl[{e}]'" for e in extras) or None
    out = {"sample": len(sample.paths), "compared": rows, **pick, "rule": rule,
           "not_installed": [p["name"] for p in missing], "install": install}
    out["text"] = _backbones_text(out, reference=reference)
    return out, identities


def _backbones_text(d: dict[str, Any], *, reference: str) -> str:
    rows = [r for r in d["compared"] if "probe_accuracy" in r]
    missing = ""
    if d["not_installed"]:
        missing = (f"{d['install'] or 'installing their weights packages'} would let advise compare "
                   f"{', '.join(d['not_installed'])} on this sample too.")
    failed = "".join(f" {r['backbone']} {r['note']}." for r in d["compared"] if "note" in r)
    if len(rows) < 2:
        only = f"Backbones: only {reference} probed"
        if missing or failed:
            return f"{only}." + (f" {missing}" if missing else "") + failed
        return f"{only} (--backbones lite0,lite1,... compares others)."

    def one(r: dict[str, Any]) -> str:
        lo, hi = r["probe_accuracy_ci95"]
        p = r.get("paired", {}).get("p_value")
        return (f"{r['backbone']} {r['probe_accuracy']:.3f} [{lo:.3f}, {hi:.3f}]"
                + (f" (p = {p:.2g} vs {reference})" if p is not None else ""))

    text = (f"Backbones, linear probe on the same {d['sample']} sampled images (95% intervals): "
            + ", ".join(one(r) for r in rows) + ". ")
    best, chosen = d["best"], d["recommended"]
    ref_s = next((r.get("seconds") for r in rows if r["backbone"] == reference), None)
    if chosen != reference:
        s = next(r.get("seconds") for r in rows if r["backbone"] == chosen)
        slower = f" (its sample took {s / ref_s:.1f}x {reference}'s time)" if ref_s and s else ""
        text += f"{chosen} probes clearly better than {reference}: the commands use it{slower}."
    elif best != reference:
        text += (f"Best: {best}, but within noise of {reference} (exact McNemar p >= {SIGNIFICANCE}): "
                 f"the commands keep {reference}.")
    else:
        text += f"Best: {reference}; the commands use it."
    return text + (f" {missing}" if missing else "") + failed


# ----------------------------------------------------------------------------- the Next commands
def _free_run_name(base: str, folders: Callable[[str], list[Path]]) -> str:
    """``base``, or ``base-2``, ``base-3``... : the first name none of whose run folders exists
    (a run folder is never overwritten, so a taken name would make the command fail)."""
    base = base if _valid_run_name(base) else f"run-{base}"
    for i in range(1, 1000):
        name = base if i == 1 else f"{base}-{i}"
        if not any(f.exists() for f in folders(name)):
            return name
    return f"{base}-{time.strftime('%Y%m%d-%H%M%S')}"


def _valid_run_name(name: str) -> bool:
    try:
        check_run_name(name)
    except ParameterError:
        return False
    return True


def _next_steps(scenario: int, *, data: str, backbone: str, images: ImageSet | None = None,
                identity: WeightsIdentity | None = None, cache_dir: str | Path | None = None,
                device: str = "auto", precision: str = "auto") -> tuple[list[str], dict[str, Any]]:
    """The commands of ``scenario``, with the files they will write named: the cache through
    :func:`~fxtl.features.extraction.planned_cache_path` (``CACHE`` when it cannot be known,
    e.g. without ``images``), the run folders through an explicit ``--run-name`` that is free now."""
    q = shlex.quote
    home = Path(cache_dir) if cache_dir is not None else default_cache_dir()
    runs_dir = home / "runs"
    opt_b = "" if backbone == DEFAULT_BACKBONE else f" --backbone {q(backbone)}"
    opt_c = "" if cache_dir is None else f" --cache-dir {q(str(cache_dir))}"
    opt_d = "".join(f" --{k} {v}" for k, v in (("device", device), ("precision", precision)) if v != "auto")
    layers = "auto" if scenario == 3 else None  # heads on several layers: scenario 3 only
    cache = None
    if images is not None:
        cache = planned_cache_path(images, backbone=backbone, layers=layers, precision=precision,
                                   device=device, cache_dir=home, identity=identity)
    c = q(str(cache)) if cache is not None else "CACHE"
    models = HeadConfig(models=("all",)).models if scenario in (1, 3) else ("logreg",)
    if images is not None and len(images) > LARGE_ROWS:  # fit-head skips heads that cannot scale
        models = tuple(m for m in models if get_head(m).stream is not None)

    def folders(name: str) -> dict[str, list[Path]]:
        heads = Destination(runs_dir=runs_dir, run_name=name if len(models) > 1 else f"{name}-logreg")
        out = {"heads": heads.exact_folders(models)}
        if scenario == 3:
            out["start"] = [runs_dir / f"{name}-start"]
        if scenario != 1:
            out["finetune"] = [runs_dir / f"{name}-finetune"]
        return out

    base = f"{slug(images.name if images is not None else Path(data).name)}-{slug(Path(backbone).name)}"
    name = _free_run_name(base, lambda n: [f for fs in folders(n).values() for f in fs])
    where = folders(name)
    heads_name = name if len(models) > 1 else f"{name}-logreg"
    extract = f"fxtl extract {q(data)}{opt_b}" + (f" --layers {layers}" if layers else "") + opt_d + opt_c
    fit = (f"fxtl fit-head {c} --model {'all' if len(models) > 1 else 'logreg'}"
           + (f" --layers {layers}" if layers else "") + f" --run-name {heads_name}{opt_c}")
    finetune = f"fxtl finetune {q(data)}{opt_b}"
    compared = list(where["heads"]) + where.get("finetune", [])
    compare = "fxtl compare " + " ".join(q(str(r)) for r in compared) + opt_c
    if scenario == 1:
        cmds = [extract, fit, compare]
    elif scenario == 3:
        lo, hi = LP_FT_CROP_SCALE
        # The fine-tune folds its start head into the network's classifier, which sees the
        # penultimate features only: that head is fitted on them, beside the heads that choose.
        start = (f"fxtl fit-head {c} --model logreg --layers penultimate --run-name {name}-start"
                 f"{opt_c}")
        cmds = [extract, fit, start,
                f"{finetune} --trainable last:2 --init-head {q(str(where['start'][0]))} "
                f"--crop-scale {lo} {hi} --run-name {name}-finetune{opt_d}{opt_c}", compare]
    else:
        epochs = " --epochs 15" if scenario == 4 else ""
        cmds = [f"{finetune} --trainable all{epochs} --run-name {name}-finetune{opt_d}{opt_c}",
                extract, fit, compare]
    outputs = {"cache": str(cache) if cache is not None else None, "runs_dir": str(runs_dir),
               "run_name": name, "head_runs": [str(f) for f in where["heads"]],
               "start_head": str(where["start"][0]) if "start" in where else None,
               "finetune_run": str(where["finetune"][0]) if "finetune" in where else None,
               "layers": layers}
    return cmds, outputs


def _commands(scenario: int, data: str, backbone: str, **where: Any) -> list[str]:
    return _next_steps(scenario, data=data, backbone=backbone, **where)[0]


def advise(data: str | Path, *, backbone: str = DEFAULT_BACKBONE,
           backbones: str | Sequence[str] = "auto", sample: int = 240,
           large_per_class: int = LARGE_PER_CLASS, seed: int = 0, device: str = "auto",
           precision: str = "auto", cache_dir: str | Path | None = None,
           progress: bool = False) -> Advice:
    """Measure size and similarity of a dataset and say which scenario (1-4) it is in.

    Parameters
    ----------
    data : str or Path
        DATA_DIR or CSV manifest.
    backbone : str
        The backbone whose source domain similarity is measured against.
    backbones : "auto", str or sequence of str
        Backbones whose linear probes are compared on the same sampled images (the best one goes
        into the commands when it is clearly better, :data:`BACKBONE_RULE`). ``"auto"``:
        ``backbone`` and the other installed Lite backbones (``lite1``, ``lite2`` with
        ``pip install 'fxtl[lite]'``); ``[backbone]`` probes that one only (the fastest).
    sample : int
        Images decoded for the similarity estimate (stratified over classes, from train).
    large_per_class : int
        Median training images per class from which a dataset counts as large.
    cache_dir : path, optional
        Where the commands will write (default ``./cache`` or ``$FXTL_CACHE``); when given, the
        commands pass it on as ``--cache-dir``. Advise itself writes nothing.

    Returns
    -------
    Advice
        ``commands`` name the cache file ``extract`` will write and the run folders (through
        ``--run-name``), so they can be run as printed, in order; ``outputs`` lists them.

    Examples
    --------
    >>> a = advise("data/hymenoptera")   # doctest: +SKIP
    >>> a.scenario, a.backbones["recommended"]   # doctest: +SKIP
    (1, 'lite0')
    """
    t0 = time.perf_counter()
    if sample < 10:
        raise ParameterError("sample", f"sample must be at least 10 images, got {sample}")
    check_seed(seed)
    names, missing = backbones_to_compare(backbones, reference=backbone)
    images = discover(data)
    size = _size(images, large_per_class)
    sim, sampled = _measure(images, backbone=backbone, sample=sample, seed=seed, device=device,
                            precision=precision, progress=progress)
    compared, identities = _compare_backbones(names, missing, sampled, reference=backbone,
                                              seed=seed, device=device, precision=precision,
                                              progress=progress)
    scenario = {("small", "similar"): 1, ("large", "similar"): 2, ("small", "different"): 3,
                ("large", "different"): 4}[(size["category"], sim["category"])]
    why = (f"{size['train_images']} training images in {size['classes']} classes "
           f"(median {size['images_per_class_median']:.0f} per class: {size['category']}, "
           f"large from {large_per_class}); similarity {sim['score']:.2f} "
           f"({sim['category']}: frozen features {sim['probe_accuracy_features']:.2f} vs raw "
           f"pixels {sim['probe_accuracy_pixels']:.2f} in a linear probe"
           + (f", ImageNet familiarity {sim['imagenet_familiarity']:.2f}" if "imagenet_familiarity" in sim else "")
           + f"). Scenario {scenario}: {SCENARIOS[scenario][2]}")
    sure = certainty(size, sim)
    use = compared["recommended"]
    commands, outputs = _next_steps(scenario, data=str(data), backbone=use, images=images,
                                    identity=identities.get(use), cache_dir=cache_dir,
                                    device=device, precision=precision)
    return Advice(scenario=scenario, size=size, similarity=sim, explanation=f"{why} {sure['text']}",
                  commands=commands, seconds=round(time.perf_counter() - t0, 3), data=str(data),
                  backbone=backbone, extra={"certainty": sure}, backbones=compared, outputs=outputs)


def certainty(size: dict[str, Any], similarity: dict[str, Any]) -> dict[str, Any]:
    """How sure the scenario is: ``clear``, or ``near the boundary`` with the reasons.

    Similarity is near its boundary when the 95% bootstrap interval of the score over the
    sampled images (``score_ci95``) contains ``similar_at``: another sample of the same data
    could land on the other side. Size is near when the median per class is within
    :data:`SIZE_NEAR_FACTOR` of ``large_per_class``.

    Examples
    --------
    >>> certainty({"images_per_class_median": 120, "large_per_class": 1000},
    ...           {"score": 0.55, "score_ci95": [0.47, 0.62], "similar_at": 0.5})["level"]
    'near the boundary'
    """
    reasons = []
    ci, at = similarity.get("score_ci95"), similarity.get("similar_at", SIMILAR_AT)
    score = similarity.get("score")
    if ci and ci[0] <= at <= ci[1]:
        reasons.append(f"similarity {score:.2f} (95% interval {ci[0]:.2f}-{ci[1]:.2f} over the "
                       f"sampled images) straddles the {at} boundary")
    median, large = size.get("images_per_class_median"), size.get("large_per_class", LARGE_PER_CLASS)
    if median is not None and large / SIZE_NEAR_FACTOR <= median <= large * SIZE_NEAR_FACTOR:
        reasons.append(f"{median:.0f} images per class is within {SIZE_NEAR_FACTOR:g}x of the "
                       f"{large} boundary between small and large")
    if reasons:
        text = ("How sure: not very: " + "; ".join(reasons) + ". The neighbouring scenario is "
                "nearly as likely: run both paths and let `fxtl compare` decide.")
        return {"level": "near the boundary", "reasons": reasons, "text": text}
    parts = []
    if ci:
        parts.append(f"similarity 95% interval {ci[0]:.2f}-{ci[1]:.2f}, clear of {at}")
    if median is not None:
        parts.append(f"{median:.0f} images per class, far from {large}")
    return {"level": "clear", "reasons": [],
            "text": "How sure: clear (" + "; ".join(parts) + ")." if parts else "How sure: clear."}


def advised_method(scenario: int) -> str:
    """``"head"`` for scenario 1 (a classifier on frozen features), ``"finetune"`` otherwise."""
    return "head" if scenario == 1 else "finetune"


def advice_verdict(scenario: int, pair: dict[str, Any] | None) -> dict[str, Any]:
    """Did the advice hold? From the paired test of the best head (``a``) against the fine-tune
    (``b``), as :func:`fxtl.report.comparison.paired_test` returns it.

    ``held``: the advised method is better and the difference significant (exact McNemar,
    p < 0.05); ``tied``: not significant; ``failed``: the other method is significantly better;
    ``untested``: no paired test (no fine-tune, or no per-image predictions).

    Examples
    --------
    >>> advice_verdict(3, {"a_method": "head:logreg", "b_method": "finetune:last:2",
    ...                    "a_accuracy": 0.82, "b_accuracy": 0.74, "p_value": 0.09, "n": 150,
    ...                    "split": "test", "a_only_correct": 20, "b_only_correct": 8})["verdict"]
    'tied'
    """
    from .report.comparison import SIGNIFICANCE, describe_pair

    advised = advised_method(scenario)
    if not pair or pair.get("p_value") is None:
        why = pair.get("note") if pair else "no fine-tune beside the heads"
        return {"advised": advised, "winner": None, "verdict": "untested", "p_value": None,
                "text": f"Advice (scenario {scenario}: {advised}) untested: {why}."}
    a, b = pair["a_accuracy"], pair["b_accuracy"]
    better = "head" if a > b else "finetune" if b > a else None
    if pair["p_value"] >= SIGNIFICANCE or better is None:
        verdict = "tied"
    else:
        verdict = "held" if better == advised else "failed"
    return {"advised": advised, "winner": better if verdict != "tied" else None,
            "verdict": verdict, "p_value": pair["p_value"],
            "text": f"Advice (scenario {scenario}: {advised}) {verdict}: {describe_pair(pair)}."}
