"""Which backbone probes best on advise's sample (``fxtl advise --backbones``).

The sampled images, as the first backbone embedded them (:class:`ProbeSample`), are embedded by
every compared backbone, and the same linear probe (:func:`probe_correct`: a standardised ridge
classifier with its own alpha CV) is cross-validated on the same folds. Each backbone gets its
probe accuracy with a 95% Wilson interval, every one but the first is paired with it image by
image (exact McNemar), and :func:`choose_backbone` applies :data:`BACKBONE_RULE`: another
backbone replaces the first in the commands only when it is clearly better. docs/advise.md
says why the bar is high.
"""
from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from .backbones.registry import (DEFAULT_BACKBONE, WeightsIdentity, load_backbone,
                                 packaged_backbones, parse_backbone_name)
from .errors import FxtlError, ParameterError
from .features.extraction import embed_paths
from .report.comparison import SIGNIFICANCE
from .report.metrics import mcnemar_exact, wilson_interval

__all__ = ["ProbeSample", "probe_correct", "backbones_to_compare", "choose_backbone",
           "compare_backbones", "BACKBONE_RULE"]

# When the Next commands switch to another backbone than the one the scenario was measured with:
# only when the sample says so beyond its noise. Probe accuracies on ~240 images have intervals
# about 6 points wide, so a larger network "winning" by a point or two is no reason to pay its
# slower extraction.
BACKBONE_RULE = ("a compared backbone replaces {reference} in the commands only when its probe is "
                 "more accurate on the same sampled images and the exact McNemar test against "
                 "{reference}'s probe gives p < {level}; otherwise the commands keep {reference}")


@dataclass(frozen=True)
class ProbeSample:
    """The sampled images as the first backbone embedded them: what the others are probed on."""

    paths: list[str]  # the images that decoded, in probe order
    labels: np.ndarray
    correct: np.ndarray | None  # per image: did the cross-validated probe get it right?
    identity: WeightsIdentity  # of the network that embedded them (names its cache)
    input_size: int | None
    seconds: float


def probe_correct(X: np.ndarray, y: np.ndarray, *, seed: int) -> np.ndarray | None:
    """Per image: did the cross-validated linear probe get it right? (``None``: too few images).

    The probe is a standardised ridge classifier with its own alpha CV, cross-validated on
    stratified folds (5, or fewer when a class has fewer images) shuffled with ``seed``: the same
    seed and labels give the same folds, so two feature sets of the same images pair up.
    """
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


def _probe_backbone(name: str, sample: ProbeSample, *, seed: int, device: str, precision: str,
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
    correct = probe_correct(np.concatenate(parts), sample.labels, seed=seed)
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


def compare_backbones(*, names: Sequence[str], missing: Sequence[dict[str, Any]],
                      sample: ProbeSample, reference: str, seed: int, device: str = "auto",
                      precision: str = "auto", progress: bool = False
                      ) -> tuple[dict[str, Any], dict[str, WeightsIdentity]]:
    """Probe every backbone of ``names`` on ``sample`` and pick the one the commands use.

    Parameters
    ----------
    names : sequence of str
        ``reference`` first (its probe is ``sample.correct``, measured already), then the others
        (:func:`backbones_to_compare`).
    missing : sequence of dict
        Packaged backbones left out because they are not installed (named in the text).
    sample : ProbeSample
        The sampled images as ``reference`` embedded them.

    Returns
    -------
    (dict, dict)
        ``Advice.backbones`` (``compared`` rows, ``best``, ``recommended``, ``rule``, ``text``...)
        and the weights identity of every backbone built (it names its cache).
    """
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
