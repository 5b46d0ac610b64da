"""The Prometheus rules: promtool check + unit tests, the PrometheusRule and Grafana renderings, and
every metric name they use checked against what the exporter really emits."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from prom_server import MISSING_PROMTOOL, PROMTOOL

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))  # `dashboards/` is build-time code at the repository root, not a package

from dashboards import alerts  # noqa: E402
from mask_monitor.sinks.prometheus import METRIC_NAMES  # noqa: E402

PROM_DIR = REPO / "dashboards" / "prometheus"
RULES_FILE = PROM_DIR / "mask_monitor.rules.yml"
RULES_TEST = PROM_DIR / "mask_monitor.rules.test.yml"
CRD_FILE = REPO / "dashboards" / "kubernetes" / "prometheusrule.yaml"
GRAFANA_ALERTS = REPO / "dashboards" / "grafana" / "alerting" / "mask_monitor.yaml"

needs_promtool = pytest.mark.skipif(PROMTOOL is None, reason=MISSING_PROMTOOL)
NAME = re.compile(r"[a-zA-Z_:][a-zA-Z0-9_:]*")
RECORDED = {r.record for r in alerts.RECORDING_RULES}


def metric_names(expr: str) -> set[str]:
    """Identifiers in a PromQL expression that name mask-monitor series (raw or recorded)."""
    return {n for n in NAME.findall(expr) if "mask_monitor_" in n}


def promtool(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([PROMTOOL, *args], capture_output=True, text=True, cwd=PROM_DIR)


@needs_promtool
def test_promtool_check_rules_is_clean():
    out = promtool("check", "rules", str(RULES_FILE))
    assert out.returncode == 0, out.stdout + out.stderr
    n = len(alerts.RECORDING_RULES) + len(alerts.ALERTS)
    assert f"SUCCESS: {n} rules found" in out.stdout
    assert "WARNING" not in (out.stdout + out.stderr).upper()


@needs_promtool
def test_promtool_unit_tests_pass():
    out = promtool("test", "rules", str(RULES_TEST))
    assert out.returncode == 0, out.stdout + out.stderr
    assert "SUCCESS" in out.stdout


def test_unit_tests_cover_firing_and_silence_for_every_alert():
    doc = yaml.safe_load(RULES_TEST.read_text())
    assert doc["rule_files"] == ["mask_monitor.rules.yml"]
    firing, silent = set(), set()
    for test in doc["tests"]:
        for case in test.get("alert_rule_test", []):
            (firing if case["exp_alerts"] else silent).add(case["alertname"])
    names = {a.name for a in alerts.ALERTS}
    assert firing == names and silent == names
    recorded_tested = {NAME.findall(c["expr"])[1] for t in doc["tests"] for c in t.get("promql_expr_test", [])}
    assert {
        "job:mask_monitor_masked_ratio:rate5m",
        "job_rank:mask_monitor_masked_ratio:rate5m",
    } <= recorded_tested


def test_rules_file_matches_the_definitions_and_required_alerts_exist():
    doc = yaml.safe_load(RULES_FILE.read_text())
    assert doc == alerts.prometheus_rules()
    rules = {r["alert"]: r for g in doc["groups"] for r in g["rules"] if "alert" in r}
    required = {
        "MaskMonitorAllMaskedBatches",
        "MaskMonitorZeroLoss",
        "MaskMonitorNonFiniteLoss",
        "MaskMonitorTrainingAborted",
        "MaskMonitorPromptLeakage",
        "MaskMonitorHighMaskedRatio",
        "MaskMonitorFullyMaskedSequences",
        "MaskMonitorStalled",
    }
    assert required <= set(rules)
    for name, rule in rules.items():
        assert rule["labels"]["severity"] in ("critical", "warning"), name
        assert "{{" in rule["annotations"]["summary"], f"{name}: summary without numbers/labels"
        assert "Check" in rule["annotations"]["description"] or "check" in rule["annotations"]["description"], name
    # the heartbeat rule reads stored samples, so it still fires after the exporter is gone
    assert "max_over_time(mask_monitor_heartbeat_timestamp_seconds[1h])" in rules["MaskMonitorStalled"]["expr"]


def test_every_metric_name_in_rules_is_emitted_by_the_exporter():
    used = set()
    for r in alerts.RECORDING_RULES:
        used |= metric_names(r.expr)
    for a in alerts.ALERTS:
        used |= metric_names(a.expr)
    raw = {n for n in used if n not in RECORDED}
    assert raw, "no metric names found"
    assert raw <= METRIC_NAMES, sorted(raw - METRIC_NAMES)
    assert used - raw <= RECORDED


@needs_promtool
def test_prometheusrule_renders_the_same_groups(tmp_path):
    crd = yaml.safe_load(CRD_FILE.read_text())
    assert crd["apiVersion"] == "monitoring.coreos.com/v1" and crd["kind"] == "PrometheusRule"
    assert crd["metadata"]["name"] == "mask-monitor"
    assert crd["spec"] == alerts.prometheus_rules()
    spec = tmp_path / "spec.yml"
    spec.write_text(yaml.safe_dump(crd["spec"]))
    out = promtool("check", "rules", str(spec))
    assert out.returncode == 0, out.stdout + out.stderr


@needs_promtool
def test_grafana_managed_rules_mirror_the_prometheus_alerts(tmp_path):
    doc = yaml.safe_load(GRAFANA_ALERTS.read_text())
    assert doc["apiVersion"] == 1
    (group,) = doc["groups"]
    assert group["folder"] and group["name"] and group["interval"] and group["orgId"] == 1
    by_title = {r["title"]: r for r in group["rules"]}
    assert set(by_title) == {a.name for a in alerts.ALERTS}
    uids = [r["uid"] for r in group["rules"]]
    assert len(set(uids)) == len(uids) and all(len(u) <= 40 for u in uids)
    exprs = []
    for a in alerts.ALERTS:
        r = by_title[a.name]
        assert r["condition"] == "C"
        query_a, cond = r["data"]
        assert query_a["refId"] == "A" and query_a["datasourceUid"] == alerts.GRAFANA_DATASOURCE_UID
        assert query_a["model"]["expr"] == a.expr and query_a["model"]["instant"] is True
        assert cond["datasourceUid"] == "__expr__" and cond["model"]["type"] == "threshold"
        assert cond["model"]["expression"] == "A"
        assert cond["model"]["conditions"][0]["evaluator"] == {"params": [0], "type": "gt"}
        assert r["for"] == a.for_ and r["labels"] == {"severity": a.severity}
        assert r["noDataState"] == "OK" and r["execErrState"] == "Error"
        assert "$value " not in r["annotations"]["summary"] + r["annotations"]["description"]
        exprs.append(query_a["model"]["expr"])
    check = tmp_path / "grafana_exprs.yml"
    check.write_text(
        yaml.safe_dump(
            {
                "groups": [
                    {
                        "name": "g",
                        "rules": [{"record": f"grafana_expr_{i}", "expr": e} for i, e in enumerate(exprs)],
                    }
                ]
            }
        )
    )
    out = promtool("check", "rules", str(check))
    assert out.returncode == 0, out.stdout + out.stderr


@needs_promtool
def test_example_scrape_config_is_valid_and_loads_the_rules():
    out = promtool("check", "config", str(PROM_DIR / "prometheus.example.yml"))
    assert out.returncode == 0, out.stdout + out.stderr
    assert "SUCCESS: 1 rule files found" in out.stdout
    config = yaml.safe_load((PROM_DIR / "prometheus.example.yml").read_text())
    (gateway,) = [j for j in config["scrape_configs"] if j["job_name"] == "pushgateway"]
    assert gateway["honor_labels"] is True


def test_podmonitor_example_scrapes_one_port_per_local_rank():
    pm = yaml.safe_load((REPO / "dashboards" / "kubernetes" / "podmonitor.yaml").read_text())
    assert pm["apiVersion"] == "monitoring.coreos.com/v1" and pm["kind"] == "PodMonitor"
    assert [e["port"] for e in pm["spec"]["podMetricsEndpoints"]] == ["mm-0", "mm-1"]
    assert pm["spec"]["selector"]["matchLabels"]
