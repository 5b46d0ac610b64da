"""The evidence file an abort leaves on disk: what was seen, where, and the offending rows.

``<output_dir>/mask_monitor/abort-rank<R>.json`` holds the reason, step, rank, the counts behind the
verdict, this rank's per-micro-batch counts, the rank and micro-batch at fault (``offending_rank``,
``offending_micro_batch``, found from the exchanged per-rank counts) and, in the file of the rank that
holds it, the first rows of that micro-batch's ``input_ids`` and labels (a healthy rank's file names the
file that has them). With ``decoded_text`` ``"local"`` (the default) or ``"all"``
(:attr:`MonitorConfig.decoded_text <mask_monitor.config.MonitorConfig>`) and a known tokenizer, those
rows are also decoded to text (:data:`DECODED_KEYS`); with ``"none"`` the file holds token ids and
counts only. SFT data often carries personal or licensed text, so the file is written owner-only
(mode 0600), and the ``mask_monitor`` directory, when the monitor creates it, too (0700).

Writing it never raises: a monitor that cannot write its evidence still stops the run, and says so.
"""

from __future__ import annotations

import json
import logging
import os
import tempfile
import time
from collections.abc import Callable
from typing import Any

from .checks import CHECKS
from .reports import StepReport, Totals

__all__ = [
    "write_evidence",
    "evidence_path",
    "read_evidence",
    "without_decoded_text",
    "write_json_private",
    "DECODED_KEYS",
]

logger = logging.getLogger("mask_monitor")

#: Keys of ``offending_micro_batch`` that hold decoded training text (absent with ``decoded_text="none"``).
DECODED_KEYS: tuple[str, ...] = ("decoded", "decoded_supervised")

FILE_MODE = 0o600
DIR_MODE = 0o700


def evidence_path(output_dir: str | os.PathLike[str] | None, rank: int) -> str:
    base = os.fspath(output_dir) if output_dir else "."
    return os.path.join(base, "mask_monitor", f"abort-rank{rank}.json")


def _flagged_first(pick: Callable[[Totals], bool], first: tuple[int, ...]) -> int | None:
    """Another rank's first micro-batch ``pick`` flags, from its exchanged first-positive index per counter
    (exact for the declared predicates, which each test one counter)."""
    for i in sorted({f for f in first if f >= 0}):
        if pick(Totals.from_values(1.0 if f == i else 0.0 for f in first)):
            return i
    return None


def offending(reason: str, report: StepReport) -> tuple[int, int | None]:
    """``(index into report.per_rank, micro-batch index)`` of the micro-batch at fault.

    The rank is this one when the check's ``offending`` predicate flags its own step counts, else the first
    rank whose exchanged counts it flags; the micro-batch is that rank's first flagged one (from this
    rank's own micro-batch counts, or the other rank's exchanged first-positive indices; None if unknown).
    """
    check = CHECKS.get(reason)
    pick = check.offending if check is not None else None
    if pick is None:
        return report.rank, 0
    mine = pick(report.local)
    at = report.rank if mine else next((r for r, t in enumerate(report.per_rank) if pick(t)), report.rank)
    if at == report.rank:
        return at, next((i for i, t in enumerate(report.micro_batches) if pick(t)), 0)
    if at < len(report.first_positive):
        return at, _flagged_first(pick, report.first_positive[at])
    return at, None


def _decode(tokenizer: Any, ids: list[int]) -> str | None:
    try:
        return tokenizer.decode(ids, skip_special_tokens=False)
    except Exception:  # noqa: BLE001 - evidence is best effort
        return None


def without_decoded_text(doc: dict[str, Any]) -> dict[str, Any]:
    """A copy of an evidence document without its decoded text (token ids and counts kept).

    >>> without_decoded_text({"reason": "all_masked", "offending_micro_batch": {"input_ids": [[1]], "decoded": ["hi"]}})
    {'reason': 'all_masked', 'offending_micro_batch': {'input_ids': [[1]]}}
    """
    sample = {k: v for k, v in (doc.get("offending_micro_batch") or {}).items() if k not in DECODED_KEYS}
    return {**doc, "offending_micro_batch": sample}


def write_json_private(path: str, doc: Any) -> None:
    """Write ``doc`` as JSON to ``path`` atomically, readable and writable by the owner only (0600); the
    parent directory, if created here, is 0700. Raises OSError."""
    folder = os.path.dirname(path) or "."
    os.makedirs(folder, mode=DIR_MODE, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{os.path.basename(path)}.", suffix=".tmp", dir=folder)  # mode 0600
    try:
        os.fchmod(fd, FILE_MODE)
        with os.fdopen(fd, "w", encoding="utf-8") as fh:
            json.dump(doc, fh, indent=2, default=str)
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except OSError:
            pass
        raise


def read_evidence(path: str | None) -> dict[str, Any] | None:
    """The evidence document at ``path`` (None when there is no such file)."""
    if not path or not os.path.isfile(path):
        return None
    with open(path, encoding="utf-8") as fh:
        return json.load(fh)  # type: ignore[no-any-return]


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
    decoded_text: str = "local",
) -> str | None:
    """Write the evidence JSON and return its path (None, with one error log, if it cannot be written).

    ``decoded_text``: ``"local"`` or ``"all"`` add the decoded rows (when ``tokenizer`` is given);
    ``"none"`` (or anything else) leaves them out.
    """
    path = evidence_path(output_dir, rank)
    at, index = offending(reason, report)
    at_rank = report.global_rank(at)
    sample: dict[str, Any] = {"rank": at_rank, "micro_batch_index": index}
    if at != report.rank:  # its rows are on the rank that has them, in that rank's evidence file
        sample["rows_in"] = os.path.basename(evidence_path(output_dir, at_rank))
    elif index is not None and 0 <= index < len(rows):
        batch = rows[index]
        sample.update(batch)
        if decoded_text in ("local", "all") and tokenizer is not None and "input_ids" in batch:
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
        "offending_rank": at_rank,
        "numbers": numbers,
        "step_total": report.total.as_dict(),
        "this_rank": report.local.as_dict(),
        "micro_batches": [t.as_dict() for t in report.micro_batches],
        "offending_micro_batch": sample,
    }
    try:
        write_json_private(path, doc)
        return path
    except OSError as exc:
        logger.error("mask-monitor: could not write the abort evidence to %s: %s", path, exc)
        return None
