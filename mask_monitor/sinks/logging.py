"""The logging sink: every finding once, with its numbers, then counted; a run summary at the end.

Warnings go to the ``mask_monitor`` logger on the main process (the verdict is the same on every
rank, so one copy is enough). A check that fires again is counted, not repeated; the end-of-run line
lists how often each fired. Window aggregates are logged at INFO.
"""

from __future__ import annotations

import logging
from collections import Counter
from typing import Any

from ..errors import MaskMonitorAbort
from ..reports import RunInfo, StepReport, WindowReport
from .base import Finding, Sink

__all__ = ["LoggingSink"]

logger = logging.getLogger("mask_monitor")


def _pct(v: float | None) -> str:
    return "n/a" if v is None else f"{v:.1%}"


class LoggingSink(Sink):
    name = "logging"

    def __init__(self, log: logging.Logger | None = None) -> None:
        self.log = log or logger
        self.counts: Counter[str] = Counter()
        self.first_step: dict[str, int] = {}
        self.main = True
        self.rank = 0

    def on_train_begin(self, info: RunInfo) -> None:
        self.main = info.is_main_process
        self.rank = info.rank

    def on_step(self, report: StepReport, findings: list[Finding]) -> None:
        for f in findings:
            if f.action != "warn":
                continue
            self.counts[f.check] += 1
            if f.check in self.first_step:
                continue
            self.first_step[f.check] = f.step
            if self.main:
                self.log.warning("%s (logged once; later occurrences are counted)", f.message)

    def on_log(self, window: WindowReport) -> None:
        if not self.main:
            return
        t = window.total
        extra = ""
        if t.unaudited_batches:
            extra += f", {int(t.unaudited_batches)} micro-batches NOT audited (labels unreadable; loss checked)"
        if t.template_audited:
            extra = (
                f", prompt leakage {_pct(t.prompt_leakage_ratio)}, response coverage "
                f"{_pct(t.response_coverage_ratio)}"
            )
        self.log.info(
            "mask-monitor steps %d-%d: %d micro-batches, %d/%d target tokens supervised (masked %s), "
            "%d fully masked sequences, worst micro-batch masked %s%s",
            window.first_step,
            window.last_step,
            t.micro_batches,
            t.supervised_tokens,
            t.target_tokens,
            _pct(t.masked_ratio),
            t.fully_masked_sequences,
            _pct(window.worst_batch.get("masked_ratio")),
            extra,
        )

    def on_abort(self, error: MaskMonitorAbort, report: StepReport) -> None:
        self.log.error("rank %d: %s", self.rank, error)

    def on_train_end(self, summary: dict[str, Any]) -> None:
        if not self.main:
            return
        fired = ", ".join(f"{k} x{v} (first at step {self.first_step[k]})" for k, v in sorted(self.counts.items()))
        parts = [
            f"mask-monitor summary: {summary.get('steps', 0)} steps, {summary.get('micro_batches', 0)} "
            f"micro-batches, {summary.get('supervised_tokens', 0)}/{summary.get('target_tokens', 0)} target tokens "
            f"supervised (masked {_pct(summary.get('masked_ratio'))})"
        ]
        dropped = int(summary.get("dropped_sequences") or 0)
        if dropped:
            parts.append(f"{dropped} examples dropped as fully masked before training")
        aborted = summary.get("aborted")
        if aborted:
            step = (summary.get("first_step") or {}).get(aborted)
            at = f" at step {step}" if step is not None else ""
            parts.append(f"ABORTED by [{aborted}]{at}")
        not_audited = summary.get("not_audited") or {}
        if "masking" in not_audited:
            parts.append(not_audited["masking"])
        if fired:
            parts.append(f"warnings: {fired}")
        elif not aborted and "masking" not in not_audited:
            parts.append("warnings: none")
        if "prompt_leakage" in not_audited:
            parts.append(f"prompt leakage {not_audited['prompt_leakage']}")
        self.log.info("%s", "; ".join(parts))
