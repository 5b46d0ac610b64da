"""The Weights & Biases sink: the audit on the run's charts, summary, alerts and an evidence table.

It never starts a run. It logs into the run that is active on the main process: the one
transformers' ``WandbCallback`` opens (``report_to="wandb"``; its ``on_train_begin`` runs before any
user callback's) or the user's own ``wandb.init``. Without wandb, with wandb disabled, or with no
active run, it does nothing and never raises; wandb's own failures are logged once and training goes on.

Use: ``MaskMonitorCallback(sinks=[WandbSink(...)])``, or nothing at all: with ``wandb=None`` (the default)
the callback adds a ``WandbSink()`` by itself when a W&B run is active.

What it writes, one module each:

* :mod:`.history`: at each Trainer logging step one history row ``{"mask_monitor/<name>": ...,
  "train/global_step": window.last_step}`` (:data:`HISTORY_KEYS`): the window's totals over all ranks;
* :mod:`.table`: ``mask_monitor/worst_sequences`` (:data:`TABLE_KEY`), an incremental ``wandb.Table`` of
  the worst sequences, their tokens coloured by label status (token ids unless ``decoded_text="all"``);
* :mod:`.summary`: the run summary ``mask_monitor/run/<name>`` (:data:`SUMMARY_PREFIX`), and on abort an
  ERROR alert with the numbers, the evidence file saved with the run (without decoded text unless
  ``decoded_text="all"``) and ``run.finish(exit_code=1)``: the run is marked failed;
* :mod:`.runtime`: finding wandb and its run; :mod:`.sink`: :class:`WandbSink`, the events.
"""

from __future__ import annotations

from .history import HISTORY_KEYS, METRIC_SUMMARIES, PREFIX, STEP_METRIC, window_row
from .runtime import wandb_disabled
from .sink import WandbSink
from .summary import SUMMARY_PREFIX, abort_summary, alert_text, run_summary
from .table import TABLE_COLUMNS, TABLE_KEY, token_statuses

# the names these had in the one-module sink (tests and the report command import them)
_abort_summary = abort_summary
_run_summary = run_summary

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
    "token_statuses",
    "window_row",
    "alert_text",
    "run_summary",
    "abort_summary",
]
