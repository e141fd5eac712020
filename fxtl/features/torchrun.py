"""One extraction over the ranks of a torchrun job: rank R of W extracts shard R/W, rank 0 merges."""
from __future__ import annotations

import os
import time
from dataclasses import replace

from .._util import say
from ..distributed import Coordinator, shard_path
from ..errors import CacheError, DataError, FxtlError
from .job import ExtractJob, ExtractResult, rate
from .shards import extract_shard, merge_shards

__all__ = ["extract_torchrun"]


def extract_torchrun(job: ExtractJob, env, *, force: bool, find_hit) -> ExtractResult:
    """Rank R of W extracts shard R/W; rank 0 merges; every rank returns the merged result.

    Collectives are reached by every rank on every path: a rank whose work fails reports the
    failure through them instead of leaving the others waiting, and all ranks raise it. ``find_hit``
    returns the finished cache's result, if any (asked on rank 0 only).
    """
    with Coordinator(env) as co:
        mine = {"fingerprint": job.fp, "n": len(job.images), "batch_size": job.batch_size,
                "host": os.uname().nodename}
        everyone = co.all_gather(mine)
        odd = [r for r, d in enumerate(everyone) if d["fingerprint"] != everyone[0]["fingerprint"]]
        if odd:
            raise DataError(f"rank(s) {', '.join(map(str, odd))} (host {everyone[odd[0]]['host']}) see "
                            f"other images or options than rank 0 ({everyone[odd[0]]['n']} vs "
                            f"{everyone[0]['n']} images, fingerprint {everyone[odd[0]]['fingerprint'][:12]} "
                            f"vs {everyone[0]['fingerprint'][:12]}); give every rank the same DATA_DIR "
                            "(on a shared filesystem) and the same options")
        # Rank 0's batch size fixes the shard boundaries, so all ranks cut the rows alike.
        job = replace(job, batch_size=everyone[0]["batch_size"],
                      progress=job.progress and env.is_primary)
        hit = find_hit() if env.is_primary and not force else None
        hit = co.broadcast(hit.to_dict() if hit is not None else None)
        if hit is not None:
            return replace(ExtractResult.from_dict(hit), rank=env.rank, world_size=env.world_size)

        t_shards = time.perf_counter()
        try:
            res = extract_shard(job, env.rank, env.world_size, force=force)
            status = {"ok": True, "run": res.shard_runs[0], "resumed_rows": res.resumed_rows}
        except FxtlError as exc:
            status = {"ok": False, "error": str(exc)}
        statuses = co.all_gather(status)
        wall = time.perf_counter() - t_shards
        failed = [r for r, s in enumerate(statuses) if not s["ok"]]
        if failed:
            raise FxtlError(f"rank {failed[0]} failed: {statuses[failed[0]]['error']}")
        if not env.is_primary:
            run = status["run"]
            say(f"fxtl: rank {env.rank}: shard {env.rank}/{env.world_size} "
                f"{'reused' if run['reused'] else 'done'} ({run['n']} images)")

        outcome = None
        if env.is_primary:
            try:
                expected = [shard_path(job.path, r, env.world_size) for r in range(env.world_size)]
                unseen = [str(p) for p in expected if not p.exists()]
                if unseen:
                    raise CacheError(f"rank 0 cannot see the shard files {', '.join(unseen)} that "
                                     "other ranks wrote; put the cache directory (cache_dir or output) on a "
                                     "filesystem all nodes share")
                merged = merge_shards(expected, output=job.path, force=True)
                runs = [s["run"] for s in statuses]
                computed = sum(r["images_computed"] for r in runs)
                merged = replace(merged, seconds=time.perf_counter() - job.t0,
                                 images_per_second=rate(computed, wall), device=job.device_kind,
                                 resumed_rows=sum(s["resumed_rows"] for s in statuses),
                                 shard_runs=runs)
                outcome = {"ok": True, "result": merged.to_dict()}
            except FxtlError as exc:
                outcome = {"ok": False, "error": str(exc)}
        outcome = co.broadcast(outcome)
        if not outcome["ok"]:
            raise FxtlError(outcome["error"] if env.is_primary else f"rank 0 failed: {outcome['error']}")
        return replace(ExtractResult.from_dict(outcome["result"]), rank=env.rank,
                       world_size=env.world_size)

