"""What the Prometheus exporter exports: metric names, the exported state, and the collector.

Every family is derived from the declarations: one counter per Prometheus-exported counter of
:data:`mask_monitor.counters.COUNTERS` (help text from there), one ``reason`` value per check of
:data:`mask_monitor.checks.CHECKS`, and last-step gauges whose help comes from the counter or ratio
they show. Names follow Prometheus conventions (``mask_monitor_`` prefix, base units, ``_total``
counters, ``_ratio`` for 0..1, ``_timestamp_seconds``); labels are bounded: ``rank`` (the global rank,
or ``"all"`` in aggregate mode) and, on two families, ``reason``.

:class:`MetricState` holds the values of one sink behind one lock and a version number that grows
with every change (so a server can serve a cached exposition until the values change);
:class:`MetricCollector` turns it into metric families at each collect.

Example:
    >>> from prometheus_client import CollectorRegistry
    >>> from mask_monitor.reports import StepReport, Totals
    >>> state, registry = MetricState(), CollectorRegistry()
    >>> registry.register(MetricCollector(state))
    >>> mb = Totals(micro_batches=1, target_tokens=8, supervised_tokens=2, masked_tokens=6, max_masked_ratio=0.75)
    >>> state.step(StepReport(1, 0, 1, total=mb, per_rank=(mb,), micro_batches=(mb,)), [])
    >>> registry.get_sample_value("mask_monitor_masked_tokens_total", {"rank": "0"}), state.version
    (6.0, 1)
"""

from __future__ import annotations

import math
import threading
import time
from collections.abc import Iterator

from prometheus_client.metrics_core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
    InfoMetricFamily,
    Metric,
)
from prometheus_client.registry import Collector

from ...checks import CHECKS, Finding
from ...counters import COUNTER, RATIO
from ...counters import COUNTERS as DECLARED_COUNTERS
from ...reports import HISTOGRAM_BUCKETS, RunInfo, StepReport, Totals

__all__ = [
    "PREFIX",
    "COUNTERS",
    "GAUGES",
    "LAST_STEP",
    "REASON_COUNTERS",
    "METRIC_NAMES",
    "MetricState",
    "MetricCollector",
]

PREFIX = "mask_monitor_"

#: Totals field -> (metric name without prefix and ``_total``, help): every counter declared for Prometheus.
COUNTERS: dict[str, tuple[str, str]] = {c.name: (c.name, c.help) for c in DECLARED_COUNTERS if c.prometheus}

#: Last-step gauge (name without prefix) -> the declared counter or ratio it shows (a ``Totals`` attribute).
#: The selection is the exporter's; names, units and help come from the declarations.
LAST_STEP: dict[str, str] = {
    "last_step_" + name: name
    for name in ("target_tokens", "supervised_tokens", "fully_masked_sequences", "masked_ratio", "max_masked_ratio")
}
LAST_STEP["last_step_loss"] = "mean_loss"
LAST_STEP.update({"last_step_" + name: name for name in ("prompt_leakage_ratio", "response_coverage_ratio")})


def _declared_help(name: str) -> str:
    decl = COUNTER.get(name) or RATIO[name]
    return decl.help.rstrip(".")


#: Gauge name (without prefix) -> help.
GAUGES: dict[str, str] = {
    "optimizer_step": "The last optimizer step audited (numbered as the Trainer numbers it once applied).",
    "world_size": "Number of ranks in the training job.",
    **{
        gauge: f"Last optimizer step: {_declared_help(source)} (NaN: no data)."
        if source in RATIO or source == "max_masked_ratio"
        else f"Last optimizer step: {_declared_help(source)}."
        for gauge, source in LAST_STEP.items()
    },
    "heartbeat_timestamp_seconds": "Unix time of the monitor's last sign of life (train begin, step, log).",
    "train_start_timestamp_seconds": "Unix time at which training began.",
}

#: Metric families with a ``reason`` label (one value per declared check).
REASON_COUNTERS: dict[str, str] = {
    "aborts": "Training aborts raised by mask-monitor, by reason.",
    "check_warnings": "Steps on which a check fired with action 'warn', by check (reason).",
}

HISTOGRAM = "micro_batch_masked_ratio"

#: Every metric name the exporter emits (sample names: counters with ``_total``, histogram series).
METRIC_NAMES: frozenset[str] = frozenset(
    [PREFIX + name + "_total" for name, _ in COUNTERS.values()]
    + [PREFIX + "optimizer_steps_total"]
    + [PREFIX + name + "_total" for name in REASON_COUNTERS]
    + [PREFIX + name for name in GAUGES]
    + [PREFIX + "train_end_timestamp_seconds"]
    + [PREFIX + HISTOGRAM + s for s in ("_bucket", "_sum", "_count")]
    + [PREFIX + "run_info"]
)


def _nan(value: float | None) -> float:
    return math.nan if value is None else float(value)


def _last_step_value(t: Totals, source: str) -> float:
    if source == "max_masked_ratio":
        return t.max_masked_ratio if t.target_tokens > 0 else math.nan
    if source == "mean_loss" and t.non_finite_loss_batches:
        return math.nan
    return _nan(getattr(t, source))


class MetricState:
    """The exported values of one sink (one ``rank`` label value), changed under :attr:`lock`.

    Each change bumps :attr:`version`: an exposition rendered at version ``v`` is current while the
    version is still ``v``.
    """

    def __init__(self) -> None:
        self.lock = threading.RLock()
        self.version = 0
        self.rank_label = "0"
        self.aggregate = False
        self.totals = Totals()
        self.steps = 0
        self.gauges: dict[str, float] = {}
        self.aborts: dict[str, float] = dict.fromkeys(CHECKS, 0.0)
        self.warnings: dict[str, float] = dict.fromkeys(CHECKS, 0.0)
        self.bucket_counts = [0] * len(HISTOGRAM_BUCKETS)
        self.hist_sum = 0.0
        self.hist_count = 0
        self.train_end: float | None = None
        self.info: dict[str, str] = {}
        self._last_step: int | None = None

    # ------------------------------------------------------------------ changes (each bumps the version)

    def begin(self, info: RunInfo, aggregate: bool = False) -> None:
        """Train begin: run info, start time; a second ``train()`` keeps the counters (they only grow)."""
        now = time.time()
        with self.lock:
            self.aggregate = aggregate
            self.rank_label = "all" if aggregate else str(info.rank)
            self.gauges["world_size"] = float(info.world_size)
            self.gauges["train_start_timestamp_seconds"] = now
            self.gauges["heartbeat_timestamp_seconds"] = now
            self.train_end = None
            self._last_step = None
            self.info = {
                "run_name": info.run_name or "",
                "wandb_run_id": info.wandb_run_id or "",
                "template_family": info.template_family or "",
                "version": info.version or "",
            }
            self.version += 1

    def step(self, report: StepReport, findings: list[Finding]) -> None:
        """One audited optimizer step and its findings (warnings counted by check)."""
        with self.lock:
            self._apply(report)
            for f in findings:
                if f.action == "warn":
                    self.warnings[f.check] = self.warnings.get(f.check, 0.0) + 1
            self.version += 1

    def heartbeat(self) -> None:
        with self.lock:
            self.gauges["heartbeat_timestamp_seconds"] = time.time()
            self.version += 1

    def abort(self, reason: str, report: StepReport) -> None:
        """The aborted step (counted once, whether or not ``step`` saw it), the reason, the end time."""
        with self.lock:
            self._apply(report)
            self.aborts[reason] = self.aborts.get(reason, 0.0) + 1
            self.gauges["heartbeat_timestamp_seconds"] = self.train_end = time.time()
            self.version += 1

    def end(self) -> bool:
        """Marks the end (heartbeat == end time, so the stalled alert knows this run ended). False when
        the run already ended (after an abort)."""
        with self.lock:
            if self.train_end is not None:
                return False
            self.gauges["heartbeat_timestamp_seconds"] = self.train_end = time.time()
            self.version += 1
            return True

    def _apply(self, report: StepReport) -> None:
        if self._last_step == report.step:  # on_step then on_abort of the same step: counted once
            return
        self._last_step = report.step
        t = report.total if self.aggregate else report.local
        self.totals = self.totals + t
        self.steps += 1
        g = self.gauges
        g["optimizer_step"] = float(report.step)
        for gauge, source in LAST_STEP.items():
            g[gauge] = _last_step_value(t, source)
        g["heartbeat_timestamp_seconds"] = time.time()
        for mb in report.micro_batches:
            if mb.target_tokens > 0:
                self._observe(mb.max_masked_ratio)

    def _observe(self, ratio: float) -> None:
        for i, bound in enumerate(HISTOGRAM_BUCKETS):
            if ratio <= bound:
                self.bucket_counts[i] += 1
                break
        self.hist_sum += ratio
        self.hist_count += 1


class MetricCollector(Collector):
    """Builds the metric families from a :class:`MetricState` at every collect (scrape, push, test read)."""

    def __init__(self, state: MetricState):
        self.state = state

    def describe(self) -> list[Metric]:
        """The families (so a registry refuses a second sink exporting the same names)."""
        return list(self.collect())

    def collect(self) -> Iterator[Metric]:
        st = self.state
        with st.lock:
            families = list(self._families(st))
        yield from families

    @staticmethod
    def _families(st: MetricState) -> Iterator[Metric]:
        rank = [st.rank_label]
        for field, (name, doc) in COUNTERS.items():
            c = CounterMetricFamily(PREFIX + name, doc, labels=["rank"])
            c.add_metric(rank, getattr(st.totals, field))
            yield c
        c = CounterMetricFamily(PREFIX + "optimizer_steps", "Optimizer steps audited.", labels=["rank"])
        c.add_metric(rank, st.steps)
        yield c
        for name, values in (("aborts", st.aborts), ("check_warnings", st.warnings)):
            c = CounterMetricFamily(PREFIX + name, REASON_COUNTERS[name], labels=["rank", "reason"])
            for reason in sorted(values):
                c.add_metric([st.rank_label, reason], values[reason])
            yield c
        for name, doc in GAUGES.items():
            g = GaugeMetricFamily(PREFIX + name, doc, labels=["rank"])
            if name in st.gauges:
                g.add_metric(rank, st.gauges[name])
            yield g
        g = GaugeMetricFamily(
            PREFIX + "train_end_timestamp_seconds",
            "Unix time at which training ended or aborted (absent while it runs).",
            labels=["rank"],
        )
        if st.train_end is not None:
            g.add_metric(rank, st.train_end)
        yield g
        h = HistogramMetricFamily(
            PREFIX + HISTOGRAM,
            "Masked share of target slots per micro-batch (micro-batches with target slots).",
            labels=["rank"],
        )
        cumulative, buckets = 0, []
        for bound, n in zip(HISTOGRAM_BUCKETS, st.bucket_counts, strict=True):
            cumulative += n
            buckets.append((repr(float(bound)), cumulative))
        buckets.append(("+Inf", st.hist_count))
        h.add_metric(rank, buckets, st.hist_sum)
        yield h
        if st.info:
            i = InfoMetricFamily(
                PREFIX + "run",
                "The training run: name, W&B run id, chat template family, mask-monitor version.",
                labels=["rank"],
            )
            i.add_metric(rank, st.info)
            yield i
