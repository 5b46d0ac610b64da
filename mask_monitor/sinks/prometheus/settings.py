"""The exporter's settings: one table, one resolution path for code and environment, one validation.

Precedence, the same as :class:`~mask_monitor.config.MonitorConfig`: a value given in code
(``PrometheusSink(port=9400)``, or the callback's deprecated ``prometheus_*`` arguments) wins; a value
left unset (None) falls back to its ``MASK_MONITOR_PROMETHEUS_*`` environment variable, then to its
default. Every variable name is declared in :data:`mask_monitor.config.ENVIRONMENT`; a bad value is named
with where it came from and what was expected. Each resolved value remembers its source, so a later error
(a taken port) can say which setting to change.

Example:
    >>> s = resolve({"port": 9400}, env={"MASK_MONITOR_PROMETHEUS_ADDR": "127.0.0.1"})
    >>> s.port, s.addr, s.source("port"), s.source("addr")
    (9400, '127.0.0.1', 'PrometheusSink(port=9400)', 'MASK_MONITOR_PROMETHEUS_ADDR=127.0.0.1')
    >>> resolve({"port": "x"}, env={})
    Traceback (most recent call last):
    ...
    mask_monitor.config.ConfigError: PrometheusSink(port='x'): expected a port number between 0 and 65535
"""

from __future__ import annotations

import os
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

from ...config import ENVIRONMENT, ConfigError

__all__ = [
    "PrometheusSettings",
    "FIELDS",
    "resolve",
    "local_world_size",
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
    "MAX_PORT",
]


def _env(name: str) -> str:
    if name not in ENVIRONMENT:  # pragma: no cover - a declaration mistake, caught at import
        raise ValueError(f"{name} is not declared in mask_monitor.config.ENVIRONMENT")
    return name


ENV_PORT = _env("MASK_MONITOR_PROMETHEUS_PORT")
ENV_ADDR = _env("MASK_MONITOR_PROMETHEUS_ADDR")
ENV_CERTFILE = _env("MASK_MONITOR_PROMETHEUS_CERTFILE")
ENV_KEYFILE = _env("MASK_MONITOR_PROMETHEUS_KEYFILE")
ENV_CLIENT_CAFILE = _env("MASK_MONITOR_PROMETHEUS_CLIENT_CAFILE")
ENV_PUSHGATEWAY_URL = _env("MASK_MONITOR_PUSHGATEWAY_URL")
ENV_JOB = _env("MASK_MONITOR_PROMETHEUS_JOB")
ENV_LINGER_SECONDS = _env("MASK_MONITOR_PROMETHEUS_LINGER_SECONDS")
ENV_MAX_CONNECTIONS = _env("MASK_MONITOR_PROMETHEUS_MAX_CONNECTIONS")
ENV_TIMEOUT_SECONDS = _env("MASK_MONITOR_PROMETHEUS_TIMEOUT_SECONDS")
ENV_CONNECTIONS_PER_SECOND = _env("MASK_MONITOR_PROMETHEUS_CONNECTIONS_PER_SECOND")

MAX_PORT = 65535
DEFAULT_ADDR = "0.0.0.0"
DEFAULT_JOB = "mask_monitor"
#: Two scrapes at Prometheus' usual 15 s interval.
DEFAULT_LINGER_SECONDS = 30.0
#: Connections open at once (like node_exporter's ``--web.max-requests``, sized for a few scrapers).
DEFAULT_MAX_CONNECTIONS = 8
#: Whole exchange (TLS handshake, request, response) of one connection, then it is closed.
DEFAULT_TIMEOUT_SECONDS = 5.0
#: Connections accepted per second, sustained (a burst of ``max_connections`` is allowed).
DEFAULT_CONNECTIONS_PER_SECOND = 20.0
#: Seconds one push to the Pushgateway may take; also the bound of the final push at end or abort.
DEFAULT_PUSH_TIMEOUT = 5.0


def _text(value: Any, where: str) -> str | None:
    if value is None:
        return None
    if not isinstance(value, str | os.PathLike):
        raise ConfigError(f"{where}: expected a string")
    text = os.fspath(value).strip()
    return text or None


def _port(value: Any, where: str) -> int:
    try:
        port = int(value.strip() if isinstance(value, str) else value)
        if isinstance(value, bool) or isinstance(value, float) and value != port:
            raise ValueError
    except (TypeError, ValueError):
        port = -1
    if not 0 <= port <= MAX_PORT:
        raise ConfigError(f"{where}: expected a port number between 0 and {MAX_PORT}")
    return port


def _number(minimum: float, *, strict: bool, integer: bool = False) -> Callable[[Any, str], float]:
    what = ("a whole number" if integer else "a number") + (f" > {minimum:g}" if strict else f" >= {minimum:g}")

    def parse(value: Any, where: str) -> float:
        try:
            if isinstance(value, bool):
                raise ValueError
            number = float(value.strip() if isinstance(value, str) else value)
        except (TypeError, ValueError):
            raise ConfigError(f"{where}: expected {what}") from None
        if number != number or number < minimum or (strict and number == minimum) or (integer and number % 1):
            raise ConfigError(f"{where}: expected {what}")
        return int(number) if integer else number

    return parse


@dataclass(frozen=True)
class _Field:
    name: str
    env: str | None
    default: Any
    parse: Callable[[Any, str], Any]
    #: the deprecated ``MaskMonitorCallback`` argument that sets it
    callback_arg: str | None = None


#: Every setting of the exporter, in ``PrometheusSink`` argument order.
FIELDS: tuple[_Field, ...] = (
    _Field("port", ENV_PORT, None, _port, "prometheus_port"),
    _Field("addr", ENV_ADDR, DEFAULT_ADDR, _text, "prometheus_addr"),
    _Field("certfile", ENV_CERTFILE, None, _text, "prometheus_certfile"),
    _Field("keyfile", ENV_KEYFILE, None, _text, "prometheus_keyfile"),
    _Field("client_cafile", ENV_CLIENT_CAFILE, None, _text),
    _Field("pushgateway_url", ENV_PUSHGATEWAY_URL, None, _text, "pushgateway_url"),
    _Field("job", ENV_JOB, DEFAULT_JOB, _text, "prometheus_job"),
    _Field(
        "linger_seconds",
        ENV_LINGER_SECONDS,
        DEFAULT_LINGER_SECONDS,
        _number(0, strict=False),
        "prometheus_linger_seconds",
    ),
    _Field("max_connections", ENV_MAX_CONNECTIONS, DEFAULT_MAX_CONNECTIONS, _number(1, strict=False, integer=True)),
    _Field("timeout_seconds", ENV_TIMEOUT_SECONDS, DEFAULT_TIMEOUT_SECONDS, _number(0, strict=True)),
    _Field(
        "connections_per_second", ENV_CONNECTIONS_PER_SECOND, DEFAULT_CONNECTIONS_PER_SECOND, _number(0, strict=True)
    ),
    _Field("push_timeout", None, DEFAULT_PUSH_TIMEOUT, _number(0, strict=True)),
    _Field("aggregate", None, False, lambda v, where: bool(v), "prometheus_aggregate"),
)
_FIELD = {f.name: f for f in FIELDS}


@dataclass(frozen=True)
class PrometheusSettings:
    """Resolved, validated settings of one exporter (see :data:`FIELDS` for the names)."""

    port: int | None = None
    addr: str = DEFAULT_ADDR
    certfile: str | None = None
    keyfile: str | None = None
    client_cafile: str | None = None
    pushgateway_url: str | None = None
    job: str = DEFAULT_JOB
    linger_seconds: float = DEFAULT_LINGER_SECONDS
    max_connections: int = DEFAULT_MAX_CONNECTIONS
    timeout_seconds: float = DEFAULT_TIMEOUT_SECONDS
    connections_per_second: float = DEFAULT_CONNECTIONS_PER_SECOND
    push_timeout: float = DEFAULT_PUSH_TIMEOUT
    aggregate: bool = False
    #: setting name -> how it was set (``PrometheusSink(port=9400)``, ``MASK_MONITOR_PROMETHEUS_PORT=9400``)
    sources: Mapping[str, str] = field(default_factory=dict, compare=False)

    def source(self, name: str) -> str:
        """How ``name`` was set, for messages (``"default"`` when nobody set it)."""
        return self.sources.get(name, "default")

    @property
    def enabled(self) -> bool:
        """Whether anything is exported (an endpoint or a Pushgateway)."""
        return self.port is not None or self.pushgateway_url is not None

    @property
    def tls(self) -> bool:
        return self.certfile is not None


def resolve(
    given: Mapping[str, Any],
    env: Mapping[str, str] | None = None,
    *,
    style: str = "sink",
) -> PrometheusSettings:
    """Settings from values given in code (None = unset) and the environment (``os.environ`` by default).

    ``style`` names code values in messages: ``"sink"`` (``PrometheusSink(port=...)``) or ``"callback"``
    (the deprecated ``prometheus_port=...`` arguments).
    """
    env = os.environ if env is None else env
    unknown = set(given) - set(_FIELD)
    if unknown:
        raise ConfigError(f"PrometheusSink: unknown setting(s) {sorted(unknown)}; known: {', '.join(_FIELD)}")
    values: dict[str, Any] = {}
    sources: dict[str, str] = {}
    for f in FIELDS:
        raw = given.get(f.name)
        if raw is not None:
            label = f.callback_arg if style == "callback" and f.callback_arg else f.name
            where = f"{label}={raw!r}" if style == "callback" else f"PrometheusSink({label}={raw!r})"
            values[f.name] = f.parse(raw, where)
            sources[f.name] = f"{label}={raw}" if style == "callback" else f"PrometheusSink({label}={raw})"
            continue
        text = env.get(f.env, "").strip() if f.env else ""
        if text:
            where = f"{f.env}={text!r}"
            values[f.name] = f.parse(text, where)
            sources[f.name] = f"{f.env}={text}"
        else:
            values[f.name] = f.default
    settings = PrometheusSettings(**values, sources=sources)
    _check(settings)
    return settings


def _check(s: PrometheusSettings) -> None:
    if (s.certfile is None) != (s.keyfile is None):
        raise ConfigError(
            f"PrometheusSink: TLS needs both a certificate and a key (certfile: {s.source('certfile')}, keyfile: "
            f"{s.source('keyfile')}; {ENV_CERTFILE} / {ENV_KEYFILE})"
        )
    if s.client_cafile is not None and s.certfile is None:
        raise ConfigError(
            f"PrometheusSink: client_cafile ({s.source('client_cafile')}) asks for mutual TLS, which needs the "
            f"server's own certfile and keyfile ({ENV_CERTFILE} / {ENV_KEYFILE})"
        )


def local_world_size(env: Mapping[str, str] | None = None) -> int | None:
    """Processes on this node (``LOCAL_WORLD_SIZE``, set by torchrun and accelerate), or None if unknown."""
    env = os.environ if env is None else env
    try:
        n = int(env.get("LOCAL_WORLD_SIZE", ""))
    except ValueError:
        return None
    return n if n >= 1 else None
