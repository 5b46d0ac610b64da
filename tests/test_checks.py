"""The check declarations: every check has its words, its setting and its place in the abort order."""

from __future__ import annotations

import math
import pickle

import pytest

from mask_monitor import ABORT_REASONS, CHECKS, MaskMonitorAbort, MonitorConfig
from mask_monitor.checks import ACTIONS, explain
from mask_monitor.config import SETTINGS


@pytest.mark.parametrize("name", list(CHECKS))
def test_each_check_is_declared_once_with_its_setting_and_words(name):
    c = CHECKS[name]
    assert c.name == name and c.default in ACTIONS and c.watches
    assert SETTINGS[name].default == c.default and SETTINGS[name].kind == "action"
    assert getattr(MonitorConfig(), name) == c.default
    msg = explain(name, {"step": 3})
    assert msg.startswith(f"mask-monitor [{name}]: ")
    assert "{" not in msg.replace("{% generation %}", "")  # every template field was filled (or '?')


def test_abort_reasons_are_the_checks_in_priority_order():
    assert ABORT_REASONS == tuple(CHECKS)


def test_explain_lists_causes_checks_and_fix():
    msg = explain("all_masked", {"step": 2, "target_tokens": 12, "micro_batches": 1, "ranks": 1})
    lines = msg.splitlines()
    assert lines[0].startswith("mask-monitor [all_masked]: no label in optimizer step 2 is supervised: 12 target")
    assert "Likely causes:" in lines and "What to check:" in lines
    assert explain("all_masked", {}, details=False).count("\n") == 0


def test_abort_pickles_with_its_fields():
    err = MaskMonitorAbort("zero_loss", step=7, rank=1, numbers={"supervised_tokens": 12}, evidence_path="/x.json")
    back = pickle.loads(pickle.dumps(err))
    assert (back.reason, back.step, back.rank, back.evidence_path) == ("zero_loss", 7, 1, "/x.json")
    assert str(back) == str(err) and "12 target tokens are supervised" in str(err)
    assert not math.isnan(back.numbers["supervised_tokens"])
