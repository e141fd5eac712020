"""What ``fxtl advise`` recommends per scenario, and the "Next:" commands that run it.

:data:`RECOMMENDATIONS` says, per scenario, which method the advice recommends and which it is
compared with; :func:`next_steps` writes the commands with the files they will write named (the
cache through :func:`fxtl.features.extraction.planned_cache_path`, the run folders through an
explicit ``--run-name`` that is free now), so they can be run as printed, in order;
:func:`recommendation` says which of them is the recommendation and which the comparison.
"""
from __future__ import annotations

import shlex
import time
from pathlib import Path
from typing import Any, Callable, Sequence

from ._util import default_cache_dir, slug
from .backbones.registry import DEFAULT_BACKBONE, WeightsIdentity
from .data.discovery import ImageSet
from .data.splits import check_run_name
from .errors import ParameterError
from .features.extraction import planned_cache_path
from .heads.config import HeadConfig
from .heads.registry import get_head
from .heads.runs import Destination
from .heads.source import LARGE_ROWS

__all__ = ["next_steps", "recommendation", "RECOMMENDATIONS", "LP_FT_CROP_SCALE"]

# Per scenario: the method the advice recommends ("head" or "finetune", what advice_verdict
# judges), its name in one line, what it is, and the method the commands run beside it to test
# it (None: the commands compare heads only). Scenario 3 ("train as few layers as possible")
# recommends the head on the layers it chooses: it trains no layer of the network, and on the
# calibration's data unlike ImageNet it matched or beat the LP-FT fine-tune (docs/layers.md),
# which stays in the commands as the comparison.
RECOMMENDATIONS: dict[int, dict[str, Any]] = {
    1: {"method": "head", "label": "head",
        "what": "every head on the frozen penultimate features (fit-head --model all)",
        "comparison": None},
    2: {"method": "finetune", "label": "fine-tune",
        "what": "the whole network fine-tuned (finetune --trainable all)",
        "comparison": {"method": "head", "what": "a logistic-regression head on the frozen features"}},
    3: {"method": "head", "label": "several-layer head",
        "what": "every head on the frozen features of the layers it chooses on the selection "
                "split (extract --layers auto, fit-head --model all --layers auto)",
        "comparison": {"method": "finetune",
                       "what": "the last two blocks fine-tuned from a logistic-regression head on "
                               "the penultimate features (LP-FT: finetune --trainable last:2 "
                               "--init-head)"}},
    4: {"method": "finetune", "label": "fine-tune",
        "what": "the whole network fine-tuned from the pretrained weights, 15 epochs "
                "(finetune --trainable all --epochs 15)",
        "comparison": {"method": "head", "what": "a logistic-regression head on the frozen features"}},
}
# Scenario 3's fine-tune starts from the fitted logistic-regression head (LP-FT) with a milder
# random crop than finetune's default (0.25, 1): the head was fitted on centre crops, and on
# heavily cropped small images (digits) it is confidently wrong, so large errors flow into the
# pretrained blocks. It runs at the input size the head's features were extracted at: folded into
# the network at another size the head is not valid. Measurements: docs/advise.md.
LP_FT_CROP_SCALE = (0.8, 1.0)


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


def next_steps(scenario: int, *, data: str, backbone: str, images: ImageSet | None = None,
               identity: WeightsIdentity | None = None, cache_dir: str | Path | None = None,
               device: str = "auto", precision: str = "auto") -> tuple[list[str], dict[str, Any]]:
    """The commands of ``scenario``, with the files they will write named.

    Parameters
    ----------
    scenario : int
        1-4.
    data : str
        DATA_DIR or CSV manifest, as the commands name it.
    backbone : str
        The backbone the commands use.
    images : ImageSet, optional
        The discovered data: without it the cache cannot be named (``CACHE`` stands for it).
    identity : WeightsIdentity, optional
        Of the built network, for a backbone whose weights only a built network can hash.

    Returns
    -------
    (list of str, dict)
        The commands, and ``outputs``: ``cache``, ``runs_dir``, ``run_name``, ``head_runs``,
        ``start_head``, ``finetune_run``, ``layers`` and ``steps`` (role -> index of its command:
        ``extract``, ``heads``, ``start``, ``finetune``, ``compare``).
    """
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
        steps = {"extract": extract, "heads": fit, "compare": compare}
    elif scenario == 3:
        lo, hi = LP_FT_CROP_SCALE
        # The fine-tune folds its start head into the network's classifier, which sees the
        # penultimate features only: that head is fitted on them, beside the heads that choose.
        start = (f"fxtl fit-head {c} --model logreg --layers penultimate --run-name {name}-start"
                 f"{opt_c}")
        steps = {"extract": extract, "heads": fit, "start": start,
                 "finetune": f"{finetune} --trainable last:2 --init-head {q(str(where['start'][0]))} "
                             f"--crop-scale {lo} {hi} --run-name {name}-finetune{opt_d}{opt_c}",
                 "compare": compare}
    else:
        epochs = " --epochs 15" if scenario == 4 else ""
        steps = {"finetune": f"{finetune} --trainable all{epochs} --run-name {name}-finetune{opt_d}{opt_c}",
                 "extract": extract, "heads": fit, "compare": compare}
    outputs = {"cache": str(cache) if cache is not None else None, "runs_dir": str(runs_dir),
               "run_name": name, "head_runs": [str(f) for f in where["heads"]],
               "start_head": str(where["start"][0]) if "start" in where else None,
               "finetune_run": str(where["finetune"][0]) if "finetune" in where else None,
               "layers": layers, "steps": {role: i for i, role in enumerate(steps)}}
    return list(steps.values()), outputs


def recommendation(scenario: int, *, commands: Sequence[str], outputs: dict[str, Any]
                   ) -> dict[str, Any]:
    """What the advice recommends and what it is compared with, pointing at their commands.

    ``commands`` and ``outputs`` are :func:`next_steps`'s. Returns ``Advice.recommendation``:
    ``method`` (``"head"`` or ``"finetune"``: what :func:`fxtl.advice.advice_verdict` judges),
    ``label``, ``what``, ``command`` (the one that produces it), ``runs`` (its run folders),
    ``layers`` and ``comparison`` (the same for the method run beside it, or ``None``).
    """
    rec = RECOMMENDATIONS[scenario]
    steps = outputs["steps"]

    def runs(method: str) -> list[str]:
        if method == "head":
            return list(outputs["head_runs"])
        return [outputs["finetune_run"]] if outputs.get("finetune_run") else []

    def role(method: str) -> str:
        return "heads" if method == "head" else "finetune"

    comp = rec["comparison"]
    return {"method": rec["method"], "label": rec["label"], "what": rec["what"],
            "command": commands[steps[role(rec["method"])]], "runs": runs(rec["method"]),
            "layers": outputs.get("layers") if rec["method"] == "head" else None,
            "comparison": None if comp is None else {
                **comp, "command": commands[steps[role(comp["method"])]], "runs": runs(comp["method"])}}
