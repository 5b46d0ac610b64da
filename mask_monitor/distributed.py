"""The one collective the monitor issues: every rank's step vector, gathered to every rank.

Every rank calls :func:`gather_rows` exactly once per optimizer step, whether or not it saw a batch
(an empty rank contributes zeros), so no rank is ever left waiting in a collective. Because every rank
then holds every rank's counts, each one takes the same verdict from the same numbers: agreement
without a second round trip, and per-rank metrics for free.
"""

from __future__ import annotations

import os

import torch
import torch.distributed as dist

__all__ = ["is_distributed", "rank_and_world", "local_rank", "collective_device", "gather_rows"]


def is_distributed() -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def rank_and_world() -> tuple[int, int]:
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))


def local_rank() -> int:
    return int(os.environ.get("LOCAL_RANK", 0))


def collective_device(preferred: torch.device | None = None) -> torch.device:
    """Where a tensor must live for the default process group's backend."""
    if not is_distributed():
        return preferred or torch.device("cpu")
    backend = str(dist.get_backend()).lower()
    if "nccl" in backend:
        if preferred is not None and preferred.type == "cuda":
            return preferred
        return torch.device("cuda", torch.cuda.current_device())
    if backend == "gloo":
        return torch.device("cpu")
    return preferred or torch.device("cpu")


def gather_rows(vector: torch.Tensor) -> torch.Tensor:
    """``(world_size, n)``: row ``r`` is rank ``r``'s vector. One ``all_gather``; no host sync."""
    if not is_distributed():
        return vector.unsqueeze(0)
    device = collective_device(vector.device)
    v = vector.to(device)
    out = [torch.empty_like(v) for _ in range(dist.get_world_size())]
    dist.all_gather(out, v.contiguous())
    return torch.stack(out).to(vector.device)
