"""The evidence file an abort leaves on disk: what was seen, where, and the offending rows.

``<output_dir>/mask_monitor/abort-rank<R>.json`` holds the reason, step, rank, the counts behind the
verdict, this rank's per-micro-batch counts, and the first rows of the offending micro-batch's
``input_ids`` and labels, decoded to text when a tokenizer is known. Writing it never raises: a
monitor that cannot write its evidence still stops the run, and says so.
"""

from __future__ import annotations

import json
import logging
import os
import time
from typing import Any

from .reports import StepReport

__all__ = ["write_evidence", "evidence_path"]

logger = logging.getLogger("mask_monitor")


def evidence_path(output_dir: str | os.PathLike[str] | None, rank: int) -> str:
    base = os.fspath(output_dir) if output_dir else "."
    return os.path.join(base, "mask_monitor", f"abort-rank{rank}.json")


def _offending_index(reason: str, report: StepReport) -> int:
    mbs = report.micro_batches
    pick = {
        "all_masked": lambda t: t.all_masked_batches > 0,
        "all_masked_micro_batch": lambda t: t.all_masked_batches > 0,
        "zero_loss": lambda t: t.zero_loss_batches > 0,
        "non_finite_loss": lambda t: t.non_finite_loss_batches > 0,
        "fully_masked_share": lambda t: t.fully_masked_sequences > 0,
        "fully_masked_sequences": lambda t: t.fully_masked_sequences > 0,
        "prompt_leakage": lambda t: t.prompt_leakage_tokens > 0,
        "unmasked": lambda t: t.unmasked_batches > 0,
    }.get(reason)
    if pick is not None:
        for i, t in enumerate(mbs):
            if pick(t):
                return i
    return 0


def _decode(tokenizer: Any, ids: list[int]) -> str | None:
    try:
        return tokenizer.decode(ids, skip_special_tokens=False)
    except Exception:  # noqa: BLE001 - evidence is best effort
        return None


def write_evidence(
    *,
    output_dir: str | os.PathLike[str] | None,
    reason: str,
    step: int,
    rank: int,
    numbers: dict[str, Any],
    report: StepReport,
    rows: list[dict[str, list[list[int]]]],
    tokenizer: Any = None,
    ignore_index: int = -100,
    message: str = "",
) -> str | None:
    """Write the evidence JSON and return its path (None, with one error log, if it cannot be written)."""
    path = evidence_path(output_dir, rank)
    index = _offending_index(reason, report)
    sample: dict[str, Any] = {"micro_batch_index": index}
    if 0 <= index < len(rows):
        batch = rows[index]
        sample.update(batch)
        if tokenizer is not None and "input_ids" in batch:
            sample["decoded"] = [_decode(tokenizer, r) for r in batch["input_ids"]]
            labels = batch.get("labels") or []
            sample["decoded_supervised"] = [
                _decode(tokenizer, [t for t in lab if t != ignore_index]) for lab in labels
            ]
    doc = {
        "reason": reason,
        "step": step,
        "rank": rank,
        "world_size": report.world_size,
        "time": time.time(),
        "message": message,
        "numbers": numbers,
        "step_total": report.total.as_dict(),
        "this_rank": report.local.as_dict(),
        "micro_batches": [t.as_dict() for t in report.micro_batches],
        "offending_micro_batch": sample,
    }
    try:
        os.makedirs(os.path.dirname(path), exist_ok=True)
        tmp = f"{path}.tmp"
        with open(tmp, "w", encoding="utf-8") as fh:
            json.dump(doc, fh, indent=2, default=str)
        os.replace(tmp, path)
        return path
    except OSError as exc:
        logger.error("mask-monitor: could not write the abort evidence to %s: %s", path, exc)
        return None
