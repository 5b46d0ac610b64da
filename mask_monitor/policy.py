"""The verdict: which checks fire, and with what action. No side effects.

:meth:`Policy.evaluate` runs the rules of :data:`mask_monitor.checks.CHECKS` over the totals of one
optimizer step (a :class:`~mask_monitor.reports.StepReport`, already global: every rank holds every
rank's counts) or of a whole dataset (``scope="dataset"``, what ``mask-monitor audit`` reads), and returns
:class:`~mask_monitor.checks.Finding` objects carrying each check's configured action. Because a step's
input is identical on every rank, every rank reaches the same verdict in the same step: the abort is agreed
without another collective. Acting on the verdict (log, export, raise, exit code) is the caller's job.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Iterable, Mapping
from typing import Any

from .checks import CHECKS, HISTORY, Check, Finding, RuleContext, Scope, explain
from .config import MonitorConfig
from .reports import StepReport, Totals

__all__ = ["Policy", "first_abort", "HISTORY"]


class Policy:
    """Evaluate totals against a :class:`MonitorConfig`.

    Keeps only bounded state: the last ``fully_masked_share_window`` steps (for the windowed share) and the
    last :data:`HISTORY` steps' totals.

    Example:
        >>> from mask_monitor.reports import StepReport, Totals
        >>> t = Totals(micro_batches=1, sequences=2, target_tokens=10, supervised_tokens=0,
        ...            masked_tokens=10, fully_masked_sequences=2, all_masked_batches=1)
        >>> r = StepReport(step=1, rank=0, world_size=1, total=t, per_rank=(t,), micro_batches=(t,))
        >>> [(f.check, f.action) for f in Policy().evaluate(r)]
        [('all_masked', 'abort')]
        >>> [(f.check, f.action) for f in Policy(MonitorConfig(all_masked="off")).evaluate(r)]
        []
    """

    def __init__(self, config: MonitorConfig | None = None) -> None:
        self.config = config or MonitorConfig()
        self._window: deque[Totals] = deque(maxlen=self.config.fully_masked_share_window)
        self._history: deque[Totals] = deque(maxlen=HISTORY)

    def reset(self) -> None:
        """Forget the steps seen (a new ``train()``)."""
        self._window.clear()
        self._history.clear()

    def state_dict(self) -> dict[str, Any]:
        """The bounded history (for a resumed run: a loss that had converged to 0 stays converged)."""
        return {"window": [t.values() for t in self._window], "history": [t.values() for t in self._history]}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        self.reset()
        self._window.extend(Totals.from_values(v) for v in state.get("window", ()))
        self._history.extend(Totals.from_values(v) for v in state.get("history", ()))

    def evaluate(
        self,
        report: StepReport | Totals,
        *,
        scope: Scope | None = None,
        step: int | None = None,
        only: Iterable[str] | None = None,
        details: Mapping[str, Any] | None = None,
    ) -> list[Finding]:
        """Findings for one step (a :class:`StepReport`) or one dataset (:class:`Totals`, ``scope="dataset"``).

        Args:
            only: evaluate these checks only (the ones whose inputs the caller really has).
            details: extra numbers for the messages (e.g. ``reasons``).
        """
        if isinstance(report, StepReport):
            totals, scope, step, world = report.total, scope or "step", report.step, report.world_size
        else:
            totals, scope, step, world = report, scope or "dataset", step or 0, 1
        if (totals.micro_batches == 0 and totals.unaudited_batches == 0 and totals.sequences == 0
                and totals.dropped_sequences == 0):
            return []
        if scope == "step":
            self._window.append(totals)
            window = Totals.total(self._window) if len(self._window) == self._window.maxlen else None
        else:
            window = totals
        ctx = RuleContext(self.config, scope, step, world, window, tuple(self._history))
        checks = CHECKS.values() if only is None else [CHECKS[name] for name in only]
        out = self._fire(totals, ctx, checks, details or {})
        if scope == "step":
            self._history.append(totals)
        return out

    def _fire(
        self, totals: Totals, ctx: RuleContext, checks: Iterable[Check], details: Mapping[str, Any]
    ) -> list[Finding]:
        numbers_base: dict[str, object] | None = None
        out: list[Finding] = []
        for check in checks:
            if ctx.scope not in check.scopes:
                continue
            action = self.config.action(check.name)
            if action == "off":
                continue
            extra = check.rule(totals, ctx)
            if extra is None:
                continue
            if numbers_base is None:
                numbers_base = {k: v for k, v in totals.as_dict().items() if v is not None}
                numbers_base["ranks"] = ctx.world_size
                numbers_base["step"] = ctx.step
                numbers_base["scope"] = ctx.scope
                numbers_base["where"] = f"in step {ctx.step}" if ctx.scope == "step" else "in the dataset"
                numbers_base.update(details)
            numbers = {**numbers_base, **extra}
            out.append(Finding(check.name, action, ctx.step, explain(check.name, numbers), numbers))
        return out


def first_abort(findings: list[Finding]) -> Finding | None:
    """The finding that stops training, if any: the first abort in :data:`~mask_monitor.checks.CHECKS` order."""
    aborts = [f for f in findings if f.action == "abort"]
    if not aborts:
        return None
    order = {name: i for i, name in enumerate(CHECKS)}
    return min(aborts, key=lambda f: order.get(f.check, len(order)))
