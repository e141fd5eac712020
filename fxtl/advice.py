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
"""
from __future__ import annotations

import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from .backbones.registry import DEFAULT_BACKBONE, load_backbone
from .data.discovery import ImageSet, discover
from .errors import DataError, FxtlError, ParameterError
from .heads.params import check_seed

__all__ = ["advise", "Advice", "measure_similarity", "SCENARIOS", "certainty", "advised_method",
           "advice_verdict", "SIZE_NEAR_FACTOR"]

SCENARIOS = {
    1: ("small", "similar", "Transfer learning: train only a classifier on frozen features; "
        "fine-tuning this little data would overfit."),
    2: ("large", "similar", "Fine-tune the whole network: there is enough data, and the "
        "pretrained features are a good start."),
    3: ("small", "different", "Train as few layers as possible: fit heads on the frozen features, "
        "then fine-tune only the last blocks starting from the logistic-regression head "
        "(LP-FT: --init-head with the logreg run folder), and keep whichever wins on held-out data."),
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


def measure_similarity(images: ImageSet, *, backbone: str = DEFAULT_BACKBONE, sample: int = 240,
                       seed: int = 0, device: str = "auto", precision: str = "auto",
                       progress: bool = False) -> dict[str, Any]:
    """Similarity of ``images`` to the backbone's source domain, measured on a sample."""
    import torch
    from PIL import Image

    from .features.extraction import embed_paths
    from .data.images import ImageDecodeError, open_image

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
    return out


def _commands(scenario: int, data: str, backbone: str) -> list[str]:
    d = f'"{data}"' if " " in data else data
    b = "" if backbone == DEFAULT_BACKBONE else f" --backbone {backbone}"
    if scenario == 1:
        return [f"fxtl extract {d}{b}", "fxtl fit-head CACHE --model all", "fxtl compare"]
    if scenario == 2:
        return [f"fxtl finetune {d}{b} --trainable all", f"fxtl extract {d}{b}",
                "fxtl fit-head CACHE --model logreg", "fxtl compare"]
    if scenario == 3:
        lo, hi = LP_FT_CROP_SCALE
        return [f"fxtl extract {d}{b}", "fxtl fit-head CACHE --model all",
                f"fxtl finetune {d}{b} --trainable last:2 --init-head LOGREG_RUN --crop-scale {lo} {hi}",
                "fxtl compare"]
    return [f"fxtl finetune {d}{b} --trainable all --epochs 15", f"fxtl extract {d}{b}",
            "fxtl fit-head CACHE --model logreg", "fxtl compare"]


def advise(data: str | Path, *, backbone: str = DEFAULT_BACKBONE, sample: int = 240,
           large_per_class: int = LARGE_PER_CLASS, seed: int = 0, device: str = "auto",
           precision: str = "auto", progress: bool = False) -> Advice:
    """Measure size and similarity of a dataset and say which scenario (1-4) it is in.

    Parameters
    ----------
    data : str or Path
        DATA_DIR or CSV manifest.
    backbone : str
        The backbone whose source domain similarity is measured against.
    sample : int
        Images decoded for the similarity estimate (stratified over classes, from train).
    large_per_class : int
        Median training images per class from which a dataset counts as large.

    Returns
    -------
    Advice

    Examples
    --------
    >>> a = advise("data/hymenoptera")   # doctest: +SKIP
    >>> a.scenario                       # doctest: +SKIP
    1
    """
    t0 = time.perf_counter()
    if sample < 10:
        raise ParameterError("sample", f"sample must be at least 10 images, got {sample}")
    check_seed(seed)
    images = discover(data)
    size = _size(images, large_per_class)
    sim = measure_similarity(images, backbone=backbone, sample=sample, seed=seed, device=device,
                             precision=precision, progress=progress)
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
    return Advice(scenario=scenario, size=size, similarity=sim, explanation=f"{why} {sure['text']}",
                  commands=_commands(scenario, str(data), backbone),
                  seconds=round(time.perf_counter() - t0, 3), data=str(data), backbone=backbone,
                  extra={"certainty": sure})


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
