"""The collectives the monitor issues, and the rule that keeps them from hanging.

Every rank of a group calls the same collectives in the same order at every optimizer step, whether or not
it saw a batch and whether or not its own part of the step failed: a rank whose step could not be built
enters the exchange anyway, carrying a *status* instead of counts (:data:`OK`, :data:`FAILED`,
:data:`PEER_FAILED`). Because every rank then holds every rank's status, they all take the same next step:
exchange the failures' messages (:func:`exchange_failures`) and raise
:class:`~mask_monitor.errors.RankFailure` together. No rank is ever left waiting in a collective the others
skipped.

Groups: ``group=None`` is the default (world) group. Under tensor / context / sequence parallelism the
counts are exchanged over the *data-parallel* group only (ranks holding different batches), and the
shards of one sequence are combined over the *sequence* group first (see :class:`mask_monitor.MaskAuditor`).
"""

from __future__ import annotations

import os
from typing import Any

import torch
import torch.distributed as dist

__all__ = [
    "SELF",
    "OK",
    "FAILED",
    "PEER_FAILED",
    "is_distributed",
    "rank_and_world",
    "local_rank",
    "group_rank_and_size",
    "global_ranks",
    "collective_device",
    "gather_rows",
    "sum_across",
    "exchange_failures",
]

#: Statuses a rank carries into the step exchange.
OK, FAILED, PEER_FAILED = 0, 1, 2


class _Self:
    """A group of this rank alone (a mesh whose data-parallel dimension is 1 has no group object for it)."""

    def __repr__(self) -> str:
        return "SELF"


#: The group holding only this rank: nothing is exchanged over it.
SELF: Any = _Self()


def _size(group: Any) -> int:
    if group is SELF or not (dist.is_available() and dist.is_initialized()):
        return 1
    return dist.get_world_size(group)


def is_distributed() -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def rank_and_world() -> tuple[int, int]:
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))


def local_rank() -> int:
    return int(os.environ.get("LOCAL_RANK", 0))


def group_rank_and_size(group: Any = None) -> tuple[int, int]:
    """This rank's index in ``group`` and the group's size ((0, 1) when not distributed)."""
    if group is SELF or not (dist.is_available() and dist.is_initialized()):
        return 0, 1
    return dist.get_rank(group), dist.get_world_size(group)


def global_ranks(group: Any = None) -> tuple[int, ...]:
    """The global rank of each member of ``group``, in group-rank order."""
    if not (dist.is_available() and dist.is_initialized()):
        return (0,)
    if group is SELF:
        return (dist.get_rank(),)
    if group is None:
        return tuple(range(dist.get_world_size()))
    return tuple(dist.get_process_group_ranks(group))


def collective_device(preferred: torch.device | None = None, group: Any = None) -> torch.device:
    """Where a tensor must live for the backend of ``group`` (the default group when None)."""
    if not is_distributed():
        return preferred or torch.device("cpu")
    backend = str(dist.get_backend(None if group is SELF else group)).lower()
    if "nccl" in backend:
        if preferred is not None and preferred.type == "cuda":
            return preferred
        return torch.device("cuda", torch.cuda.current_device())
    if backend == "gloo":
        return torch.device("cpu")
    return preferred or torch.device("cpu")


def gather_rows(vector: torch.Tensor, group: Any = None) -> torch.Tensor:
    """``(group size, n)``: row ``r`` is group rank ``r``'s vector. One ``all_gather``; no host sync."""
    if not is_distributed() or _size(group) == 1:
        return vector.unsqueeze(0)
    device = collective_device(vector.device, group)
    v = vector.to(device).contiguous()
    out = [torch.empty_like(v) for _ in range(dist.get_world_size(group))]
    dist.all_gather(out, v, group=group)
    return torch.stack(out).to(vector.device)


def sum_across(t: torch.Tensor, group: Any) -> torch.Tensor:
    """``t`` summed over ``group`` (one ``all_reduce``; every member must pass the same shape)."""
    if not is_distributed() or _size(group) == 1:
        return t
    device = collective_device(t.device, group)
    v = t.to(device).contiguous()
    dist.all_reduce(v, op=dist.ReduceOp.SUM, group=group)
    return v.to(t.device)


def exchange_failures(known: list[tuple[int, str]], group: Any = None) -> list[tuple[int, str]]:
    """Every member's known failures, merged (called by every member once statuses showed a failure)."""
    if not is_distributed() or _size(group) == 1:
        return sorted(set(known))
    out: list[Any] = [None] * dist.get_world_size(group)
    dist.all_gather_object(out, list(known), group=group)
    merged = {(int(r), str(m)) for part in out for r, m in (part or [])}
    return sorted(merged)
