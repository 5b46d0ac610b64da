"""Configuration and repeated use.

One resolution path (defaults < ``MASK_MONITOR_*`` environment < a given ``config=`` < keyword arguments),
every bad value named with what was expected (from code and from the environment alike), unknown
``MASK_MONITOR_*`` names warned once, ``enabled="false"``, ``strict=True`` with ``config=``, ``config=``
under ``MASK_MONITOR_ENABLED=0``; then real runs: a second ``train()`` with the same callback reports only its
own run, a healthy run after an aborted one says ``aborted=None``, and
``restore_callback_states_from_checkpoint=True`` rebuilds the user's configuration, not a default one.
"""

from __future__ import annotations

import logging

import pytest
from test_trainer import COUNT_KEYS, pick, sft
from trainer_utils import expected_counts, rows

from mask_monitor import ConfigError, MaskMonitorAbort, MaskMonitorCallback, MonitorConfig, Policy
from mask_monitor.checks import CHECKS, HISTORY
from mask_monitor.config import ENVIRONMENT, SETTINGS, env_name, warn_unknown_environment
from mask_monitor.reports import StepReport, Totals

# ============================================================================ resolution
EXPECTED = {  # what each kind of setting expects, as the message says it
    "action": "one of 'abort', 'warn', 'off'",
    "ratio": "a number between 0 and 1",
    "int": "a whole number",
    "bool": "true or false (1/0, yes/no, on/off)",
}
BAD = {"action": ["stop", 1, True], "ratio": ["lots", 1.5, -0.1, True], "int": ["abc", 2.5, "1.5"],
       "bool": ["maybe", 2, "enabled"], "choice": ["remote", 0]}


def _expected(name: str) -> str:
    s = SETTINGS[name]
    if s.kind == "choice":
        return "one of " + ", ".join(repr(c) for c in s.choices)
    return EXPECTED[s.kind]


@pytest.mark.parametrize("name", SETTINGS)
def test_every_bad_value_is_named_with_what_was_expected(name):
    kind = SETTINGS[name].kind
    for bad in BAD[kind]:
        with pytest.raises(ConfigError) as info:
            MonitorConfig(**{name: bad})
        assert str(info.value) == f"MonitorConfig({name}={bad!r}): expected {_expected(name)}"
    raw = "not-a-value"
    with pytest.raises(ConfigError) as info:
        MonitorConfig.resolve(env={env_name(name): raw})
    assert str(info.value) == f"{env_name(name)}={raw!r}: expected {_expected(name)}"


def test_minimums_are_named():
    with pytest.raises(ConfigError,
                       match=r"^MonitorConfig\(fully_masked_share_window=0\): expected a whole number >= 1$"):
        MonitorConfig(fully_masked_share_window=0)
    with pytest.raises(ConfigError, match=r"^MASK_MONITOR_EVIDENCE_ROWS='-1': expected a whole number >= 0$"):
        MonitorConfig.resolve(env={"MASK_MONITOR_EVIDENCE_ROWS": "-1"})


def test_unknown_settings_are_named_with_the_known_ones():
    with pytest.raises(ConfigError) as info:
        MonitorConfig(zero_los="warn")
    assert str(info.value).startswith("MonitorConfig() got unknown setting(s): zero_los; known: all_masked, ")
    with pytest.raises(ConfigError, match="unknown setting 'zero_los'"):
        MaskMonitorCallback(zero_los="warn")


def test_values_parse_from_code_and_environment_alike():
    cfg = MonitorConfig(enabled="false", template_audit="0", prompt_leakage_threshold="0.2", evidence_rows="3",
                        zero_loss=" WARN ", fully_masked_share_window=5.0)
    assert (cfg.enabled, cfg.template_audit, cfg.prompt_leakage_threshold) == (False, False, 0.2)
    assert (cfg.evidence_rows, cfg.zero_loss, cfg.fully_masked_share_window) == (3, "warn", 5)
    env = {"MASK_MONITOR_ENABLED": "off", "MASK_MONITOR_EVIDENCE_ROWS": " 4 ", "MASK_MONITOR_ZERO_LOSS": ""}
    got = MonitorConfig.resolve(env=env)
    assert (got.enabled, got.evidence_rows, got.zero_loss) == (False, 4, "abort")  # empty = not set


def test_precedence_defaults_env_config_then_keywords():
    env = {"MASK_MONITOR_ZERO_LOSS": "off", "MASK_MONITOR_PROMPT_LEAKAGE": "abort",
           "MASK_MONITOR_PROMPT_LEAKAGE_THRESHOLD": "0.2"}
    base = MonitorConfig(prompt_leakage="warn", evidence_rows=5)
    cfg = MonitorConfig.resolve({"evidence_rows": 7, "truncation": None}, env=env, base=base)
    assert cfg.zero_loss == "off"  # the environment fills what code did not set
    assert cfg.prompt_leakage == "warn"  # config= wins over the environment
    assert cfg.prompt_leakage_threshold == 0.2
    assert cfg.evidence_rows == 7  # keywords win over config=
    assert cfg.truncation == CHECKS["truncation"].default  # None counts as not given
    assert cfg.given() == {"zero_loss": "off", "prompt_leakage": "warn", "prompt_leakage_threshold": 0.2,
                           "evidence_rows": 7}


def test_config_is_still_under_the_environment_switch(monkeypatch):
    monkeypatch.setenv("MASK_MONITOR_ENABLED", "0")
    cb = MaskMonitorCallback(config=MonitorConfig(prompt_leakage="abort"))
    assert cb.config.enabled is False and cb.config.prompt_leakage == "abort"
    # code that sets enabled explicitly wins over the environment (documented precedence)
    assert MaskMonitorCallback(config=MonitorConfig(enabled=True)).config.enabled is True


def test_strict_with_config_is_kept_and_conflicts_are_named():
    cb = MaskMonitorCallback(config=MonitorConfig(zero_loss="warn"), strict=True)
    assert (cb.config.all_masked_micro_batch, cb.config.zero_loss) == ("abort", "warn")
    with pytest.raises(ConfigError, match="strict=True asks all_masked_micro_batch='abort', but 'warn' was given"):
        MaskMonitorCallback(config=MonitorConfig(all_masked_micro_batch="warn"), strict=True)
    with pytest.raises(ConfigError, match="but 'off' was given"):
        MaskMonitorCallback(strict=True, all_masked_micro_batch="off")


def test_unknown_environment_names_are_warned_once(caplog, monkeypatch):
    name = "MASK_MONITOR_PROMPT_LEAKAGE_TRESHOLD"  # a typo users make
    assert name not in ENVIRONMENT
    monkeypatch.setenv(name, "0.2")
    MaskMonitorCallback()
    MaskMonitorCallback()
    assert warn_unknown_environment() == [name]
    warned = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING and name in r.getMessage()]
    assert warned == [f"mask-monitor: ignoring unknown environment variable {name} "
                      "(did you mean MASK_MONITOR_PROMPT_LEAKAGE_THRESHOLD?)"]


def test_every_setting_has_its_environment_variable():
    assert all(s.env in ENVIRONMENT for s in SETTINGS.values())
    assert "MASK_MONITOR_VERBOSITY" in ENVIRONMENT


def test_policy_history_survives_a_resume():
    """A loss that converged to 0 stays converged after a resume (the policy's bounded history is saved)."""
    def report(step, loss, zero=0):
        t = Totals(micro_batches=1, sequences=1, target_tokens=4, supervised_tokens=4, loss_batches=1,
                   loss_sum=loss, zero_loss_batches=zero)
        return StepReport(step=step, rank=0, world_size=1, total=t, per_rank=(t,), micro_batches=(t,))

    before = Policy()
    for step, loss in enumerate([2.0, 0.5, 1e-6], start=1):
        assert before.evaluate(report(step, loss)) == []
    after = Policy()
    after.load_state_dict(before.state_dict())
    assert [f.check for f in after.evaluate(report(4, 0.0, zero=1))] == ["zero_loss_converged"]
    assert [f.check for f in Policy().evaluate(report(4, 0.0, zero=1))] == ["zero_loss"]  # no history: broken
    plateau = Policy()  # exactly 0 for longer than the history: a plateau judged when it began
    plateau.load_state_dict({"history": [report(i, 0.0, zero=1).total.values() for i in range(HISTORY)]})
    assert [f.check for f in plateau.evaluate(report(HISTORY + 1, 0.0, zero=1))] == ["zero_loss_converged"]


# ============================================================================ real runs: switches
@pytest.mark.slow
@pytest.mark.parametrize("how", ["enabled_false_string", "config_under_env_switch"])
def test_switched_off_monitor_lets_a_dead_run_train(zephyr_tokenizer, tmp_path, monkeypatch, how):
    if how == "enabled_false_string":
        cb = MaskMonitorCallback(enabled="false")
    else:
        monkeypatch.setenv("MASK_MONITOR_ENABLED", "0")
        cb = MaskMonitorCallback(config=MonitorConfig(all_masked="abort"))
    trainer, _ = sft(zephyr_tokenizer, rows(zephyr_tokenizer, "all", n=4), tmp_path, callbacks=[cb])
    assert trainer.train().global_step == 2  # the operator turned the monitor off: nothing stops
    assert cb.summary()["micro_batches"] == 0 and cb.summary()["aborted"] is None


# ============================================================================ real runs: repeated use
@pytest.mark.slow
def test_second_train_reports_only_its_own_run(zephyr_tokenizer, tmp_path, caplog):
    examples = rows(zephyr_tokenizer, "assistant")
    cb = MaskMonitorCallback()
    trainer, _ = sft(zephyr_tokenizer, examples, tmp_path, callbacks=[cb])
    trainer.train()
    first = cb.summary()
    trainer.train()
    second = cb.summary()
    exp = expected_counts(examples)
    assert pick(first, COUNT_KEYS) == pick(second, COUNT_KEYS) == exp
    assert (second["steps"], second["micro_batches"]) == (4, 4)
    lines = [r.getMessage() for r in caplog.records if r.getMessage().startswith("mask-monitor summary:")]
    assert len(lines) == 2 and lines[0] == lines[1]


@pytest.mark.slow
def test_healthy_run_after_an_aborted_one_is_not_aborted(zephyr_tokenizer, tmp_path):
    cb = MaskMonitorCallback()
    dead, _ = sft(zephyr_tokenizer, rows(zephyr_tokenizer, "all", n=4), tmp_path / "dead", callbacks=[cb])
    with pytest.raises(MaskMonitorAbort):
        dead.train()
    assert cb.summary()["aborted"] == "all_masked" and cb.summary()["evidence_path"]
    examples = rows(zephyr_tokenizer, "assistant")
    healthy, _ = sft(zephyr_tokenizer, examples, tmp_path / "ok", callbacks=[cb])
    assert healthy.train().global_step == 4
    s = cb.summary()
    assert s["aborted"] is None and s["evidence_path"] is None
    assert "all_masked" not in s["findings"] and "all_masked" not in s["first_step"]
    assert pick(s, COUNT_KEYS) == expected_counts(examples)


@pytest.mark.slow
def test_restore_callback_states_rebuilds_the_users_configuration(zephyr_tokenizer, tmp_path):
    examples = rows(zephyr_tokenizer, "assistant")
    whole = MaskMonitorCallback(template=None)
    trainer, _ = sft(zephyr_tokenizer, examples, tmp_path / "whole", callbacks=[whole])
    trainer.train()

    mine = dict(prompt_leakage="abort", zero_loss="warn", fully_masked_share_threshold=0.3, evidence_rows=1)
    user = MaskMonitorCallback(strict=True, template=None, **mine)
    trainer, _ = sft(zephyr_tokenizer, examples, tmp_path / "b", callbacks=[user], save_strategy="steps",
                     save_steps=2)
    trainer.train()
    fresh = MaskMonitorCallback()  # what a resuming script passes; the checkpoint says how it was configured
    trainer, _ = sft(zephyr_tokenizer, examples, tmp_path / "b", callbacks=[fresh], save_strategy="steps",
                     save_steps=2, restore_callback_states_from_checkpoint=True)
    trainer.train(resume_from_checkpoint=str(tmp_path / "b" / "out" / "checkpoint-2"))
    rebuilt = [c for c in trainer.callback_handler.callbacks if isinstance(c, MaskMonitorCallback)]
    assert len(rebuilt) == 1 and rebuilt[0] is not fresh
    cb = rebuilt[0]
    assert cb.config.given() == {**mine, "all_masked_micro_batch": "abort"}
    assert cb.config == user.config and cb._strict is True and cb.template_setting is None
    got, exp = cb.summary(), whole.summary()
    assert (got["steps"], got["last_step"]) == (4, 4)  # and it still restored the run totals
    assert pick(got, COUNT_KEYS) == pick(exp, COUNT_KEYS)
