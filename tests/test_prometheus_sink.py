"""PrometheusSink against hand-built reports: exact values, the HTTP endpoint, TLS, a taken port,
the Pushgateway (real, and down), the abort linger, aggregate mode, settings from the environment.

Values are read with ``registry.get_sample_value`` (prometheus_client's test accessor) or parsed from
the real HTTP exposition, and the exposition is linted with ``promtool check metrics``.
"""

from __future__ import annotations

import logging
import math
import re
import shutil
import socket
import ssl
import subprocess
import threading
import time
import urllib.request

import pytest
from prom_server import MISSING_PROMTOOL, MISSING_PUSHGATEWAY, PROMTOOL, PUSHGATEWAY, Pushgateway, free_port
from prom_server import free_port_range as free_ports
from prometheus_client import REGISTRY, CollectorRegistry
from prometheus_client.parser import text_string_to_metric_families

from mask_monitor.config import CHECKS
from mask_monitor.errors import ABORT_REASONS, MaskMonitorAbort
from mask_monitor.reports import HISTOGRAM_BUCKETS, RunInfo, StepReport, Totals, WindowReport
from mask_monitor.sinks.base import Finding, SinkConfigError
from mask_monitor.sinks.prometheus import COUNTERS, METRIC_NAMES, PrometheusSink

# --------------------------------------------------------------------------- builders


def mb(
    target: int,
    supervised: int,
    *,
    sequences: int = 2,
    fully: int = 0,
    loss: float | None = 1.5,
    leak: int = 0,
    audited: int = 0,
    content: int = 0,
    sup_content: int = 0,
    nonfinite: int = 0,
) -> Totals:
    """One micro-batch's counts, built the way the auditor builds them."""
    masked = target - supervised
    return Totals(
        micro_batches=1,
        sequences=sequences,
        target_tokens=target,
        supervised_tokens=supervised,
        masked_tokens=masked,
        fully_masked_sequences=fully,
        all_masked_batches=1 if supervised == 0 else 0,
        unmasked_batches=1 if masked == 0 and target > 0 else 0,
        loss_batches=0 if loss is None else 1,
        loss_sum=0.0 if loss is None or nonfinite else loss,
        zero_loss_batches=1 if loss == 0 and supervised > 0 else 0,
        non_finite_loss_batches=nonfinite,
        audited_supervised_tokens=audited,
        prompt_leakage_tokens=leak,
        assistant_content_tokens=content,
        supervised_assistant_content_tokens=sup_content,
        max_masked_ratio=masked / target if target else 0.0,
    )


def report(step: int, rank: int, per_rank_mbs: list[list[Totals]]) -> StepReport:
    per_rank = tuple(Totals.total(m) for m in per_rank_mbs)
    return StepReport(
        step=step,
        rank=rank,
        world_size=len(per_rank),
        total=Totals.total(per_rank),
        per_rank=per_rank,
        micro_batches=tuple(per_rank_mbs[rank]),
    )


def info(rank: int = 0, local_rank: int = 0, world: int = 1) -> RunInfo:
    return RunInfo(
        run_name="run-a",
        rank=rank,
        local_rank=local_rank,
        world_size=world,
        template_family="zephyr",
        wandb_run_id="abc123",
        version="0.1.0",
    )


def window(step: int) -> WindowReport:
    return WindowReport(
        first_step=step, last_step=step, steps=1, rank=0, world_size=1, total=Totals(), per_rank=(Totals(),)
    )


def value(registry: CollectorRegistry, name: str, **labels: str) -> float | None:
    return registry.get_sample_value(name, labels)


def scrape(url: str, context: ssl.SSLContext | None = None) -> str:
    with urllib.request.urlopen(url, timeout=5, context=context) as r:
        return r.read().decode()


def samples(text: str) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    out = {}
    for fam in text_string_to_metric_families(text):
        for s in fam.samples:
            out[(s.name, tuple(sorted(s.labels.items())))] = s.value
    return out


@pytest.fixture
def registry() -> CollectorRegistry:
    return CollectorRegistry()


def wait_until(predicate, what: str, timeout: float = 5.0):
    """Poll ``predicate()`` until it returns something truthy (then return it); fail after ``timeout``."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        got = predicate()
        if got:
            return got
        time.sleep(0.02)
    raise AssertionError(f"timed out after {timeout}s waiting for {what}")


# --------------------------------------------------------------------------- counters, histogram, gauges


def test_counters_follow_this_ranks_counts_with_its_rank_label(registry):
    """Rank 1 of 2 exports its own counts (per_rank[1]); the other rank's never leak in."""
    sink = PrometheusSink(registry=registry)
    sink.on_train_begin(info(rank=1, local_rank=1, world=2))
    r0 = [mb(100, 40)]
    r1 = [mb(50, 10, fully=1), mb(30, 0, fully=2, loss=0.0)]  # the second micro-batch is all masked
    sink.on_step(report(1, 1, [r0, r1]), [])
    sink.on_step(report(2, 1, [[mb(10, 5)], [mb(20, 20)]]), [])
    # rank 1: step 1 = 50+30 targets, 10+0 supervised; step 2 = 20 targets, all supervised
    expected = {
        "micro_batches": 3,
        "sequences": 6,
        "target_tokens": 100,
        "supervised_tokens": 30,
        "masked_tokens": 70,
        "fully_masked_sequences": 3,
        "all_masked_batches": 1,
        "unmasked_batches": 1,
        "loss_batches": 3,
        "zero_loss_batches": 0,  # loss 0 with nothing supervised is an all-masked batch, not zero loss
        "non_finite_loss_batches": 0,
    }
    for field, want in expected.items():
        name = f"mask_monitor_{COUNTERS[field][0]}_total"
        assert value(registry, name, rank="1") == want, name
        assert value(registry, name, rank="0") is None
    assert value(registry, "mask_monitor_optimizer_steps_total", rank="1") == 2
    assert value(registry, "mask_monitor_optimizer_step", rank="1") == 2
    assert value(registry, "mask_monitor_world_size", rank="1") == 2
    assert REGISTRY.get_sample_value("mask_monitor_target_tokens_total", {"rank": "1"}) is None  # private


def test_histogram_observes_each_micro_batch_with_targets(registry):
    sink = PrometheusSink(registry=registry)
    sink.on_train_begin(info())
    # masked ratios: 0.6, 0.97, 1.0 (all masked), a micro-batch without target slots (not observed), 0.0
    mbs = [mb(10, 4), mb(100, 3), mb(20, 0), mb(0, 0, sequences=0), mb(8, 8)]
    sink.on_step(report(1, 0, [mbs]), [])
    le = {
        b: value(registry, "mask_monitor_micro_batch_masked_ratio_bucket", rank="0", le=repr(b))
        for b in HISTOGRAM_BUCKETS
    }
    # cumulative: 0.0 in every bucket, 0.6 from 0.75, 0.97 from 0.98, 1.0 only in 1.0
    assert le[0.1] == le[0.25] == le[0.5] == 1
    assert le[0.75] == le[0.9] == le[0.95] == 2
    assert le[0.98] == le[0.99] == le[0.995] == le[0.999] == 3
    assert le[1.0] == 4
    assert value(registry, "mask_monitor_micro_batch_masked_ratio_bucket", rank="0", le="+Inf") == 4
    assert value(registry, "mask_monitor_micro_batch_masked_ratio_count", rank="0") == 4
    assert value(registry, "mask_monitor_micro_batch_masked_ratio_sum", rank="0") == pytest.approx(0.6 + 0.97 + 1.0)


def test_last_step_gauges_and_nan_for_no_data(registry):
    sink = PrometheusSink(registry=registry)
    sink.on_train_begin(info())
    sink.on_step(
        report(
            7,
            0,
            [
                [
                    mb(10, 4, loss=2.0, leak=1, audited=4, content=5, sup_content=3),
                    mb(30, 3, loss=1.0, fully=1),
                ]
            ],
        ),
        [],
    )
    g = lambda n: value(registry, f"mask_monitor_{n}", rank="0")  # noqa: E731
    assert g("optimizer_step") == 7
    assert g("last_step_target_tokens") == 40 and g("last_step_supervised_tokens") == 7
    assert g("last_step_fully_masked_sequences") == 1
    assert g("last_step_masked_ratio") == pytest.approx(33 / 40)
    assert g("last_step_max_masked_ratio") == pytest.approx(27 / 30)
    assert g("last_step_loss") == pytest.approx(1.5)
    assert g("last_step_prompt_leakage_ratio") == pytest.approx(1 / 4)
    assert g("last_step_response_coverage_ratio") == pytest.approx(3 / 5)
    # a step without template audit, loss or targets: NaN, not a fake 0 % or 100 %
    sink.on_step(report(8, 0, [[mb(0, 0, sequences=0, loss=None)]]), [])
    for name in (
        "last_step_masked_ratio",
        "last_step_max_masked_ratio",
        "last_step_loss",
        "last_step_prompt_leakage_ratio",
        "last_step_response_coverage_ratio",
    ):
        assert math.isnan(g(name)), name
    # a NaN loss shows as NaN, and is counted
    sink.on_step(report(9, 0, [[mb(10, 5, loss=None, nonfinite=1), mb(10, 5, loss=1.0)]]), [])
    assert math.isnan(g("last_step_loss"))
    assert value(registry, "mask_monitor_non_finite_loss_batches_total", rank="0") == 1


def test_info_heartbeat_warnings_and_every_reason_initialised(registry):
    sink = PrometheusSink(registry=registry)
    t0 = time.time()
    sink.on_train_begin(info())
    assert (
        value(
            registry,
            "mask_monitor_run_info",
            rank="0",
            run_name="run-a",
            wandb_run_id="abc123",
            template_family="zephyr",
            version="0.1.0",
        )
        == 1
    )
    start = value(registry, "mask_monitor_train_start_timestamp_seconds", rank="0")
    assert t0 <= start <= time.time()
    # every reason / check exists at 0 from the start, so increase() sees the first event
    for reason in ABORT_REASONS:
        assert value(registry, "mask_monitor_aborts_total", rank="0", reason=reason) == 0
    for check in CHECKS:
        assert value(registry, "mask_monitor_check_warnings_total", rank="0", reason=check) == 0
    findings = [
        Finding("unmasked", "warn", 1, "m", {}),
        Finding("prompt_leakage", "warn", 1, "m", {}),
        Finding("fully_masked_sequences", "off", 1, "m", {}),
    ]
    sink.on_step(report(1, 0, [[mb(10, 10)]]), findings)
    sink.on_step(report(2, 0, [[mb(10, 10)]]), findings[:1])
    assert value(registry, "mask_monitor_check_warnings_total", rank="0", reason="unmasked") == 2
    assert value(registry, "mask_monitor_check_warnings_total", rank="0", reason="prompt_leakage") == 1
    assert value(registry, "mask_monitor_check_warnings_total", rank="0", reason="fully_masked_sequences") == 0
    hb = value(registry, "mask_monitor_heartbeat_timestamp_seconds", rank="0")
    assert start <= hb <= time.time()
    assert value(registry, "mask_monitor_train_end_timestamp_seconds", rank="0") is None  # still running


def test_abort_counts_the_step_once_and_marks_the_end(registry):
    sink = PrometheusSink(registry=registry, linger_seconds=0)
    sink.on_train_begin(info())
    rep = report(1, 0, [[mb(12, 0, loss=0.0, fully=2)]])
    sink.on_step(rep, [])
    sink.on_abort(MaskMonitorAbort("all_masked", step=1), rep)  # same step: not added twice
    sink.on_train_end({})
    assert value(registry, "mask_monitor_all_masked_batches_total", rank="0") == 1
    assert value(registry, "mask_monitor_target_tokens_total", rank="0") == 12
    assert value(registry, "mask_monitor_aborts_total", rank="0", reason="all_masked") == 1
    assert value(registry, "mask_monitor_aborts_total", rank="0", reason="zero_loss") == 0
    end = value(registry, "mask_monitor_train_end_timestamp_seconds", rank="0")
    assert end == value(registry, "mask_monitor_heartbeat_timestamp_seconds", rank="0")
    # an abort whose step never reached on_step is still counted
    reg2 = CollectorRegistry()
    other = PrometheusSink(registry=reg2, linger_seconds=0)
    other.on_train_begin(info())
    other.on_abort(MaskMonitorAbort("non_finite_loss", step=3), report(3, 0, [[mb(10, 5, loss=None, nonfinite=1)]]))
    assert value(reg2, "mask_monitor_non_finite_loss_batches_total", rank="0") == 1
    assert value(reg2, "mask_monitor_aborts_total", rank="0", reason="non_finite_loss") == 1


def test_aggregate_mode_exports_job_totals_from_rank_zero_only():
    reg0, reg1 = CollectorRegistry(), CollectorRegistry()
    s0 = PrometheusSink(registry=reg0, aggregate=True)
    s1 = PrometheusSink(registry=reg1, aggregate=True)
    s0.on_train_begin(info(rank=0, world=2))
    s1.on_train_begin(info(rank=1, local_rank=1, world=2))
    per_rank = [[mb(100, 40)], [mb(50, 0, loss=0.0)]]
    s0.on_step(report(1, 0, per_rank), [])
    s1.on_step(report(1, 1, per_rank), [])
    assert value(reg0, "mask_monitor_target_tokens_total", rank="all") == 150
    assert value(reg0, "mask_monitor_supervised_tokens_total", rank="all") == 40
    assert value(reg0, "mask_monitor_all_masked_batches_total", rank="all") == 1
    assert value(reg0, "mask_monitor_target_tokens_total", rank="0") is None
    assert value(reg1, "mask_monitor_target_tokens_total", rank="all") == 0  # rank 1 exports nothing new
    assert s1.active is False and s0.active is True


def test_one_registry_refuses_a_second_sink():
    from prometheus_client.registry import DuplicateTimeseries

    reg = CollectorRegistry()
    PrometheusSink(registry=reg)
    with pytest.raises(DuplicateTimeseries):
        PrometheusSink(registry=reg)
    PrometheusSink()  # two default sinks each get their own private registry
    PrometheusSink()


# --------------------------------------------------------------------------- settings


def test_from_settings_falls_back_to_environment_and_is_off_by_default():
    assert PrometheusSink.from_settings(env={}) is None
    env = {
        "MASK_MONITOR_PROMETHEUS_PORT": "9400",
        "MASK_MONITOR_PROMETHEUS_ADDR": "127.0.0.1",
        "MASK_MONITOR_PUSHGATEWAY_URL": "http://gw:9091",
        "MASK_MONITOR_PROMETHEUS_JOB": "sft-7b",
        "MASK_MONITOR_PROMETHEUS_LINGER_SECONDS": "2.5",
        "MASK_MONITOR_PROMETHEUS_CERTFILE": "/c.pem",
        "MASK_MONITOR_PROMETHEUS_KEYFILE": "/k.pem",
    }
    s = PrometheusSink.from_settings(env=env)
    assert (s.base_port, s.addr, s.pushgateway_url, s.job, s.linger_seconds, s.certfile, s.keyfile) == (
        9400,
        "127.0.0.1",
        "http://gw:9091",
        "sft-7b",
        2.5,
        "/c.pem",
        "/k.pem",
    )
    assert s.port_setting == "MASK_MONITOR_PROMETHEUS_PORT=9400"
    # arguments win over the environment
    s = PrometheusSink.from_settings(port=9500, job="mine", linger_seconds=0, env=env)
    assert (s.base_port, s.job, s.linger_seconds, s.port_setting) == (
        9500,
        "mine",
        0.0,
        "prometheus_port=9500",
    )
    # a gateway alone turns the exporter on (push only, no server)
    s = PrometheusSink.from_settings(env={"MASK_MONITOR_PUSHGATEWAY_URL": "gw:9091"})
    assert s.base_port is None and s.linger_seconds == 30.0 and s.job == "mask_monitor"
    with pytest.raises(ValueError, match="MASK_MONITOR_PROMETHEUS_PORT='x'"):
        PrometheusSink.from_settings(env={"MASK_MONITOR_PROMETHEUS_PORT": "x"})
    with pytest.raises(ValueError, match="MASK_MONITOR_PROMETHEUS_LINGER_SECONDS"):
        PrometheusSink.from_settings(port=1, env={"MASK_MONITOR_PROMETHEUS_LINGER_SECONDS": "soon"})
    with pytest.raises(ValueError, match="TLS needs both"):
        PrometheusSink(port=1, certfile="/c.pem")


# --------------------------------------------------------------------------- HTTP endpoint


def _populated(sink: PrometheusSink) -> None:
    sink.on_train_begin(info())
    sink.on_step(
        report(1, 0, [[mb(10, 4, leak=1, audited=4, content=3, sup_content=3)]]),
        [Finding("unmasked", "warn", 1, "m", {})],
    )
    sink.on_abort(MaskMonitorAbort("zero_loss", step=2), report(2, 0, [[mb(10, 4, loss=0.0)]]))


def test_endpoint_serves_every_metric_name_and_promtool_lints_it_clean(tmp_path):
    sink = PrometheusSink(port=0, addr="127.0.0.1", linger_seconds=0)
    try:
        _populated(sink)
        text = scrape(f"http://127.0.0.1:{sink.port}/metrics")
    finally:
        sink.close()
    got = samples(text)
    names = {name for name, _ in got}
    assert names == set(METRIC_NAMES)
    assert all(name.startswith("mask_monitor_") for name in names)
    for name, labels in got:  # only bounded labels (the info series carries the run's descriptive labels)
        keys = {k for k, _ in labels} - {"le"}
        if name != "mask_monitor_run_info":
            assert keys <= {"rank", "reason"}, (name, keys)
    assert got[("mask_monitor_target_tokens_total", (("rank", "0"),))] == 20
    if PROMTOOL is None:
        pytest.skip(MISSING_PROMTOOL)
    lint = subprocess.run([PROMTOOL, "check", "metrics"], input=text, capture_output=True, text=True)
    assert lint.returncode == 0 and lint.stdout.strip() == "" and lint.stderr.strip() == "", lint


def test_each_rank_serves_on_base_port_plus_local_rank():
    base = free_ports(2)
    sinks = [PrometheusSink(port=base, addr="127.0.0.1") for _ in range(2)]
    try:
        for r, s in enumerate(sinks):
            s.on_train_begin(info(rank=r + 4, local_rank=r, world=8))  # node 2 of a 4-GPU-per-node job
        assert [s.port for s in sinks] == [base, base + 1]
        for r in range(2):
            got = samples(scrape(f"http://127.0.0.1:{base + r}/metrics"))
            assert got[("mask_monitor_world_size", (("rank", str(r + 4)),))] == 8
    finally:
        for s in sinks:
            s.close()
    with pytest.raises(OSError):  # closed: nothing serves there any more
        scrape(f"http://127.0.0.1:{base}/metrics")


def test_taken_port_is_one_clear_error_naming_port_and_setting():
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        sink = PrometheusSink(port=port, addr="127.0.0.1")
        with pytest.raises(SinkConfigError) as err:
            sink.on_train_begin(info())
        assert f"port {port} is already in use" in str(err.value)
        assert f"set by PrometheusSink(port={port})" in str(err.value)
        flat = PrometheusSink.from_settings(port=port, addr="127.0.0.1", env={})  # the callback's deprecated args
        with pytest.raises(SinkConfigError, match=f"set by prometheus_port={port};"):
            flat.on_train_begin(info())
        env_sink = PrometheusSink.from_settings(
            env={"MASK_MONITOR_PROMETHEUS_PORT": str(port - 1), "MASK_MONITOR_PROMETHEUS_ADDR": "127.0.0.1"}
        )
        with pytest.raises(SinkConfigError, match=f"MASK_MONITOR_PROMETHEUS_PORT={port - 1}.*LOCAL_RANK 1"):
            env_sink.on_train_begin(info(rank=1, local_rank=1, world=2))


@pytest.mark.skipif(shutil.which("openssl") is None, reason="the openssl command is not installed")
def test_tls_endpoint_with_cert_and_key(tmp_path):
    cert, key = tmp_path / "cert.pem", tmp_path / "key.pem"
    subprocess.run(
        [
            "openssl",
            "req",
            "-x509",
            "-newkey",
            "rsa:2048",
            "-nodes",
            "-days",
            "1",
            "-subj",
            "/CN=127.0.0.1",
            "-keyout",
            str(key),
            "-out",
            str(cert),
        ],
        check=True,
        capture_output=True,
    )
    sink = PrometheusSink(port=0, addr="127.0.0.1", certfile=str(cert), keyfile=str(key))
    try:
        sink.on_train_begin(info())
        sink.on_step(report(1, 0, [[mb(10, 4)]]), [])
        ctx = ssl.create_default_context(cafile=str(cert))
        ctx.check_hostname = False
        text = scrape(f"https://127.0.0.1:{sink.port}/metrics", context=ctx)
        assert samples(text)[("mask_monitor_supervised_tokens_total", (("rank", "0"),))] == 4
        with pytest.raises(OSError):  # plain HTTP is refused
            scrape(f"http://127.0.0.1:{sink.port}/metrics")
    finally:
        sink.close()
    bad = PrometheusSink(port=0, addr="127.0.0.1", certfile=str(tmp_path / "missing.pem"), keyfile=str(key))
    with pytest.raises(SinkConfigError, match="missing.pem"):
        bad.on_train_begin(info())


# --------------------------------------------------------------------------- linger


def test_abort_lingers_until_scraped_twice_or_timeout():
    sink = PrometheusSink(port=0, addr="127.0.0.1", linger_seconds=1.0)
    try:
        sink.on_train_begin(info())
        t = time.monotonic()
        sink.on_abort(MaskMonitorAbort("all_masked", step=1), report(1, 0, [[mb(8, 0, loss=0.0)]]))
        waited = time.monotonic() - t
        assert 1.0 <= waited < 3  # nobody scraped: the full linger
        # the endpoint still serves the final values until close()
        got = samples(scrape(f"http://127.0.0.1:{sink.port}/metrics"))
        assert got[("mask_monitor_aborts_total", (("rank", "0"), ("reason", "all_masked")))] == 1
    finally:
        sink.close()

    sink = PrometheusSink(port=0, addr="127.0.0.1", linger_seconds=20.0)
    seen: list[float] = []

    def scraper() -> None:
        for _ in range(2):
            time.sleep(0.3)
            got = samples(scrape(f"http://127.0.0.1:{sink.port}/metrics"))
            seen.append(got[("mask_monitor_aborts_total", (("rank", "0"), ("reason", "zero_loss")))])

    try:
        sink.on_train_begin(info())
        th = threading.Thread(target=scraper)
        t = time.monotonic()
        th.start()
        sink.on_abort(MaskMonitorAbort("zero_loss", step=1), report(1, 0, [[mb(8, 4, loss=0.0)]]))
        waited = time.monotonic() - t
        th.join()
        assert seen == [1, 1]  # two scrapes saw the abort, then on_abort returned
        assert waited < 5
    finally:
        sink.close()


def test_normal_end_waits_for_one_scrape_only_when_someone_scrapes():
    sink = PrometheusSink(port=0, addr="127.0.0.1", linger_seconds=5.0)
    try:
        sink.on_train_begin(info())
        t = time.monotonic()
        sink.on_train_end({})  # never scraped: no wait
        assert time.monotonic() - t < 0.9
    finally:
        sink.close()
    sink = PrometheusSink(port=0, addr="127.0.0.1", linger_seconds=1.0)
    try:
        sink.on_train_begin(info())
        scrape(f"http://127.0.0.1:{sink.port}/metrics")
        wait_until(lambda: sink.scrapes == 1, "the scrape to be counted (after its last byte was sent)")
        t = time.monotonic()
        sink.on_train_end({})  # scraped before, nobody scrapes now: waits, bounded by the linger
        assert 1.0 <= time.monotonic() - t < 3
    finally:
        sink.close()


# --------------------------------------------------------------------------- Pushgateway


@pytest.mark.skipif(PUSHGATEWAY is None, reason=MISSING_PUSHGATEWAY)
def test_pushes_at_log_end_and_abort_grouped_by_job_instance_rank():
    with Pushgateway() as gw:
        sink = PrometheusSink(pushgateway_url=gw.url, job="sft-job")
        sink.on_train_begin(info(rank=3, local_rank=1, world=4))
        sink.on_step(report(1, 3, [[], [], [], [mb(10, 4)]]), [])
        assert "mask_monitor_target_tokens_total" not in gw.metrics()  # nothing pushed before a log step
        sink.on_log(window(1))  # asks the background worker for a push; returns at once
        group = (("instance", socket.gethostname()), ("job", "sft-job"), ("rank", "3"))
        got = wait_until(lambda: samples(gw.metrics()).get(("mask_monitor_target_tokens_total", group)), "a push")
        assert got == 10
        sink.on_step(report(2, 3, [[], [], [], [mb(6, 0, loss=0.0)]]), [])
        sink.on_abort(MaskMonitorAbort("all_masked", step=2), report(2, 3, [[], [], [], [mb(6, 0, loss=0.0)]]))
        got = samples(gw.metrics())  # on_abort waits for the final push (bounded by push_timeout)
        assert got[("mask_monitor_target_tokens_total", group)] == 16
        assert got[("mask_monitor_aborts_total", (*group[:2], ("rank", "3"), ("reason", "all_masked")))] == 1
        sink.close()
        # a normal end pushes too (a second sink, rank 0 of another job)
        other = PrometheusSink(pushgateway_url=gw.url, job="other")
        other.on_train_begin(info())
        other.on_step(report(1, 0, [[mb(5, 5)]]), [])
        other.on_train_end({})
        got = samples(gw.metrics())
        key = (("instance", socket.gethostname()), ("job", "other"), ("rank", "0"))
        assert got[("mask_monitor_supervised_tokens_total", key)] == 5
        assert ("mask_monitor_train_end_timestamp_seconds", key) in got


def test_gateway_down_warns_at_once_then_sums_up_at_the_end(registry, caplog):
    """A gateway that refuses connections: one warning at the first failure, none for the failures that follow
    within the warning interval, one at the end whose counts add up (4 pushes asked for: 3 logs + the final)."""
    dead = f"http://127.0.0.1:{free_port()}"
    sink = PrometheusSink(pushgateway_url=dead, registry=registry, push_timeout=1, env={})
    sink.on_train_begin(info())
    with caplog.at_level(logging.DEBUG, logger="mask_monitor"):
        for step in (1, 2, 3):
            sink.on_step(report(step, 0, [[mb(10, 4)]]), [])
            sink.on_log(window(step))
        t = time.monotonic()
        sink.on_train_end({})
        assert time.monotonic() - t < 1.5  # bounded by push_timeout
        sink.close()
    warnings = [m for r in caplog.records if r.levelno == logging.WARNING and "Pushgateway" in (m := r.getMessage())]
    assert len(warnings) == 2, warnings
    assert dead in warnings[0] and "training goes on" in warnings[0] and "Connection refused" in warnings[0]
    counts = re.search(
        r"of (\d+) pushes asked for in this run, (\d+) were pushed, (\d+) failed, (\d+) were skipped .* and (\d+) are "
        r"unfinished", warnings[1]
    )
    assert counts, warnings[1]
    requested, pushed, failed, skipped, unfinished = map(int, counts.groups())
    assert (requested, pushed, unfinished) == (4, 0, 0) and failed + skipped == 4 and failed >= 1
    assert "the final (end) push" in warnings[1] and "failed (URLError" in warnings[1]
    assert value(registry, "mask_monitor_target_tokens_total", rank="0") == 30  # the sink kept counting
