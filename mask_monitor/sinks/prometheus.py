"""Prometheus exporter: one scrape endpoint per rank, optional Pushgateway, a linger on abort.

Every metric is named by Prometheus conventions (``mask_monitor_`` prefix, base units, ``_total``
counters, ``_ratio`` for 0..1, ``_timestamp_seconds``) and carries only bounded labels: ``rank``
(the global rank, or ``"all"`` in aggregate mode) and, on two families, ``reason``. Token and event
counters are driven by this rank's own counts (:attr:`StepReport.local`); Prometheus sums ranks
with ``sum by (job)``, and ratios are ``rate(a) / rate(b)`` of counters, so no batch is missed
between scrapes. A histogram of the per-micro-batch masked ratio (buckets dense near 1) shows the
distribution; last-step gauges feed stat panels.

The sink keeps its metrics in a private :class:`~prometheus_client.CollectorRegistry` (never the
global default one), serves it on ``base_port + LOCAL_RANK`` (TLS when a cert and key are given)
and/or pushes it to a Pushgateway grouped by ``job``/``instance``/``rank``. When training aborts,
the final values are pushed and the endpoint keeps serving them for ``linger_seconds`` (returning
early once Prometheus has scraped them twice), so the abort reaches Prometheus although the
process is about to die.

Example:
    >>> from prometheus_client import CollectorRegistry
    >>> from mask_monitor.reports import RunInfo, StepReport, Totals
    >>> registry = CollectorRegistry()
    >>> sink = PrometheusSink(port=None, registry=registry)  # no server: registry only
    >>> sink.on_train_begin(RunInfo(run_name="demo", rank=0, world_size=1))
    >>> mb = Totals(micro_batches=1, target_tokens=8, supervised_tokens=2, masked_tokens=6,
    ...             max_masked_ratio=0.75)
    >>> sink.on_step(StepReport(1, 0, 1, total=mb, per_rank=(mb,), micro_batches=(mb,)), [])
    >>> registry.get_sample_value("mask_monitor_masked_tokens_total", {"rank": "0"})
    6.0
    >>> sink.close()
"""

from __future__ import annotations

import logging
import math
import os
import socket
import threading
import time
from collections.abc import Iterator, Mapping
from typing import Any

from prometheus_client import CollectorRegistry, push_to_gateway
from prometheus_client.exposition import start_http_server
from prometheus_client.metrics_core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
    InfoMetricFamily,
    Metric,
)
from prometheus_client.registry import Collector

from ..checks import CHECKS
from ..counters import COUNTERS as DECLARED_COUNTERS
from ..errors import MaskMonitorAbort
from ..reports import HISTOGRAM_BUCKETS, RunInfo, StepReport, Totals, WindowReport
from .base import Finding, Sink, SinkConfigError

__all__ = [
    "PrometheusSink",
    "COUNTERS",
    "GAUGES",
    "METRIC_NAMES",
    "ENV_PORT",
    "ENV_ADDR",
    "ENV_CERTFILE",
    "ENV_KEYFILE",
    "ENV_PUSHGATEWAY_URL",
    "ENV_JOB",
    "ENV_LINGER_SECONDS",
    "DEFAULT_JOB",
    "DEFAULT_LINGER_SECONDS",
]

logger = logging.getLogger("mask_monitor")

ENV_PORT = "MASK_MONITOR_PROMETHEUS_PORT"
ENV_ADDR = "MASK_MONITOR_PROMETHEUS_ADDR"
ENV_CERTFILE = "MASK_MONITOR_PROMETHEUS_CERTFILE"
ENV_KEYFILE = "MASK_MONITOR_PROMETHEUS_KEYFILE"
ENV_PUSHGATEWAY_URL = "MASK_MONITOR_PUSHGATEWAY_URL"
ENV_JOB = "MASK_MONITOR_PROMETHEUS_JOB"
ENV_LINGER_SECONDS = "MASK_MONITOR_PROMETHEUS_LINGER_SECONDS"

DEFAULT_JOB = "mask_monitor"
#: Two scrapes at Prometheus' usual 15 s interval.
DEFAULT_LINGER_SECONDS = 30.0
#: Scrapes of the final values after which an abort linger may end early.
ABORT_SCRAPES = 2

PREFIX = "mask_monitor_"

#: Totals field -> (metric name without ``_total``, help): every counter declared for Prometheus.
COUNTERS: dict[str, tuple[str, str]] = {c.name: (c.name, c.help) for c in DECLARED_COUNTERS if c.prometheus}

#: Last-step gauge name (without prefix) -> help.
GAUGES: dict[str, str] = {
    "optimizer_step": "The last optimizer step audited (numbered as the Trainer numbers it once applied).",
    "world_size": "Number of ranks in the training job.",
    "last_step_target_tokens": "Target slots in the last optimizer step.",
    "last_step_supervised_tokens": "Supervised targets in the last optimizer step.",
    "last_step_fully_masked_sequences": "Fully masked sequences in the last optimizer step.",
    "last_step_masked_ratio": "Masked share of target slots in the last optimizer step (NaN: no targets).",
    "last_step_max_masked_ratio": "Masked ratio of the worst micro-batch of the last optimizer step.",
    "last_step_loss": "Mean loss of the last optimizer step's micro-batches (NaN: none reported a loss).",
    "last_step_prompt_leakage_ratio": "Audited supervised targets that are prompt tokens, last step.",
    "last_step_response_coverage_ratio": "Share of assistant content targets that are supervised, last step.",
    "heartbeat_timestamp_seconds": "Unix time of the monitor's last sign of life (train begin, step, log).",
    "train_start_timestamp_seconds": "Unix time at which training began.",
}

#: Metric families with a ``reason`` label.
REASON_COUNTERS: dict[str, str] = {
    "aborts": "Training aborts raised by mask-monitor, by reason.",
    "check_warnings": "Steps on which a check fired with action 'warn', by check (reason).",
}

#: Every metric name the exporter emits (sample names: counters with ``_total``, histogram series).
METRIC_NAMES: frozenset[str] = frozenset(
    [PREFIX + name + "_total" for name, _ in COUNTERS.values()]
    + [PREFIX + "optimizer_steps_total"]
    + [PREFIX + name + "_total" for name in REASON_COUNTERS]
    + [PREFIX + name for name in GAUGES]
    + [PREFIX + "train_end_timestamp_seconds"]
    + [PREFIX + "micro_batch_masked_ratio" + s for s in ("_bucket", "_sum", "_count")]
    + [PREFIX + "run_info"]
)


def _nan(value: float | None) -> float:
    return math.nan if value is None else float(value)


class _State:
    """The exported values of one sink (one label value of ``rank``), guarded by the sink's lock."""

    def __init__(self) -> None:
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


class _Collector(Collector):
    """Builds the metric families from the sink's state at every collect (scrape, push, test read)."""

    def __init__(self, sink: PrometheusSink):
        self._sink = sink

    def describe(self) -> list[Metric]:
        """The families (so a registry refuses a second sink exporting the same names)."""
        local = self._sink._local
        local.internal = True
        try:
            return list(self.collect())
        finally:
            local.internal = False

    def collect(self) -> Iterator[Metric]:
        sink = self._sink
        with sink._lock:
            if not getattr(sink._local, "internal", False):
                sink._scrapes += 1
            st = sink._state
            rank = [sink.rank_label]
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
                    c.add_metric([sink.rank_label, reason], values[reason])
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
                PREFIX + "micro_batch_masked_ratio",
                "Masked share of target slots per micro-batch (micro-batches with target slots).",
                labels=["rank"],
            )
            cumulative, buckets = 0, []
            for bound, n in zip(HISTOGRAM_BUCKETS, st.bucket_counts, strict=True):
                cumulative += n
                buckets.append((_bucket_label(bound), cumulative))
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


def _bucket_label(bound: float) -> str:
    return repr(float(bound))


class PrometheusSink(Sink):
    """Exports the audit to Prometheus: a scrape endpoint per rank and/or a Pushgateway.

    Args:
        port: base port of the scrape endpoint; rank ``r`` serves on ``port + LOCAL_RANK``. ``0`` picks
            a free port (see :attr:`port` after train begin); ``None`` serves nothing (push only, or a
            registry read in-process).
        addr: address to bind (``0.0.0.0`` by default).
        certfile, keyfile: serve HTTPS with this certificate and key (both or neither).
        pushgateway_url: push to this Pushgateway at every logging step, at the end and at an abort.
        job: the ``job`` grouping key of pushed metrics.
        linger_seconds: at an abort, keep serving the final values up to this long (returns early once
            they were scraped twice); at a normal end, wait up to this long for one scrape of the final
            values when the endpoint has been scraped before.
        registry: the registry to fill (a fresh private one by default).
        aggregate: export the job-wide totals from rank 0 only, with ``rank="all"`` (for very large
            jobs); other ranks export nothing. The histogram then covers rank 0's micro-batches.
        push_timeout: seconds before a push gives up.
        port_setting: how the port was configured, for error messages.
    """

    name = "prometheus"

    def __init__(
        self,
        port: int | None = None,
        *,
        addr: str = "0.0.0.0",
        certfile: str | None = None,
        keyfile: str | None = None,
        pushgateway_url: str | None = None,
        job: str = DEFAULT_JOB,
        linger_seconds: float = DEFAULT_LINGER_SECONDS,
        registry: CollectorRegistry | None = None,
        aggregate: bool = False,
        push_timeout: float = 5.0,
        port_setting: str | None = None,
    ) -> None:
        if port is not None and not 0 <= int(port) <= 65535:
            raise ValueError(f"PrometheusSink(port={port!r}) must be between 0 and 65535")
        if bool(certfile) != bool(keyfile):
            raise ValueError(
                f"PrometheusSink(certfile={certfile!r}, keyfile={keyfile!r}): TLS needs both a certificate "
                f"and a key ({ENV_CERTFILE} / {ENV_KEYFILE})"
            )
        if linger_seconds < 0:
            raise ValueError(f"PrometheusSink(linger_seconds={linger_seconds!r}) must be >= 0")
        self.base_port = None if port is None else int(port)
        self.addr = addr
        self.certfile = certfile
        self.keyfile = keyfile
        self.pushgateway_url = pushgateway_url or None
        self.job = job
        self.linger_seconds = float(linger_seconds)
        self.aggregate = aggregate
        self.push_timeout = push_timeout
        self.port_setting = port_setting or f"prometheus_port={port}"
        self.registry = registry if registry is not None else CollectorRegistry()
        #: the port actually served (after train begin), or None
        self.port: int | None = None
        self.rank_label = "all" if aggregate else "0"
        self.instance = socket.gethostname()
        self.active = True  # False on non-zero ranks in aggregate mode
        self._lock = threading.RLock()
        self._local = threading.local()
        self._state = _State()
        self._scrapes = 0
        self._server: Any = None
        self._thread: threading.Thread | None = None
        self._last_step: int | None = None
        self._push_warned = False
        self._closed = False
        self._collector = _Collector(self)
        self.registry.register(self._collector)

    # ------------------------------------------------------------------ settings

    @classmethod
    def from_settings(
        cls,
        port: int | None = None,
        addr: str | None = None,
        certfile: str | None = None,
        keyfile: str | None = None,
        pushgateway_url: str | None = None,
        job: str | None = None,
        linger_seconds: float | None = None,
        registry: CollectorRegistry | None = None,
        aggregate: bool = False,
        env: Mapping[str, str] | None = None,
    ) -> PrometheusSink | None:
        """A sink from callback arguments, falling back to ``MASK_MONITOR_*`` variables for each None.

        Returns None when neither a port nor a Pushgateway is configured (the exporter is off).

        Example:
            >>> PrometheusSink.from_settings(env={}) is None
            True
            >>> sink = PrometheusSink.from_settings(env={"MASK_MONITOR_PROMETHEUS_PORT": "9400"})
            >>> sink.base_port, sink.port_setting
            (9400, 'MASK_MONITOR_PROMETHEUS_PORT=9400')
        """
        env = os.environ if env is None else env
        port_setting = f"prometheus_port={port}"
        if port is None and env.get(ENV_PORT, "").strip():
            raw = env[ENV_PORT].strip()
            try:
                port = int(raw)
            except ValueError:
                raise ValueError(f"{ENV_PORT}={raw!r}: expected a port number") from None
            port_setting = f"{ENV_PORT}={raw}"
        addr = addr or env.get(ENV_ADDR, "").strip() or "0.0.0.0"
        certfile = certfile or env.get(ENV_CERTFILE, "").strip() or None
        keyfile = keyfile or env.get(ENV_KEYFILE, "").strip() or None
        pushgateway_url = pushgateway_url or env.get(ENV_PUSHGATEWAY_URL, "").strip() or None
        job = job or env.get(ENV_JOB, "").strip() or DEFAULT_JOB
        if linger_seconds is None:
            raw = env.get(ENV_LINGER_SECONDS, "").strip()
            try:
                linger_seconds = float(raw) if raw else DEFAULT_LINGER_SECONDS
            except ValueError:
                raise ValueError(f"{ENV_LINGER_SECONDS}={raw!r}: expected seconds") from None
        if port is None and pushgateway_url is None:
            return None
        return cls(
            port,
            addr=addr,
            certfile=certfile,
            keyfile=keyfile,
            pushgateway_url=pushgateway_url,
            job=job,
            linger_seconds=linger_seconds,
            registry=registry,
            aggregate=aggregate,
            port_setting=port_setting,
        )

    # ------------------------------------------------------------------ sink events

    def on_train_begin(self, info: RunInfo) -> None:
        self.active = not self.aggregate or info.rank == 0
        self.rank_label = "all" if self.aggregate else str(info.rank)
        now = time.time()
        with self._lock:
            st = self._state
            st.gauges["world_size"] = float(info.world_size)
            st.gauges["train_start_timestamp_seconds"] = now
            st.gauges["heartbeat_timestamp_seconds"] = now
            st.info = {
                "run_name": info.run_name or "",
                "wandb_run_id": info.wandb_run_id or "",
                "template_family": info.template_family or "",
                "version": info.version or "",
            }
        if self.active and self.base_port is not None:
            self._serve(info.local_rank)

    def on_step(self, report: StepReport, findings: list[Finding]) -> None:
        if not self.active:
            return
        with self._lock:
            self._apply(report)
            for f in findings:
                if f.action == "warn":
                    self._state.warnings[f.check] = self._state.warnings.get(f.check, 0.0) + 1

    def on_log(self, window: WindowReport) -> None:
        if not self.active:
            return
        with self._lock:
            self._state.gauges["heartbeat_timestamp_seconds"] = time.time()
        self._push()

    def on_abort(self, error: MaskMonitorAbort, report: StepReport) -> None:
        if not self.active:
            return
        with self._lock:
            self._apply(report)
            st = self._state
            st.aborts[error.reason] = st.aborts.get(error.reason, 0.0) + 1
            st.gauges["heartbeat_timestamp_seconds"] = st.train_end = time.time()
            scrapes = self._scrapes
        self._push()
        self._linger(scrapes, ABORT_SCRAPES, "abort")

    def on_train_end(self, summary: dict[str, Any]) -> None:
        if not self.active:
            return
        with self._lock:
            st = self._state
            if st.train_end is not None:  # after an abort: pushed and lingered already
                return
            now = time.time()
            # heartbeat == end: the stalled alert knows this run ended (see dashboards/alerts.py)
            st.gauges["heartbeat_timestamp_seconds"] = st.train_end = now
            scrapes = self._scrapes
        self._push()
        if scrapes > 0:  # someone scrapes this endpoint: let them see the final values once
            self._linger(scrapes, 1, "end")

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        server, self._server = self._server, None
        if server is not None:
            server.shutdown()
            server.server_close()
        if self._thread is not None:
            self._thread.join(timeout=5)
            self._thread = None

    # ------------------------------------------------------------------ internals

    @property
    def scrapes(self) -> int:
        """How many times the metrics were collected by someone else than this sink (scrapes)."""
        return self._scrapes

    def _apply(self, report: StepReport) -> None:
        """Add one step's counts (once per step, whether it arrives via on_step or on_abort)."""
        if self._last_step == report.step:
            return
        self._last_step = report.step
        st = self._state
        t = report.total if self.aggregate else report.local
        st.totals = st.totals + t
        st.steps += 1
        g = st.gauges
        g["optimizer_step"] = float(report.step)
        g["last_step_target_tokens"] = t.target_tokens
        g["last_step_supervised_tokens"] = t.supervised_tokens
        g["last_step_fully_masked_sequences"] = t.fully_masked_sequences
        g["last_step_masked_ratio"] = _nan(t.masked_ratio)
        g["last_step_max_masked_ratio"] = t.max_masked_ratio if t.target_tokens > 0 else math.nan
        g["last_step_loss"] = _nan(t.mean_loss if t.non_finite_loss_batches == 0 else math.nan)
        g["last_step_prompt_leakage_ratio"] = _nan(t.prompt_leakage_ratio)
        g["last_step_response_coverage_ratio"] = _nan(t.response_coverage_ratio)
        g["heartbeat_timestamp_seconds"] = time.time()
        for mb in report.micro_batches:
            if mb.target_tokens > 0:
                self._observe(mb.max_masked_ratio)

    def _observe(self, ratio: float) -> None:
        st = self._state
        for i, bound in enumerate(HISTOGRAM_BUCKETS):
            if ratio <= bound:
                st.bucket_counts[i] += 1
                break
        st.hist_sum += ratio
        st.hist_count += 1

    def _serve(self, local_rank: int) -> None:
        port = 0 if self.base_port == 0 else self.base_port + int(local_rank)
        try:
            self._server, self._thread = start_http_server(
                port, addr=self.addr, registry=self.registry, certfile=self.certfile, keyfile=self.keyfile
            )
        except OSError as exc:
            if exc.errno in (98, 48, 10048) or "in use" in str(exc).lower():  # EADDRINUSE (Linux/macOS/Win)
                raise SinkConfigError(
                    f"mask-monitor: cannot serve Prometheus metrics on {self.addr}:{port}: port {port} is "
                    f"already in use (set by {self.port_setting}; rank {self.rank_label} serves on base port "
                    f"+ LOCAL_RANK {local_rank}). Choose a free base port with prometheus_port= or "
                    f"{ENV_PORT}, leaving LOCAL_WORLD_SIZE consecutive ports free."
                ) from exc
            raise SinkConfigError(
                f"mask-monitor: cannot serve Prometheus metrics on {self.addr}:{port} ({self.port_setting}, "
                f"certfile={self.certfile!r}, keyfile={self.keyfile!r}): {type(exc).__name__}: {exc}"
            ) from exc
        self.port = self._server.server_address[1]
        logger.info(
            "mask-monitor: serving Prometheus metrics on %s://%s:%d/metrics (rank %s)",
            "https" if self.certfile else "http",
            self.addr,
            self.port,
            self.rank_label,
        )

    def _push(self) -> None:
        if not self.pushgateway_url:
            return
        self._local.internal = True
        try:
            push_to_gateway(
                self.pushgateway_url,
                job=self.job,
                registry=self.registry,
                grouping_key={"instance": self.instance, "rank": self.rank_label},
                timeout=self.push_timeout,
            )
        except Exception as exc:  # noqa: BLE001 - a gateway that is down must not stop training
            if not self._push_warned:
                self._push_warned = True
                logger.warning(
                    "mask-monitor: cannot push metrics to the Pushgateway at %s (%s: %s); training goes on, "
                    "later push failures are logged at debug level",
                    self.pushgateway_url,
                    type(exc).__name__,
                    exc,
                )
            else:
                logger.debug("mask-monitor: push to %s failed: %r", self.pushgateway_url, exc)
        finally:
            self._local.internal = False

    def _linger(self, scrapes_before: int, wanted: int, why: str) -> None:
        """Keep serving until ``wanted`` scrapes saw the final values, at most ``linger_seconds``."""
        if self._server is None or self.linger_seconds <= 0:
            return
        logger.info(
            "mask-monitor: serving the final metrics for up to %.0f s so Prometheus sees the %s",
            self.linger_seconds,
            why,
        )
        deadline = time.monotonic() + self.linger_seconds
        while time.monotonic() < deadline:
            if self._scrapes - scrapes_before >= wanted:
                return
            time.sleep(0.05)
