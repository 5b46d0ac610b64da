"""Pre-flight audit of an SFT dataset: what the loss will see, before a GPU is rented.

* :mod:`~mask_monitor.audit.data`: load JSONL / JSON / Parquet / ``save_to_disk`` / hub data, sample it.
* :mod:`~mask_monitor.audit.prepare`: TRL's own ``SFTTrainer`` preparation and collator, on the CPU.
* :mod:`~mask_monitor.audit.counting`: totals from :func:`mask_monitor.stats.batch_stats` plus one row
  per sequence.
* :mod:`~mask_monitor.audit.pipeline`: :func:`run_audit` and the verdict.
* :mod:`~mask_monitor.audit.report`: terminal, JSON and HTML output.

The command line is ``mask-monitor audit`` (:mod:`mask_monitor.cli.audit`).
"""

from .pipeline import AuditOptions, AuditResult, run_audit

__all__ = ["AuditOptions", "AuditResult", "run_audit"]
