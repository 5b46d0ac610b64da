"""``mask-monitor wandb-report``: the report is built offline with real wandb-workspaces objects, its
panels read the keys the W&B sink writes, and saving without a login fails with one clear line."""

from __future__ import annotations

import json
import sys

import pytest

from mask_monitor.cli.main import main
from mask_monitor.config import CHECKS
from mask_monitor.errors import MaskMonitorAbort
from mask_monitor.sinks.wandb import (
    HISTORY_KEYS,
    METRIC_SUMMARIES,
    SUMMARY_PREFIX,
    TABLE_KEY,
    _abort_summary,
    _run_summary,
)

wr = pytest.importorskip("wandb_workspaces.reports.v2")
from wandb_workspaces import expr  # noqa: E402

from mask_monitor.cli.wandb_report import RUN_COLUMNS, build_report, report_spec, spec_metric_keys  # noqa: E402


@pytest.fixture
def no_login(tmp_path, monkeypatch):
    """No W&B credentials anywhere: no key in the environment, an empty home and config dir."""
    for var in ("WANDB_API_KEY", "WANDB_IDENTITY_TOKEN_FILE"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("HOME", str(tmp_path))
    monkeypatch.setenv("NETRC", str(tmp_path / "no-netrc"))
    monkeypatch.setenv("WANDB_CONFIG_DIR", str(tmp_path / "wandb-config"))
    monkeypatch.setenv("WANDB_BASE_URL", "https://api.wandb.ai")


def test_spec_panels_put_masked_ratio_next_to_loss_on_the_step_axis():
    spec = report_spec(build_report("team", "sft", run_ids=["abc123", "def-456"]))
    assert spec["entity"] == "team" and spec["project"] == "sft"
    assert spec["title"] == "mask-monitor: label masking in sft"
    assert [s["heading"] for s in spec["sections"]] == [
        None,
        "Masked labels next to the loss",
        "Dead batches and broken loss",
        "Chat template audit",
        "Worst sequences",
        "Verdicts",
    ]
    first = spec["sections"][1]["panels"][0]
    assert first["viewType"] == "Run History Line Plot"
    assert first["config"]["chartTitle"] == "Loss and masked-label ratio"
    assert first["config"]["metrics"] == ["train/loss", "mask_monitor/masked_ratio"]
    line_plots = [p for s in spec["sections"] for p in s["panels"] if p["viewType"] == "Run History Line Plot"]
    assert len(line_plots) == 10  # one per chart declared in the report's SECTIONS
    assert {p["config"]["xAxis"] for p in line_plots} == {"train/global_step"}


def test_spec_metric_keys_are_keys_the_sink_writes():
    keys = spec_metric_keys(report_spec(build_report("team", "sft")))
    monitor = [k for k in keys if k.startswith("mask_monitor/")]
    assert set(keys) - set(monitor) == {"train/loss"}
    assert set(monitor) <= set(HISTORY_KEYS), set(monitor) - set(HISTORY_KEYS)
    # every ratio with a defined summary and every check's counter has a chart
    assert set(METRIC_SUMMARIES) <= set(monitor) | {"mask_monitor/prompt_leakage_tokens"}
    assert {f"mask_monitor/findings/{c}" for c in CHECKS} <= set(monitor)
    assert len(monitor) == len(set(monitor))  # no key charted twice


def test_spec_runsets_filter_the_given_runs_and_pin_the_verdict_columns():
    spec = report_spec(build_report("team", "sft", run_ids=["abc123", "def-456"]))
    runsets = [rs for s in spec["sections"] for rs in s["runsets"]]
    assert len(runsets) == 5
    for rs in runsets:
        assert rs["filters"] == "Metric('ID') in ['abc123', 'def-456']"
        assert rs["pinned_columns"] == list(RUN_COLUMNS)
    parsed = expr.expr_to_filters(runsets[0]["filters"])
    assert (parsed.op, parsed.key.section, parsed.key.name, parsed.value) == ("IN", "run", "name",
                                                                               ["abc123", "def-456"])
    # the pinned columns are summary keys the sink writes (at train end and on abort)
    err = MaskMonitorAbort("all_masked", step=3, rank=0, numbers={}, evidence_path="/x/abort-rank0.json")
    written = {SUMMARY_PREFIX + k for k in _run_summary({"masked_ratio": 0.5, "fully_masked_sequences": 1,
                                                          "worst_batch": {"masked_ratio": 1.0, "step": 3,
                                                                          "rank": 0}})}
    written |= {SUMMARY_PREFIX + k for k in _abort_summary(err)}
    assert {c.removeprefix("summary:") for c in RUN_COLUMNS} <= written
    assert "Metric('ID')" not in json.dumps(report_spec(build_report("team", "sft"))["sections"][1]["runsets"])


def test_spec_has_the_evidence_table_panel():
    spec = report_spec(build_report("team", "sft"))
    (panel,) = spec["sections"][4]["panels"]
    assert panel["viewType"] == "Weave"
    assert f'"val": "{TABLE_KEY}"' in json.dumps(panel)
    (comparer,) = spec["sections"][5]["panels"]
    assert comparer["viewType"] == "Run Comparer"


def test_cli_dry_run_json_prints_the_spec(capsys):
    rc = main(["wandb-report", "--entity", "team", "--project", "sft", "--run-ids", "abc123", "--title", "T",
               "--dry-run", "--json"])
    out = capsys.readouterr().out
    assert rc == 0
    spec = json.loads(out)
    assert spec["title"] == "T"
    assert spec_metric_keys(spec) == spec_metric_keys(report_spec(build_report("team", "sft")))
    assert spec["sections"][1]["runsets"][0]["filters"] == "Metric('ID') in ['abc123']"


def test_cli_dry_run_text(capsys):
    assert main(["wandb-report", "--entity", "team", "--project", "sft", "--dry-run"]) == 0
    out = capsys.readouterr().out.splitlines()
    assert out[0] == "W&B report 'mask-monitor: label masking in sft' for team/sft (not saved: --dry-run)"
    assert "  - Loss and masked-label ratio: train/loss, mask_monitor/masked_ratio vs train/global_step" in out


def test_cli_save_without_login_is_a_usage_error(no_login, capsys):
    rc = main(["wandb-report", "--entity", "team", "--project", "sft"])
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2
    assert err[0].startswith("mask-monitor: error: saving a W&B report needs a login: run `wandb login` or set "
                             "WANDB_API_KEY")
    assert err[0].endswith("use --dry-run to build the report without saving")


def test_cli_rejects_a_malformed_run_id(capsys):
    rc = main(["wandb-report", "--entity", "team", "--project", "sft", "--run-ids", "abc']", "--dry-run"])
    assert rc == 2
    assert "not a W&B run id: \"abc']\"" in capsys.readouterr().err


def test_cli_without_wandb_workspaces_says_which_extra(monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "wandb_workspaces.reports.v2", None)  # import fails as if not installed
    rc = main(["wandb-report", "--entity", "team", "--project", "sft", "--dry-run"])
    assert rc == 2
    assert capsys.readouterr().err.strip() == (
        "mask-monitor: error: wandb-workspaces is not installed: pip install 'mask-monitor[report]'"
    )
