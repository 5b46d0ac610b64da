""":class:`PrometheusSink`: the monitor's events in, a scrape endpoint and/or Pushgateway pushes out.

The sink wires the parts of this package together: :mod:`.settings` (arguments and environment),
:mod:`.metrics` (the exported values and their families), :mod:`.server` (the bounded endpoint) and
:mod:`.push` (the background pusher). The training thread only updates values under a lock and asks for
pushes; serving and pushing happen in their own threads, and every wait at the end of training (the
abort linger, the final push, closing the server) has a bound.
"""

from __future__ import annotations

import logging
import socket
import ssl
import threading
import time
from collections.abc import Mapping
from typing import Any

from prometheus_client import CollectorRegistry, push_to_gateway

from ...errors import MaskMonitorAbort
from ...reports import RunInfo, StepReport, WindowReport
from ..base import Finding, Sink, SinkConfigError
from .metrics import MetricCollector, MetricState
from .push import PushWorker
from .server import ExpositionCache, MetricsServer, tls_context
from .settings import ENV_PORT, MAX_PORT, PrometheusSettings, local_world_size, resolve

__all__ = ["PrometheusSink", "ABORT_SCRAPES"]

logger = logging.getLogger("mask_monitor")

#: Scrapes of the final values after which an abort linger may end early.
ABORT_SCRAPES = 2
_ADDR_IN_USE = (98, 48, 10048)  # EADDRINUSE on Linux, macOS, Windows


class PrometheusSink(Sink):
    """Exports the audit to Prometheus: a scrape endpoint per rank and/or a Pushgateway.

    Use it as ``MaskMonitorCallback(sinks=[PrometheusSink(port=9400)])``. Every argument left unset (None)
    falls back to its ``MASK_MONITOR_PROMETHEUS_*`` environment variable, then to its default (see
    :mod:`mask_monitor.sinks.prometheus.settings`); pass ``env={}`` to ignore the environment.

    Args:
        port: base port of the scrape endpoint; rank ``r`` serves on ``port + LOCAL_RANK``, and the whole
            range ``port .. port + LOCAL_WORLD_SIZE - 1`` must be valid. ``0`` picks a free port (see
            :attr:`port` after train begin). None and no ``MASK_MONITOR_PROMETHEUS_PORT``: no endpoint.
        addr: address to bind (``0.0.0.0``: every interface).
        certfile, keyfile: serve HTTPS with this certificate and key (both or neither).
        client_cafile: require a client certificate signed by this CA (mutual TLS; needs certfile/keyfile).
        pushgateway_url: push to this Pushgateway (in the background) at every logging step, at the end
            and at an abort.
        job: the ``job`` grouping key of pushed metrics.
        linger_seconds: at an abort, keep serving the final values up to this long (returns early once
            they were scraped twice); at a normal end, wait up to this long for one scrape of the final
            values when the endpoint has been scraped before.
        max_connections: client connections open at once (the oldest idle one is evicted when full).
        timeout_seconds: the whole exchange of one connection (TLS handshake, request, response).
        connections_per_second: connections accepted per second, sustained (burst: ``max_connections``).
        push_timeout: seconds one push may take; also the bound of the final push at end or abort.
        aggregate: export the job-wide totals from rank 0 only, with ``rank="all"`` (for very large
            jobs); other ranks export nothing. The histogram then covers rank 0's micro-batches.
        registry: the registry to fill (a fresh private one by default).
        env: where unset arguments are looked up (``os.environ`` by default).

    Example:
        >>> from prometheus_client import CollectorRegistry
        >>> from mask_monitor.reports import RunInfo, StepReport, Totals
        >>> registry = CollectorRegistry()
        >>> sink = PrometheusSink(registry=registry, env={})  # no endpoint, no push: a registry only
        >>> sink.on_train_begin(RunInfo(run_name="demo", rank=0, world_size=1))
        >>> mb = Totals(micro_batches=1, target_tokens=8, supervised_tokens=2, masked_tokens=6,
        ...             max_masked_ratio=0.75)
        >>> sink.on_step(StepReport(1, 0, 1, total=mb, per_rank=(mb,), micro_batches=(mb,)), [])
        >>> registry.get_sample_value("mask_monitor_masked_tokens_total", {"rank": "0"})
        6.0
        >>> sink.close()
    """

    name = "prometheus"

    def __init__(
        self,
        port: int | None = None,
        *,
        addr: str | None = None,
        certfile: str | None = None,
        keyfile: str | None = None,
        client_cafile: str | None = None,
        pushgateway_url: str | None = None,
        job: str | None = None,
        linger_seconds: float | None = None,
        max_connections: int | None = None,
        timeout_seconds: float | None = None,
        connections_per_second: float | None = None,
        push_timeout: float | None = None,
        aggregate: bool = False,
        registry: CollectorRegistry | None = None,
        env: Mapping[str, str] | None = None,
    ) -> None:
        given = {
            "port": port,
            "addr": addr,
            "certfile": certfile,
            "keyfile": keyfile,
            "client_cafile": client_cafile,
            "pushgateway_url": pushgateway_url,
            "job": job,
            "linger_seconds": linger_seconds,
            "max_connections": max_connections,
            "timeout_seconds": timeout_seconds,
            "connections_per_second": connections_per_second,
            "push_timeout": push_timeout,
            "aggregate": aggregate or None,
        }
        self._setup(resolve(given, env), registry)

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
        """A sink from the callback's (deprecated) ``prometheus_*`` arguments and the environment, or None
        when neither a port nor a Pushgateway is configured (the exporter is off).

        Example:
            >>> PrometheusSink.from_settings(env={}) is None
            True
            >>> sink = PrometheusSink.from_settings(env={"MASK_MONITOR_PROMETHEUS_PORT": "9400"})
            >>> sink.base_port, sink.port_setting
            (9400, 'MASK_MONITOR_PROMETHEUS_PORT=9400')
        """
        given = {
            "port": port,
            "addr": addr,
            "certfile": certfile,
            "keyfile": keyfile,
            "pushgateway_url": pushgateway_url,
            "job": job,
            "linger_seconds": linger_seconds,
            "aggregate": aggregate or None,
        }
        settings = resolve(given, env, style="callback")
        if not settings.enabled:
            return None
        sink = cls.__new__(cls)
        sink._setup(settings, registry)
        return sink

    def _setup(self, settings: PrometheusSettings, registry: CollectorRegistry | None) -> None:
        self.settings = settings
        self.registry = registry if registry is not None else CollectorRegistry()
        exclusive = registry is None  # a private registry holds only this sink's values
        #: the port actually served (after train begin), or None
        self.port: int | None = None
        self.instance = socket.gethostname()
        self.active = True  # False on non-zero ranks in aggregate mode
        self._state = MetricState()
        self._state.rank_label = "all" if settings.aggregate else "0"
        self._exposition = ExpositionCache(self.registry, lambda: self._state.version, exclusive=exclusive)
        self._server: MetricsServer | None = None
        self._pusher: PushWorker | None = None
        self._scrape_cond = threading.Condition()
        self._scrapes = 0
        self._watch_version: int | None = None
        self._watched = 0
        self.registry.register(MetricCollector(self._state))

    # ------------------------------------------------------------------ settings, for reading

    @property
    def base_port(self) -> int | None:
        return self.settings.port

    @property
    def addr(self) -> str:
        return self.settings.addr

    @property
    def certfile(self) -> str | None:
        return self.settings.certfile

    @property
    def keyfile(self) -> str | None:
        return self.settings.keyfile

    @property
    def client_cafile(self) -> str | None:
        return self.settings.client_cafile

    @property
    def pushgateway_url(self) -> str | None:
        return self.settings.pushgateway_url

    @property
    def job(self) -> str:
        return self.settings.job

    @property
    def linger_seconds(self) -> float:
        return self.settings.linger_seconds

    @property
    def aggregate(self) -> bool:
        return self.settings.aggregate

    @property
    def port_setting(self) -> str:
        """How the port was set (for messages)."""
        return self.settings.source("port")

    @property
    def rank_label(self) -> str:
        return self._state.rank_label

    @property
    def scrapes(self) -> int:
        """Complete ``GET /metrics`` responses the endpoint has served."""
        return self._scrapes

    @property
    def server(self) -> MetricsServer | None:
        """The running endpoint (after train begin, until close), for diagnostics."""
        return self._server

    @property
    def pusher(self) -> PushWorker | None:
        """The background pusher (after train begin, until close), for diagnostics."""
        return self._pusher

    def __repr__(self) -> str:
        return (
            f"PrometheusSink(port={self.base_port!r}, addr={self.addr!r}, tls={self.settings.tls}, "
            f"mtls={self.client_cafile is not None}, pushgateway_url={self.pushgateway_url!r})"
        )

    # ------------------------------------------------------------------ sink events

    def on_train_begin(self, info: RunInfo) -> None:
        s = self.settings
        self.active = not s.aggregate or info.rank == 0
        self._state.begin(info, s.aggregate)
        if not self.active:
            return
        if s.port is not None and self._server is None:  # (still running if a train() died without end)
            self._serve(self._port_of(info.local_rank), info.local_rank)
        if s.pushgateway_url is not None and self._pusher is None:
            self._pusher = PushWorker(self._push, s.pushgateway_url, s.push_timeout)

    def on_step(self, report: StepReport, findings: list[Finding]) -> None:
        if self.active:
            self._state.step(report, findings)

    def on_log(self, window: WindowReport) -> None:
        if not self.active:
            return
        self._state.heartbeat()
        if self._pusher is not None:
            self._pusher.request()

    def on_abort(self, error: MaskMonitorAbort, report: StepReport) -> None:
        if not self.active:
            return
        self._state.abort(error.reason, report)
        self._finish(ABORT_SCRAPES, "abort")

    def on_train_end(self, summary: dict[str, Any]) -> None:
        if not self.active or not self._state.end():  # (after an abort: pushed and lingered already)
            return
        # someone scrapes this endpoint: let them see the final values once
        self._finish(1 if self._scrapes > 0 else 0, "end")

    def close(self) -> None:
        """Stop the endpoint and the pusher; bounded whatever clients or the gateway do."""
        server, self._server = self._server, None
        pusher, self._pusher = self._pusher, None
        if server is not None:
            server.close()
        if pusher is not None:
            pusher.close()

    # ------------------------------------------------------------------ internals

    def _finish(self, scrapes_wanted: int, why: str) -> None:
        """Final push (in the background) and linger (here) at once; both bounded."""
        push_deadline = time.monotonic() + self.settings.push_timeout
        wanted = self._pusher.request() if self._pusher is not None else None
        if scrapes_wanted:
            self._linger(scrapes_wanted, why)
        if wanted is not None and self._pusher is not None:
            self._pusher.wait(wanted, push_deadline, what=f"final ({why})")

    def _port_of(self, local_rank: int) -> int:
        """This rank's port; :class:`SinkConfigError` when the node's port range passes 65535 (on every rank,
        before any is bound: they all see the same LOCAL_WORLD_SIZE)."""
        base = self.settings.port
        assert base is not None
        if base == 0:
            return 0
        local_world = local_world_size()
        ranks = max(local_world or 1, local_rank + 1)
        last = base + ranks - 1
        if last > MAX_PORT:
            span = f"LOCAL_WORLD_SIZE={local_world}" if local_world else f"LOCAL_RANK {local_rank}"
            raise SinkConfigError(
                f"mask-monitor: cannot serve Prometheus metrics: base port {base} (set by {self.port_setting}) "
                f"+ LOCAL_RANK needs ports {base}..{last} for {ranks} local rank(s) ({span}), past the highest "
                f"port {MAX_PORT}. Choose a base port of at most {MAX_PORT - ranks + 1} with PrometheusSink(port=...) "
                f"or {ENV_PORT}, leaving {ranks} consecutive ports free."
            )
        return base + int(local_rank)

    def _serve(self, port: int, local_rank: int) -> None:
        s = self.settings
        context = None
        if s.certfile is not None and s.keyfile is not None:
            try:
                context = tls_context(s.certfile, s.keyfile, s.client_cafile)
            except (OSError, ssl.SSLError, ValueError) as exc:
                raise SinkConfigError(
                    f"mask-monitor: cannot serve Prometheus metrics over TLS: loading certfile={s.certfile!r}, "
                    f"keyfile={s.keyfile!r}, client_cafile={s.client_cafile!r} failed: {type(exc).__name__}: {exc}"
                ) from exc
        try:
            server = MetricsServer(
                s.addr,
                port,
                self._exposition,
                ssl_context=context,
                max_connections=s.max_connections,
                timeout_seconds=s.timeout_seconds,
                connections_per_second=s.connections_per_second,
                on_scrape=self._scraped,
            )
        except OSError as exc:
            if exc.errno in _ADDR_IN_USE or "in use" in str(exc).lower():
                raise SinkConfigError(
                    f"mask-monitor: cannot serve Prometheus metrics on {s.addr}:{port}: port {port} is already in "
                    f"use (set by {self.port_setting}; rank {self.rank_label} serves on base port + LOCAL_RANK "
                    f"{local_rank}). Choose a free base port with PrometheusSink(port=...) or {ENV_PORT}, leaving "
                    f"LOCAL_WORLD_SIZE consecutive ports free."
                ) from exc
            raise SinkConfigError(
                f"mask-monitor: cannot serve Prometheus metrics on {s.addr}:{port} ({self.port_setting}): "
                f"{type(exc).__name__}: {exc}"
            ) from exc
        server.start()
        self._server = server
        self.port = server.port
        logger.info(
            "mask-monitor: serving Prometheus metrics on %s://%s:%d/metrics (rank %s%s)",
            "https" if context else "http",
            s.addr,
            self.port,
            self.rank_label,
            ", client certificates required" if s.client_cafile else "",
        )

    def _push(self) -> None:
        """One push (runs in the push worker's thread)."""
        s = self.settings
        assert s.pushgateway_url is not None
        push_to_gateway(
            s.pushgateway_url,
            job=s.job,
            registry=self.registry,
            grouping_key={"instance": self.instance, "rank": self.rank_label},
            timeout=s.push_timeout,
        )

    def _scraped(self, version: int) -> None:
        """A complete ``GET /metrics`` response of values at ``version`` (called in the server thread)."""
        with self._scrape_cond:
            self._scrapes += 1
            if self._watch_version is not None and version >= self._watch_version:
                self._watched += 1
            self._scrape_cond.notify_all()

    def _linger(self, wanted: int, why: str) -> None:
        """Keep serving until ``wanted`` scrapes saw the final values, at most ``linger_seconds``."""
        if self._server is None or self.linger_seconds <= 0:
            return
        logger.info(
            "mask-monitor: serving the final metrics for up to %.0f s so Prometheus sees the %s",
            self.linger_seconds,
            why,
        )
        deadline = time.monotonic() + self.linger_seconds
        with self._scrape_cond:
            self._watch_version, self._watched = self._state.version, 0
            while self._watched < wanted:
                left = deadline - time.monotonic()
                if left <= 0:
                    break
                self._scrape_cond.wait(left)
            self._watch_version = None
