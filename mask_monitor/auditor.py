"""MaskAuditor: the framework-agnostic core. Feed it micro-batches, close steps, read reports.

Per micro-batch, :meth:`MaskAuditor.update` computes :func:`~mask_monitor.stats.batch_stats` on the
batch's device and keeps the vector there: no host sync. At the optimizer-step boundary,
:meth:`MaskAuditor.step` exchanges the step's vector with the other ranks (one ``all_gather`` when
``torch.distributed`` is initialised) and reads everything back in a single device-to-host copy: one
synchronisation per optimizer step, none per micro-batch. Windows (e.g. the Trainer's logging
interval) and run totals are kept on the host from those step reports.

Works in a plain PyTorch loop:

    >>> import torch
    >>> from mask_monitor import MaskAuditor, Policy
    >>> auditor, policy = MaskAuditor(), Policy()
    >>> labels = torch.tensor([[-100, -100, 7, 8, 9]])
    >>> auditor.update(labels=labels, loss=torch.tensor(2.5))
    >>> report = auditor.step()
    >>> report.total.supervised_tokens, report.total.masked_tokens
    (3.0, 1.0)
    >>> [f.check for f in policy.evaluate(report)]
    []
    >>> auditor.update(labels=torch.full((1, 5), -100), loss=torch.tensor(0.0))
    >>> [f.check for f in policy.evaluate(auditor.step())]
    ['all_masked']
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch

from .distributed import collective_device, gather_rows, rank_and_world
from .reports import StepReport, Totals, WindowReport
from .stats import FIELDS, batch_stats, combine, stats_dtype

__all__ = ["MaskAuditor"]

RoleTagger = Callable[[torch.Tensor, torch.Tensor | None], torch.Tensor]


class MaskAuditor:
    """Accumulates per-micro-batch statistics on the device; reports per step, window and run.

    Args:
        ignore_index: the label value the loss ignores.
        role_tagger: optional ``tagger(input_ids, position_ids) -> roles`` (see
            :class:`mask_monitor.templates.RoleTagger`) enabling the prompt-leakage audit.
        evidence_rows: how many leading rows of each micro-batch to keep (on device, until the next
            step closes) for an abort's evidence file.
        sync: gather across ranks at each step when ``torch.distributed`` is initialised.
    """

    def __init__(
        self,
        *,
        ignore_index: int = -100,
        role_tagger: RoleTagger | None = None,
        evidence_rows: int = 2,
        sync: bool = True,
    ) -> None:
        self.ignore_index = ignore_index
        self.role_tagger = role_tagger
        self.evidence_rows = evidence_rows
        self.sync = sync
        self._pending: list[torch.Tensor] = []
        self._pending_rows: list[dict[str, torch.Tensor]] = []
        self._device: torch.device | None = None
        self._last_rows: list[dict[str, torch.Tensor]] = []
        self.steps = 0
        self.last_step = 0
        self.run_total = Totals()
        self.run_per_rank: list[Totals] = []
        self._window: list[StepReport] = []
        self._worst: dict[str, float | int] = {}

    # ---------------------------------------------------------------- per micro-batch (hot path)
    def update(
        self,
        labels: torch.Tensor | None,
        *,
        input_ids: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.Tensor | None = None,
        shift_labels: torch.Tensor | None = None,
        loss: torch.Tensor | float | None = None,
        causal: bool = True,
    ) -> None:
        """Audit one micro-batch. Tensors stay on their device; nothing is read back.

        ``causal=False`` for encoder-decoder models (``labels`` are decoder targets, not shifted;
        ``attention_mask`` is the decoder's); see :func:`~mask_monitor.stats.batch_stats`.
        """
        roles = None
        if self.role_tagger is not None and input_ids is not None and causal:
            roles = self.role_tagger(input_ids, position_ids)
        vec = batch_stats(
            labels,
            attention_mask=attention_mask,
            position_ids=position_ids,
            shift_labels=shift_labels,
            loss=loss,
            roles=roles,
            ignore_index=self.ignore_index,
            causal=causal,
        )
        self._device = vec.device
        self._pending.append(vec)
        if self.evidence_rows > 0:  # one entry per micro-batch (empty when nothing is readable), aligned
            rows: dict[str, torch.Tensor] = {}
            for key, t in (("labels", labels), ("input_ids", input_ids), ("shift_labels", shift_labels),
                           ("attention_mask", attention_mask), ("position_ids", position_ids), ("roles", roles)):
                if isinstance(t, torch.Tensor) and t.dim() == 2:
                    rows[key] = t.detach()[: self.evidence_rows].clone()
            self._pending_rows.append(rows)

    def reset(self) -> None:
        """Forget everything: pending micro-batches, windows, run totals (a new run)."""
        self._pending, self._pending_rows, self._last_rows = [], [], []
        self.steps = 0
        self.last_step = 0
        self.run_total = Totals()
        self.run_per_rank = []
        self._window = []
        self._worst = {}

    def add_totals(self, totals: Totals) -> None:
        """Add counts known outside any batch (e.g. rows the dataset preparation dropped) to the run totals."""
        self.run_total = self.run_total + totals

    @property
    def pending_micro_batches(self) -> int:
        return len(self._pending)

    # ---------------------------------------------------------------- step boundary (one sync)
    def step(self, step: int | None = None) -> StepReport:
        """Close the optimizer step: exchange with other ranks, read back once, return the report.

        Every rank must call this once per step (it issues a collective when distributed).
        """
        rank, _ = rank_and_world()
        device = collective_device(self._device)
        dtype = stats_dtype(device)
        if self._pending:
            mb = torch.stack(self._pending).to(device=device, dtype=dtype)
        else:
            mb = torch.zeros((0, len(FIELDS)), dtype=dtype, device=device)
        local = combine(mb)
        rows = gather_rows(local) if self.sync else local.unsqueeze(0)
        payload = torch.cat([rows.reshape(-1), mb.reshape(-1)]).tolist()  # the one host sync
        k = len(FIELDS)
        n_ranks = rows.shape[0]
        per_rank = tuple(Totals.from_values(payload[i * k : (i + 1) * k]) for i in range(n_ranks))
        base = n_ranks * k
        micro = tuple(
            Totals.from_values(payload[base + i * k : base + (i + 1) * k]) for i in range(mb.shape[0])
        )
        if n_ranks == 1:
            rank = 0
        self.steps += 1
        self.last_step = self.steps if step is None else int(step)
        report = StepReport(
            step=self.last_step,
            rank=rank,
            world_size=n_ranks,
            total=Totals.total(per_rank),
            per_rank=per_rank,
            micro_batches=micro,
        )
        self._last_rows = self._pending_rows
        self._pending = []
        self._pending_rows = []
        self._accumulate(report)
        return report

    def _accumulate(self, report: StepReport) -> None:
        self.run_total = self.run_total + report.total
        if len(self.run_per_rank) != len(report.per_rank):
            self.run_per_rank = [Totals() for _ in report.per_rank]
        self.run_per_rank = [a + b for a, b in zip(self.run_per_rank, report.per_rank, strict=True)]
        self._window.append(report)
        ratios = [t.max_masked_ratio for t in report.per_rank]
        worst = max(ratios) if ratios else 0.0
        if not self._worst or worst > float(self._worst["masked_ratio"]):
            self._worst = {"masked_ratio": worst, "step": report.step, "rank": ratios.index(worst)}

    def evidence_rows_of_last_step(self) -> list[dict[str, list[list[int]]]]:
        """The kept leading rows of each micro-batch of the last closed step (reads them back)."""
        return [{k: v.tolist() for k, v in rows.items()} for rows in self._last_rows]

    # ---------------------------------------------------------------- windows and totals (host)
    def window(self) -> WindowReport | None:
        """Aggregate of the steps since the previous call (None if no step closed since)."""
        reports, self._window = self._window, []
        if not reports:
            return None
        n = len(reports[-1].per_rank)
        per_rank = tuple(Totals.total(r.per_rank[i] for r in reports if len(r.per_rank) == n) for i in range(n))
        ratios = [t.max_masked_ratio for t in per_rank]
        worst_idx = max(range(n), key=lambda i: ratios[i])
        worst_step = next(
            (r.step for r in reports if r.per_rank[worst_idx].max_masked_ratio == ratios[worst_idx]),
            reports[-1].step,
        )
        return WindowReport(
            first_step=reports[0].step,
            last_step=reports[-1].step,
            steps=len(reports),
            rank=reports[-1].rank,
            world_size=reports[-1].world_size,
            total=Totals.total(per_rank),
            per_rank=per_rank,
            worst_batch={"masked_ratio": ratios[worst_idx], "step": worst_step, "rank": worst_idx},
        )

    def summary(self) -> dict[str, Any]:
        """Run totals so far (all ranks), with derived ratios."""
        d: dict[str, Any] = {"steps": self.steps, "last_step": self.last_step}
        d.update(self.run_total.as_dict())
        d["batches"] = d["micro_batches"]
        d["worst_batch"] = dict(self._worst)
        return d

    # ---------------------------------------------------------------- resume
    def state_dict(self) -> dict[str, Any]:
        return {
            "steps": self.steps,
            "last_step": self.last_step,
            "run_total": self.run_total.values(),
            "run_per_rank": [t.values() for t in self.run_per_rank],
            "worst": dict(self._worst),
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.steps = int(state["steps"])
        self.last_step = int(state["last_step"])
        self.run_total = Totals.from_values(state["run_total"])
        self.run_per_rank = [Totals.from_values(v) for v in state["run_per_rank"]]
        self._worst = dict(state.get("worst", {}))
