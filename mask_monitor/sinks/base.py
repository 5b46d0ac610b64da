"""What a sink is, and the guard that keeps a failing sink from stopping training.

A sink receives host-side reports (never tensors) at four moments: train begin, every optimizer
step, every Trainer logging step, abort, and train end. Every method is optional. A sink's own
failure (a port taken, a gateway down, wandb missing) must never stop a healthy run:
:class:`SinkGroup` calls each sink inside a guard that logs one warning per sink and carries on.
A sink that must refuse to start (e.g. a Prometheus port already taken, which the operator has to
fix before GPU time is spent) raises :class:`SinkConfigError` from ``on_train_begin``; that is the
only exception the group lets through.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable
from typing import Any

from ..checks import Finding
from ..errors import MaskMonitorAbort
from ..reports import RunInfo, StepReport, WindowReport

__all__ = ["Sink", "SinkGroup", "SinkConfigError", "Finding"]

logger = logging.getLogger("mask_monitor")


class SinkConfigError(RuntimeError):
    """A sink's configuration cannot work (raised at train begin, before any training step)."""


class Sink:
    """Base class: override what you need. All methods are called on every rank."""

    name: str = "sink"
    #: Set True to receive the leading rows of each micro-batch at logging steps (see on_micro_batch_rows).
    wants_batches: bool = False
    #: Set by the callback when a tokenizer is known (for decoding evidence).
    tokenizer: Any = None

    def on_train_begin(self, info: RunInfo) -> None:
        """Once, before the first step."""

    def on_step(self, report: StepReport, findings: list[Finding]) -> None:
        """After every optimizer step's audit (before the optimizer applies it)."""

    def on_log(self, window: WindowReport) -> None:
        """At the Trainer's logging steps: the aggregate since the previous logging step."""

    def on_micro_batch_rows(self, report: StepReport, rows: list[dict[str, list[list[int]]]]) -> None:
        """At logging steps, for sinks with ``wants_batches``: the last step's kept leading rows of each
        micro-batch (``input_ids``, ``labels``, as lists), aligned with ``report.micro_batches``."""

    def on_abort(self, error: MaskMonitorAbort, report: StepReport) -> None:
        """Just before the abort is raised out of ``train()``."""

    def on_train_end(self, summary: dict[str, Any]) -> None:
        """At the end of training (normal end, or after an abort)."""

    def close(self) -> None:
        """Release resources (servers, files). Called once, last."""


class SinkGroup:
    """Calls every sink, turning each sink's failure into one warning (later ones at debug level)."""

    def __init__(self, sinks: Iterable[Sink] = ()):
        self.sinks: list[Sink] = list(sinks)
        self._warned: set[str] = set()

    def add(self, sink: Sink) -> None:
        self.sinks.append(sink)

    def call(self, method: str, *args: Any) -> None:
        for sink in self.sinks:
            try:
                getattr(sink, method)(*args)
            except SinkConfigError:
                raise
            except Exception as exc:  # noqa: BLE001 - a sink must never stop training
                key = f"{sink.name}"
                if key not in self._warned:
                    self._warned.add(key)
                    logger.warning(
                        "mask-monitor: the %s sink failed in %s (%s: %s); training goes on, the other sinks "
                        "keep reporting, further errors of this sink are logged at debug level",
                        sink.name,
                        method,
                        type(exc).__name__,
                        exc,
                    )
                else:
                    logger.debug("mask-monitor: %s sink failed in %s: %r", sink.name, method, exc)
