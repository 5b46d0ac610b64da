"""The scrape endpoint on its own, against raw sockets on loopback: what is served (only ``/metrics``),
what counts as a scrape, the cached exposition, the accept rate and connection cap, timeouts of idle,
half-open and slowloris clients, TLS handshakes that never block, mutual TLS, settings from code and
environment, and the per-rank port range.

The same endpoint under a real training run is in ``test_prometheus_hostile.py``.
"""

from __future__ import annotations

import re
import socket
import ssl
import threading
import time
import urllib.request
from pathlib import Path

import pytest
import yaml
from prom_server import MISSING_PROMETHEUS, PROMETHEUS, PrometheusServer
from prometheus_client import CollectorRegistry, Counter
from tls_pki import MISSING_OPENSSL, OPENSSL, Pki, make_pki

from mask_monitor.config import ENVIRONMENT, ConfigError
from mask_monitor.errors import MaskMonitorAbort
from mask_monitor.reports import RunInfo, StepReport, Totals
from mask_monitor.sinks.base import SinkConfigError
from mask_monitor.sinks.prometheus import ExpositionCache, PrometheusSink, settings
from mask_monitor.sinks.prometheus import server as server_module
from mask_monitor.sinks.prometheus.server import MAX_EVENTS, MAX_REQUEST_BYTES

LOCAL = "127.0.0.1"
DOCS = Path(__file__).resolve().parents[1] / "docs"


def mb(target: int, supervised: int) -> Totals:
    return Totals(
        micro_batches=1, sequences=1, target_tokens=target, supervised_tokens=supervised,
        masked_tokens=target - supervised, max_masked_ratio=(target - supervised) / target,
    )  # fmt: skip


def step(n: int, t: Totals) -> StepReport:
    return StepReport(n, 0, 1, total=t, per_rank=(t,), micro_batches=(t,))


def started(**kw) -> PrometheusSink:
    sink = PrometheusSink(port=0, addr=LOCAL, env={}, **kw)
    sink.on_train_begin(RunInfo(run_name="t"))
    return sink


def exchange(port: int, data: bytes, *, context: ssl.SSLContext | None = None, timeout: float = 5.0):
    """Send ``data``, read until the server closes; (status, headers, body)."""
    with socket.create_connection((LOCAL, port), timeout=timeout) as raw:
        s = context.wrap_socket(raw, server_hostname=LOCAL) if context else raw
        s.sendall(data)
        buf = b""
        while chunk := s.recv(65536):
            buf += chunk
    head, _, body = buf.partition(b"\r\n\r\n")
    lines = head.decode("latin-1").split("\r\n")
    headers = dict(line.split(": ", 1) for line in lines[1:])
    return int(lines[0].split()[1]), headers, body


def get(port: int, path: str = "/metrics", method: str = "GET", extra: str = "", **kw):
    return exchange(port, f"{method} {path} HTTP/1.1\r\nHost: x\r\n{extra}\r\n".encode(), **kw)


def wait_until(predicate, what: str, timeout: float = 5.0):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if got := predicate():
            return got
        time.sleep(0.01)
    raise AssertionError(f"timed out after {timeout}s waiting for {what}")


def closed_by_server(sock: socket.socket, timeout: float) -> float:
    """Seconds until the server closed ``sock`` (EOF or reset), failing after ``timeout``."""
    t = time.monotonic()
    sock.settimeout(timeout)
    try:
        while sock.recv(4096):
            pass
    except ConnectionResetError:
        pass
    except TimeoutError:
        raise AssertionError(f"the server kept the connection open for more than {timeout}s") from None
    return time.monotonic() - t


# --------------------------------------------------------------------------- what is served, what is a scrape


def test_only_get_and_head_of_metrics_are_served_and_only_get_counts_as_a_scrape():
    sink = started()
    try:
        p = sink.port
        status, headers, body = get(p)
        assert status == 200 and headers["Content-Type"].startswith("text/plain; version=0.0.4")
        assert int(headers["Content-Length"]) == len(body) and b"mask_monitor_target_tokens_total" in body
        status, headers, body = get(p, extra="Accept: application/openmetrics-text; version=1.0.0\r\n")
        assert status == 200 and headers["Content-Type"].startswith("application/openmetrics-text")
        assert body.endswith(b"# EOF\n")
        assert get(p, "/metrics?name[]=x")[0] == 200  # a query string is ignored
        wait_until(lambda: sink.scrapes == 3, "three scrapes")
        for path in ("/", "/foo", "/../../etc/passwd", "/metrics/", "/metricsx", "//metrics", "http://x/metrics"):
            assert get(p, path)[0] == 404, path
        status, headers, body = get(p, method="HEAD")
        assert status == 200 and body == b"" and int(headers["Content-Length"]) > 0  # HEAD: headers only
        for method in ("POST", "PUT", "DELETE", "OPTIONS", "TRACE"):
            status, headers, _ = get(p, method=method)
            assert (status, headers["Allow"]) == (405, "GET, HEAD"), method
        assert exchange(p, b"GET /metrics\r\n\r\n")[0] == 400  # no HTTP version
        assert exchange(p, b"\x16\x03\x01 garbage\r\n\r\n")[0] == 400  # TLS on a plain port
        assert exchange(p, b"GET /metrics HTTP/2.0\r\n\r\n")[0] == 505
        assert exchange(p, b"GET /" + b"a" * MAX_REQUEST_BYTES + b" HTTP/1.1\r\n\r\n")[0] == 414
        assert get(p, extra="X-Big: " + "b" * MAX_REQUEST_BYTES + "\r\n")[0] == 431
        time.sleep(0.2)
        assert sink.scrapes == 3 == sink.server.stats["scrapes"]  # none of those 21 requests was a scrape
        assert sink.server.stats["responses"] == 3 + 7 + 1 + 5 + 5
    finally:
        sink.close()


def test_requests_that_are_not_scrapes_do_not_end_the_abort_linger():
    sink = started(linger_seconds=1.5)
    stop = threading.Event()

    def noise() -> None:  # 404s and HEADs as fast as they come back
        while not stop.is_set():
            get(sink.port, "/")
            get(sink.port, method="HEAD")

    th = threading.Thread(target=noise)
    try:
        th.start()
        t = time.monotonic()
        sink.on_abort(MaskMonitorAbort("all_masked", step=1), step(1, mb(8, 0)))
        waited = time.monotonic() - t
        assert 1.5 <= waited < 3.5  # the whole linger: none of it was a scrape
        assert sink.scrapes == 0 and sink.server.stats["responses"] > 2
    finally:
        stop.set()
        th.join()
        sink.close()


def test_the_linger_counts_only_scrapes_that_carried_the_final_values():
    """A body rendered before the abort and served from the cache after it is not a scrape of the final
    values: the linger waits for two scrapes that carried them."""
    sink = started(linger_seconds=10)
    try:
        sink.on_step(step(1, mb(8, 4)), [])
        get(sink.port)  # renders the exposition before the abort (cached for up to half a second)
        seen: list[float] = []
        started_at: list[float] = []

        def scraper() -> None:
            for pause in (0.1, 0.6, 0.4):
                time.sleep(pause)
                started_at.append(time.monotonic())
                body = get(sink.port)[2].decode()
                key = 'mask_monitor_aborts_total{rank="0",reason="all_masked"}'
                seen.append(float(next(ln for ln in body.splitlines() if ln.startswith(key)).split()[-1]))

        th = threading.Thread(target=scraper)
        th.start()
        sink.on_abort(MaskMonitorAbort("all_masked", step=2), step(2, mb(8, 0)))
        returned = time.monotonic()
        th.join()
        # scrape 1 (0.1 s) got the cached pre-abort body; scrapes 2 and 3 (0.7 s, 1.1 s) the final values
        assert seen == [0.0, 1.0, 1.0]
        assert returned > started_at[2]  # the linger ended with the third scrape, not the second
        assert returned - started_at[2] < 2
    finally:
        sink.close()


# --------------------------------------------------------------------------- the cached exposition


def test_the_exposition_cache_renders_at_most_once_per_interval_and_only_after_a_change():
    registry, version, clock = CollectorRegistry(), [0], [100.0]
    Counter("demo_events", "Demo.", registry=registry).inc()
    cache = ExpositionCache(registry, lambda: version[0], min_interval=0.5, exclusive=True)
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(server_module.time, "monotonic", lambda: clock[0])
        body, ctype, v = cache.get()
        assert (cache.renders, v, ctype.startswith("text/plain")) == (1, 0, True)
        clock[0] += 10
        assert cache.get()[0] is body and cache.renders == 1  # exclusive, unchanged: never rendered again
        version[0] = 1
        assert cache.get()[2] == 1 and cache.renders == 2  # changed, last rendered 10 s ago: rendered
        version[0] = 2
        clock[0] += 0.1
        assert cache.get()[2] == 1 and cache.renders == 2  # changed again, but rendered 0.1 s ago: cached
        clock[0] += 0.4
        assert cache.get()[2] == 2 and cache.renders == 3  # 0.5 s after the last rendering: rendered
        assert cache.get("application/openmetrics-text")[1].startswith("application/openmetrics-text")
        assert cache.renders == 4  # the other encoding has its own cache entry
        shared = ExpositionCache(registry, lambda: version[0], min_interval=0.5)  # a registry shared with others
        shared.get()
        clock[0] += 0.5
        shared.get()
        assert shared.renders == 2  # unchanged version, but other collectors may have changed: every 0.5 s


def test_a_storm_of_scrapes_between_two_steps_renders_once():
    sink = started(connections_per_second=1000)  # (the default accept rate would space these scrapes out)
    try:
        bodies = [get(sink.port)[2] for _ in range(30)]
        assert sink._exposition.renders == 1 and len(set(bodies)) == 1  # nothing changed: rendered once
        sink.on_step(step(1, mb(10, 4)), [])
        time.sleep(0.55)
        assert b"mask_monitor_target_tokens_total{rank=\"0\"} 10.0" in get(sink.port)[2]
        for _ in range(20):
            get(sink.port)
        assert sink._exposition.renders == 2
    finally:
        sink.close()


# --------------------------------------------------------------------------- accept rate, cap, timeouts


def test_accepting_is_rate_limited_and_connections_capped():
    rate, cap = 20.0, 4
    sink = started(connections_per_second=rate, max_connections=cap)
    try:
        t = time.monotonic()
        attempts, held = 0, []
        while time.monotonic() - t < 1.5:  # connect as fast as possible, keep every socket open
            s = socket.socket()
            s.setblocking(False)
            try:
                s.connect((LOCAL, sink.port))
            except BlockingIOError:
                pass
            held.append(s)
            attempts += 1
            if len(held) >= 60:  # stay within the listen backlog's reach: a bounded attack
                break
            time.sleep(0.002)
        time.sleep(1.5 - (time.monotonic() - t) if time.monotonic() - t < 1.5 else 0)
        elapsed = time.monotonic() - t
        stats = sink.server.stats
        assert stats["accepted"] <= cap + rate * elapsed + 1, (stats, elapsed)
        assert stats["accepted"] >= cap + rate * 1.0  # it did keep accepting (evicting the idle ones)
        assert sink.server.connections <= cap
        assert stats["evicted"] >= stats["accepted"] - cap - stats["timed_out"] - 1
        # a real scrape still gets in behind them
        status, _, _ = get(sink.port, timeout=10)
        assert status == 200
        for s in held:
            s.close()
    finally:
        sink.close()


@pytest.mark.parametrize("mode", ["idle", "partial_headers", "half_closed", "dribble"])
def test_idle_half_open_and_slowloris_connections_are_closed_in_bounded_time(mode):
    timeout = 1.0
    sink = started(timeout_seconds=timeout)
    try:
        s = socket.create_connection((LOCAL, sink.port))
        if mode == "partial_headers":
            s.sendall(b"GET /metrics HTTP/1.1\r\nHost: x\r\nX-Slow: ")
        elif mode == "half_closed":
            s.sendall(b"GET /metrics HTTP/1.1\r\n")
            s.shutdown(socket.SHUT_WR)
        if mode == "dribble":  # a byte at a time, as fast as possible: the event budget closes it first
            s.sendall(b"GET /metrics HTTP/1.1\r\nX-Slow: ")
            sent = 0
            with pytest.raises(OSError):
                while sent < 10 * MAX_EVENTS:
                    s.sendall(b"x")
                    sent += 1
                    time.sleep(0.005)
            assert sink.server.stats["over_budget"] == 1
        else:
            waited = closed_by_server(s, timeout + 2)
            assert (waited < 0.5) if mode == "half_closed" else (timeout - 0.2 <= waited < timeout + 1), waited
            if mode != "half_closed":
                assert sink.server.stats["timed_out"] == 1
        s.close()
        assert get(sink.port)[0] == 200 and sink.scrapes >= 0
        wait_until(lambda: sink.server.connections == 0, "every connection closed", timeout + 2)
    finally:
        sink.close()


def test_close_is_bounded_with_clients_still_connected():
    sink = started(max_connections=8, timeout_seconds=60)
    socks = [socket.create_connection((LOCAL, sink.port)) for _ in range(8)]
    socks[1].sendall(b"GET /metrics HTTP/1.1\r\n")  # one mid-request
    wait_until(lambda: sink.server.connections == 8, "8 open connections")
    t = time.monotonic()
    sink.close()
    assert time.monotonic() - t < 1.0
    for s in socks:
        assert closed_by_server(s, 2) < 2
        s.close()
    with pytest.raises(OSError):
        socket.create_connection((LOCAL, sink.port), timeout=1)  # the port is released


# --------------------------------------------------------------------------- TLS and mutual TLS


@pytest.fixture(scope="module")
def pki(tmp_path_factory) -> Pki:
    if OPENSSL is None:
        pytest.skip(MISSING_OPENSSL)
    return make_pki(tmp_path_factory.mktemp("pki"))


def client_context(pki: Pki, cert=None, key=None) -> ssl.SSLContext:
    ctx = ssl.create_default_context(cafile=str(pki.ca))
    if cert is not None:
        ctx.load_cert_chain(str(cert), str(key))
    return ctx


def test_tls_handshakes_that_never_come_do_not_block_the_endpoint(pki):
    """The bug of issue 15: an idle TCP connection to the HTTPS endpoint blocked every later scrape."""
    sink = started(certfile=str(pki.server_cert), keyfile=str(pki.server_key), timeout_seconds=2)
    try:
        opened = time.monotonic()
        idle = [socket.create_connection((LOCAL, sink.port)) for _ in range(3)]
        partial = socket.create_connection((LOCAL, sink.port))
        partial.sendall(bytes([0x16, 0x03, 0x01, 0x02, 0x00, 0x01]))  # a ClientHello that stops short
        wait_until(lambda: sink.server.connections == 4, "4 pending handshakes")
        t = time.monotonic()
        status, _, body = get(sink.port, context=client_context(pki), timeout=5)
        assert status == 200 and b"mask_monitor_" in body
        assert time.monotonic() - t < 1.0
        for s in [*idle, partial]:  # each closed at its deadline, 2 s after it was opened
            closed_by_server(s, 4)
            assert 1.9 < time.monotonic() - opened < 4
            s.close()
        assert sink.server.stats["timed_out"] == 4
        with pytest.raises(OSError):  # plain HTTP on the TLS port gets no answer but a closed connection
            urllib.request.urlopen(f"http://{LOCAL}:{sink.port}/metrics", timeout=5).read()
    finally:
        sink.close()


def test_mutual_tls_accepts_a_client_certificate_and_rejects_clients_without_one(pki):
    sink = started(certfile=str(pki.server_cert), keyfile=str(pki.server_key), client_cafile=str(pki.ca))
    try:
        status, _, body = get(sink.port, context=client_context(pki, pki.client_cert, pki.client_key))
        assert status == 200 and b"mask_monitor_world_size" in body
        for cert, key in ((None, None), (pki.rogue_client_cert, pki.rogue_client_key)):
            with pytest.raises((ssl.SSLError, ConnectionResetError, BrokenPipeError)):
                get(sink.port, context=client_context(pki, cert, key))
        wait_until(lambda: sink.server.stats["tls_failed"] == 2, "two rejected handshakes")
        assert sink.scrapes == 1
    finally:
        sink.close()


def doc_blocks(page: str, language: str) -> list[str]:
    return re.findall(rf"```{language}\n(.*?)```", (DOCS / page).read_text(), flags=re.S)


@pytest.mark.slow
@pytest.mark.skipif(PROMETHEUS is None, reason=MISSING_PROMETHEUS)
def test_a_real_prometheus_scrapes_over_mutual_tls_with_the_documented_tls_config(pki):
    """The scrape job of docs/security.md, read from the page (only the file paths replaced by the test's):
    with the client certificate the target is up; the same job without it is down (handshake refused)."""
    (documented,) = [yaml.safe_load(b)["scrape_configs"][0] for b in doc_blocks("security.md", "yaml")
                     if "tls_config" in b]  # fmt: skip
    assert documented["scheme"] == "https" and set(documented["tls_config"]) == {"ca_file", "cert_file", "key_file"}
    paths = {"ca_file": str(pki.ca), "cert_file": str(pki.client_cert), "key_file": str(pki.client_key)}
    with_cert = {"scheme": documented["scheme"], "tls_config": {k: paths[k] for k in documented["tls_config"]}}
    without = {"scheme": documented["scheme"], "tls_config": {"ca_file": str(pki.ca)}}
    sink = started(certfile=str(pki.server_cert), keyfile=str(pki.server_key), client_cafile=str(pki.ca))
    try:
        sink.on_step(step(1, mb(12, 5)), [])
        target = [f"{LOCAL}:{sink.port}"]
        jobs, options = {"mm-mtls": target, "mm-nocert": target}, {"mm-mtls": with_cert, "mm-nocert": without}
        with PrometheusServer(jobs, job_options=options, rule_files=()) as prom:

            def up() -> dict[str, float]:
                return {r["metric"]["job"]: float(r["value"][1]) for r in prom.query("up")}

            assert prom.wait_for(lambda: len(up()) == 2 and up(), 20, "both jobs scraped") == {
                "mm-mtls": 1.0, "mm-nocert": 0.0,
            }  # fmt: skip
            (res,) = prom.query('mask_monitor_supervised_tokens_total{job="mm-mtls"}')
            assert float(res["value"][1]) == 5 and res["metric"]["rank"] == "0"
            assert prom.query('mask_monitor_supervised_tokens_total{job="mm-nocert"}') == []
            (nocert,) = [t for t in prom.targets() if t["labels"]["job"] == "mm-nocert"]
            assert nocert["lastError"].endswith("remote error: tls: certificate required"), nocert
    finally:
        sink.close()
    assert sink.server is None and sink.scrapes >= 1


def test_the_python_examples_of_the_docs_build_the_sinks_they_describe(monkeypatch):
    import mask_monitor.sinks.prometheus as package

    built: list[PrometheusSink] = []

    class Recorded(PrometheusSink):
        def __init__(self, *args, **kwargs):
            super().__init__(*args, **kwargs)
            built.append(self)

    monkeypatch.setattr(package, "PrometheusSink", Recorded)  # what the examples import
    for page in ("prometheus.md", "security.md"):
        for block in doc_blocks(page, "python"):
            exec(compile(block, f"docs/{page}", "exec"), {})  # builds callbacks and sinks; serves nothing
    assert [(s.base_port, s.pushgateway_url, s.job, s.certfile, s.client_cafile) for s in built] == [
        (9400, None, "mask_monitor", None, None),
        (None, "http://pushgateway:9091", "sft-llama", None, None),
        (9400, None, "mask_monitor", "/tls/tls.crt", "/tls/ca.crt"),
        (9400, None, "mask_monitor", "/tls/server.crt", "/tls/ca.crt"),
    ]


def test_tls_settings_are_validated_and_bad_files_fail_before_training(pki, tmp_path):
    with pytest.raises(ConfigError, match="TLS needs both"):
        PrometheusSink(port=0, certfile=str(pki.server_cert), env={})
    with pytest.raises(ConfigError, match="mutual TLS, which needs the server's own certfile"):
        PrometheusSink(port=0, client_cafile=str(pki.ca), env={})
    bad = PrometheusSink(
        port=0, addr=LOCAL, certfile=str(pki.server_cert), keyfile=str(pki.server_key),
        client_cafile=str(tmp_path / "no-such-ca.pem"), env={},
    )  # fmt: skip
    with pytest.raises(SinkConfigError, match="no-such-ca.pem"):
        bad.on_train_begin(RunInfo())
    env = {
        "MASK_MONITOR_PROMETHEUS_CERTFILE": str(pki.server_cert),
        "MASK_MONITOR_PROMETHEUS_KEYFILE": str(pki.server_key),
        "MASK_MONITOR_PROMETHEUS_CLIENT_CAFILE": str(pki.ca),
    }
    sink = PrometheusSink(port=0, addr=LOCAL, env=env)  # an operator adds mTLS to the code's sink
    assert (sink.certfile, sink.client_cafile) == (str(pki.server_cert), str(pki.ca))
    assert sink.settings.source("client_cafile") == f"MASK_MONITOR_PROMETHEUS_CLIENT_CAFILE={pki.ca}"


# --------------------------------------------------------------------------- settings and port range


def test_every_environment_variable_is_declared_and_read():
    names = {f.env for f in settings.FIELDS if f.env}
    assert names <= set(ENVIRONMENT)
    assert {n for n in ENVIRONMENT if "PROMETHEUS" in n or "PUSHGATEWAY" in n} == names
    env = {
        "MASK_MONITOR_PROMETHEUS_PORT": "9400",
        "MASK_MONITOR_PROMETHEUS_MAX_CONNECTIONS": "3",
        "MASK_MONITOR_PROMETHEUS_TIMEOUT_SECONDS": "2.5",
        "MASK_MONITOR_PROMETHEUS_CONNECTIONS_PER_SECOND": "7",
    }
    s = PrometheusSink(env=env).settings
    assert (s.port, s.max_connections, s.timeout_seconds, s.connections_per_second) == (9400, 3, 2.5, 7.0)
    s = PrometheusSink(port=1, max_connections=5, env=env).settings  # code wins, field by field
    assert (s.port, s.max_connections, s.timeout_seconds) == (1, 5, 2.5)
    assert s.source("port") == "PrometheusSink(port=1)" and s.source("timeout_seconds").startswith("MASK_")
    for name, value, expected in [
        ("MASK_MONITOR_PROMETHEUS_MAX_CONNECTIONS", "0", "a whole number >= 1"),
        ("MASK_MONITOR_PROMETHEUS_MAX_CONNECTIONS", "2.5", "a whole number >= 1"),
        ("MASK_MONITOR_PROMETHEUS_TIMEOUT_SECONDS", "0", "a number > 0"),
        ("MASK_MONITOR_PROMETHEUS_CONNECTIONS_PER_SECOND", "fast", "a number > 0"),
        ("MASK_MONITOR_PROMETHEUS_PORT", "65536", "a port number between 0 and 65535"),
    ]:
        with pytest.raises(ConfigError, match=f"{name}='{value}': expected {expected}"):
            PrometheusSink(env={name: value})
    with pytest.raises(ConfigError, match=r"PrometheusSink\(port=70000\): expected a port number"):
        PrometheusSink(port=70000, env={})


@pytest.mark.parametrize("local_rank", [0, 5, 7])
def test_a_port_range_past_65535_fails_on_every_local_rank_with_one_message(monkeypatch, local_rank):
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "8")
    sink = PrometheusSink(env={"MASK_MONITOR_PROMETHEUS_PORT": "65530", "MASK_MONITOR_PROMETHEUS_ADDR": LOCAL})
    with pytest.raises(SinkConfigError) as err:
        sink.on_train_begin(RunInfo(rank=local_rank, local_rank=local_rank, world_size=8))
    assert str(err.value) == (
        "mask-monitor: cannot serve Prometheus metrics: base port 65530 (set by MASK_MONITOR_PROMETHEUS_PORT=65530) "
        "+ LOCAL_RANK needs ports 65530..65537 for 8 local rank(s) (LOCAL_WORLD_SIZE=8), past the highest port "
        "65535. Choose a base port of at most 65528 with PrometheusSink(port=...) or MASK_MONITOR_PROMETHEUS_PORT, "
        "leaving 8 consecutive ports free."
    )
    assert sink.server is None  # nothing was bound
    monkeypatch.delenv("LOCAL_WORLD_SIZE")  # unknown node size: this rank's own port is still checked
    sink = PrometheusSink(port=65535, addr=LOCAL, env={})
    with pytest.raises(SinkConfigError, match=r"ports 65535..65536 for 2 local rank\(s\) \(LOCAL_RANK 1\)"):
        sink.on_train_begin(RunInfo(rank=1, local_rank=1, world_size=2))
