"""What scraping costs a training run: step time under a scrape storm and under a normal scrape, side by
side in one run, against no scraping (issue 15).

One ``train()`` of a real ``transformers.Trainer`` (the ``tiny`` model of ``overhead.py``: the model costs
little, so whatever the exporter costs shows), with ``MaskMonitorCallback(sinks=[PrometheusSink(...)])``
serving on loopback. The run is cut into blocks of steps; each block has one scraping regime, and the
regimes rotate round after round (round 1: A B C D E, round 2: B C D E A, ...) so that load from other
processes and drift hit every regime alike (use a multiple of 5 rounds). A first block warms up and is not
reported; the first step of each block (the switch) is not counted.

Regimes:

* ``none``: the endpoint serves, nobody scrapes (the baseline);
* ``normal``: one scrape every 15 s, as a Prometheus would (a separate process; random phase, so that over
  many short blocks the regime gets one scrape per 15 s on average);
* ``storm``: ``--clients`` processes fetching ``/metrics`` as fast as they can, each in a loop of connect,
  GET, read, close;
* ``storm-tls``: the same against a second, HTTPS endpoint of the same run (``openssl`` makes a
  throwaway certificate; skipped without it);
* ``storm-reference``: the same storm against ``prometheus_client.start_http_server`` serving the very
  same registry: the thread-per-connection server the exporter used before issue 15, for comparison.

Reported first, the unit costs: CPU time of the exporter's serving thread per connection (idle, and a
scrape served from the cache; plain and TLS) and per rendering of the exposition. Then, per regime: the
median step time, and its ratio to ``none`` paired by round (median over rounds, bootstrap 95 % interval),
on the wall clock and on the process CPU clock (CPU seconds of every thread of the training process per
step: its own cost, blind to CPU that other processes take; on a shared machine the low-noise measure);
the requests the endpoint answered per second; for the exporter's own server, renderings per second and
its thread's CPU seconds per second. ``--pin`` puts training on one CPU and the clients on the others, as
when scrapers run on other hosts.

Run::

    python benchmarks/scrape_storm.py                      # 4 rounds of 5 regimes x 10 steps
    python benchmarks/scrape_storm.py --rounds 15 --block 8 --pin
    python benchmarks/scrape_storm.py --rounds 15 --block 8 --clients 4 --torch-threads 2
"""

from __future__ import annotations

import argparse
import os
import random
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "benchmarks"))

from overhead import CONFIGS, StepTimer, build_model, build_trainer, load_tokenizer, make_rows  # noqa: E402
from prometheus_client import CollectorRegistry  # noqa: E402
from prometheus_client.exposition import start_http_server  # noqa: E402
from prometheus_client.registry import Collector  # noqa: E402
from stats_speed import machine  # noqa: E402

from mask_monitor import MaskMonitorCallback  # noqa: E402
from mask_monitor.sinks.prometheus import MetricCollector, PrometheusSink  # noqa: E402

LOCAL = "127.0.0.1"

#: A client fetching /metrics in a loop as fast as it can (its own process: its CPU is not the trainer's).
STORM_CLIENT = r"""
import socket, ssl, sys
port, cafile = int(sys.argv[1]), sys.argv[2]
ctx = ssl.create_default_context(cafile=cafile) if cafile else None
while True:
    try:
        s = socket.create_connection(("127.0.0.1", port), timeout=10)
        if ctx:
            s = ctx.wrap_socket(s, server_hostname="127.0.0.1")
        s.sendall(b"GET /metrics HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
        while s.recv(65536):
            pass
        s.close()
    except OSError:
        pass
"""

#: A Prometheus-like scraper: one scrape every 15 s, its phase random (a block is shorter than 15 s, so over
#: many blocks the regime sees one scrape per 15 s on average, as a training run scraped by Prometheus does).
NORMAL_CLIENT = r"""
import random, socket, sys, time
port = int(sys.argv[1])
time.sleep(random.uniform(0, 15))
while True:
    s = socket.create_connection(("127.0.0.1", port), timeout=10)
    s.sendall(b"GET /metrics HTTP/1.1\r\nHost: x\r\nAccept: application/openmetrics-text\r\n\r\n")
    while s.recv(65536):
        pass
    s.close()
    time.sleep(15)
"""


class RequestCounter(Collector):
    """Counts collections of a registry (one per request the reference server answers); exports nothing."""

    def __init__(self) -> None:
        self.count = 0

    def collect(self):
        self.count += 1
        return iter(())


def self_signed(folder: Path) -> tuple[str, str] | None:
    if shutil.which("openssl") is None:
        return None
    cert, key = folder / "cert.pem", folder / "key.pem"
    subprocess.run(
        ["openssl", "req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:P-256", "-nodes", "-days", "1",
         "-subj", "/CN=127.0.0.1", "-addext", "subjectAltName=IP:127.0.0.1", "-keyout", str(key), "-out", str(cert)],
        check=True, capture_output=True,
    )  # fmt: skip
    return str(cert), str(key)


class Load:
    """Starts and stops the client processes of one regime."""

    def __init__(self, ports: dict[str, int], cafile: str | None, clients: int, cpus: set[int] | None) -> None:
        self.ports, self.cafile, self.clients, self.cpus = ports, cafile, clients, cpus
        self.procs: list[subprocess.Popen] = []

    def start(self, regime: str) -> None:
        if regime in ("none", "warmup"):
            return
        if regime == "normal":
            cmds = [[NORMAL_CLIENT, str(self.ports["plain"])]]
        else:
            target = {"storm": "plain", "storm-tls": "tls", "storm-reference": "reference"}[regime]
            cafile = self.cafile if target == "tls" else ""
            cmds = [[STORM_CLIENT, str(self.ports[target]), cafile or ""] for _ in range(self.clients)]
        self.procs = [
            subprocess.Popen([sys.executable, "-c", *cmd], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
            for cmd in cmds
        ]
        if self.cpus:
            for p in self.procs:
                os.sched_setaffinity(p.pid, self.cpus)

    def stop(self) -> None:
        for p in self.procs:
            p.kill()
        for p in self.procs:
            p.wait()
        self.procs = []


class Schedule(StepTimer):
    """Switches the regime at block boundaries and files each step's times under its regime."""

    def __init__(self, order: list[str], block: int, load: Load, probes: dict[str, Any]) -> None:
        super().__init__()
        self.order, self.block, self.load, self.probes = order, block, load, probes
        self.step = 0
        self.regime = "warmup"
        self.by_regime: dict[str, dict[str, list[float]]] = {}
        self.blocks: list[tuple[str, list[float]]] = []
        self.cpu_blocks: list[tuple[str, list[float]]] = []
        self._mark: dict[str, float] = {}

    def on_step_begin(self, args, state, control, **kw):
        block, pos = divmod(self.step, self.block)
        if pos == 0:
            self._close_block()
            self.load.stop()
            self.regime = self.order[block] if block < len(self.order) else "tail"
            self.load.start(self.regime)
            self._mark = {"t": time.perf_counter(), **{k: f() for k, f in self.probes.items()}}
            self.blocks.append((self.regime, []))
            self.cpu_blocks.append((self.regime, []))
        super().on_step_begin(args, state, control, **kw)

    def on_step_end(self, args, state, control, **kw):
        super().on_step_end(args, state, control, **kw)
        if self.step % self.block:  # the first step of a block is the switch: not counted
            d = self.by_regime.setdefault(self.regime, {"wall": [], "cpu": []})
            d["wall"].append(self.times[-1])
            d["cpu"].append(self.cpu_times[-1])
            self.blocks[-1][1].append(self.times[-1])
            self.cpu_blocks[-1][1].append(self.cpu_times[-1])
        self.step += 1

    def _close_block(self) -> None:
        if not self._mark:
            return
        elapsed = time.perf_counter() - self._mark["t"]
        rates = self.by_regime.setdefault(self.regime, {"wall": [], "cpu": []})
        for k, f in self.probes.items():
            rates.setdefault(k, []).append((f() - self._mark[k]) / elapsed)

    def finish(self) -> None:
        self._close_block()
        self.load.stop()


def unit_costs(tls: tuple[str, str] | None, n: int = 200) -> list[tuple[str, float]]:
    """CPU seconds the exporter's serving thread spends per connection (thread CPU clock), and one rendering
    of the exposition, measured on a sink of its own before training."""
    import socket
    import ssl

    from prometheus_client.exposition import generate_latest
    from prometheus_client.openmetrics.exposition import generate_latest as generate_openmetrics

    from mask_monitor.reports import RunInfo

    out = []
    for kind in ("plain", "tls") if tls else ("plain",):
        kw = {"certfile": tls[0], "keyfile": tls[1]} if kind == "tls" else {}
        sink = PrometheusSink(port=0, addr=LOCAL, env={}, connections_per_second=1e6, max_connections=64, **kw)
        sink.on_train_begin(RunInfo())
        thread = next(t for t in threading.enumerate() if t.name.endswith(f":{sink.port}"))
        clock = time.pthread_getcpuclockid(thread.ident)
        ctx = ssl.create_default_context(cafile=tls[0]) if kind == "tls" else None
        for what in ("connection, nothing sent", "scrape (GET /metrics, cached)"):
            c0 = time.clock_gettime(clock)
            for _ in range(n):
                s = socket.create_connection((LOCAL, sink.port))
                if ctx:
                    s = ctx.wrap_socket(s, server_hostname=LOCAL)
                if what.startswith("scrape"):
                    s.sendall(b"GET /metrics HTTP/1.1\r\nHost: x\r\n\r\n")
                    while s.recv(65536):
                        pass
                s.close()
            time.sleep(0.3)  # the server closes what is left
            out.append((f"{kind} {what}", (time.clock_gettime(clock) - c0) / n))
        sink.close()
    sink = PrometheusSink(env={})
    for name, render in (("rendering, text 0.0.4", generate_latest), ("rendering, OpenMetrics", generate_openmetrics)):
        t0 = time.process_time()
        for _ in range(n):
            render(sink.registry)
        out.append((name, (time.process_time() - t0) / n))
    return out


def round_ratios(blocks: list[tuple[str, list[float]]], regimes: list[str], regime: str) -> list[float]:
    """Per round: median step of the regime's block over the median step of that round's ``none`` block."""
    rounds: list[dict[str, list[float]]] = []
    for i, (name, times) in enumerate(blocks):
        if i % len(regimes) == 0:
            rounds.append({})
        rounds[-1][name] = times
    return [
        statistics.median(r[regime]) / statistics.median(r["none"])
        for r in rounds
        if r.get(regime) and r.get("none")
    ]


def bootstrap_median(values: list[float], n: int = 4000) -> tuple[float, float]:
    """95 % interval of the median of ``values`` (resampled with replacement)."""
    rng = random.Random(0)
    meds = sorted(statistics.median(rng.choices(values, k=len(values))) for _ in range(n))
    return meds[int(0.025 * n)], meds[int(0.975 * n)]


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rounds", type=int, default=4)
    ap.add_argument("--block", type=int, default=10, help="steps per block (the first is not counted)")
    ap.add_argument("--clients", type=int, default=4, help="storm client processes")
    ap.add_argument("--torch-threads", type=int, default=None)
    ap.add_argument("--config", default="tiny", choices=("tiny", "small"))
    ap.add_argument("--pin", action="store_true",
                    help="training (one torch thread) on CPU 0, the clients on the other CPUs: the clients' own "
                    "CPU does not compete with training, as when scrapers run on other hosts")  # fmt: skip
    a = ap.parse_args(argv)
    if a.pin:
        a.torch_threads = 1
    if a.torch_threads:
        torch.set_num_threads(a.torch_threads)
    cfg = CONFIGS[a.config]
    tmp = Path(tempfile.mkdtemp(prefix="mm-scrape-storm-"))
    tls = self_signed(tmp)
    regimes = ["none", "normal", "storm", *(["storm-tls"] if tls else []), "storm-reference"]

    plain = PrometheusSink(port=0, addr=LOCAL, linger_seconds=0, env={})
    sinks = [plain]
    secure = None
    if tls:
        secure = PrometheusSink(port=0, addr=LOCAL, linger_seconds=0, certfile=tls[0], keyfile=tls[1], env={})
        sinks.append(secure)
    reference_requests = RequestCounter()
    reference_registry = CollectorRegistry()  # the same values (the plain sink's state), its own request count
    reference_registry.register(MetricCollector(plain._state))
    reference_registry.register(reference_requests)
    ports: dict[str, int] = {}
    servers: dict[str, Any] = {}

    def server_cpu(sink: PrometheusSink | None) -> float:
        th = next((t for t in threading.enumerate() if sink and sink.server and t.name.endswith(f":{sink.port}")), None)
        return time.clock_gettime(time.pthread_getcpuclockid(th.ident)) if th else 0.0

    probes = {
        "plain": lambda: plain.server.stats["responses"] if plain.server else 0,
        "tls": lambda: secure.server.stats["responses"] if secure and secure.server else 0,
        "reference": lambda: reference_requests.count,
        "renders/s": lambda: plain._exposition.renders + (secure._exposition.renders if secure else 0),
        "server CPU s/s": lambda: server_cpu(plain) + server_cpu(secure),
    }
    rotation = [r for i in range(a.rounds) for r in regimes[i % len(regimes) :] + regimes[: i % len(regimes)]]
    order = ["warmup", *rotation]  # a first block to warm up, not reported
    cpus = sorted(os.sched_getaffinity(0))
    pinned = a.pin and len(cpus) >= 2
    load = Load(ports, tls[0] if tls else None, a.clients, set(cpus[1:]) if pinned else None)
    schedule = Schedule(order, a.block, load, probes)

    class Ports(MaskMonitorCallback):
        def on_train_begin(self, args, state, control, **kwargs):
            super().on_train_begin(args, state, control, **kwargs)
            ports["plain"] = plain.port
            if secure is not None:
                ports["tls"] = secure.port
            server, _ = start_http_server(0, addr=LOCAL, registry=reference_registry)  # the pre-issue-15 server
            servers["reference"] = server
            ports["reference"] = server.server_address[1]

    tok = load_tokenizer()
    vocab = len(tok) if tok is not None else 32000
    data = make_rows(tok, 64, cfg["seq"], vocab)
    model = build_model(cfg, vocab)
    steps = len(order) * a.block
    trainer = build_trainer(model, data, cfg, steps, str(tmp / "out"),
                            [Ports(sinks=sinks, template=None, wandb=False), schedule])  # fmt: skip
    if pinned:  # every thread of this process (torch's pool included) on the first CPU
        for tid in os.listdir("/proc/self/task"):
            os.sched_setaffinity(int(tid), {cpus[0]})
    print(f"machine: {machine()}")
    print(f"pinned: training on CPU {cpus[0]}, clients on CPUs {cpus[1:]}" if pinned else "pinned: no")
    print(f"config {a.config}: {cfg}; {a.rounds} rounds x {len(regimes)} regimes x {a.block} steps; "
          f"{a.clients} storm client processes")  # fmt: skip
    print()
    print("unit costs (CPU time of the exporter's serving thread per connection; of the caller per rendering):")
    for what, seconds in unit_costs(tls):
        print(f"  {what:<42} {seconds * 1e6:8.0f} us")
    try:
        trainer.train()
    finally:
        schedule.finish()
        if "reference" in servers:
            servers["reference"].shutdown()
            servers["reference"].server_close()
    print()
    print(f"{'regime':<16} {'steps':>5} {'step (median)':>13} {'wall ratio [95% CI]':>22} {'CPU/step':>9} "
          f"{'CPU ratio [95% CI]':>21} {'answered/s':>11} {'renders/s':>10} {'server CPU':>11}")  # fmt: skip
    for regime in regimes:
        d = schedule.by_regime.get(regime)
        if not d or not d["wall"]:
            continue
        wall = round_ratios(schedule.blocks[1:], regimes, regime)  # (blocks[0]: the warm-up)
        cpu = round_ratios(schedule.cpu_blocks[1:], regimes, regime)
        (wlo, whi), (clo, chi) = bootstrap_median(wall), bootstrap_median(cpu)
        target = {"storm-tls": "tls", "storm-reference": "reference"}.get(regime, "plain")
        rate = statistics.median(d.get(target, [0.0]))
        renders = statistics.median(d.get("renders/s", [0.0]))
        server = statistics.median(d.get("server CPU s/s", [0.0]))
        server_txt = f"{server:>10.3f}s" if regime != "storm-reference" else f"{'n/a':>11}"
        step_ms, cpu_ms = statistics.median(d["wall"]) * 1000, statistics.median(d["cpu"]) * 1000
        print(f"{regime:<16} {len(d['wall']):>5} {step_ms:>11.1f}ms "
              f"{statistics.median(wall):>6.2f} [{wlo:>5.2f}, {whi:>5.2f}] {cpu_ms:>7.1f}ms "
              f"{statistics.median(cpu):>5.2f} [{clo:>5.2f}, {chi:>5.2f}] {rate:>11.1f} {renders:>10.2f} "
              f"{server_txt}")  # fmt: skip
    print()
    print("wall ratio / CPU ratio: the median over rounds of (median step time of the regime's block / median step")
    print("time of the same round's 'none' block), on the wall clock and on the process CPU clock (CPU seconds of all")
    print("threads of the training process per step: its own cost, blind to CPU taken by other processes), with a")
    print("bootstrap 95% interval over rounds. answered/s: responses of the targeted endpoint; renders/s: renderings")
    print("of the exposition; server CPU: CPU seconds per second of the exporter's serving thread(s) (the reference")
    print("server's per-request threads are not measured: n/a).")
    shutil.rmtree(tmp, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
