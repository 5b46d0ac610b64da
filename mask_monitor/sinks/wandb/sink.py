"""WandbSink: the monitor's events turned into W&B history rows, table rows, summary, alert and finish.

The sink only orchestrates; what it writes is built in :mod:`.history` (rows), :mod:`.table` (the
evidence table) and :mod:`.summary` (summary, alert, evidence copy); :mod:`.runtime` finds wandb and
guards every call.
"""

from __future__ import annotations

import logging
from typing import Any

from ...errors import MaskMonitorAbort
from ...evidence import read_evidence
from ...reports import RunInfo, StepReport, WindowReport
from ..base import Finding, Sink
from .history import PREFIX, STEP_METRIC, PendingSteps, define_metrics, window_row
from .runtime import Guard, load_wandb
from .summary import abort_summary, alert_text, run_summary, save_evidence, update_summary
from .table import TABLE_KEY, EvidenceTable

__all__ = ["WandbSink"]

logger = logging.getLogger("mask_monitor")


class WandbSink(Sink):
    """Log the audit into the active W&B run, on the main process.

    Pass it to the callback: ``MaskMonitorCallback(sinks=[WandbSink(table_max_rows=16)])``. Given this way,
    a missing or disabled wandb is one warning at train begin. Without it, the callback adds a default
    one by itself when a W&B run is active (``wandb=None``, see :class:`~mask_monitor.MaskMonitorCallback`).

    Args:
        table_top_k: a sequence enters the evidence table when it is worse (higher masked ratio) than
            the ``table_top_k``-th worst sequence seen so far, or while fewer have been seen.
        table_max_rows: hard cap on the rows of the evidence table over the whole run.
        html_max_tokens: tokens rendered per sequence (the rest is summarised as ``... (+N tokens)``).

    Whether token text reaches W&B is decided by ``MonitorConfig.decoded_text`` (``RunInfo.decoded_text``):
    only ``"all"`` sends it (token pieces in the evidence table, decoded rows in the saved evidence file).

    Example:
        >>> sink = WandbSink(table_top_k=4)
        >>> sink.table.top_k, sink.table.max_rows
        (4, 64)
    """

    name = "wandb"
    wants_batches = True

    def __init__(self, *, table_top_k: int = 8, table_max_rows: int = 64, html_max_tokens: int = 256) -> None:
        if table_top_k < 1 or table_max_rows < 0 or html_max_tokens < 1:
            raise ValueError(
                f"WandbSink(table_top_k={table_top_k}, table_max_rows={table_max_rows}, "
                f"html_max_tokens={html_max_tokens}): expected table_top_k >= 1, table_max_rows >= 0, "
                "html_max_tokens >= 1"
            )
        self.table = EvidenceTable(table_top_k, table_max_rows, html_max_tokens)
        #: ``tagger(input_ids, position_ids) -> roles`` (the auditor's, handed over by the callback at train
        #: begin), giving each table row its prompt-leakage count.
        self.role_tagger: Any = None
        self.ignore_index = -100
        self.info = RunInfo()
        self._wandb: Any = None
        self._run: Any = None
        self._guard = Guard()
        self._pending = PendingSteps()
        self._error: MaskMonitorAbort | None = None
        self._finished = False

    # ------------------------------------------------------------------ creation
    @classmethod
    def maybe_create(cls, force: bool = False, **kwargs: Any) -> WandbSink | None:
        """A sink when a W&B run is (or, with ``force``, may become) active on this process; else None.

        Returns None, with one debug line, when wandb is not installed, disabled by ``WANDB_DISABLED`` /
        ``WANDB_MODE=disabled``, or no run is active (without ``force``). wandb is not even imported
        unless the process already did (a run cannot be active otherwise) or ``force`` asks for it.
        With ``force`` (``MaskMonitorCallback(wandb=True)``) a missing or disabled wandb is a warning.
        """
        wandb = load_wandb(explicit=force)
        if wandb is None:
            return None
        if getattr(wandb, "run", None) is None and not force:
            logger.debug("mask-monitor: no active wandb run: W&B logging off")
            return None
        sink = cls(**kwargs)
        sink._wandb = wandb
        return sink

    # ------------------------------------------------------------------ helpers
    def _active_run(self) -> Any:
        """The run to log to, looked up each time (a run can start late or be finished by its owner)."""
        if not self.info.is_main_process or self._finished or self._wandb is None:
            return None
        run = getattr(self._wandb, "run", None)
        if run is None:
            return None
        if self._run is not run:
            self._run = run
            self._guard("define_metric", define_metrics, run)
        return run

    def _log(self, run: Any, row: dict[str, Any]) -> None:
        self._guard("log", run.log, row)

    window_row = staticmethod(window_row)
    alert_text = staticmethod(alert_text)

    def render_html(self, cand: dict[str, Any]) -> str:
        """One evidence-table row's tokens as HTML (see :meth:`EvidenceTable.render_html`)."""
        return self.table.render_html(cand)

    # ------------------------------------------------------------------ Sink events
    def on_train_begin(self, info: RunInfo) -> None:
        # a sink object may serve several train() calls: each starts clean
        self.info = info
        self._run = None
        self._pending = PendingSteps()
        self._error = None
        self._finished = False
        self.table.reset()
        self.table.tokenizer = self.tokenizer
        self.table.role_tagger = self.role_tagger
        self.table.ignore_index = self.ignore_index
        self.table.token_text = info.remote_text
        if not info.is_main_process:
            return
        if self._wandb is None:  # given by the user (not maybe_create): W&B was asked for explicitly
            self._wandb = load_wandb(explicit=True)
        run = self._active_run()
        if run is None:
            if self._wandb is not None:
                logger.debug("mask-monitor: no wandb run at train begin; the W&B sink waits for one")
            return
        info.wandb_run_id = getattr(run, "id", None)
        self._guard(
            "summary",
            update_summary,
            run,
            {"status": "running", "version": info.version, "template_family": info.template_family or "none"},
        )

    def on_step(self, report: StepReport, findings: list[Finding]) -> None:
        self._pending.add(report, findings)

    def on_log(self, window: WindowReport) -> None:
        findings = dict(self._pending.findings)
        self._pending = PendingSteps()
        run = self._active_run()
        if run is None:
            return
        row = window_row(window.total, window.worst_batch, window.steps, findings)
        row[STEP_METRIC] = window.last_step
        self._log(run, row)

    def on_micro_batch_rows(self, report: StepReport, rows: list[dict[str, list[list[int]]]]) -> None:
        run = self._active_run()
        if run is None:
            return
        candidates = self._guard("evidence rows", self._candidates, report, rows) or []
        if self._guard("table", self.table.add_worst, self._wandb, candidates):
            self._guard("table", run.log, {TABLE_KEY: self.table.table, STEP_METRIC: report.step})

    def _candidates(self, report: StepReport, rows: list[dict[str, list[list[int]]]]) -> list[dict]:
        out: list[dict] = []
        for mb, batch in enumerate(rows):
            out += self.table.candidates(report.step, report.rank, mb, batch, "log")
        return out

    def on_abort(self, error: MaskMonitorAbort, report: StepReport) -> None:
        self._error = error
        if self._pending.steps == 0:  # on_step did not see the stopped step
            self.on_step(report, [])
        pending, self._pending = self._pending, PendingSteps()
        run = self._active_run()
        if run is None:
            return
        # The stopped step never reaches on_log: log the steps since the last logging step, ending on it.
        row = pending.row()
        row[PREFIX + "aborted"] = 1
        row[STEP_METRIC] = error.step
        # Evidence rows of the offending micro-batch, from the evidence file the callback wrote.
        evidence = self._guard("evidence file", read_evidence, error.evidence_path)
        if evidence:
            cands = self._guard("evidence rows", self._abort_candidates, error, evidence) or []
            if self._guard("table", self.table.add_rows, self._wandb, cands):
                row[TABLE_KEY] = self.table.table
        self._log(run, row)
        if evidence and error.evidence_path:
            self._guard("save evidence", save_evidence, run, error.evidence_path, evidence,
                        token_text=self.info.remote_text)
        self._guard("alert", self._alert, run, error, report)
        self._guard("summary", update_summary, run, abort_summary(error))

    def _abort_candidates(self, error: MaskMonitorAbort, evidence: dict[str, Any]) -> list[dict]:
        sample = evidence.get("offending_micro_batch") or {}
        if "labels" not in sample:
            return []
        rank = int(evidence.get("rank", error.rank))
        return self.table.candidates(error.step, rank, int(sample.get("micro_batch_index", 0)), sample, "abort")

    def on_train_end(self, summary: dict[str, Any]) -> None:
        run = self._active_run()
        if run is None:
            return
        values = run_summary(summary)
        if self._error is not None:
            values.update(abort_summary(self._error))
        else:
            values["status"] = "completed"
        self._guard("summary", update_summary, run, values)
        if self._error is not None:
            self._finish_failed(run)

    def close(self) -> None:
        if self._error is not None and not self._finished:
            run = self._active_run()
            if run is not None:
                self._finish_failed(run)

    # ------------------------------------------------------------------ alert, finish
    def _alert(self, run: Any, error: MaskMonitorAbort, report: StepReport) -> None:
        title, text = alert_text(error, report)
        level = getattr(getattr(self._wandb, "AlertLevel", None), "ERROR", "ERROR")
        run.alert(title=title, text=text, level=level)

    def _finish_failed(self, run: Any) -> None:
        self._finished = True
        self._guard("finish", lambda: run.finish(exit_code=1))
