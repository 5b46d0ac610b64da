"""Live proof: a real Prometheus (scrape and rule evaluation every second, the project's rules
loaded) and a real Pushgateway watch real tiny SFTTrainer runs exporting through the callback.

One module fixture runs, in order: a healthy run, an all -100 run that aborts (scraped endpoint),
the same abort through the Pushgateway only, and a two-rank torchrun job (gloo, CPU) with one
endpoint per rank. The tests then query Prometheus' HTTP API: counters equal ``summary()``, no
alert for the healthy job, the abort alerts firing with the right labels, both ranks scraped, and
every dashboard panel query returning data.
"""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import pytest
from prom_server import (
    MISSING_PROMETHEUS,
    MISSING_PUSHGATEWAY,
    PROMETHEUS,
    PUSHGATEWAY,
    PrometheusServer,
    Pushgateway,
    free_port,
    free_port_range,
)
from trainer_utils import dataset, expected_counts, rows, tiny_llama
from transformers import TrainerCallback

from mask_monitor import MaskMonitorAbort, MaskMonitorCallback
from mask_monitor.sinks.prometheus import COUNTERS, PrometheusSink

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
from dashboards import alerts as alert_rules  # noqa: E402

trl = pytest.importorskip("trl")
pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(PROMETHEUS is None, reason=MISSING_PROMETHEUS),
    pytest.mark.skipif(PUSHGATEWAY is None, reason=MISSING_PUSHGATEWAY),
]

DDP_SCRIPT = Path(__file__).parent / "scripts" / "prom_ddp.py"
DASHBOARD = REPO / "dashboards" / "grafana" / "mask_monitor.json"
#: Totals fields exported as counters, compared one by one with the callback's summary()
COUNTER_FIELDS = tuple(COUNTERS)


class Pace(TrainerCallback):
    """Slows each optimizer step so a 1 s scrape interval sees the run while it trains."""

    def __init__(self, seconds: float):
        self.seconds = seconds

    def on_step_end(self, args, state, control, **kwargs):
        time.sleep(self.seconds)


class WaitScraped(TrainerCallback):
    """Placed after MaskMonitorCallback: at train begin (its endpoint is serving by then) wait until
    Prometheus has scraped the job once, so a loaded machine cannot make the run end before the first
    scrape."""

    def __init__(self, prom, job: str, timeout: float = 60.0):
        self.prom, self.job, self.timeout = prom, job, timeout

    def on_train_begin(self, args, state, control, **kwargs):
        self.prom.wait_for(
            lambda: any(float(r["value"][1]) == 1 for r in self.prom.query(f'up{{job="{self.job}"}}')),
            self.timeout, f"Prometheus to scrape {self.job}",
        )


def sft(tokenizer, examples, out_dir: Path, callbacks, *, epochs: int = 1, bs: int = 1):
    config = trl.SFTConfig(
        output_dir=str(out_dir),
        per_device_train_batch_size=bs,
        num_train_epochs=epochs,
        learning_rate=1e-2,
        logging_steps=2,
        save_strategy="no",
        report_to="none",
        use_cpu=True,
        dataloader_num_workers=0,
        disable_tqdm=True,
        seed=0,
        max_length=None,  # keep fully masked examples (TRL drops them when max_length is set)
    )
    return trl.SFTTrainer(
        model=tiny_llama(len(tokenizer)),
        args=config,
        train_dataset=dataset(examples),
        processing_class=tokenizer,
        callbacks=callbacks,
    )


@dataclass
class Live:
    prom: PrometheusServer
    gateway: Pushgateway
    t0: float
    summaries: dict[str, dict] = field(default_factory=dict)
    examples: dict[str, list] = field(default_factory=dict)
    errors: dict[str, MaskMonitorAbort] = field(default_factory=dict)
    ddp: dict = field(default_factory=dict)
    ddp_ports: tuple[int, int] = (0, 0)

    def last(self, expr: str) -> list[dict]:
        """Latest value of each series of ``expr`` within the last 10 minutes (stale or not)."""
        return self.prom.query(f"last_over_time({expr}[10m])")

    def last_value(self, expr: str) -> float:
        res = self.last(expr)
        assert len(res) == 1, (expr, res)
        return float(res[0]["value"][1])


def _torchrun_ddp(out_dir: Path, base_port: int) -> subprocess.Popen:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MASTER_ADDR": "127.0.0.1", "LINGER": "5"}
    cmd = [
        sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", f"--master_port={free_port()}",
        str(DDP_SCRIPT), str(out_dir), str(base_port),
    ]  # fmt: skip
    return subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


@pytest.fixture(scope="module")
def live(zephyr_tokenizer, tmp_path_factory) -> Live:
    tmp = tmp_path_factory.mktemp("prom_live")
    tok = zephyr_tokenizer
    healthy_port, abort_port = free_port(), free_port()
    ddp_base = free_port_range(2)
    jobs = {
        "mm-healthy": [f"127.0.0.1:{healthy_port}"],
        "mm-abort": [f"127.0.0.1:{abort_port}"],
        "mm-ddp": [f"127.0.0.1:{ddp_base}", f"127.0.0.1:{ddp_base + 1}"],
    }
    with Pushgateway() as gw, PrometheusServer(jobs, pushgateway=gw) as prom:
        prom.wait_for(lambda: len(prom.rules()) == 2, 20, "the rule groups to load")
        live = Live(prom, gw, time.time(), ddp_ports=(ddp_base, ddp_base + 1))

        # 1. healthy: prompts masked, responses supervised; 2 epochs of 8 steps
        examples = rows(tok, "assistant")
        cb = MaskMonitorCallback(sinks=[PrometheusSink(port=healthy_port, addr="127.0.0.1", linger_seconds=5)])
        sft(tok, examples, tmp / "healthy", [cb, WaitScraped(prom, "mm-healthy"), Pace(0.25)], epochs=2).train()
        live.summaries["healthy"], live.examples["healthy"] = cb.summary(), examples

        # 2. every label -100: aborts at step 1 and lingers until scraped twice (at most 5 s)
        examples = rows(tok, "all")
        cb = MaskMonitorCallback(sinks=[PrometheusSink(port=abort_port, addr="127.0.0.1", linger_seconds=5)])
        with pytest.raises(MaskMonitorAbort) as err:
            sft(tok, examples, tmp / "abort", [cb], bs=2).train()
        live.summaries["abort"], live.examples["abort"], live.errors["abort"] = cb.summary(), examples, err.value

        # 3. the same abort through the Pushgateway only (no endpoint, no linger)
        cb = MaskMonitorCallback(sinks=[PrometheusSink(pushgateway_url=gw.url, job="mm-push")])
        with pytest.raises(MaskMonitorAbort) as err:
            sft(tok, examples, tmp / "push", [cb], bs=2).train()
        live.summaries["push"], live.errors["push"] = cb.summary(), err.value

        # 4. two ranks, one endpoint each
        proc = _torchrun_ddp(tmp / "ddp", ddp_base)
        try:
            output, _ = proc.communicate(timeout=240)
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
        assert proc.returncode == 0, output[-4000:]
        live.ddp = {r: json.loads((tmp / "ddp" / f"result-rank{r}.json").read_text()) for r in (0, 1)}
        time.sleep(2.5)  # two more rule evaluations over the last samples
        yield live


# --------------------------------------------------------------------------- 1. healthy run


def test_healthy_run_counters_in_prometheus_equal_summary(live):
    s = live.summaries["healthy"]
    exp = expected_counts(live.examples["healthy"])  # independent plain-Python count, one epoch
    for key in ("sequences", "target_tokens", "supervised_tokens", "masked_tokens"):
        assert s[key] == 2 * exp[key]
    for f in COUNTER_FIELDS:
        got = live.last_value(f'mask_monitor_{COUNTERS[f][0]}_total{{job="mm-healthy", rank="0"}}')
        assert got == s[f], f
    assert live.last_value('mask_monitor_optimizer_steps_total{job="mm-healthy"}') == s["steps"] == 16
    assert live.last_value('mask_monitor_optimizer_step{job="mm-healthy"}') == 16
    assert live.last_value('mask_monitor_micro_batch_masked_ratio_count{job="mm-healthy"}') == 16
    (info,) = live.last('mask_monitor_run_info{job="mm-healthy"}')
    assert info["metric"]["version"] and info["metric"]["rank"] == "0"
    assert info["metric"]["template_family"] == (s["template_family"] or "")
    # the recording rules ran on this job's data
    ratio = live.prom.query_range('job:mask_monitor_masked_ratio:rate5m{job="mm-healthy"}', live.t0, time.time())
    assert ratio and all(0 < float(v) < 1 for _, v in ratio[0]["values"])


def test_healthy_run_fires_no_alert(live):
    loaded = {r["name"] for g in live.prom.rules() for r in g["rules"] if r["type"] == "alerting"}
    assert loaded == {a.name for a in alert_rules.ALERTS}
    # ALERTS holds every pending or firing alert of the whole time range
    assert live.prom.query_range('ALERTS{job="mm-healthy"}', live.t0, time.time()) == []
    assert [a for a in live.prom.alerts() if a["labels"].get("job") == "mm-healthy"] == []


# --------------------------------------------------------------------------- 2. abort, scraped


def _firing(live: Live, job: str, alertname: str) -> list[dict]:
    return [
        a
        for a in live.prom.alerts()
        if a["labels"]["alertname"] == alertname and a["labels"].get("job") == job and a["state"] == "firing"
    ]


@pytest.mark.parametrize("job,run", [("mm-abort", "abort"), ("mm-push", "push")])
def test_aborting_run_fires_aborted_and_all_masked_alerts(live, job, run):
    err = live.errors[run]
    assert err.reason == "all_masked" and err.step == 1
    s = live.summaries[run]
    assert s["aborted"] == "all_masked" and s["all_masked_batches"] == 1 and s["supervised_tokens"] == 0
    for f in COUNTER_FIELDS:
        assert live.last_value(f'mask_monitor_{COUNTERS[f][0]}_total{{job="{job}", rank="0"}}') == s[f], f
    assert live.last_value(f'mask_monitor_aborts_total{{job="{job}", reason="all_masked"}}') == 1

    (aborted,) = live.prom.wait_for(lambda: _firing(live, job, "MaskMonitorTrainingAborted"), 15, "abort alert")
    labels = aborted["labels"]
    assert (labels["rank"], labels["reason"], labels["severity"]) == ("0", "all_masked", "critical")
    assert "aborted training (all_masked)" in aborted["annotations"]["summary"]
    (masked,) = live.prom.wait_for(lambda: _firing(live, job, "MaskMonitorAllMaskedBatches"), 15, "all-masked alert")
    assert masked["labels"]["rank"] == "0" and masked["labels"]["severity"] == "warning"
    assert masked["annotations"]["summary"].startswith(f"1 micro-batch(es) with every label masked in job {job}")
    if run == "push":
        assert labels["instance"] == masked["labels"]["instance"] != "127.0.0.1:" + str(live.gateway.port)
        assert "mask_monitor_aborts_total" in live.gateway.metrics()
    # a finished run is not "stalled"
    assert _firing(live, job, "MaskMonitorStalled") == []


# --------------------------------------------------------------------------- 3. two ranks


def test_two_rank_job_both_endpoints_scraped_with_rank_labels(live):
    (r0, r1) = (live.ddp[0], live.ddp[1])
    assert r0["global_step"] == r1["global_step"] == 4
    total = r0["summary"]  # summary() is the job total on every rank
    assert total == r1["summary"]
    assert total["steps"] == 4 and total["aborted"] is None
    res = live.last('mask_monitor_target_tokens_total{job="mm-ddp"}')
    by_rank = {r["metric"]["rank"]: r for r in res}
    assert set(by_rank) == {"0", "1"}
    p0, p1 = live.ddp_ports
    assert by_rank["0"]["metric"]["instance"] == f"127.0.0.1:{p0}"
    assert by_rank["1"]["metric"]["instance"] == f"127.0.0.1:{p1}"
    for f in COUNTER_FIELDS:
        res = live.prom.query(f'sum(last_over_time(mask_monitor_{COUNTERS[f][0]}_total{{job="mm-ddp"}}[10m]))')
        assert float(res[0]["value"][1]) == total[f], f
    per_rank = {r["metric"]["rank"]: float(r["value"][1]) for r in live.last('mask_monitor_world_size{job="mm-ddp"}')}
    assert per_rank == {"0": 2.0, "1": 2.0}
    steps = live.last('mask_monitor_optimizer_steps_total{job="mm-ddp"}')
    assert sorted(float(r["value"][1]) for r in steps) == [4.0, 4.0]
    # rank 1's all -100 micro-batch of step 2 (policy: warn): counted on rank 1 only, warned on both
    masked = {
        r["metric"]["rank"]: float(r["value"][1])
        for r in live.last('mask_monitor_all_masked_batches_total{job="mm-ddp"}')
    }
    assert masked == {"0": 0.0, "1": 1.0} and total["all_masked_batches"] == 1
    assert total["findings"].get("all_masked_micro_batch") == 1
    warned = live.last('mask_monitor_check_warnings_total{job="mm-ddp", reason="all_masked_micro_batch"}')
    assert sorted(float(r["value"][1]) for r in warned) == [1.0, 1.0]
    (alert,) = live.prom.wait_for(lambda: _firing(live, "mm-ddp", "MaskMonitorAllMaskedBatches"), 15, "alert")
    assert alert["labels"]["rank"] == "1" and alert["labels"]["instance"] == f"127.0.0.1:{p1}"
    up = live.prom.query_range('up{job="mm-ddp"} == 1', live.t0, time.time())
    assert {r["metric"]["instance"] for r in up} == {f"127.0.0.1:{p0}", f"127.0.0.1:{p1}"}


# --------------------------------------------------------------------------- 4. the dashboard


def test_every_dashboard_query_returns_data(live):
    d = json.loads(DASHBOARD.read_text())
    end = time.time()
    values = {
        "$__rate_interval": "4s",  # Grafana: max(4 x scrape interval, step + scrape interval)
        "$__range": f"{int(end - live.t0) + 1}s",
        "$job": ".*",
        "$rank": ".*",
    }
    queries = [(p["title"], t["expr"]) for p in d["panels"] if p["type"] != "row" for t in p["targets"]]
    queries += [("annotation " + a["name"], a["expr"]) for a in d["annotations"]["list"] if a.get("expr")]
    empty = []
    for title, expr in queries:
        for var in sorted(values, key=len, reverse=True):
            expr = expr.replace(var, values[var])
        res = live.prom.query_range(expr, live.t0, end, step=1)
        finite = [v for r in res for _, v in r["values"] if not math.isnan(float(v))]
        if not finite:
            empty.append((title, expr))
    assert not empty, f"{len(empty)} of {len(queries)} dashboard queries returned no data: {empty}"
