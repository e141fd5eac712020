"""The training state of a run, its checkpoint (``checkpoint-last.pt``) and the run folder.

After every epoch the whole state (model, optimizer, scheduler, scaler, torch RNG state, best
metric, history) is written atomically; ``resume`` continues from it and ends with the same
weights as an uninterrupted run (on the same machine, device and thread count). A checkpoint is
read with ``torch.load(weights_only=True)``: tensors and plain containers only.

A run is finished when its manifest (``fxtl-model.json``, written last) is in place; only then
is the checkpoint removed (:func:`remove_checkpoint`, unless ``keep_checkpoint``), so a run
stopped at any earlier point keeps what ``resume`` needs, and resuming a finished run has
nothing to do (:func:`is_finished`).

A run whose kept epoch is retrained on every train image (``refit``, :mod:`fxtl.training.refit`)
also keeps, until it has finished, the network it started from (``start.pt``, written before
the first epoch) and the refit's own training state (``checkpoint-refit.pt``, after every refit
epoch), so an interrupted refit resumes too.
"""
from __future__ import annotations

import re
import sys
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import TYPE_CHECKING, Any

from .._util import atomic_path, ensure_dir, meaning_sha256, unique_dir
from ..backbones.registry import MODEL_MANIFEST, RUN_MEANING_KEYS
from ..data.splits import check_run_name
from ..errors import FxtlError, ProvenanceError
from .config import RESUME_KEYS

if TYPE_CHECKING:
    from .trainer import Trainer

__all__ = ["CHECKPOINT_FORMAT", "CHECKPOINT_VERSION", "TrainState", "rng_state", "set_rng_state",
           "torch_save", "load_checkpoint", "choose_run_dir", "discard_unfinished", "initial_state",
           "RUN_FILES", "manifest_digest", "CHECKPOINT_FILE", "is_finished", "remove_checkpoint",
           "remove_start", "check_same_settings", "START_FILE", "REFIT_CHECKPOINT_FILE"]

CHECKPOINT_FORMAT = "fxtl-finetune-checkpoint"
CHECKPOINT_VERSION = 1
CHECKPOINT_FILE = "checkpoint-last.pt"
# The network as the first epoch found it (the fitted start), for the refit to start from again.
START_FILE = "start.pt"
# The refit's training state after each of its epochs (same format, ``phase: "refit"``).
REFIT_CHECKPOINT_FILE = "checkpoint-refit.pt"


@dataclass
class TrainState:
    """Where a run stands after ``epoch`` epochs; stored at the top level of the checkpoint."""

    epoch: int = 0
    history: list[dict[str, Any]] = field(default_factory=list)  # one row per epoch
    best: dict[str, Any] | None = None  # {"epoch", "accuracy", "loss"} of the kept weights
    bad_epochs: int = 0  # epochs since the last improvement
    fit_seconds: float = 0.0
    errors: dict[str, str] = field(default_factory=dict)  # image path -> why it was skipped
    stopped_early: bool = False
    done: bool = False

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_checkpoint(cls, ckpt: dict[str, Any]) -> "TrainState":
        return cls(**{f.name: ckpt[f.name] for f in fields(cls)})


def rng_state() -> dict[str, Any]:
    """The torch RNG states (dropout, stochastic depth draw from them)."""
    import torch

    state = {"torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    import torch

    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def torch_save(obj: Any, path: Path) -> None:
    """``torch.save`` to a temporary file renamed into place (never a half-written file).

    Serialised in memory first: torch's zip writer reports a full disk as an opaque
    RuntimeError, a plain write as ``OSError(ENOSPC)``, which :func:`atomic_path` names.
    """
    import io

    import torch

    buf = io.BytesIO()
    torch.save(obj, buf)
    with atomic_path(path, suffix=".tmp") as tmp:
        tmp.write_bytes(buf.getbuffer())


def load_checkpoint(path: Path) -> dict[str, Any]:
    import torch

    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:
        raise FxtlError(f"{path} cannot be read ({str(exc).splitlines()[0][:120]}); delete it "
                        "and start the run afresh") from None
    if not isinstance(ckpt, dict) or ckpt.get("format") != CHECKPOINT_FORMAT:
        raise FxtlError(f"{path} is not an fxtl fine-tune checkpoint; start the run afresh")
    if ckpt.get("format_version", 0) > CHECKPOINT_VERSION:
        raise FxtlError(f"{path} has checkpoint version {ckpt.get('format_version')}, this fxtl "
                        f"reads up to {CHECKPOINT_VERSION}; upgrade fxtl")
    return ckpt


def manifest_digest(manifest: dict[str, Any]) -> str:
    """The ``meaning_sha256`` of a run's ``fxtl-model.json``: covers its class names,
    preprocessing, backbone and weights hash, so an edit to any of them is refused on load."""
    return meaning_sha256(manifest, RUN_MEANING_KEYS)


def is_finished(run_dir: Path) -> bool:
    """Has the fine-tune in ``run_dir`` finished? Its manifest is the last file a run writes."""
    return (Path(run_dir) / MODEL_MANIFEST).is_file()


def remove_checkpoint(run_dir: Path) -> None:
    """Remove a finished run's checkpoints (about 3x the model each; nothing resumes a finished
    run). An unfinished run keeps them, whatever the caller asks."""
    if is_finished(run_dir):
        for name in (CHECKPOINT_FILE, REFIT_CHECKPOINT_FILE):
            (Path(run_dir) / name).unlink(missing_ok=True)


def remove_start(run_dir: Path) -> None:
    """Remove a finished run's ``start.pt``: only an unfinished refit starts from it."""
    if is_finished(run_dir):
        (Path(run_dir) / START_FILE).unlink(missing_ok=True)


def _last_written(run_dir: Path) -> float:
    """When the run last saved its state: the checkpoint, else (finished, checkpoint removed)
    the manifest."""
    ckpt = run_dir / CHECKPOINT_FILE
    return (ckpt if ckpt.is_file() else run_dir / MODEL_MANIFEST).stat().st_mtime


def choose_run_dir(runs: Path, base: str, *, run_name: str | None, resume: bool) -> Path:
    """The folder to train into: an exact ``run_name``, the latest ``base*`` run when resuming
    (unfinished, or finished: then there is nothing to resume), else a new ``base``, ``base-2``,
    ... folder."""
    ensure_dir(runs)
    if run_name:
        check_run_name(run_name)
        run_dir = runs / run_name
        _check_reusable(run_dir, resume=resume)
        return run_dir
    if resume:
        found = [d for d in runs.glob(f"{base}*") if re.fullmatch(re.escape(base) + r"(-\d+)?", d.name)
                 and ((d / CHECKPOINT_FILE).is_file() or is_finished(d))]
        if found:
            return max(found, key=_last_written)
    return unique_dir(runs, base)


# What a fine-tune writes into its folder (a resumed run may find any of them).
RUN_FILES = frozenset({"model.pt", CHECKPOINT_FILE, "metrics.json", "rows.json",
                       "predictions.csv", "fxtl-model.json", "learning_curves.png",
                       "confusion.png", ".lock", START_FILE, REFIT_CHECKPOINT_FILE})


def _check_reusable(run_dir: Path, *, resume: bool) -> None:
    """Refuse a named folder that holds another run's (or anybody's) files: never overwrite them."""
    if not run_dir.is_dir():
        if run_dir.exists():
            raise FxtlError(f"{run_dir} is a file, not a run folder; choose another run name")
        return
    # Temporaries of an interrupted atomic write are ours too.
    present = sorted(p.name for p in run_dir.iterdir() if not p.name.endswith((".tmp", ".partial"))
                     and p.name != ".lock")
    if not present:
        return
    has_ckpt = (run_dir / CHECKPOINT_FILE).is_file()
    finished = is_finished(run_dir)  # its checkpoint may be gone: removed once finished
    foreign = [n for n in present if n not in RUN_FILES
               or not (has_ckpt or finished) and n not in ("model.pt", START_FILE)]
    if foreign:
        raise FxtlError(f"run folder {run_dir} holds another run's files ({', '.join(foreign[:3])}"
                        f"{', ...' if len(foreign) > 3 else ''}); choose another run name")
    if not resume and finished:
        raise FxtlError(f"run folder {run_dir} already holds a run, finished; choose another run "
                        "name (or delete the folder)")
    if not resume and has_ckpt:
        raise FxtlError(f"run folder {run_dir} already holds a run; resume it, or choose "
                        "another run name (or delete the folder)")
    if not resume:  # only model.pt, start.pt: an interrupted first epoch; starting over may replace them
        return


def discard_unfinished(run_dir: Path) -> None:
    """Remove what a new run wrote before its first checkpoint (so no folder holds only
    ``model.pt``); a folder with a checkpoint is left as it is, resumable, and a finished one
    (its checkpoint perhaps removed) as it is."""
    if (run_dir / CHECKPOINT_FILE).exists() or is_finished(run_dir):
        return
    for name in ("model.pt", START_FILE, ".lock"):
        (run_dir / name).unlink(missing_ok=True)
    try:
        run_dir.rmdir()  # only when empty: never anybody else's files
    except OSError:
        pass


def initial_state(trainer: Trainer, ckpt_path: Path, record: dict[str, Any], *,
                  resume: bool, quiet: bool = False) -> TrainState:
    """A fresh training state, or the checkpoint's (loading the trainer and RNG states).

    ``record`` is the run's :meth:`FinetuneConfig.record`; every :data:`RESUME_KEYS` entry must
    equal the checkpoint's.
    """
    if not resume:
        return TrainState()
    if not ckpt_path.is_file():
        if not quiet:
            print(f"fxtl: no checkpoint in {ckpt_path.parent}; starting the run", file=sys.stderr)
        return TrainState()
    ckpt = load_checkpoint(ckpt_path)
    check_same_settings(ckpt.get("config", {}), record, source=ckpt_path)
    trainer.load_state(ckpt)
    set_rng_state(ckpt["rng"])
    state = TrainState.from_checkpoint(ckpt)
    if not quiet:
        print(f"fxtl: resuming {ckpt_path.parent.name} after epoch {state.epoch}/{record['epochs']}",
              file=sys.stderr)
    return state


def check_same_settings(old: dict[str, Any], record: dict[str, Any], *, source: Path) -> None:
    """Refuse to resume (or report) a run made with other settings than ``record``: every
    :data:`RESUME_KEYS` entry of ``old`` (the stored record, read from ``source``) must match."""
    defaults = {"flip": True, "refit": False}  # keys a record holds only when they differ from these
    old = old if isinstance(old, dict) else {}
    diff = [k for k in RESUME_KEYS if old.get(k, defaults.get(k)) != record.get(k, defaults.get(k))]
    if "selection_holdout" in diff and "selection_holdout" not in old \
            and record.get("selection_holdout") is True:
        raise ProvenanceError(f"{source} was made by a fine-tune that trained on every train "
                              "image and selected on nothing; resume it with that plan "
                              "(selection_holdout=False, --no-selection-holdout), or start a new "
                              "run, which selects on a hold-out of train")
    if "refit" in diff and "refit" not in old and record.get("refit") is True:
        raise ProvenanceError(f"{source} was made by a fine-tune that reported the epoch its "
                              "selection hold-out chose as trained beside that hold-out, without "
                              "retraining it on every train image; resume it with that plan "
                              "(refit=False, --no-refit), or start a new run, which refits")
    if diff:
        raise ProvenanceError(f"{source} was made with other settings ({diff[0]}: "
                              f"{old.get(diff[0], defaults.get(diff[0]))!r}, now "
                              f"{record.get(diff[0], defaults.get(diff[0]))!r}); resume with "
                              "the same settings, or start a new run")
