"""Which ranks of a ``Trainer`` hold different data: its data-parallel and sequence groups.

Under tensor parallelism every rank of a tensor-parallel group trains on the same batch; under context or
sequence parallelism the ranks of a context group each hold a shard of the same sequences. Counting over
the whole world would multiply the counts by the tensor-parallel size and judge each shard as if it were a
micro-batch (a shard holding only prompt tokens would look all masked). :func:`trainer_groups` reads where
the parallelism is configured and returns the groups :class:`~mask_monitor.MaskAuditor` needs:

* accelerate's ``ParallelismConfig`` (``TrainingArguments(parallelism_config=...)``, or the one the Trainer
  builds for a model loaded with ``tp_plan``) and its device mesh (``accelerator.torch_device_mesh``):
  the data-parallel group is the mesh's flattened ``"dp"`` dimension (this rank alone when there is none),
  the sequence group its ``"cp"`` (or torch ``"sp"``) dimension;
* DeepSpeed Ulysses sequence parallelism (``sp_backend="deepspeed"``): DeepSpeed's sequence group, and
  for the data-parallel group the ranks with the same position in their sequence group.

Plain data parallelism (DDP, FSDP, DeepSpeed ZeRO) needs none of this: the default group is the
data-parallel group.
"""

from __future__ import annotations

import logging
from typing import Any

import torch.distributed as dist

from .distributed import SELF

__all__ = ["trainer_groups"]

logger = logging.getLogger("mask_monitor")


def _mesh_group(mesh: Any, name: str) -> Any | None:
    try:
        return mesh[name].get_group()
    except (KeyError, RuntimeError, ValueError, IndexError):
        return None


def trainer_groups(trainer: Any) -> tuple[Any, Any, str]:
    """``(process_group, sequence_group, description)`` for ``trainer``; ``(None, None, "")`` for plain
    data parallelism (or one process)."""
    accelerator = getattr(trainer, "accelerator", None)
    pc = getattr(accelerator, "parallelism_config", None)
    if pc is None or not (dist.is_available() and dist.is_initialized()):
        return None, None, ""
    tp, cp, sp = int(getattr(pc, "tp_size", 1) or 1), int(getattr(pc, "cp_size", 1) or 1), int(
        getattr(pc, "sp_size", 1) or 1)
    if tp * cp * sp == 1:
        return None, None, ""
    described = f"tp={tp} cp={cp} sp={sp}"
    if sp > 1 and getattr(pc, "sp_backend", None) == "deepspeed":
        return (*_deepspeed_ulysses(trainer, sp), f"{described} (DeepSpeed Ulysses)")
    mesh = getattr(accelerator, "torch_device_mesh", None)
    if mesh is None:
        raise RuntimeError(f"a ParallelismConfig ({described}) without a device mesh")
    names = tuple(getattr(mesh, "mesh_dim_names", None) or ())
    dp = _mesh_group(mesh, "dp") or SELF
    seq = None
    if cp > 1:
        seq = _mesh_group(mesh, "cp")
    elif sp > 1:
        seq = _mesh_group(mesh, "sp")
    if (cp > 1 or sp > 1) and seq is None:
        raise RuntimeError(f"no context/sequence group in the device mesh {names}")
    return dp, seq, f"{described}, mesh {names}"


def _deepspeed_ulysses(trainer: Any, sp: int) -> tuple[Any, Any]:
    """DeepSpeed's sequence group, and the ranks holding the same shard position in theirs (data-parallel)."""
    mpu: Any = getattr(getattr(trainer, "model_wrapped", None), "mpu", None)
    if mpu is None:
        from deepspeed.runtime.sequence_parallel import parallel_state_sp

        mpu = parallel_state_sp
    seq = mpu.get_sequence_parallel_group()
    world, rank = dist.get_world_size(), dist.get_rank()
    if world == sp:
        return SELF, seq
    mine = None
    for position in range(sp):  # every rank creates every group, in the same order (new_group is collective)
        group = dist.new_group([r for r in range(world) if r % sp == position])
        if rank % sp == position:
            mine = group
    return mine, seq
