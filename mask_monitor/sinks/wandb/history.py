"""The history rows: which ``mask_monitor/...`` keys exist, their x-axis and summaries, and one row's values.

Every key is derived from the declarations: window ratios from :data:`mask_monitor.counters.RATIOS`,
counts from :data:`mask_monitor.counters.COUNTERS`, one ``findings/<check>`` per
:data:`mask_monitor.checks.CHECKS` entry. A row is logged with ``train/global_step`` (the x-axis, as
transformers' ``WandbCallback`` defines it), never with ``commit=False`` (the values would land on the
next row) nor ``step=`` (out-of-order steps are dropped).

Example:
    >>> from mask_monitor.reports import Totals
    >>> t = Totals(micro_batches=1, sequences=2, target_tokens=8, supervised_tokens=6, masked_tokens=2)
    >>> row = window_row(t, {"masked_ratio": 0.5, "step": 3, "rank": 0}, steps=1)
    >>> row["mask_monitor/masked_ratio"], row["mask_monitor/supervised_tokens"], row["mask_monitor/worst_batch_step"]
    (0.25, 6, 3)
    >>> "mask_monitor/prompt_leakage_ratio" in row   # no chat template known: left out, not 0
    False
"""

from __future__ import annotations

from collections import Counter
from typing import Any

from ...checks import CHECKS, Finding
from ...counters import COUNTERS, RATIOS
from ...reports import StepReport, Totals

__all__ = [
    "PREFIX",
    "STEP_METRIC",
    "WINDOW_RATIOS",
    "WINDOW_COUNTS",
    "TEMPLATE_COUNTS",
    "ALARM_COUNTS",
    "HISTORY_KEYS",
    "METRIC_SUMMARIES",
    "window_row",
    "define_metrics",
    "PendingSteps",
]

PREFIX = "mask_monitor/"
#: The x-axis: the Trainer's optimizer step, as transformers' WandbCallback defines it.
STEP_METRIC = "train/global_step"

#: Ratios of a row (the mean loss is left to the Trainer's own ``train/loss``).
WINDOW_RATIOS: tuple[str, ...] = tuple(r.name for r in RATIOS if r.name != "mean_loss")
_WINDOW = [c for c in COUNTERS if c.scope == "batch" and c.reduce == "sum" and c.integral]
#: Whole counts of every row, and those that exist only when a chat template is known.
WINDOW_COUNTS: tuple[str, ...] = tuple(c.name for c in _WINDOW if not c.template)
TEMPLATE_COUNTS: tuple[str, ...] = tuple(c.name for c in _WINDOW if c.template)
_WORST = ("worst_batch_masked_ratio", "worst_batch_step", "worst_batch_rank")


def _alarm_counts() -> tuple[str, ...]:
    """Counts one unit of which makes a micro-batch the offending one of some check (``Check.offending``)."""
    return tuple(
        name
        for name in (*WINDOW_COUNTS, *TEMPLATE_COUNTS)
        if any(c.offending is not None and c.offending(Totals(**{name: 1})) for c in CHECKS.values())
    )


#: Counts whose window maximum is worth keeping in the run summary (any unit of them fires a check).
ALARM_COUNTS: tuple[str, ...] = _alarm_counts()

#: Every history key the sink may write (ratios are left out of a row where undefined, template counts
#: where no chat template is known).
HISTORY_KEYS: tuple[str, ...] = tuple(
    PREFIX + k for k in (*WINDOW_RATIOS, *WINDOW_COUNTS, *TEMPLATE_COUNTS, *_WORST, "window_steps", "aborted")
) + tuple(f"{PREFIX}findings/{c}" for c in CHECKS)

#: Run-summary aggregates W&B keeps for a history key (``define_metric(..., summary=...)``).
METRIC_SUMMARIES: dict[str, str] = {
    **{PREFIX + r.name: r.summary for r in RATIOS if r.name in WINDOW_RATIOS},
    PREFIX + "worst_batch_masked_ratio": "max,last",
    **{PREFIX + k: "max,last" for k in ALARM_COUNTS},
}


def window_row(
    total: Totals, worst: dict[str, Any], steps: int, findings: dict[str, int] | None = None
) -> dict[str, Any]:
    """The ``mask_monitor/...`` values of one history row (without the step metric)."""
    row: dict[str, Any] = {}
    for k in WINDOW_RATIOS:
        v = getattr(total, k)
        if v is not None:
            row[PREFIX + k] = v
    for k in WINDOW_COUNTS:
        row[PREFIX + k] = int(getattr(total, k))
    if total.template_audited:
        for k in TEMPLATE_COUNTS:
            row[PREFIX + k] = int(getattr(total, k))
    if worst:
        row[PREFIX + "worst_batch_masked_ratio"] = float(worst.get("masked_ratio", 0.0))
        row[PREFIX + "worst_batch_step"] = int(worst.get("step", 0))
        row[PREFIX + "worst_batch_rank"] = int(worst.get("rank", 0))
    row[PREFIX + "window_steps"] = int(steps)
    counts = findings or {}
    for check in CHECKS:
        row[f"{PREFIX}findings/{check}"] = int(counts.get(check, 0))
    return row


def define_metrics(run: Any) -> None:
    """Put every ``mask_monitor/`` key on the step axis, with the summaries of :data:`METRIC_SUMMARIES`."""
    run.define_metric(STEP_METRIC)
    run.define_metric(PREFIX + "*", step_metric=STEP_METRIC)
    for key, summary in METRIC_SUMMARIES.items():
        run.define_metric(key, step_metric=STEP_METRIC, summary=summary)


class PendingSteps:
    """The steps since the last logging step, as running totals: the checks that fired (for the next
    row), and what an abort's last row describes (the stopped step never reaches a logging step)."""

    def __init__(self) -> None:
        self.total = Totals()
        self.steps = 0
        self.worst: dict[str, Any] = {}
        self.findings: Counter[str] = Counter()

    def add(self, report: StepReport, findings: list[Finding]) -> None:
        self.total = self.total + report.total
        self.steps += 1
        for rank, t in enumerate(report.per_rank):
            if not self.worst or t.max_masked_ratio > self.worst["masked_ratio"]:
                self.worst = {"masked_ratio": t.max_masked_ratio, "step": report.step, "rank": rank}
        for f in findings:
            self.findings[f.check] += 1

    def row(self) -> dict[str, Any]:
        """The row of these steps (:func:`window_row`)."""
        return window_row(self.total, self.worst, self.steps, dict(self.findings))
