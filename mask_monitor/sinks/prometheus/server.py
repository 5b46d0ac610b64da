"""The scrape endpoint: one thread, non-blocking sockets, every resource bounded.

The endpoint lives inside the training process, on a port anyone on the cluster network may reach, so
nothing a client does may block, slow or crash training. The design, and what bounds each cost:

* **One thread, whatever the clients do.** A ``selectors`` loop drives every connection without blocking:
  the TLS handshake too (``do_handshake`` on a non-blocking socket), so an idle or half-open client never
  holds the accept loop. Threads: one, always. Descriptors: at most ``max_connections`` client sockets plus
  four of the server's own (listener, selector, wake-up pair).
* **Every connection has a deadline** (``timeout_seconds`` for the whole exchange: handshake, request,
  response) and a budget of socket events (a slowloris dribbling one byte at a time is closed after
  :data:`MAX_EVENTS` events or at its deadline, whichever comes first).
* **At most ``max_connections`` open at once** (node_exporter's ``--web.max-requests``). When full, a new
  connection evicts the oldest one that has not sent a complete request yet, so idle clients cannot lock
  Prometheus out; the kernel's listen backlog (:data:`BACKLOG`) holds the rest outside the process.
* **Accepting is rate limited** (a token bucket: ``connections_per_second`` sustained, a burst of
  ``max_connections``). Every unit of work the thread does (accept, handshake, read, render, write) belongs
  to an accepted connection, so this bounds the GIL time a storm of clients can take from training; the
  excess waits in the kernel's backlog, costing the process nothing.
* **The exposition is rendered at most twice per second**, and only when the exported values changed
  since (see :class:`ExpositionCache`); every other request is served the cached bytes (at most half a
  second old), so a storm of scrapes costs two renderings per second at most, not one per request.
* **Only ``GET``/``HEAD /metrics``** is served (query strings ignored); any other path is 404, any other
  method 405, a malformed request 400, an oversized request line 414 or header block 431, another HTTP
  version 505. Only a complete ``GET /metrics`` answered 200 counts as a scrape (see ``on_scrape``).
* **``close()`` returns in bounded time** whatever the clients do: it wakes the loop, which closes every
  socket without waiting for any client.

Example:
    >>> import urllib.request
    >>> from prometheus_client import CollectorRegistry, Counter
    >>> registry = CollectorRegistry()
    >>> Counter("demo_events", "Demo.", registry=registry).inc()
    >>> server = MetricsServer("127.0.0.1", 0, ExpositionCache(registry, lambda: 0))
    >>> server.start()
    >>> body = urllib.request.urlopen(f"http://127.0.0.1:{server.port}/metrics", timeout=5).read()
    >>> b"demo_events_total 1.0" in body
    True
    >>> server.close()
"""

from __future__ import annotations

import errno
import logging
import selectors
import socket
import ssl
import threading
import time
from collections.abc import Callable
from typing import Any

from prometheus_client.exposition import generate_latest
from prometheus_client.openmetrics.exposition import generate_latest as generate_openmetrics

__all__ = ["MetricsServer", "ExpositionCache", "tls_context", "MAX_EVENTS", "MAX_REQUEST_BYTES", "BACKLOG"]

logger = logging.getLogger("mask_monitor")

#: Socket events one connection may cause (a normal scrape needs 2 to 6, TLS included).
MAX_EVENTS = 32
#: Request line and headers together (Prometheus sends a few hundred bytes).
MAX_REQUEST_BYTES = 8192
#: Connections the kernel queues before the process accepts them (outside the process: no descriptor).
BACKLOG = 64
#: After the response, how long a connection is drained (read and dropped until the client closes) before
#: it is closed, so that the client reads the response rather than a reset.
DRAIN_SECONDS = 1.0

TEXT_CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"
OPENMETRICS_CONTENT_TYPE = "application/openmetrics-text; version=1.0.0; charset=utf-8"

_REASONS = {
    200: "OK",
    400: "Bad Request",
    404: "Not Found",
    405: "Method Not Allowed",
    408: "Request Timeout",
    414: "URI Too Long",
    431: "Request Header Fields Too Large",
    500: "Internal Server Error",
    505: "HTTP Version Not Supported",
}


class ExpositionCache:
    """The registry rendered at most once per ``min_interval`` seconds, and only when asked.

    Between renders every request gets the cached bytes (at most ``min_interval`` old: half a second by
    default, so scrapes a second apart never share a stale body), so a storm of scrapes costs at most two
    renderings per second, not one per request; nothing is rendered while nobody scrapes. With
    ``exclusive`` (the registry holds only the values behind ``version()``), a body is also kept as long as
    the version has not changed: no rendering at all while the values stand still.
    Each body carries the ``version()`` read before it was rendered (its values are at least that new), so
    the abort linger can count only scrapes that carried the final values. Two encodings, chosen by the
    request's ``Accept`` header: OpenMetrics 1.0.0 when the client asks for it (Prometheus does), else the
    text format 0.0.4. :attr:`renders` counts the renderings.
    """

    def __init__(
        self, registry: Any, version: Callable[[], int], min_interval: float = 0.5, exclusive: bool = False
    ) -> None:
        self.registry = registry
        self._version = version
        self.min_interval = min_interval
        self.exclusive = exclusive
        self._lock = threading.Lock()
        self._cache: dict[bool, tuple[int, float, bytes]] = {}
        self.renders = 0

    def get(self, accept: str = "") -> tuple[bytes, str, int]:
        """(body, content type, version of the values) for a request with this ``Accept`` header."""
        openmetrics = "application/openmetrics-text" in accept
        version, now = self._version(), time.monotonic()
        with self._lock:
            hit = self._cache.get(openmetrics)
            if hit is not None and (now - hit[1] < self.min_interval or self.exclusive and hit[0] == version):
                return hit[2], OPENMETRICS_CONTENT_TYPE if openmetrics else TEXT_CONTENT_TYPE, hit[0]
        # rendered outside the cache lock (the collector takes the state lock); the version was read
        # before rendering, so values that change meanwhile make the next request render again
        body = (generate_openmetrics if openmetrics else generate_latest)(self.registry)
        with self._lock:
            self._cache[openmetrics] = (version, now, body)
            self.renders += 1
        return body, OPENMETRICS_CONTENT_TYPE if openmetrics else TEXT_CONTENT_TYPE, version


def tls_context(certfile: str, keyfile: str, client_cafile: str | None = None) -> ssl.SSLContext:
    """A server context (TLS 1.2 or later); with ``client_cafile``, clients must present a certificate
    signed by that CA (mutual TLS)."""
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    ctx.load_cert_chain(certfile, keyfile)
    if client_cafile:
        ctx.load_verify_locations(cafile=client_cafile)
        ctx.verify_mode = ssl.CERT_REQUIRED
    return ctx


# connection states
_HANDSHAKE, _READ, _WRITE, _DRAIN = "handshake", "read", "write", "drain"
_LISTEN, _WAKE = object(), object()


class _Conn:
    __slots__ = ("sock", "tls", "state", "opened", "deadline", "events", "inbuf", "out", "scrape", "interest")

    def __init__(self, sock: socket.socket, tls: bool, now: float, timeout: float) -> None:
        self.sock = sock
        self.tls = tls
        self.state = _HANDSHAKE if tls else _READ
        self.opened = now
        self.deadline = now + timeout
        self.events = 0
        self.inbuf = bytearray()
        self.out = memoryview(b"")
        self.scrape: int | None = None  # the version of the values served by a scrape
        self.interest = selectors.EVENT_READ


class MetricsServer:
    """Serves ``GET /metrics`` from an :class:`ExpositionCache`; bounded as the module docstring says.

    Binding happens in the constructor (an ``OSError`` such as ``EADDRINUSE`` raises there, in the caller's
    thread); :meth:`start` starts the one serving thread; :meth:`close` stops it in bounded time.

    Args:
        addr, port: where to listen (port 0 picks a free one: see :attr:`port`).
        exposition: what to serve.
        ssl_context: serve HTTPS (see :func:`tls_context`).
        max_connections: connections open at once.
        timeout_seconds: the whole exchange of one connection.
        connections_per_second: sustained accept rate (burst: ``max_connections``).
        on_scrape: called (in the serving thread) after each complete ``GET /metrics`` response, with the
            version of the values it carried.
    """

    def __init__(
        self,
        addr: str,
        port: int,
        exposition: ExpositionCache,
        *,
        ssl_context: ssl.SSLContext | None = None,
        max_connections: int = 8,
        timeout_seconds: float = 5.0,
        connections_per_second: float = 20.0,
        on_scrape: Callable[[int], None] | None = None,
    ) -> None:
        self.exposition = exposition
        self.ssl_context = ssl_context
        self.max_connections = int(max_connections)
        self.timeout_seconds = float(timeout_seconds)
        self.rate = float(connections_per_second)
        self.burst = float(max(1, self.max_connections))
        self.on_scrape = on_scrape
        #: counters of what happened (read them for tests and diagnostics)
        self.stats: dict[str, int] = dict.fromkeys(
            ("accepted", "evicted", "timed_out", "over_budget", "tls_failed", "scrapes", "responses", "errors"), 0
        )
        family = socket.getaddrinfo(addr or None, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)[0][0]
        self._listener = socket.create_server((addr, port), family=family, backlog=BACKLOG, reuse_port=False)
        try:
            self._listener.setblocking(False)
            self._wake_r, self._wake_w = socket.socketpair()
            self._wake_r.setblocking(False)
            self._wake_w.setblocking(False)
        except BaseException:
            self._listener.close()
            raise
        self.addr = addr
        self.port: int = self._listener.getsockname()[1]
        self._sel = selectors.DefaultSelector()
        self._conns: dict[socket.socket, _Conn] = {}
        self._tokens = self.burst
        self._refilled = time.monotonic()
        self._listening = False
        self._full = False
        self._stopping = False
        self._thread: threading.Thread | None = None
        self._lock = threading.Lock()

    # ------------------------------------------------------------------ lifecycle

    def start(self) -> None:
        self._sel.register(self._wake_r, selectors.EVENT_READ, _WAKE)
        self._listen(True)
        self._thread = threading.Thread(target=self._run, name=f"mask-monitor-metrics:{self.port}", daemon=True)
        self._thread.start()

    def close(self, timeout: float = 2.0) -> None:
        """Stop serving: wakes the loop, which closes every connection at once. Bounded by ``timeout``."""
        with self._lock:
            if self._stopping:
                return
            self._stopping = True
        try:
            self._wake_w.send(b"x")
        except OSError:
            pass
        if self._thread is not None:
            self._thread.join(timeout)
            if self._thread.is_alive():  # pragma: no cover - the loop never blocks; last resort
                logger.warning("mask-monitor: the metrics server thread did not stop within %.1f s", timeout)
        else:
            self._shutdown()

    @property
    def connections(self) -> int:
        """Client connections open now."""
        return len(self._conns)

    # ------------------------------------------------------------------ the loop

    def _run(self) -> None:
        try:
            while not self._stopping:
                events = self._sel.select(self._timeout(time.monotonic()))
                if self._stopping:
                    break
                for key, mask in events:
                    if key.data is _LISTEN:
                        self._accept()
                    elif key.data is _WAKE:
                        self._drain_wake()
                    else:
                        self._handle(key.data, mask)
                now = time.monotonic()
                for conn in [c for c in self._conns.values() if c.deadline <= now]:
                    if conn.state != _DRAIN:
                        self.stats["timed_out"] += 1
                    self._close(conn)
                if not self._listening and not self._full:
                    self._refill(now)
                    if self._tokens >= 1:
                        self._listen(True)
        except Exception:  # pragma: no cover - a bug here must not leak sockets or kill training
            logger.exception("mask-monitor: the metrics server stopped on an unexpected error")
        finally:
            self._shutdown()

    def _timeout(self, now: float) -> float | None:
        deadlines = [c.deadline for c in self._conns.values()]
        if not self._listening and not self._full:  # waiting for a token
            deadlines.append(now + max(0.0, (1 - self._tokens) / self.rate))
        if not deadlines:
            return None
        return max(0.0, min(deadlines) - now)

    def _shutdown(self) -> None:
        for conn in list(self._conns.values()):
            self._close(conn)
        for s in (self._listener, self._wake_r, self._wake_w):
            try:
                s.close()
            except OSError:  # pragma: no cover
                pass
        try:
            self._sel.close()
        except (OSError, ValueError):  # pragma: no cover
            pass

    def _drain_wake(self) -> None:
        try:
            while self._wake_r.recv(64):
                pass
        except OSError:
            pass

    def _listen(self, on: bool) -> None:
        if on and not self._listening:
            self._sel.register(self._listener, selectors.EVENT_READ, _LISTEN)
        elif not on and self._listening:
            self._sel.unregister(self._listener)
        self._listening = on

    def _refill(self, now: float) -> None:
        self._tokens = min(self.burst, self._tokens + (now - self._refilled) * self.rate)
        self._refilled = now

    # ------------------------------------------------------------------ accept

    def _accept(self) -> None:
        now = time.monotonic()
        self._refill(now)
        while self._tokens >= 1:
            if len(self._conns) >= self.max_connections and not self._evict():
                self._full = True  # every slot is writing a response: resume when one closes
                self._listen(False)
                return
            try:
                sock, _ = self._listener.accept()
            except (BlockingIOError, InterruptedError):
                return
            except OSError as exc:  # EMFILE and friends: stop accepting for a moment, never spin
                logger.debug("mask-monitor: metrics server accept failed: %r", exc)
                if exc.errno in (errno.EMFILE, errno.ENFILE, errno.ENOBUFS, errno.ENOMEM):
                    self._tokens = 0.0
                    self._listen(False)
                return
            self._tokens -= 1
            self.stats["accepted"] += 1
            self._open(sock, now)
        self._listen(False)  # out of tokens: the refill timer resumes accepting

    def _evict(self) -> bool:
        """Close the oldest connection that is not writing a response; False if there is none."""
        candidates = [c for c in self._conns.values() if c.state != _WRITE]
        if not candidates:
            return False
        self.stats["evicted"] += 1
        self._close(min(candidates, key=lambda c: (c.state != _DRAIN, c.opened)))  # served ones first
        return True

    def _open(self, sock: socket.socket, now: float) -> None:
        try:
            sock.setblocking(False)
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            if self.ssl_context is not None:
                sock = self.ssl_context.wrap_socket(sock, server_side=True, do_handshake_on_connect=False)
        except (OSError, ValueError) as exc:
            logger.debug("mask-monitor: metrics connection setup failed: %r", exc)
            sock.close()
            return
        conn = _Conn(sock, self.ssl_context is not None, now, self.timeout_seconds)
        self._conns[sock] = conn
        self._sel.register(sock, selectors.EVENT_READ, conn)
        if conn.tls:
            self._handshake(conn)  # the ClientHello may be there already

    # ------------------------------------------------------------------ one connection

    def _handle(self, conn: _Conn, mask: int) -> None:
        if conn.sock not in self._conns:
            return
        conn.events += 1
        if conn.events > MAX_EVENTS:
            self.stats["over_budget"] += 1
            self._close(conn)
            return
        if conn.state == _HANDSHAKE:
            self._handshake(conn)
        elif conn.state == _READ:
            self._read(conn)
        elif conn.state == _WRITE:
            self._write(conn)
        else:
            self._drain(conn)

    def _want(self, conn: _Conn, events: int) -> None:
        if conn.interest != events:
            conn.interest = events
            self._sel.modify(conn.sock, events, conn)

    def _handshake(self, conn: _Conn) -> None:
        try:
            conn.sock.do_handshake()  # type: ignore[attr-defined]
        except ssl.SSLWantReadError:
            self._want(conn, selectors.EVENT_READ)
            return
        except ssl.SSLWantWriteError:
            self._want(conn, selectors.EVENT_WRITE)
            return
        except (ssl.SSLError, OSError) as exc:  # no/bad client certificate, not TLS at all, reset
            self.stats["tls_failed"] += 1
            logger.debug("mask-monitor: TLS handshake with a metrics client failed: %r", exc)
            self._close(conn)
            return
        conn.state = _READ
        self._want(conn, selectors.EVENT_READ)
        self._read(conn)

    def _recv(self, conn: _Conn) -> bytes | None:
        """Bytes read (b"" at end of stream), or None when nothing can be read now."""
        try:
            return conn.sock.recv(16384)
        except (BlockingIOError, InterruptedError, ssl.SSLWantReadError):
            self._want(conn, selectors.EVENT_READ)
            return None
        except ssl.SSLWantWriteError:
            self._want(conn, selectors.EVENT_WRITE)
            return None
        except OSError:
            return b""

    def _read(self, conn: _Conn) -> None:
        while True:
            data = self._recv(conn)
            if data is None:
                return
            if not data:  # the client gave up (or half-closed) before a complete request
                self._close(conn)
                return
            conn.inbuf += data
            end = conn.inbuf.find(b"\r\n\r\n")
            if end >= 0 or len(conn.inbuf) > MAX_REQUEST_BYTES:
                self._respond(conn, self._answer(conn.inbuf[: end if end >= 0 else len(conn.inbuf)], end >= 0))
                return
            if not (conn.tls and conn.sock.pending()):  # type: ignore[attr-defined]
                return

    def _answer(self, head: bytearray, complete: bool) -> tuple[int, bytes, str, int | None, bool]:
        """(status, body, content type, version served if a scrape, send the body) for a request head."""
        first_nl = head.find(b"\r\n")
        request_line = bytes(head if first_nl < 0 else head[:first_nl])
        if not complete or len(head) > MAX_REQUEST_BYTES:
            if first_nl < 0:
                return 414, b"request line too long\n", "text/plain", None, True
            return 431, b"request headers too large\n", "text/plain", None, True
        parts = request_line.split(b" ")
        if len(parts) != 3 or not parts[0].isalpha() or not parts[1] or not parts[2].startswith(b"HTTP/"):
            return 400, b"bad request\n", "text/plain", None, True
        method, target, version = parts
        if version not in (b"HTTP/1.1", b"HTTP/1.0"):
            return 505, b"HTTP/1.0 or HTTP/1.1 only\n", "text/plain", None, True
        head_only = method == b"HEAD"
        path = target.split(b"?", 1)[0]
        if path != b"/metrics":
            return 404, b"not found: the metrics are at /metrics\n", "text/plain", None, not head_only
        if method not in (b"GET", b"HEAD"):
            return 405, b"method not allowed: GET or HEAD /metrics\n", "text/plain", None, True
        accept = ""
        for line in bytes(head[first_nl + 2 :]).split(b"\r\n"):
            name, _, value = line.partition(b":")
            if name.strip().lower() == b"accept":
                accept = value.decode("latin-1")
        try:
            body, ctype, values_version = self.exposition.get(accept)
        except Exception as exc:  # noqa: BLE001 - e.g. a user's collector added to the registry failed
            self.stats["errors"] += 1
            logger.debug("mask-monitor: rendering the metrics failed: %r", exc)
            return 500, b"rendering the metrics failed\n", "text/plain", None, True
        return 200, body, ctype, None if head_only else values_version, not head_only

    def _respond(self, conn: _Conn, answer: tuple[int, bytes, str, int | None, bool]) -> None:
        status, body, ctype, scrape, send_body = answer
        headers = [
            f"HTTP/1.1 {status} {_REASONS[status]}",
            f"Content-Type: {ctype}",
            f"Content-Length: {len(body)}",
            "Connection: close",
        ]
        if status == 405:
            headers.append("Allow: GET, HEAD")
        data = ("\r\n".join(headers) + "\r\n\r\n").encode("latin-1") + (body if send_body else b"")
        conn.out = memoryview(data)
        conn.scrape = scrape
        conn.state = _WRITE
        conn.inbuf = bytearray()
        self.stats["responses"] += 1
        self._write(conn)

    def _write(self, conn: _Conn) -> None:
        while conn.out:
            try:
                n = conn.sock.send(conn.out)
            except (BlockingIOError, InterruptedError, ssl.SSLWantWriteError):
                self._want(conn, selectors.EVENT_WRITE)
                return
            except ssl.SSLWantReadError:
                self._want(conn, selectors.EVENT_READ)
                return
            except OSError:
                self._close(conn)
                return
            conn.out = conn.out[n:]
        if conn.scrape is not None:
            version, conn.scrape = conn.scrape, None
            self.stats["scrapes"] += 1
            if self.on_scrape is not None:
                try:
                    self.on_scrape(version)
                except Exception:  # noqa: BLE001  # pragma: no cover
                    logger.debug("mask-monitor: on_scrape failed", exc_info=True)
        # half-close, so that a client reading until the end of the stream sees it now (TLS: close_notify first)
        try:
            if conn.tls:
                try:
                    conn.sock.unwrap()  # type: ignore[attr-defined]  # sends close_notify, then wants the client's
                except (ssl.SSLWantReadError, ssl.SSLWantWriteError):
                    pass
            socket.socket.shutdown(conn.sock, socket.SHUT_WR)
        except (OSError, ValueError):
            self._close(conn)
            return
        conn.state = _DRAIN
        conn.deadline = min(conn.deadline, time.monotonic() + DRAIN_SECONDS)
        self._want(conn, selectors.EVENT_READ)

    def _drain(self, conn: _Conn) -> None:
        """Read and drop what the client still sends until it closes (or the drain deadline)."""
        data = self._recv(conn)
        if data == b"":
            self._close(conn)

    def _close(self, conn: _Conn) -> None:
        if self._conns.pop(conn.sock, None) is None:
            return
        self._full = False
        try:
            self._sel.unregister(conn.sock)
        except (KeyError, ValueError, OSError):  # pragma: no cover
            pass
        try:
            conn.sock.close()
        except OSError:  # pragma: no cover
            pass
