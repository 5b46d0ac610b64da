"""The errors mask-monitor raises.

* :class:`MaskMonitorAbort`: training was stopped because of a pathology in the labels or the loss. It
  carries structured fields (reason, step, rank, numbers, evidence path) and builds its actionable message
  from the check's declaration (:func:`mask_monitor.checks.explain`). It pickles (``__reduce__``), so it
  survives process boundaries (torchrun, multiprocessing).
* :class:`RankFailure`: a rank could not close an optimizer step (a fault of the monitor or of its input on
  that rank, or ranks running different settings); every rank of the exchange raises it in the same step,
  naming the failing rank and its exception, instead of leaving a rank waiting in a collective.
* :class:`InputError`: input the monitor cannot use (a dataset, a tokenizer, a setting of the audit); the
  CLI prints it as one line and exits 2.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from .checks import CHECKS, explain

__all__ = ["MaskMonitorAbort", "RankFailure", "InputError", "ABORT_REASONS"]

#: Every reason an abort can carry: the checks, in priority order.
ABORT_REASONS: tuple[str, ...] = tuple(CHECKS)


class InputError(ValueError):
    """Input the monitor cannot use: unreadable data, an unknown tokenizer, settings TRL refuses."""


class MaskMonitorAbort(RuntimeError):
    """Training was stopped by mask-monitor because of a pathology in the labels or the loss.

    Attributes:
        reason: one of :data:`ABORT_REASONS`.
        step: the optimizer step that was stopped (numbered as the Trainer would once applied).
        rank: the rank that raised (every rank raises in the same step).
        evidence_path: the JSON file written before raising, or None if it could not be written.
        numbers: the counts behind the decision.

    Example:
        >>> err = MaskMonitorAbort("all_masked", step=1, rank=0, numbers={"target_tokens": 12})
        >>> err.reason, err.step
        ('all_masked', 1)
    """

    def __init__(
        self,
        reason: str,
        *,
        step: int,
        rank: int = 0,
        numbers: Mapping[str, object] | None = None,
        evidence_path: str | None = None,
        message: str | None = None,
    ) -> None:
        self.reason = reason
        self.step = step
        self.rank = rank
        self.numbers = dict(numbers or {})
        self.evidence_path = evidence_path
        self.message = message or explain(reason, {"step": step, **self.numbers})
        text = self.message
        if evidence_path:
            text += f"\nEvidence: {evidence_path}"
        super().__init__(text)

    def __reduce__(self) -> tuple[Any, ...]:
        return (_rebuild, (self.reason, self.step, self.rank, self.numbers, self.evidence_path, self.message))


def _rebuild(
    reason: str, step: int, rank: int, numbers: dict[str, object], evidence_path: str | None, message: str
) -> MaskMonitorAbort:
    return MaskMonitorAbort(
        reason, step=step, rank=rank, numbers=numbers, evidence_path=evidence_path, message=message
    )


class RankFailure(RuntimeError):
    """A rank could not close the optimizer step; every rank of the exchange raises this, in the same step.

    Attributes:
        step: the optimizer step being closed.
        failures: ``(global rank, "ExceptionType: message")`` for every rank that failed (rank -1: a
            disagreement between ranks, e.g. different settings).
    """

    def __init__(self, step: int, failures: list[tuple[int, str]], *, rank: int = 0) -> None:
        self.step = step
        self.failures = list(failures)
        self.rank = rank
        named = "; ".join(f"rank {r}: {msg}" if r >= 0 else msg for r, msg in self.failures) or "no message"
        super().__init__(
            f"mask-monitor: could not close optimizer step {step} on every rank ({named}). Every rank stops "
            "here, in the same step, rather than leave a rank waiting in a collective the others skipped. This "
            "is a fault of the monitor or of its input on that rank, not a finding about your data: report it "
            "with the message above, or pass MaskMonitorCallback(enabled=False) or MASK_MONITOR_ENABLED=0 to "
            "train without the monitor."
        )

    def __reduce__(self) -> tuple[Any, ...]:
        return (_rebuild_failure, (self.step, self.failures, self.rank))


def _rebuild_failure(step: int, failures: list[tuple[int, str]], rank: int) -> RankFailure:
    return RankFailure(step, failures, rank=rank)
