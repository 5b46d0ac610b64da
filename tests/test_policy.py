"""The one Policy: every declared check fires on its own totals, with exactly its configured action, the same
way for a training step (the callback, the plain-loop API) and for a dataset (``mask-monitor audit``)."""

from __future__ import annotations

import pytest

from mask_monitor import CHECKS, MonitorConfig, Policy, first_abort
from mask_monitor.audit.pipeline import AuditResult
from mask_monitor.reports import StepReport, Totals

# Totals that fire each check under the default thresholds, and nothing stronger that would silence it.
HEALTHY = dict(micro_batches=1, sequences=4, target_tokens=40, supervised_tokens=10, masked_tokens=30)
FIRING: dict[str, dict[str, float]] = {
    "all_masked": dict(micro_batches=1, sequences=2, target_tokens=20, masked_tokens=20, fully_masked_sequences=2,
                       all_masked_batches=1),
    "all_masked_micro_batch": dict(HEALTHY, micro_batches=2, all_masked_batches=1),
    "zero_loss": dict(HEALTHY, loss_batches=1, zero_loss_batches=1),
    # the same totals, step after step: a loss that stays exactly 0 for the whole history is a plateau
    "zero_loss_converged": dict(HEALTHY, loss_batches=1, zero_loss_batches=1),
    "non_finite_loss": dict(HEALTHY, loss_batches=1, non_finite_loss_batches=1),
    "fully_masked_share": dict(HEALTHY, fully_masked_sequences=3),
    "prompt_leakage": dict(HEALTHY, audited_supervised_tokens=10, prompt_leakage_tokens=6,
                           assistant_content_tokens=4, supervised_assistant_content_tokens=4),
    "fully_masked_sequences": dict(HEALTHY, fully_masked_sequences=1),
    "unmasked": dict(HEALTHY, unmasked_sequences=1),
    "supervised_padding": dict(HEALTHY, supervised_padding_tokens=2),
    "response_coverage": dict(HEALTHY, audited_supervised_tokens=10, assistant_content_tokens=20,
                              supervised_assistant_content_tokens=10),
    "eot_unsupervised": dict(HEALTHY, audited_supervised_tokens=10, assistant_content_tokens=8,
                             supervised_assistant_content_tokens=8, assistant_turns=2, supervised_eot_turns=1),
    "dropped_sequences": dict(HEALTHY, dropped_sequences=2),
    "unterminated_responses": dict(HEALTHY, audited_supervised_tokens=10, assistant_content_tokens=8,
                                   supervised_assistant_content_tokens=8, assistant_turns=2, supervised_eot_turns=2,
                                   assistant_responses=3, unterminated_responses=1),
    "truncation": dict(HEALTHY, truncated_sequences=1, truncated_supervised_tokens=5),
}


def step_report(t: Totals, step: int = 1) -> StepReport:
    return StepReport(step=step, rank=0, world_size=1, total=t, per_rank=(t,), micro_batches=(t,))


def findings(config: MonitorConfig, counts: dict[str, float], scope: str) -> dict[str, str]:
    """Every check that fired (with its action) on ``counts``: once for a dataset, on each of a full window of
    identical steps for training."""
    t = Totals(**counts)
    policy = Policy(config)
    if scope == "dataset":
        return {f.check: f.action for f in policy.evaluate(t, scope="dataset")}
    out: dict[str, str] = {}
    for step in range(1, config.fully_masked_share_window + 1):  # the windowed share needs a full window
        out.update({f.check: f.action for f in policy.evaluate(step_report(t, step))})
    return out


def test_every_declared_check_has_a_firing_case():
    assert set(FIRING) == set(CHECKS)


def test_healthy_totals_fire_nothing():
    assert findings(MonitorConfig(), HEALTHY, "step") == {}
    assert findings(MonitorConfig(), HEALTHY, "dataset") == {}


@pytest.mark.parametrize("check", list(CHECKS))
@pytest.mark.parametrize("scope", ["step", "dataset"])
@pytest.mark.parametrize("action", ["abort", "warn", "off"])
def test_each_check_fires_with_exactly_its_configured_action(check, scope, action):
    config = MonitorConfig(**{check: action})
    got = findings(config, FIRING[check], scope)
    if scope not in CHECKS[check].scopes or action == "off":
        assert check not in got
    else:
        assert got.get(check) == action
    # the other checks keep their own (default) actions
    for other, other_action in got.items():
        if other != check:
            assert other_action == CHECKS[other].default


@pytest.mark.parametrize("check", [c for c in CHECKS if "dataset" in CHECKS[c].scopes])
@pytest.mark.parametrize("action", ["abort", "warn", "off"])
def test_the_audit_verdict_is_the_policy(check, action):
    """mask-monitor audit judges its dataset totals with this Policy: abort = blocking (exit 1), warn = warning."""
    config = MonitorConfig(**{check: action})
    result = AuditResult.__new__(AuditResult)  # only the verdict fields are read
    result.findings = Policy(config).evaluate(Totals(**FIRING[check]), scope="dataset")
    result.fail_on = "abort"
    by_check = {f.check: f for f in result.findings}
    if action == "off":
        assert check not in by_check
        return
    assert by_check[check].severity == ("blocking" if action == "abort" else "warning")
    assert (by_check[check] in result.blocking) == (action == "abort")
    assert result.exit_code == (1 if result.blocking else 0)


def test_thresholds_are_read_from_the_config():
    counts = FIRING["prompt_leakage"]  # 60% leakage
    assert "prompt_leakage" in findings(MonitorConfig(prompt_leakage_threshold=0.59), counts, "step")
    assert "prompt_leakage" not in findings(MonitorConfig(prompt_leakage_threshold=0.6), counts, "step")
    counts = FIRING["response_coverage"]  # 50% coverage
    assert "response_coverage" in findings(MonitorConfig(response_coverage_threshold=0.51), counts, "step")
    assert "response_coverage" not in findings(MonitorConfig(response_coverage_threshold=0.5), counts, "step")


def test_all_masked_silences_what_it_implies():
    got = findings(MonitorConfig(), FIRING["all_masked"], "step")
    assert got == {"all_masked": "abort"}


def test_unreadable_labels_never_prove_all_masked():
    counts = dict(FIRING["all_masked"], unaudited_batches=1)
    assert "all_masked" not in findings(MonitorConfig(), counts, "step")


def test_everything_dropped_is_all_masked_for_a_dataset():
    got = Policy().evaluate(Totals(dropped_sequences=8), scope="dataset")
    assert [f.check for f in got] == ["all_masked"]
    assert "all 8 examples were dropped as fully masked" in got[0].message


def test_fully_masked_share_needs_a_full_window():
    p = Policy(MonitorConfig(fully_masked_share_window=3, fully_masked_share_threshold=0.5))
    t = Totals(micro_batches=1, sequences=4, target_tokens=8, supervised_tokens=2, masked_tokens=6,
               fully_masked_sequences=3)
    fired = [[f.check for f in p.evaluate(step_report(t, step))] for step in (1, 2, 3)]
    assert "fully_masked_share" not in fired[0] + fired[1] and "fully_masked_share" in fired[2]
    p.reset()  # a new train(): the window starts over
    assert "fully_masked_share" not in [f.check for f in p.evaluate(step_report(t, 4))]


def test_first_abort_follows_declaration_order():
    counts = dict(FIRING["non_finite_loss"], loss_batches=2, zero_loss_batches=1)
    got = Policy().evaluate(step_report(Totals(**counts)))
    assert {f.check for f in got} >= {"zero_loss", "non_finite_loss"}
    assert first_abort(got).check == "zero_loss"  # declared first
    assert first_abort([f for f in got if f.action != "abort"]) is None


def test_messages_carry_the_numbers_and_the_step():
    got = Policy().evaluate(step_report(Totals(**FIRING["prompt_leakage"]), step=7))
    f = next(f for f in got if f.check == "prompt_leakage")
    assert f.step == 7 and f.numbers["share"] == pytest.approx(0.6)
    assert f.headline.startswith("mask-monitor [prompt_leakage]: 6 of 10 supervised targets (60.0%) in step 7")
    assert "{% generation %}" in f.message and "{{" not in f.message
