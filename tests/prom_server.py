"""Real Prometheus and Pushgateway servers on loopback, for tests.

Each server runs from the Debian binaries (``prometheus``, ``prometheus-pushgateway``) on free
ports with its own temporary folder; Prometheus scrapes and evaluates rules every second.
``stop()`` (or leaving the ``with`` block) kills the process it started and nothing else.

Example (needs the binaries)::

    with Pushgateway() as gw, PrometheusServer({"train": ["127.0.0.1:9400"]}, pushgateway=gw) as prom:
        prom.query("up")
"""

from __future__ import annotations

import contextlib
import json
import shutil
import socket
import subprocess
import tempfile
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

import yaml

REPO = Path(__file__).resolve().parents[1]
RULES = REPO / "dashboards" / "prometheus" / "mask_monitor.rules.yml"

PROMETHEUS = shutil.which("prometheus")
PUSHGATEWAY = shutil.which("prometheus-pushgateway") or shutil.which("pushgateway")
PROMTOOL = shutil.which("promtool")

MISSING_PROMETHEUS = "the `prometheus` binary is not installed (apt-get install prometheus)"
MISSING_PUSHGATEWAY = "the Pushgateway binary is not installed (apt-get install prometheus-pushgateway)"
MISSING_PROMTOOL = "`promtool` is not installed (apt-get install prometheus)"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def free_port_range(n: int) -> int:
    """A base port such that base .. base+n-1 are all free right now."""
    for _ in range(200):
        base = free_port()
        if base + n > 65535:
            continue
        socks = []
        try:
            for p in range(base, base + n):
                s = socket.socket()
                socks.append(s)
                s.bind(("127.0.0.1", p))
            return base
        except OSError:
            continue
        finally:
            for s in socks:
                s.close()
    raise RuntimeError(f"no {n} consecutive free ports found")


def http_get(url: str, timeout: float = 5.0) -> bytes:
    with urllib.request.urlopen(url, timeout=timeout) as r:
        return r.read()


def _wait_ready(url: str, proc: subprocess.Popen, log: Path, timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"{url}: the server exited with {proc.returncode}:\n{log.read_text()[-3000:]}")
        with contextlib.suppress(OSError):
            http_get(url, timeout=1)
            return
        time.sleep(0.1)
    raise RuntimeError(f"{url} not ready after {timeout}s:\n{log.read_text()[-3000:]}")


class _Server:
    proc: subprocess.Popen | None = None
    tmp: tempfile.TemporaryDirectory | None = None

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(timeout=10)
        self.proc = None
        if self.tmp is not None:
            self.tmp.cleanup()
            self.tmp = None

    def __enter__(self):
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()


class Pushgateway(_Server):
    def __init__(self) -> None:
        if PUSHGATEWAY is None:
            raise RuntimeError(MISSING_PUSHGATEWAY)
        self.tmp = tempfile.TemporaryDirectory(prefix="mm-pushgateway-")
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        log = Path(self.tmp.name) / "pushgateway.log"
        self.proc = subprocess.Popen(
            [
                PUSHGATEWAY,
                f"--web.listen-address=127.0.0.1:{self.port}",
                # Debian's build persists to /var/lib/prometheus by default: keep each gateway's state private
                f"--persistence.file={Path(self.tmp.name) / 'pushgateway.data'}",
            ],
            stdout=log.open("wb"),
            stderr=subprocess.STDOUT,
        )
        try:
            _wait_ready(self.url + "/-/ready", self.proc, log)
        except Exception:
            self.stop()
            raise

    def metrics(self) -> str:
        return http_get(self.url + "/metrics").decode()


class PrometheusServer(_Server):
    """Prometheus with the project's rules, scraping ``jobs`` (job name -> targets) every second.

    ``job_options`` adds settings to a job's scrape config (e.g. ``scheme`` and ``tls_config``)."""

    def __init__(
        self,
        jobs: Mapping[str, Iterable[str]],
        *,
        pushgateway: Pushgateway | None = None,
        rule_files: Iterable[Path] = (RULES,),
        job_options: Mapping[str, Mapping[str, Any]] | None = None,
    ) -> None:
        if PROMETHEUS is None:
            raise RuntimeError(MISSING_PROMETHEUS)
        self.tmp = tempfile.TemporaryDirectory(prefix="mm-prometheus-")
        root = Path(self.tmp.name)
        scrape = [
            {"job_name": job, **(job_options or {}).get(job, {}), "static_configs": [{"targets": list(targets)}]}
            for job, targets in jobs.items()
        ]
        if pushgateway is not None:
            scrape.append(
                {
                    "job_name": "pushgateway",
                    "honor_labels": True,
                    "static_configs": [{"targets": [f"127.0.0.1:{pushgateway.port}"]}],
                }
            )
        config = {
            "global": {"scrape_interval": "1s", "scrape_timeout": "1s", "evaluation_interval": "1s"},
            "rule_files": [str(p) for p in rule_files],
            "scrape_configs": scrape,
        }
        (root / "prometheus.yml").write_text(yaml.safe_dump(config, sort_keys=False))
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        log = root / "prometheus.log"
        self.proc = subprocess.Popen(
            [
                PROMETHEUS,
                f"--config.file={root / 'prometheus.yml'}",
                f"--storage.tsdb.path={root / 'data'}",
                f"--web.listen-address=127.0.0.1:{self.port}",
                "--storage.tsdb.retention.time=1d",
            ],
            stdout=log.open("wb"),
            stderr=subprocess.STDOUT,
            cwd=root,
        )
        self.log = log
        try:
            _wait_ready(self.url + "/-/ready", self.proc, log)
        except Exception:
            self.stop()
            raise

    # ------------------------------------------------------------------ HTTP API
    def api(self, path: str, **params: Any) -> Any:
        url = f"{self.url}/api/v1/{path}"
        if params:
            url += "?" + urllib.parse.urlencode(params)
        try:
            body = json.loads(http_get(url, timeout=10))
        except urllib.error.HTTPError as exc:  # Prometheus explains a bad query in the body
            raise RuntimeError(f"{url}: HTTP {exc.code}: {exc.read().decode()[:500]}") from None
        if body.get("status") != "success":
            raise RuntimeError(f"{url}: {body}")
        return body["data"]

    def query(self, expr: str, at: float | None = None) -> list[dict]:
        params = {"query": expr}
        if at is not None:
            params["time"] = f"{at:.3f}"
        return self.api("query", **params)["result"]

    def query_range(self, expr: str, start: float, end: float, step: float = 1.0) -> list[dict]:
        return self.api("query_range", query=expr, start=f"{start:.3f}", end=f"{end:.3f}", step=str(step))["result"]

    def alerts(self) -> list[dict]:
        return self.api("alerts")["alerts"]

    def rules(self) -> list[dict]:
        return self.api("rules")["groups"]

    def targets(self) -> list[dict]:
        return self.api("targets")["activeTargets"]

    def wait_for(self, predicate, timeout: float, what: str, interval: float = 0.25) -> Any:
        """Poll ``predicate()`` until it returns something truthy; fail with ``what`` after ``timeout``."""
        deadline = time.monotonic() + timeout
        last = None
        while time.monotonic() < deadline:
            last = predicate()
            if last:
                return last
            time.sleep(interval)
        raise AssertionError(f"timed out after {timeout}s waiting for {what}; last value: {last!r}")
