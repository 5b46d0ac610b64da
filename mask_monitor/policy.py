"""The verdict: which checks fire for an optimizer step, and with what action. No side effects.

:meth:`Policy.evaluate` reads a :class:`~mask_monitor.reports.StepReport` (already global: every rank
holds every rank's counts) and returns :class:`~mask_monitor.sinks.base.Finding` objects. Because the
input is identical on every rank, every rank reaches the same verdict in the same step: the abort is
agreed without another collective. Acting on the verdict (log, export, raise) is the caller's job.
"""

from __future__ import annotations

from collections import deque

from .config import MonitorConfig
from .errors import ABORT_REASONS, _Defaulting, explain
from .reports import StepReport
from .sinks.base import Finding

__all__ = ["Policy", "first_abort"]

_WARN_TEXT = {
    "fully_masked_sequences": (
        "{fully_masked_sequences} of {sequences} sequences in step {step} have no supervised target (their "
        "response was truncated away or never found); they cost compute and teach nothing."
    ),
    "all_masked_micro_batch": (
        "{all_masked_batches} of {micro_batches} micro-batches in step {step} have no supervised target; the "
        "step still has {supervised_tokens} supervised tokens elsewhere, so it trains (use "
        "all_masked_micro_batch='abort' for the strict policy)."
    ),
    "unmasked": (
        "{unmasked_batches} of {micro_batches} micro-batches in step {step} have no masking at all: every "
        "target token is trained on, prompt included. Expected for pre-training style data; for chat SFT it "
        "usually means masking is disabled (labels == input_ids, assistant_only_loss/completion_only_loss off)."
    ),
    "supervised_padding": (
        "{supervised_padding_tokens} supervised targets in step {step} are padding or cross a packed-document "
        "boundary: the loss trains on them (labels of pad tokens should be -100)."
    ),
    "response_coverage": (
        "only {supervised_assistant_content_tokens} of {assistant_content_tokens} assistant tokens in step "
        "{step} are supervised ({share:.1%}, threshold {threshold:.1%}): parts of the responses are masked "
        "(truncation, or a response marker that matches too late)."
    ),
    "eot_unsupervised": (
        "none of the {assistant_turns} assistant end-of-turn tokens in step {step} is supervised: the model "
        "never learns to stop (include the end-of-turn token in the assistant mask)."
    ),
}


class Policy:
    """Evaluate a step's counts against a :class:`MonitorConfig`.

    Example:
        >>> from mask_monitor.reports import StepReport, Totals
        >>> t = Totals(micro_batches=1, sequences=2, target_tokens=10, supervised_tokens=0,
        ...            masked_tokens=10, fully_masked_sequences=2, all_masked_batches=1)
        >>> r = StepReport(step=1, rank=0, world_size=1, total=t, per_rank=(t,), micro_batches=(t,))
        >>> [(f.check, f.action) for f in Policy().evaluate(r)]
        [('all_masked', 'abort')]
    """

    def __init__(self, config: MonitorConfig | None = None) -> None:
        self.config = config or MonitorConfig()
        self._share: deque[tuple[float, float]] = deque(maxlen=self.config.fully_masked_share_window)

    def evaluate(self, report: StepReport) -> list[Finding]:
        c = self.config
        t = report.total
        step = report.step
        out: list[Finding] = []
        if t.micro_batches == 0:
            return out
        numbers = {k: v for k, v in t.as_dict().items() if v is not None}
        numbers["ranks"] = report.world_size
        numbers["step"] = step

        def fire(check: str, extra: dict | None = None) -> None:
            action = getattr(c, check)
            if action == "off":
                return
            nums = {**numbers, **(extra or {})}
            if check in _WARN_TEXT:
                message = "mask-monitor [" + check + "]: " + _WARN_TEXT[check].format_map(_Defaulting(nums))
            else:
                message = explain(check, nums)
            out.append(Finding(check, action, step, message, nums))

        if t.supervised_tokens == 0:
            fire("all_masked")
        elif t.all_masked_batches > 0:
            fire("all_masked_micro_batch")
        if t.zero_loss_batches > 0:
            fire("zero_loss")
        if t.non_finite_loss_batches > 0:
            fire("non_finite_loss")
        dead = t.supervised_tokens == 0  # all_masked already says it; the implied warnings stay quiet
        if t.fully_masked_sequences > 0 and not dead:
            fire("fully_masked_sequences")
        self._share.append((t.fully_masked_sequences, t.sequences))
        if len(self._share) == self._share.maxlen:
            fm = sum(a for a, _ in self._share)
            seqs = sum(b for _, b in self._share)
            if seqs > 0 and fm / seqs > c.fully_masked_share_threshold:
                fire(
                    "fully_masked_share",
                    {
                        "fully_masked_sequences": fm,
                        "sequences": seqs,
                        "share": fm / seqs,
                        "threshold": c.fully_masked_share_threshold,
                        "window_steps": len(self._share),
                    },
                )
        if t.unmasked_batches > 0:
            fire("unmasked")
        if t.supervised_padding_tokens > 0:
            fire("supervised_padding")
        leak = t.prompt_leakage_ratio
        if leak is not None and leak > c.prompt_leakage_threshold:
            fire("prompt_leakage", {"share": leak, "threshold": c.prompt_leakage_threshold})
        cov = t.response_coverage_ratio
        if cov is not None and cov < c.response_coverage_threshold and not dead:
            fire("response_coverage", {"share": cov, "threshold": c.response_coverage_threshold})
        if t.assistant_turns > 0 and t.supervised_eot_turns == 0 and not dead:
            fire("eot_unsupervised")
        return out


def first_abort(findings: list[Finding]) -> Finding | None:
    """The finding that stops training, if any: the first abort in :data:`ABORT_REASONS` order."""
    aborts = [f for f in findings if f.action == "abort"]
    if not aborts:
        return None
    order = {r: i for i, r in enumerate(ABORT_REASONS)}
    return min(aborts, key=lambda f: order.get(f.check, len(order)))

