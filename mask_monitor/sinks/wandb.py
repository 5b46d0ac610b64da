"""The Weights & Biases sink: the audit on the run's charts, summary, alerts and an evidence table.

It never starts a run. It logs into the run that is active on the main process: the one
transformers' ``WandbCallback`` opens (``report_to="wandb"``; its ``on_train_begin`` runs before any
user callback's) or the user's own ``wandb.init``. Without wandb, with wandb disabled, or with no
active run, it does nothing (one debug line) and never raises; wandb's own failures are logged once
and training goes on.

What it writes (keys in :data:`HISTORY_KEYS`, :data:`SUMMARY_PREFIX`, :data:`TABLE_KEY`):

* at each Trainer logging step, one history row ``{"mask_monitor/<name>": ..., "train/global_step":
  window.last_step}``: the logging window's totals over all ranks (token-weighted ratios from summed
  counts, counts, the worst micro-batch, how often each check fired). Never ``commit=False`` (the values
  would land on the next row) nor ``step=`` (out-of-order steps are dropped): ``train/global_step`` is
  the x-axis, as transformers defines it;
* the run summary ``mask_monitor/run/<name>``: run totals and ratios, worst micro-batch, first step and
  count of each finding, template family, status, abort reason, step, rank and evidence path;
* ``mask_monitor/worst_sequences``: an incremental ``wandb.Table`` of the worst sequences seen (step,
  rank, masked ratio, supervised tokens, prompt leakage when a chat template is known) with each
  sequence's tokens rendered as HTML, coloured by label status; bounded in rows and tokens;
* on abort: a last history row for the stopped step, an ERROR alert with the numbers, the summary, and
  ``run.finish(exit_code=1)``: the run is marked failed, never finished as a success.

Use: ``TrainingArguments(report_to="wandb", ...)`` and ``MaskMonitorCallback()`` (``wandb=None``: log
when a run is active). The values of one history row, from a window's counts:

    >>> from mask_monitor.reports import Totals
    >>> t = Totals(micro_batches=1, sequences=2, target_tokens=8, supervised_tokens=6, masked_tokens=2)
    >>> row = WandbSink.window_row(t, {"masked_ratio": 0.5, "step": 3, "rank": 0}, steps=1)
    >>> row["mask_monitor/masked_ratio"], row["mask_monitor/supervised_tokens"], row["mask_monitor/worst_batch_step"]
    (0.25, 6, 3)
    >>> "mask_monitor/prompt_leakage_ratio" in row   # no chat template known: left out, not 0
    False
"""

from __future__ import annotations

import heapq
import html
import json
import logging
import os
import sys
from collections import Counter
from typing import Any

import torch

from ..checks import CHECKS
from ..counters import COUNTERS, RATIOS
from ..errors import MaskMonitorAbort
from ..reports import RunInfo, StepReport, Totals, WindowReport
from ..stats import SLOT_STATUSES, as_dict, batch_stats, slot_status
from .base import Finding, Sink

__all__ = [
    "WandbSink",
    "PREFIX",
    "STEP_METRIC",
    "HISTORY_KEYS",
    "SUMMARY_PREFIX",
    "TABLE_KEY",
    "TABLE_COLUMNS",
    "METRIC_SUMMARIES",
    "wandb_disabled",
]

logger = logging.getLogger("mask_monitor")

PREFIX = "mask_monitor/"
#: The x-axis: the Trainer's optimizer step, as transformers' WandbCallback defines it.
STEP_METRIC = "train/global_step"
SUMMARY_PREFIX = PREFIX + "run/"
TABLE_KEY = PREFIX + "worst_sequences"
TABLE_COLUMNS: tuple[str, ...] = (
    "step",
    "rank",
    "micro_batch",
    "row",
    "masked_ratio",
    "supervised_tokens",
    "target_tokens",
    "fully_masked_sequences",
    "prompt_leakage_tokens",
    "source",
    "tokens",
)

_RATIOS = tuple(r.name for r in RATIOS if r.name != "mean_loss")
#: Counts of every history row, and those that exist only when a chat template is known.
_COUNTS = tuple(c.name for c in COUNTERS if c.prometheus and not c.template)
_TEMPLATE_COUNTS = tuple(c.name for c in COUNTERS if c.prometheus and c.template)
_WORST = ("worst_batch_masked_ratio", "worst_batch_step", "worst_batch_rank")

#: Every history key the sink may write (ratios are left out of a row where undefined, template
#: counts where no chat template is known).
HISTORY_KEYS: tuple[str, ...] = tuple(
    PREFIX + k
    for k in (*_RATIOS, *_COUNTS, *_TEMPLATE_COUNTS, *_WORST, "window_steps", "aborted")
) + tuple(f"{PREFIX}findings/{c}" for c in CHECKS)

#: Run-summary aggregates W&B keeps for a history key (``define_metric(..., summary=...)``).
METRIC_SUMMARIES: dict[str, str] = {
    **{PREFIX + r.name: r.summary for r in RATIOS if r.name in _RATIOS},
    PREFIX + "worst_batch_masked_ratio": "max,last",
    **{PREFIX + k: "max,last" for k in ("fully_masked_sequences", "all_masked_batches", "zero_loss_batches",
                                         "non_finite_loss_batches", "prompt_leakage_tokens")},
}

_ROW_KEYS = ("input_ids", "labels", "shift_labels", "attention_mask", "position_ids", "roles")

_STATUS_COLOURS = {
    "supervised": "#c8f7c5",  # green: trained on
    "masked": "#e6e6e6",  # grey: label -100
    "leakage": "#ffb3b3",  # red: a prompt token trained on
    "padding": "#ffffff",
    "none": "#ffffff",  # position 0: never a target
}


def wandb_disabled(env: dict[str, str] | None = None) -> bool:
    """True when the environment turns W&B off (``WANDB_DISABLED`` truthy or ``WANDB_MODE=disabled``)."""
    env = os.environ if env is None else env
    if env.get("WANDB_DISABLED", "").strip().lower() in ("1", "true", "yes", "on"):
        return True
    return env.get("WANDB_MODE", "").strip().lower() == "disabled"


def _import_wandb() -> Any:
    import wandb  # noqa: PLC0415 - optional dependency, imported only when a run may exist

    return wandb


class WandbSink(Sink):
    """Log the audit into the active W&B run, on the main process.

    Args:
        table_top_k: a sequence enters the evidence table when it is worse (higher masked ratio) than
            the ``table_top_k``-th worst sequence seen so far, or while fewer have been seen.
        table_max_rows: hard cap on the rows of the evidence table over the whole run.
        html_max_tokens: tokens rendered per sequence (the rest is summarised as ``... (+N tokens)``).

    Use :meth:`maybe_create`, which returns None when there is nothing to log to.
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
        self.table_top_k = table_top_k
        self.table_max_rows = table_max_rows
        self.html_max_tokens = html_max_tokens
        #: ``tagger(input_ids, position_ids) -> roles`` (the auditor's), enabling per-sequence leakage.
        self.role_tagger: Any = None
        self.ignore_index = -100
        self.info = RunInfo()
        self._run: Any = None
        self._wandb: Any = None
        # Steps since the last logging step (what an abort row describes), kept as running totals.
        self._pending_total = Totals()
        self._pending_steps = 0
        self._pending_worst: dict[str, Any] = {}
        self._window_findings: Counter[str] = Counter()
        self._worst_heap: list[float] = []
        self._table: Any = None
        self._table_rows = 0
        self._error: MaskMonitorAbort | None = None
        self._finished = False
        self._failed: set[str] = set()

    # ------------------------------------------------------------------ creation
    @classmethod
    def maybe_create(cls, force: bool = False, **kwargs: Any) -> WandbSink | None:
        """A sink when a W&B run is (or, with ``force``, may become) active on this process; else None.

        Returns None, with one debug line, when wandb is not installed, disabled by ``WANDB_DISABLED`` /
        ``WANDB_MODE=disabled``, or no run is active (without ``force``). wandb is not even imported
        unless the process already did (a run cannot be active otherwise) or ``force`` asks for it.
        With ``force`` (``MaskMonitorCallback(wandb=True)``) a missing or disabled wandb is a warning.
        """
        log = logger.warning if force else logger.debug
        if wandb_disabled():
            log("mask-monitor: W&B logging off (WANDB_DISABLED / WANDB_MODE=disabled)")
            return None
        if "wandb" not in sys.modules and not force:
            logger.debug("mask-monitor: wandb not imported, so no run is active: W&B logging off")
            return None
        try:
            wandb = _import_wandb()
        except ImportError:
            log("mask-monitor: wandb is not installed (pip install 'mask-monitor[wandb]'): W&B logging off")
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
        if not self.info.is_main_process or self._finished:
            return None
        if self._wandb is None:
            try:
                self._wandb = _import_wandb()
            except ImportError:
                return None
        run = getattr(self._wandb, "run", None)
        if run is None:
            return None
        if self._run is not run:
            self._run = run
            self._define_metrics(run)
        return run

    def _guard(self, what: str, fn: Any, *args: Any) -> Any:
        """Run one W&B operation; its failure is logged once (then at debug level), never raised."""
        try:
            return fn(*args)
        except Exception as exc:  # noqa: BLE001 - wandb must never stop training
            if what not in self._failed:
                self._failed.add(what)
                logger.warning(
                    "mask-monitor: W&B %s failed (%s: %s); training goes on", what, type(exc).__name__, exc
                )
            else:
                logger.debug("mask-monitor: W&B %s failed again: %r", what, exc)
            return None

    def _define_metrics(self, run: Any) -> None:
        def define() -> None:
            run.define_metric(STEP_METRIC)
            run.define_metric(PREFIX + "*", step_metric=STEP_METRIC)
            for key, summary in METRIC_SUMMARIES.items():
                run.define_metric(key, step_metric=STEP_METRIC, summary=summary)

        self._guard("define_metric", define)

    def _log(self, run: Any, row: dict[str, Any]) -> None:
        self._guard("log", run.log, row)

    # ------------------------------------------------------------------ rows of the history
    @staticmethod
    def window_row(
        total: Totals, worst: dict[str, Any], steps: int, findings: dict[str, int] | None = None
    ) -> dict[str, Any]:
        """The ``mask_monitor/...`` values of one history row (without the step metric)."""
        row: dict[str, Any] = {}
        for k in _RATIOS:
            v = getattr(total, k)
            if v is not None:
                row[PREFIX + k] = v
        for k in _COUNTS:
            row[PREFIX + k] = int(getattr(total, k))
        if total.template_audited:
            for k in _TEMPLATE_COUNTS:
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

    # ------------------------------------------------------------------ Sink events
    def on_train_begin(self, info: RunInfo) -> None:
        self.info = info
        self._reset_pending()
        run = self._active_run()
        if run is None:
            if info.is_main_process:
                logger.debug("mask-monitor: no wandb run at train begin; the W&B sink waits for one")
            return
        info.wandb_run_id = getattr(run, "id", None)
        self._guard(
            "summary",
            self._update_summary,
            run,
            {"status": "running", "version": info.version, "template_family": info.template_family or "none"},
        )

    def _reset_pending(self) -> dict[str, int]:
        findings = dict(self._window_findings)
        self._window_findings = Counter()
        self._pending_total = Totals()
        self._pending_steps = 0
        self._pending_worst = {}
        return findings

    def on_step(self, report: StepReport, findings: list[Finding]) -> None:
        self._pending_total = self._pending_total + report.total
        self._pending_steps += 1
        for rank, t in enumerate(report.per_rank):
            if not self._pending_worst or t.max_masked_ratio > self._pending_worst["masked_ratio"]:
                self._pending_worst = {"masked_ratio": t.max_masked_ratio, "step": report.step, "rank": rank}
        for f in findings:
            self._window_findings[f.check] += 1

    def on_log(self, window: WindowReport) -> None:
        findings = self._reset_pending()
        run = self._active_run()
        if run is None:
            return
        row = self.window_row(window.total, window.worst_batch, window.steps, findings)
        row[STEP_METRIC] = window.last_step
        self._log(run, row)

    def on_micro_batch_rows(self, report: StepReport, rows: list[dict[str, list[list[int]]]]) -> None:
        run = self._active_run()
        if run is None:
            return
        candidates = self._guard("evidence rows", self._candidates, report, rows, "log") or []
        added = self._guard("table", self._add_worst, candidates)
        if added:
            self._guard("table", self._log_table, run, report.step)

    def on_abort(self, error: MaskMonitorAbort, report: StepReport) -> None:
        self._error = error
        if self._pending_steps == 0:  # on_step did not see the stopped step
            self.on_step(report, [])
        total, steps, worst = self._pending_total, self._pending_steps, self._pending_worst
        findings = self._reset_pending()
        run = self._active_run()
        if run is None:
            return
        # The stopped step never reaches on_log: log the steps since the last logging step, ending on it.
        row = self.window_row(total, worst, steps, findings)
        row[PREFIX + "aborted"] = 1
        row[STEP_METRIC] = error.step
        # Evidence rows of the offending micro-batch, from the evidence file the callback wrote.
        evidence = self._guard("evidence file", _read_evidence, error.evidence_path)
        if evidence:
            cands = self._guard("evidence rows", self._abort_candidates, error, evidence) or []
            if self._guard("table", self._add_rows, cands):
                row[TABLE_KEY] = self._table
        self._log(run, row)
        path = error.evidence_path
        if path and os.path.isfile(path):
            base = os.path.dirname(path)
            self._guard("save evidence", lambda: run.save(path, base_path=base, policy="now"))
        self._guard("alert", self._alert, run, error, report)
        self._guard("summary", self._update_summary, run, _abort_summary(error))

    def on_train_end(self, summary: dict[str, Any]) -> None:
        run = self._active_run()
        if run is None:
            return
        values = _run_summary(summary)
        if self._error is not None:
            values.update(_abort_summary(self._error))
        else:
            values["status"] = "completed"
        self._guard("summary", self._update_summary, run, values)
        if self._error is not None:
            self._finish_failed(run)

    def close(self) -> None:
        if self._error is not None and not self._finished:
            run = self._active_run()
            if run is not None:
                self._finish_failed(run)

    # ------------------------------------------------------------------ summary, alert, finish
    @staticmethod
    def _update_summary(run: Any, values: dict[str, Any]) -> None:
        run.summary.update({SUMMARY_PREFIX + k: v for k, v in values.items()})

    @staticmethod
    def alert_text(error: MaskMonitorAbort, report: StepReport) -> tuple[str, str]:
        """Title and text of the abort alert: the reason, where, and the numbers behind it."""
        t = report.total
        masked = "n/a" if t.masked_ratio is None else f"{t.masked_ratio:.1%}"
        title = f"mask-monitor stopped training: {error.reason} at step {error.step}"
        lines = [
            f"reason: {error.reason}",
            f"step: {error.step} (rank {error.rank} of {report.world_size})",
            f"supervised tokens: {int(t.supervised_tokens)} of {int(t.target_tokens)} targets "
            f"(masked {masked}) in {int(t.micro_batches)} micro-batch(es)",
            f"fully masked sequences: {int(t.fully_masked_sequences)} of {int(t.sequences)}; "
            f"all-masked micro-batches: {int(t.all_masked_batches)}; zero-loss micro-batches: "
            f"{int(t.zero_loss_batches)}; non-finite-loss micro-batches: {int(t.non_finite_loss_batches)}",
        ]
        if t.template_audited and t.prompt_leakage_ratio is not None:
            lines.append(
                f"prompt leakage: {int(t.prompt_leakage_tokens)} of {int(t.audited_supervised_tokens)} "
                f"supervised ({t.prompt_leakage_ratio:.1%})"
            )
        lines.append(f"evidence: {error.evidence_path or 'not written'}")
        first = (error.message or "").splitlines()[0] if error.message else ""
        if first:
            lines += ["", first]
        return title, "\n".join(lines)[:2000]

    def _alert(self, run: Any, error: MaskMonitorAbort, report: StepReport) -> None:
        title, text = self.alert_text(error, report)
        level = getattr(getattr(self._wandb, "AlertLevel", None), "ERROR", "ERROR")
        run.alert(title=title, text=text, level=level)

    def _finish_failed(self, run: Any) -> None:
        self._finished = True
        self._guard("finish", lambda: run.finish(exit_code=1))

    # ------------------------------------------------------------------ evidence table
    def _row_candidates(
        self, step: int, rank: int, mb_index: int, batch: dict[str, list[list[int]]], source: str
    ) -> list[dict[str, Any]]:
        labels = batch.get("labels") or []
        out = []
        for i in range(len(labels)):
            one = {k: torch.tensor([batch[k][i]]) for k in _ROW_KEYS if k in batch and len(batch[k]) > i}
            roles = one.get("roles")
            if roles is None and self.role_tagger is not None and "input_ids" in one:
                roles = self.role_tagger(one["input_ids"], one.get("position_ids"))
            s = as_dict(
                batch_stats(
                    one["labels"],
                    attention_mask=one.get("attention_mask"),
                    position_ids=one.get("position_ids"),
                    shift_labels=one.get("shift_labels"),
                    roles=roles,
                    ignore_index=self.ignore_index,
                )
            )
            if s["target_tokens"] <= 0:
                continue
            out.append(
                {
                    "step": int(step),
                    "rank": int(rank),
                    "micro_batch": int(mb_index),
                    "row": i,
                    "masked_ratio": s["masked_tokens"] / s["target_tokens"],
                    "supervised_tokens": int(s["supervised_tokens"]),
                    "target_tokens": int(s["target_tokens"]),
                    "fully_masked_sequences": int(s["fully_masked_sequences"]),
                    "prompt_leakage_tokens": int(s["prompt_leakage_tokens"]) if roles is not None else None,
                    "source": source,
                    "_batch": one,
                    "_roles": roles,
                }
            )
        return out

    def _candidates(
        self, report: StepReport, rows: list[dict[str, list[list[int]]]], source: str
    ) -> list[dict]:
        out: list[dict] = []
        for mb, batch in enumerate(rows):
            out += self._row_candidates(report.step, report.rank, mb, batch, source)
        return out

    def _abort_candidates(self, error: MaskMonitorAbort, evidence: dict[str, Any]) -> list[dict]:
        sample = evidence.get("offending_micro_batch") or {}
        batch = {k: v for k, v in sample.items() if k in _ROW_KEYS}
        if "labels" not in batch:
            return []
        rank = int(evidence.get("rank", error.rank))
        return self._row_candidates(error.step, rank, int(sample.get("micro_batch_index", 0)), batch, "abort")

    def _add_worst(self, candidates: list[dict]) -> list[dict]:
        """Keep the candidates worse than the ``table_top_k``-th worst seen so far (bounded)."""
        chosen = []
        for c in sorted(candidates, key=lambda c: (-c["masked_ratio"], c["supervised_tokens"])):
            r = c["masked_ratio"]
            if len(self._worst_heap) < self.table_top_k:
                heapq.heappush(self._worst_heap, r)
            elif r > self._worst_heap[0]:
                heapq.heapreplace(self._worst_heap, r)
            else:
                continue
            chosen.append(c)
        return self._add_rows(chosen)

    def _add_rows(self, chosen: list[dict]) -> list[dict]:
        added = []
        for c in chosen:
            if self._table_rows >= self.table_max_rows:
                logger.debug("mask-monitor: W&B evidence table full (%d rows)", self.table_max_rows)
                break
            if self._table is None:
                self._table = self._wandb.Table(columns=list(TABLE_COLUMNS), log_mode="INCREMENTAL")
            values = [c[k] for k in TABLE_COLUMNS[:-1]]
            rendered = self._wandb.Html(self.render_html(c), inject=False, data_is_not_path=True)
            self._table.add_data(*values, rendered)
            self._table_rows += 1
            added.append(c)
        return added

    def _log_table(self, run: Any, step: int) -> None:
        run.log({TABLE_KEY: self._table, STEP_METRIC: step})

    def render_html(self, cand: dict[str, Any]) -> str:
        """One sequence's tokens, each coloured by what the loss does with it (bounded length)."""
        batch = cand["_batch"]
        labels = batch["labels"][0].tolist()
        ids = batch["input_ids"][0].tolist() if "input_ids" in batch else None
        shift = batch["shift_labels"][0].tolist() if "shift_labels" in batch else None
        attn = batch["attention_mask"][0].tolist() if "attention_mask" in batch else None
        pos = batch["position_ids"][0].tolist() if "position_ids" in batch else None
        roles = cand["_roles"][0].tolist() if cand.get("_roles") is not None else None
        statuses = token_statuses(labels, shift_labels=shift, attention_mask=attn, position_ids=pos, roles=roles,
                                  ignore_index=self.ignore_index)
        shown = len(statuses) if ids is None else len(ids)
        n = min(shown, self.html_max_tokens)
        pieces = _token_pieces(self.tokenizer, ids[:n]) if ids is not None else None
        spans = []
        for j in range(n):
            status = statuses[j]
            text = pieces[j] if pieces is not None else f"[{labels[j]}]"
            tid = ids[j] if ids is not None else labels[j]
            colour = _STATUS_COLOURS[status]
            spans.append(
                f'<span class="{status}" title="{status} id={tid}" style="background:{colour}">'
                f"{html.escape(text)}</span>"
            )
        more = f" <i>... (+{shown - n} tokens)</i>" if shown > n else ""
        head = (
            f"<div><b>step {cand['step']}, rank {cand['rank']}, micro-batch {cand['micro_batch']}, "
            f"row {cand['row']}</b>: masked {cand['masked_ratio']:.1%}, {cand['supervised_tokens']} of "
            f"{cand['target_tokens']} targets supervised"
        )
        if cand.get("prompt_leakage_tokens") is not None:
            head += f", {cand['prompt_leakage_tokens']} prompt tokens trained on"
        legend = " ".join(
            f'<span style="background:{_STATUS_COLOURS[s]}">{s}</span>'
            for s in ("supervised", "masked", "leakage")
        )
        return (
            f"{head}</div><div>{legend}</div>"
            f'<div style="font-family:monospace;white-space:pre-wrap">{"".join(spans)}{more}</div>'
        )


# ---------------------------------------------------------------------- module helpers
def token_statuses(
    labels: list[int],
    *,
    shift_labels: list[int] | None = None,
    attention_mask: list[int] | None = None,
    position_ids: list[int] | None = None,
    roles: list[int] | None = None,
    ignore_index: int = -100,
) -> list[str]:
    """What the loss does with each *input* token of one sequence: ``supervised``, ``masked``,
    ``leakage``, ``padding`` or ``none`` (:func:`mask_monitor.stats.slot_status`, the counting rules).

    >>> token_statuses([-100, -100, 5, 6])
    ['none', 'masked', 'supervised', 'supervised']
    """
    def t(x: list[int] | None) -> torch.Tensor | None:
        return torch.tensor([x], dtype=torch.long) if x is not None else None

    codes = slot_status(t(labels), shift_labels=t(shift_labels), attention_mask=t(attention_mask),
                        position_ids=t(position_ids), roles=t(roles), ignore_index=ignore_index)
    return [SLOT_STATUSES[c] for c in codes[0].tolist()]


def _token_pieces(tokenizer: Any, ids: list[int]) -> list[str]:
    if tokenizer is not None:
        try:
            pieces = tokenizer.convert_ids_to_tokens(ids)
            return [str(p) if p is not None else f"[{i}]" for p, i in zip(pieces, ids, strict=True)]
        except Exception:  # noqa: BLE001 - fall back to ids
            pass
    return [f"[{i}]" for i in ids]


def _read_evidence(path: str | None) -> dict[str, Any] | None:
    if not path or not os.path.isfile(path):
        return None
    with open(path, encoding="utf-8") as fh:
        return json.load(fh)


def _abort_summary(error: MaskMonitorAbort) -> dict[str, Any]:
    return {
        "status": "aborted",
        "abort_reason": error.reason,
        "abort_step": error.step,
        "abort_rank": error.rank,
        "evidence_path": error.evidence_path or "",
    }


def _run_summary(summary: dict[str, Any]) -> dict[str, Any]:
    """The callback's run summary flattened for ``run.summary`` (``None`` values left out)."""
    out: dict[str, Any] = {}
    for k, v in summary.items():
        if k in ("worst_batch", "findings", "first_step", "aborted", "evidence_path", "batches"):
            continue
        if isinstance(v, (int, float, str)) and not isinstance(v, bool):
            out[k] = v
    worst = summary.get("worst_batch") or {}
    if worst:
        out["worst_micro_batch_masked_ratio"] = float(worst.get("masked_ratio", 0.0))
        out["worst_micro_batch_step"] = int(worst.get("step", 0))
        out["worst_micro_batch_rank"] = int(worst.get("rank", 0))
    for check, step in (summary.get("first_step") or {}).items():
        out[f"first_step/{check}"] = int(step)
    for check, n in (summary.get("findings") or {}).items():
        out[f"findings/{check}"] = int(n)
    out["template_family"] = summary.get("template_family") or "none"
    return out
