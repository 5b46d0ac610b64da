"""Prometheus exporter: one scrape endpoint per rank, optional Pushgateway, a linger on abort.

Turn it on with ``MaskMonitorCallback(sinks=[PrometheusSink(port=9400)])`` (or, for operators, the
``MASK_MONITOR_PROMETHEUS_*`` environment variables). One module per concern:

* :mod:`.metrics`: the metric families, built from :data:`mask_monitor.counters.COUNTERS` and
  :data:`mask_monitor.checks.CHECKS` (:data:`METRIC_NAMES` is every name the exporter emits);
* :mod:`.settings`: arguments and environment, resolved and validated in one place;
* :mod:`.server`: the scrape endpoint, one non-blocking thread with bounded connections, timeouts,
  accept rate and a cached exposition, so no client can block or slow training;
* :mod:`.push`: Pushgateway pushes in a background thread, the latest values winning;
* :mod:`.sink`: :class:`PrometheusSink`, which ties them to the monitor's events.

Every metric is named by Prometheus conventions (``mask_monitor_`` prefix, base units, ``_total``
counters, ``_ratio`` for 0..1, ``_timestamp_seconds``) and carries only bounded labels: ``rank`` (the
global rank, or ``"all"`` in aggregate mode) and, on two families, ``reason``. Token and event counters
are driven by this rank's own counts (:attr:`StepReport.local`); Prometheus sums ranks with
``sum by (job)``, and ratios are ``rate(a) / rate(b)`` of counters, so no batch is missed between scrapes.
"""

from __future__ import annotations

from .metrics import COUNTERS, GAUGES, LAST_STEP, METRIC_NAMES, PREFIX, REASON_COUNTERS, MetricCollector, MetricState
from .push import PushWorker
from .server import ExpositionCache, MetricsServer, tls_context
from .settings import (
    DEFAULT_ADDR,
    DEFAULT_CONNECTIONS_PER_SECOND,
    DEFAULT_JOB,
    DEFAULT_LINGER_SECONDS,
    DEFAULT_MAX_CONNECTIONS,
    DEFAULT_PUSH_TIMEOUT,
    DEFAULT_TIMEOUT_SECONDS,
    ENV_ADDR,
    ENV_CERTFILE,
    ENV_CLIENT_CAFILE,
    ENV_CONNECTIONS_PER_SECOND,
    ENV_JOB,
    ENV_KEYFILE,
    ENV_LINGER_SECONDS,
    ENV_MAX_CONNECTIONS,
    ENV_PORT,
    ENV_PUSHGATEWAY_URL,
    ENV_TIMEOUT_SECONDS,
    PrometheusSettings,
)
from .sink import ABORT_SCRAPES, PrometheusSink

__all__ = [
    "PrometheusSink",
    "PrometheusSettings",
    "MetricsServer",
    "ExpositionCache",
    "PushWorker",
    "MetricState",
    "MetricCollector",
    "tls_context",
    "COUNTERS",
    "GAUGES",
    "LAST_STEP",
    "REASON_COUNTERS",
    "METRIC_NAMES",
    "PREFIX",
    "ABORT_SCRAPES",
    "ENV_PORT",
    "ENV_ADDR",
    "ENV_CERTFILE",
    "ENV_KEYFILE",
    "ENV_CLIENT_CAFILE",
    "ENV_PUSHGATEWAY_URL",
    "ENV_JOB",
    "ENV_LINGER_SECONDS",
    "ENV_MAX_CONNECTIONS",
    "ENV_TIMEOUT_SECONDS",
    "ENV_CONNECTIONS_PER_SECOND",
    "DEFAULT_ADDR",
    "DEFAULT_JOB",
    "DEFAULT_LINGER_SECONDS",
    "DEFAULT_MAX_CONNECTIONS",
    "DEFAULT_TIMEOUT_SECONDS",
    "DEFAULT_CONNECTIONS_PER_SECOND",
    "DEFAULT_PUSH_TIMEOUT",
]
