"""The Grafana dashboard and the other generated files under dashboards/: regenerated and diffed,
checked for structure, every PromQL expression parsed by promtool and every metric name checked
against what the exporter really emits (no Grafana server needed)."""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from prom_server import MISSING_PROMTOOL, PROMTOOL

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))  # `dashboards/` is build-time code at the repository root, not a package

from dashboards import dashboard  # noqa: E402
from mask_monitor.sinks.prometheus import METRIC_NAMES  # noqa: E402

DASHBOARD = REPO / "dashboards" / "grafana" / "mask_monitor.json"
NAME = re.compile(r"[a-zA-Z_:][a-zA-Z0-9_:]*")

#: What Grafana substitutes before a query reaches Prometheus (values that parse as PromQL).
GRAFANA_VARS = {"$__rate_interval": "1m", "$__range": "6h", "$job": ".*", "$rank": ".*"}


def substitute(expr: str, values: dict[str, str] = GRAFANA_VARS) -> str:
    for var in sorted(values, key=len, reverse=True):
        expr = expr.replace(var, values[var])
    assert "$" not in expr, expr
    return expr


def load() -> dict:
    return json.loads(DASHBOARD.read_text())


def panel_queries(d: dict) -> list[tuple[str, str]]:
    return [(p["title"], t["expr"]) for p in d["panels"] if p["type"] != "row" for t in p["targets"]]


def test_generated_files_are_up_to_date():
    pytest.importorskip("grafana_foundation_sdk", reason="grafana-foundation-sdk (the dev extra) is not installed")
    from dashboards import generate

    stale = [rel for rel, text in generate.render_all().items() if (generate.HERE / rel).read_text() != text]
    assert not stale, f"run `python -m dashboards.generate`: {stale}"
    assert generate.main(["--check"]) == 0


def test_dashboard_structure():
    d = load()
    assert d["uid"] == dashboard.UID and d["title"]
    variables = {v["name"]: v for v in d["templating"]["list"]}
    assert variables["datasource"]["type"] == "datasource" and variables["datasource"]["query"] == "prometheus"
    for name in ("job", "rank"):
        v = variables[name]
        assert v["type"] == "query" and v["multi"] and v["includeAll"] and v["allValue"] == ".*"
        assert v["datasource"]["uid"] == "${datasource}"
    ids = [p["id"] for p in d["panels"]]
    assert len(ids) == len(set(ids))
    rows = [p for p in d["panels"] if p["type"] == "row"]
    panels = [p for p in d["panels"] if p["type"] != "row"]
    assert len(rows) == 5 and len(panels) == len(dashboard.PANELS)
    cells = set()
    for p in d["panels"]:
        g = p["gridPos"]
        assert 0 <= g["x"] and g["x"] + g["w"] <= 24, p["title"]
        for x in range(g["x"], g["x"] + g["w"]):
            for y in range(g["y"], g["y"] + g["h"]):
                assert (x, y) not in cells, f"{p['title']} overlaps another panel"
                cells.add((x, y))
    for p in panels:
        assert p["description"], p["title"]
        assert p["datasource"] == {"type": "prometheus", "uid": "${datasource}"}, p["title"]
        unit = p["fieldConfig"]["defaults"].get("unit") if p["type"] != "heatmap" else p["options"]["yAxis"]["unit"]
        assert unit, f"{p['title']}: no unit"
        assert p["targets"] and all(t["expr"] and t["refId"] for t in p["targets"]), p["title"]
    # job-wide and per-rank views
    exprs = [e for _, e in panel_queries(d)]
    assert any("by (job)" in e for e in exprs) and any("by (job, rank)" in e or "by (rank)" in e for e in exprs)
    # an annotation marks aborts
    (ann,) = [a for a in d["annotations"]["list"] if a.get("expr")]
    assert "mask_monitor_aborts_total" in ann["expr"] and ann["enable"] and ann["titleFormat"]


def test_every_metric_family_has_a_panel_and_every_name_is_emitted():
    d = load()
    texts = [e for _, e in panel_queries(d)]
    texts += [a["expr"] for a in d["annotations"]["list"] if a.get("expr")]
    texts += [v["query"] for v in d["templating"]["list"] if v["type"] == "query"]
    used = {n for t in texts for n in NAME.findall(t) if n.startswith("mask_monitor_")}
    assert used <= METRIC_NAMES, sorted(used - METRIC_NAMES)
    # every family the exporter emits is shown (the histogram through its buckets)
    families = {n for n in METRIC_NAMES if not n.endswith(("_sum", "_count"))}
    assert families - used == set(), sorted(families - used)


@pytest.mark.skipif(PROMTOOL is None, reason=MISSING_PROMTOOL)
def test_every_dashboard_expression_parses_in_promtool(tmp_path):
    d = load()
    exprs = [substitute(e) for _, e in panel_queries(d)]
    exprs += [substitute(a["expr"]) for a in d["annotations"]["list"] if a.get("expr")]
    rules = {
        "groups": [
            {
                "name": "dashboard",
                "rules": [{"record": f"dashboard_expr_{i}", "expr": e} for i, e in enumerate(exprs)],
            }
        ]
    }
    path = tmp_path / "dashboard_exprs.yml"
    path.write_text(yaml.safe_dump(rules))
    out = subprocess.run([PROMTOOL, "check", "rules", str(path)], capture_output=True, text=True)
    assert out.returncode == 0, out.stdout + out.stderr
    assert f"SUCCESS: {len(exprs)} rules found" in out.stdout
    # and a broken expression is caught the same way (the check can fail)
    path.write_text(yaml.safe_dump({"groups": [{"name": "g", "rules": [{"record": "x", "expr": "sum(rate(x[1m])"}]}]}))
    bad = subprocess.run([PROMTOOL, "check", "rules", str(path)], capture_output=True, text=True)
    assert bad.returncode != 0
