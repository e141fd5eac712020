"""Splitting one extraction over processes and machines: shard plans, names and torchrun glue.

Two launchers produce the same shard files, so they can be mixed (a torchrun rank that crashed can
be finished by ``fxtl extract --shard I/N``, and the other way round):

* ``torchrun ... -m fxtl extract DATA_DIR``: rank R of W extracts shard R/W; rank 0 then merges.
  torchrun is recognised by its environment (``WORLD_SIZE``, ``RANK``, ``LOCAL_RANK``,
  ``LOCAL_WORLD_SIZE``); torch.distributed (gloo) only carries barriers and small Python objects.
* ``fxtl extract DATA_DIR --shard I/N`` from a scheduler's array job, then ``fxtl merge``.

Shard I of N covers a contiguous block of rows of the dataset order, cut at multiples of the batch
size: every batch a shard computes is a batch the single-process run computes too, so the merged
cache has the same rows, in the same order, from the same batches as a single-process run.
"""
from __future__ import annotations

import os
import re
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path
from typing import Any

from .errors import FxtlError

__all__ = ["TorchrunEnv", "torchrun_env", "Coordinator", "TrainingGroup", "parse_shard",
           "shard_rows", "shards_dir", "shard_path", "SHARD_NAME", "rank_budget", "place_rank",
           "available_cores"]

# File name of shard I of N inside ``<cache>.shards/`` (zero-padded so names sort in order).
SHARD_NAME = "shard-{index:05d}-of-{count:05d}.h5"
SHARD_RE = re.compile(r"shard-(\d+)-of-(\d+)\.h5")
# How long a rank waits at a barrier for the slowest rank (a shard can take hours); a rank that
# dies is noticed at once anyway (torchrun stops the others, gloo sees the closed connection).
_DEFAULT_TIMEOUT_S = 7 * 24 * 3600


@dataclass(frozen=True)
class TorchrunEnv:
    """Where this process sits in a torchrun job, and how long its barriers wait."""

    rank: int
    world_size: int
    local_rank: int
    local_world_size: int
    timeout_s: float = _DEFAULT_TIMEOUT_S

    @property
    def is_primary(self) -> bool:
        return self.rank == 0


def torchrun_env(environ: dict[str, str] | None = None) -> TorchrunEnv | None:
    """The torchrun placement from the environment, or None when not launched by torchrun.

    A world of one process is treated as no torchrun at all (the ordinary single-process path).
    The launch environment is the one place fxtl reads a job's settings from: torchrun's
    ``RANK``/``WORLD_SIZE``/..., and ``FXTL_DIST_TIMEOUT`` (seconds a barrier waits) beside them,
    since every rank must agree on it and torchrun hands all ranks one environment.
    """
    env = os.environ if environ is None else environ
    if "WORLD_SIZE" not in env or "RANK" not in env:
        return None
    try:
        world = int(env["WORLD_SIZE"])
        rank = int(env["RANK"])
        local_rank = int(env.get("LOCAL_RANK", rank))
        local_world = int(env.get("LOCAL_WORLD_SIZE", world))
    except ValueError:
        raise FxtlError(f"WORLD_SIZE={env.get('WORLD_SIZE')!r}, RANK={env.get('RANK')!r} are not "
                        "integers; launch with torchrun or unset them") from None
    if world <= 1:
        return None
    if not 0 <= rank < world or not 0 <= local_rank < max(1, local_world):
        raise FxtlError(f"RANK={rank} (LOCAL_RANK={local_rank}) is outside WORLD_SIZE={world} "
                        f"(LOCAL_WORLD_SIZE={local_world}); launch with torchrun")
    return TorchrunEnv(rank=rank, world_size=world, local_rank=local_rank,
                       local_world_size=max(1, local_world),
                       timeout_s=_timeout_seconds(env.get("FXTL_DIST_TIMEOUT", "")))


def parse_shard(text: str) -> tuple[int, int]:
    """``"I/N"`` -> ``(I, N)`` with ``0 <= I < N`` (I counts from 0, like torchrun's RANK)."""
    m = re.fullmatch(r"\s*(\d+)\s*/\s*(\d+)\s*", str(text))
    if not m:
        raise FxtlError(f"{text!r} is not I/N, e.g. 0/4 (I counts from 0)")
    index, count = int(m.group(1)), int(m.group(2))
    if count < 1 or index >= count:
        raise FxtlError(f"{text!r} needs 0 <= I < N (I counts from 0: the shards of 4 are "
                        "0/4 ... 3/4)")
    return index, count


def shard_rows(n: int, count: int, batch_size: int) -> list[tuple[int, int]]:
    """Row ranges ``[lo, hi)`` of the ``count`` shards of ``n`` rows, cut at batch boundaries.

    Deterministic in ``(n, count, batch_size)``; contiguous; together they cover ``range(n)``.
    With fewer batches than shards, some shards are empty.

    >>> shard_rows(10, 2, 4)
    [(0, 4), (4, 10)]
    """
    if count < 1 or batch_size < 1:
        raise FxtlError(f"internal: shard_rows(count={count}, batch_size={batch_size})")
    batches = (n + batch_size - 1) // batch_size
    cuts = [min(n, (i * batches // count) * batch_size) for i in range(count)] + [n]
    return [(cuts[i], cuts[i + 1]) for i in range(count)]


def shards_dir(cache: Path) -> Path:
    """``<cache>.shards/``: where the shard files of ``cache`` live until they are merged."""
    cache = Path(cache)
    return cache.with_name(cache.name + ".shards")


def shard_path(cache: Path, index: int, count: int) -> Path:
    """``<cache>.shards/shard-IIIII-of-NNNNN.h5``."""
    return shards_dir(cache) / SHARD_NAME.format(index=index, count=count)


def available_cores() -> int:
    if hasattr(os, "sched_getaffinity"):
        return max(1, len(os.sched_getaffinity(0)))
    return max(1, os.cpu_count() or 1)


def rank_budget(env: TorchrunEnv, *, cuda: bool, cores: int | None = None) -> tuple[int | None, int]:
    """``(torch threads or None to leave as is, decode workers)`` for one rank.

    Ranks on one node share its cores. On CPU each rank gets ``cores // local_world_size`` threads,
    and a rank with a small share decodes in its own process: forked decode workers would
    oversubscribe the cores the network runs on (decoding is cheap next to the network). On CUDA
    the share goes to decode workers, which is what keeps a GPU fed.
    """
    cores = available_cores() if cores is None else cores
    share = max(1, cores // env.local_world_size)
    if cuda:
        return None, max(1, min(8, share - 1))
    workers = 0 if share < 4 else min(4, share // 4)
    return max(1, share - workers), workers


def place_rank(env: TorchrunEnv, device: str) -> tuple[str, int]:
    """This torchrun rank's device (``cuda:LOCAL_RANK``) and decode workers; sets CPU threads."""
    import torch

    if device.startswith("cuda"):
        gpus = torch.cuda.device_count()
        if env.local_rank >= gpus:
            raise FxtlError(f"LOCAL_RANK {env.local_rank} has no GPU (this node has {gpus}); "
                            f"start at most {gpus} processes per node (torchrun's nproc-per-node)")
        torch.cuda.set_device(env.local_rank)
        _, workers = rank_budget(env, cuda=True)
        return f"cuda:{env.local_rank}", workers
    threads, workers = rank_budget(env, cuda=False)
    torch.set_num_threads(threads)
    return device, workers


def _timeout_seconds(raw: str) -> float:
    try:
        seconds = float(raw) if raw else _DEFAULT_TIMEOUT_S
    except ValueError:
        raise FxtlError(f"FXTL_DIST_TIMEOUT={raw!r} is not a number of seconds; fix or unset it") from None
    if not seconds > 0:
        raise FxtlError(f"FXTL_DIST_TIMEOUT={raw!r} must be a positive number of seconds; fix or unset it")
    return seconds


def _start_process_group(env: TorchrunEnv, backend: str, **kwargs: Any) -> None:
    """``init_process_group`` from torchrun's environment, or a one-line error saying what is missing."""
    import torch.distributed as dist

    if not dist.is_available():
        raise FxtlError("this torch build has no torch.distributed; run without torchrun (for "
                        "extraction: extract(shard=(I, N)) and merge_shards)")
    missing = [k for k in ("MASTER_ADDR", "MASTER_PORT") if k not in os.environ]
    if missing:
        raise FxtlError(f"WORLD_SIZE={env.world_size} is set but {', '.join(missing)} "
                        "is not; launch with torchrun, or unset WORLD_SIZE and RANK")
    dist.init_process_group(backend, **kwargs)


class Coordinator:
    """Barriers and broadcasts of small Python objects between torchrun ranks.

    Uses a gloo process group on every device: only a few bytes move, and gloo (unlike NCCL's
    watchdog) lets a rank wait as long as the slowest shard takes. An existing process group
    (fxtl called from inside a training script) is reused; one made here is destroyed on exit.
    """

    def __init__(self, env: TorchrunEnv):
        self.env = env
        self._owned = False
        self._group = None

    def __enter__(self) -> "Coordinator":
        import torch.distributed as dist

        if dist.is_available() and dist.is_initialized():
            if dist.get_backend() != "gloo":
                self._group = dist.new_group(backend="gloo",
                                             timeout=timedelta(seconds=self.env.timeout_s))
        else:
            _start_process_group(self.env, "gloo", timeout=timedelta(seconds=self.env.timeout_s))
            self._owned = True
        return self

    def __exit__(self, *exc) -> None:
        import torch.distributed as dist

        if self._owned and dist.is_initialized():
            dist.destroy_process_group()

    def barrier(self) -> None:
        import torch.distributed as dist

        dist.barrier(group=self._group)

    def broadcast(self, obj: Any) -> Any:
        """Rank 0's ``obj`` on every rank."""
        import torch.distributed as dist

        box = [obj]
        dist.broadcast_object_list(box, src=0, group=self._group)
        return box[0]

    def all_gather(self, obj: Any) -> list[Any]:
        """Every rank's ``obj``, indexed by rank, on every rank."""
        import torch.distributed as dist

        out: list[Any] = [None] * self.env.world_size
        dist.all_gather_object(out, obj, group=self._group)
        return out


class TrainingGroup:
    """The torch.distributed side of a DistributedDataParallel fine-tune.

    ``TrainingGroup(None, device)`` is a world of one: every collective is the identity, so the
    training loop has one code path. Under torchrun the default process group is NCCL on CUDA and
    gloo on CPU (the gradients' all-reduce); small Python objects (metrics, skipped images, the
    run folder's name) travel over a :class:`Coordinator` (gloo). A process group that exists
    already (fxtl called from a training script) is reused and left open.
    """

    def __init__(self, env: TorchrunEnv | None, device: str):
        self.env, self.device = env, device
        self.rank = env.rank if env else 0
        self.world_size = env.world_size if env else 1
        self._owned = False
        self._coord: Coordinator | None = None

    @property
    def is_primary(self) -> bool:
        return self.rank == 0

    def __enter__(self) -> "TrainingGroup":
        if self.env is None:
            return self
        import torch
        import torch.distributed as dist

        if not (dist.is_available() and dist.is_initialized()):
            if self.device.startswith("cuda"):
                _start_process_group(self.env, "nccl", device_id=torch.device(self.device))
            else:
                _start_process_group(self.env, "gloo")
            self._owned = True
        self._coord = Coordinator(self.env).__enter__()
        return self

    def __exit__(self, *exc) -> None:
        if self.env is None:
            return
        import torch.distributed as dist

        if self._owned and dist.is_initialized():
            dist.destroy_process_group()

    def wrap(self, module):
        """``module`` in DistributedDataParallel (itself in a world of one)."""
        if self.env is None:
            return module
        from torch.nn.parallel import DistributedDataParallel

        ids = [self.env.local_rank] if self.device.startswith("cuda") else None
        return DistributedDataParallel(module, device_ids=ids)

    def gather(self, obj: Any) -> list[Any]:
        """Every rank's ``obj``, by rank (``[obj]`` in a world of one)."""
        return [obj] if self._coord is None else self._coord.all_gather(obj)

    def counts(self, n: int) -> list[int]:
        """Every rank's ``n`` (one small all-gather per training step)."""
        if self.env is None:
            return [n]
        import torch
        import torch.distributed as dist

        dev = self.device if self.device.startswith("cuda") else "cpu"
        mine = torch.tensor([n], dtype=torch.int64, device=dev)
        out = [torch.zeros_like(mine) for _ in range(self.world_size)]
        dist.all_gather(out, mine)
        return [int(t.item()) for t in out]

    def broadcast(self, obj: Any) -> Any:
        return obj if self._coord is None else self._coord.broadcast(obj)

    def barrier(self) -> None:
        if self._coord is not None:
            self._coord.barrier()
