"""The plain-loop API under process groups: two gloo ranks (torchrun), several scenarios in one launch.

Usage: torchrun --nproc_per_node=2 tests/scripts/plain_groups.py OUT_DIR
Each rank writes OUT_DIR/result-rank<R>.json: one entry per scenario, in the order they ran (every
scenario's collectives must line up on both ranks for the next one to run at all):

  dp_2x1       a (dp=2, tp=1) device mesh: each rank its own batch, counted over the dp group
  tp_pair      a (dp=1, tp=2) mesh: both ranks the same batch; counted over the dp group (and, for contrast,
               over the default group, which counts it twice)
  cp_pair      a (dp=1, cp=2) mesh: each row's sequence split in two shards (``shift_labels`` made before
               the split), rank 0's shard holding only prompt tokens; then a step that really is all masked.
               For contrast the same shards without the sequence group (each shard judged alone).
  cp_dp_2x2    not run here (needs 4 ranks)
  fail_rank1   rank 1's pending step holds a malformed vector (injected): both ranks must raise RankFailure
               naming rank 1 and the error; then a healthy step on both (the exchange stayed aligned)
  fail_cp      the same inside a sequence group
  settings     the ranks' fingerprints differ (different monitor settings): both raise RankFailure
"""

from __future__ import annotations

import json
import os
import sys
import time
import traceback
from pathlib import Path
from typing import Any, NoReturn

import torch
import torch.distributed as dist

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))

from torch.distributed.device_mesh import init_device_mesh  # noqa: E402
from trainer_utils import exit_worker  # noqa: E402

from mask_monitor import MaskAuditor, MonitorConfig, Policy, RankFailure  # noqa: E402

IGNORE = -100
COUNTS = ("micro_batches", "sequences", "target_tokens", "supervised_tokens", "masked_tokens",
          "fully_masked_sequences", "unmasked_sequences", "supervised_padding_tokens", "all_masked_batches",
          "zero_loss_batches", "non_finite_loss_batches", "loss_batches", "loss_sum")


def counts(t) -> dict[str, float]:
    return {k: getattr(t, k) for k in COUNTS}


def batch(seed: int, rows: int = 3, length: int = 12, prompt: int = 5) -> dict[str, torch.Tensor]:
    """Rows of ``length`` tokens whose first ``prompt`` labels are -100; row 0 right-padded by 3."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, 500, (rows, length), generator=g)
    labels = ids.clone()
    labels[:, :prompt] = IGNORE
    mask = torch.ones_like(ids)
    mask[0, length - 3:] = 0
    labels[0, length - 3:] = IGNORE
    return {"input_ids": ids, "labels": labels, "attention_mask": mask}


def independent(batches: list[dict[str, torch.Tensor]]) -> dict[str, int]:
    """Plain-Python count of what a causal LM loss sees (rows right-padded, no supervised padding)."""
    out = {"sequences": 0, "target_tokens": 0, "supervised_tokens": 0, "fully_masked_sequences": 0}
    for b in batches:
        for lab, m in zip(b["labels"].tolist(), b["attention_mask"].tolist(), strict=True):
            n_real = sum(m)
            targets = lab[1:n_real]
            sup = sum(1 for t in targets if t != IGNORE)
            out["sequences"] += 1
            out["target_tokens"] += len(targets)
            out["supervised_tokens"] += sup
            out["fully_masked_sequences"] += int(sup == 0)
    out["masked_tokens"] = out["target_tokens"] - out["supervised_tokens"]
    return out


def single(batches: list[dict[str, torch.Tensor]], losses: list[float]) -> dict[str, float]:
    """The one-process reference: the same batches, unsharded, in one auditor that exchanges nothing."""
    a = MaskAuditor(sync=False)
    for b, loss in zip(batches, losses, strict=True):
        a.update(b["labels"], attention_mask=b["attention_mask"], loss=torch.tensor(loss))
    return counts(a.step().total)


def shards(b: dict[str, torch.Tensor], n: int = 2) -> list[dict[str, torch.Tensor]]:
    """Split every row's sequence in ``n`` contiguous shards; ``shift_labels`` made before the split."""
    shift = torch.nn.functional.pad(b["labels"], (0, 1), value=IGNORE)[:, 1:]
    w = b["labels"].shape[1] // n
    return [{"shift_labels": shift[:, i * w:(i + 1) * w], "attention_mask": b["attention_mask"][:, i * w:(i + 1) * w],
             "input_ids": b["input_ids"][:, i * w:(i + 1) * w]} for i in range(n)]


def strict_policy() -> Policy:
    return Policy(MonitorConfig(all_masked_micro_batch="abort", fully_masked_share_window=1))


def findings(policy: Policy, report) -> list[str]:
    return sorted(f"{f.check}:{f.action}" for f in policy.evaluate(report))


def dp_2x1(rank: int) -> dict[str, Any]:
    mesh = init_device_mesh("cpu", (2, 1), mesh_dim_names=("dp", "tp"))
    a = MaskAuditor(process_group=mesh["dp"].get_group())
    mine = batch(seed=10 + rank)
    a.update(mine["labels"], attention_mask=mine["attention_mask"], loss=torch.tensor(1.5))
    r = a.step()
    both = [batch(seed=10), batch(seed=11)]
    return {"total": counts(r.total), "single": single(both, [1.5, 1.5]), "independent": independent(both),
            "world_size": r.world_size, "ranks": list(r.ranks), "rank_index": r.rank, "duplicate": r.duplicate,
            "per_rank": [counts(t) for t in r.per_rank]}


def tp_pair(rank: int) -> dict[str, Any]:
    mesh = init_device_mesh("cpu", (1, 2), mesh_dim_names=("dp", "tp"))
    same = batch(seed=20)
    dp = MaskAuditor(process_group=mesh["dp"].get_group())
    world = MaskAuditor()  # the default group: the tensor-parallel peers' identical batches counted twice
    for a in (dp, world):
        a.update(same["labels"], attention_mask=same["attention_mask"], loss=torch.tensor(2.0))
    r_dp, r_world = dp.step(), world.step()
    return {"total": counts(r_dp.total), "world_total": counts(r_world.total), "single": single([same], [2.0]),
            "independent": independent([same]), "world_size": r_dp.world_size, "duplicate": r_dp.duplicate}


def cp_pair(rank: int) -> dict[str, Any]:
    mesh = init_device_mesh("cpu", (1, 2), mesh_dim_names=("dp", "cp"))
    full = batch(seed=30, rows=3, length=12, prompt=7)  # shard 0 (columns 0..5) predicts prompt only
    full["labels"][2] = IGNORE  # and one row that really is fully masked
    dead = batch(seed=31, rows=2, length=12, prompt=12)  # step 2: every label -100
    out: dict[str, Any] = {}
    a = MaskAuditor(process_group=mesh["dp"].get_group(), sequence_group=mesh["cp"].get_group())
    alone = MaskAuditor(process_group=mesh["dp"].get_group())  # the same shards, each judged by itself
    pol, pol_alone = strict_policy(), strict_policy()
    shard_losses = [0.0, 2.0]  # sum over its own targets / all targets of the row set: 0 on the prompt shard
    for step_batch, name in ((full, "healthy"), (dead, "dead")):
        s = shards(step_batch)[rank]
        loss = torch.tensor(shard_losses[rank] if name == "healthy" else 0.0)
        for aud in (a, alone):
            aud.update(None, shift_labels=s["shift_labels"], attention_mask=s["attention_mask"],
                       input_ids=s["input_ids"], loss=loss)
        r, r_alone = a.step(), alone.step()
        out[name] = {"total": counts(r.total), "findings": findings(pol, r),
                     "alone_total": counts(r_alone.total), "alone_findings": findings(pol_alone, r_alone),
                     "shard_supervised": int((s["shift_labels"] != IGNORE).sum())}
    out["healthy"]["single"] = single([full], [2.0])
    out["healthy"]["independent"] = independent([full])
    out["dead"]["single"] = single([dead], [0.0])
    ref = strict_policy()
    ref_a = MaskAuditor(sync=False)
    for b, loss in ((full, 2.0), (dead, 0.0)):
        ref_a.update(b["labels"], attention_mask=b["attention_mask"], loss=torch.tensor(loss))
        out["healthy" if loss else "dead"]["single_findings"] = findings(ref, ref_a.step())
    return out


def fail(rank: int, sequence: bool) -> dict[str, Any]:
    if sequence:
        mesh = init_device_mesh("cpu", (1, 2), mesh_dim_names=("dp", "cp"))
        a = MaskAuditor(process_group=mesh["dp"].get_group(), sequence_group=mesh["cp"].get_group())
    else:
        a = MaskAuditor()
    b = batch(seed=40) if sequence else batch(seed=40 + rank)
    s = shards(b)[rank]

    def feed() -> None:
        if sequence:  # this rank's shard of the shared batch
            a.update(None, shift_labels=s["shift_labels"], attention_mask=s["attention_mask"],
                     loss=torch.tensor([0.5, 1.5][rank]))
        else:  # this rank's own batch
            a.update(b["labels"], attention_mask=b["attention_mask"], loss=torch.tensor(2.0))

    feed()
    if rank == 1:
        a._pending.append(torch.zeros(3, dtype=torch.float64))  # injected: a malformed micro-batch vector
    out: dict[str, Any] = {}
    t0 = time.monotonic()
    try:
        a.step()
        out["outcome"] = "closed"
    except RankFailure as err:
        out.update(outcome="RankFailure", message=str(err), failures=err.failures, step=err.step)
    except Exception as err:  # noqa: BLE001 - recorded: the test says what was expected
        out.update(outcome=type(err).__name__, message=str(err))
    out["seconds"] = round(time.monotonic() - t0, 3)
    # the exchange stayed aligned: the next step closes on both ranks with both ranks' counts
    feed()
    r = a.step()
    every = [batch(seed=40)] if sequence else [batch(seed=40), batch(seed=41)]
    out["next_step"] = {"step": r.step, "total": counts(r.total), "single": single(every, [2.0] * len(every))}
    return out


def settings(rank: int) -> dict[str, Any]:
    a = MaskAuditor()
    a.fingerprint = 0x12345 if rank == 0 else 0x54321
    a.update(batch(seed=50)["labels"])
    try:
        a.step()
        return {"outcome": "closed"}
    except RankFailure as err:
        return {"outcome": "RankFailure", "message": str(err)}


def main() -> NoReturn:
    out_dir = Path(sys.argv[1])
    dist.init_process_group("gloo")
    rank = dist.get_rank()
    results: dict[str, Any] = {}
    for name, fn in (("dp_2x1", dp_2x1), ("tp_pair", tp_pair), ("cp_pair", cp_pair),
                     ("fail_rank1", lambda r: fail(r, False)), ("fail_cp", lambda r: fail(r, True)),
                     ("settings", settings)):
        t0 = time.monotonic()
        try:
            results[name] = fn(rank)
        except Exception:  # noqa: BLE001 - recorded for the test's message; later scenarios still run
            results[name] = {"error": traceback.format_exc()}
        results[name]["wall_s"] = round(time.monotonic() - t0, 3)
        (out_dir / f"result-rank{rank}.json").write_text(json.dumps(results, default=str))
    exit_worker(0)


if __name__ == "__main__":
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    main()
