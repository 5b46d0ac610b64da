"""The W&B evidence table, driven directly: rows with padding and chat roles, the size bounds, and the
promise that a process without wandb never imports it. A real offline run, read back from disk."""

from __future__ import annotations

import importlib.abc
import logging
import sys

import pytest
import torch
from test_wandb_sink import html_statuses, table_rows, wandb_dir  # noqa: F401 - the fixture is reused
from trainer_utils import CONVERSATIONS, encode_pair
from wandb_records import find_run_dir, read_run

from mask_monitor import MaskAuditor
from mask_monitor.reports import RunInfo
from mask_monitor.sinks.wandb import TABLE_COLUMNS, WandbSink, token_statuses
from mask_monitor.stats import (
    ROLE_ASSISTANT_CONTENT,
    ROLE_ASSISTANT_HEADER,
    ROLE_END_OF_TURN,
    ROLE_OTHER,
    ROLE_USER,
)

wandb = pytest.importorskip("wandb")

X = -100


def drive(sink: WandbSink, step: int, batches: list[dict[str, list[list[int]]]]) -> None:
    """One optimizer step of the given micro-batches through the real auditor, logged, rows handed over."""
    auditor = drive.auditor
    for b in batches:
        auditor.update(
            torch.tensor(b["labels"]),
            input_ids=torch.tensor(b["input_ids"]),
            attention_mask=torch.tensor(b["attention_mask"]) if "attention_mask" in b else None,
        )
    report = auditor.step(step)
    sink.on_step(report, [])
    sink.on_log(auditor.window())
    sink.on_micro_batch_rows(report, batches)


def open_sink(**kwargs) -> WandbSink:
    wandb.init(mode="offline", project="mask-monitor-tests")
    sink = WandbSink.maybe_create(**kwargs)
    assert sink is not None
    sink.on_train_begin(RunInfo(run_name="t"))
    drive.auditor = MaskAuditor()
    return sink


def test_padding_and_prompt_leakage_rows(wandb_dir):  # noqa: F811
    # token:      bos  user user header content content eot  pad pad
    ids = [1, 10, 11, 12, 13, 14, 15, 0, 0]
    roles = [ROLE_OTHER, ROLE_USER, ROLE_USER, ROLE_ASSISTANT_HEADER, ROLE_ASSISTANT_CONTENT,
             ROLE_ASSISTANT_CONTENT, ROLE_END_OF_TURN, ROLE_OTHER, ROLE_OTHER]
    # user token 11 (prompt leakage) and the header 12 (counted apart, not leakage) are trained on
    leaky = [X, X, 11, 12, 13, 14, 15, X, X]
    dead = [X] * 9
    batch = {"input_ids": [ids, [1, 10, 11, 12, 13, 14, 15, 16, 17]], "labels": [leaky, dead],
             "attention_mask": [[1] * 7 + [0, 0], [1] * 9], "roles": [roles, [ROLE_OTHER] * 9]}
    sink = open_sink()
    drive(sink, 1, [batch])
    sink.on_train_end({"steps": 1})
    wandb.finish()
    run = read_run(find_run_dir(wandb_dir))
    table, html_files = table_rows(run)
    got = [{k: r[k] for k in TABLE_COLUMNS[:-1]} for r in table]
    # leaky row: 6 real targets (tokens 1..6; padding excluded), 5 supervised, 1 of them a prompt token
    assert got == [
        {"step": 1, "rank": 0, "micro_batch": 0, "row": 1, "masked_ratio": 1.0, "supervised_tokens": 0,
         "target_tokens": 8, "fully_masked_sequences": 1, "prompt_leakage_tokens": 0, "source": "log"},
        {"step": 1, "rank": 0, "micro_batch": 0, "row": 0, "masked_ratio": pytest.approx(1 / 6),
         "supervised_tokens": 5, "target_tokens": 6, "fully_masked_sequences": 0, "prompt_leakage_tokens": 1,
         "source": "log"},
    ]
    statuses = html_statuses(html_files[table[1]["tokens"]["path"]])
    assert statuses == ["none", "masked", "leakage", "supervised", "supervised", "supervised", "supervised",
                        "padding", "padding"]
    assert html_files[table[1]["tokens"]["path"]].count("[11]") == 1  # no tokenizer: ids shown
    assert "1 prompt tokens trained on" in html_files[table[1]["tokens"]["path"]]


def test_rows_without_roles_are_tagged_by_the_role_tagger(wandb_dir, zephyr_tokenizer):  # noqa: F811
    templates = pytest.importorskip("mask_monitor.templates")
    tok = zephyr_tokenizer
    ids, _, n_prompt = encode_pair(tok, *CONVERSATIONS[0])
    user = [{"role": "user", "content": CONVERSATIONS[0][0]}]
    header = (len(tok.apply_chat_template(user, add_generation_prompt=True, tokenize=True, return_dict=False))
              - len(tok.apply_chat_template(user, tokenize=True, return_dict=False)))
    wandb.init(mode="offline", project="mask-monitor-tests")
    sink = WandbSink.maybe_create()
    sink.role_tagger = templates.RoleTagger.from_tokenizer(tok, templates.detect_template(tok))
    sink.on_train_begin(RunInfo(run_name="t"))
    drive.auditor = MaskAuditor()  # no role tagger: the rows handed to the sink carry no roles
    drive(sink, 1, [{"input_ids": [ids], "labels": [list(ids)]}])  # every token trained on
    wandb.finish()
    table, html_files = table_rows(read_run(find_run_dir(wandb_dir)))
    (row,) = table
    assert row["prompt_leakage_tokens"] == n_prompt - 1 - header > 0
    assert html_statuses(html_files[row["tokens"]["path"]]).count("leakage") == n_prompt - 1 - header


def test_table_is_bounded_in_rows_and_tokens(wandb_dir):  # noqa: F811
    def seq(n_targets: int, n_masked: int) -> dict:
        labels = [X] * (n_masked + 1) + [7] * (n_targets - n_masked)
        return {"input_ids": [list(range(1, n_targets + 2))], "labels": [labels]}

    sink = open_sink(table_top_k=2, table_max_rows=3, html_max_tokens=4)
    drive(sink, 1, [seq(4, 2), seq(4, 1)])  # 0.5, 0.25: the first two seen are kept
    drive(sink, 2, [seq(5, 2), seq(10, 3)])  # 0.4 beats the 2nd worst (0.25); 0.3 does not beat 0.4
    drive(sink, 3, [seq(10, 9)])  # 0.9 would enter the top 2, but the table is full (3 rows)
    wandb.finish()
    run = read_run(find_run_dir(wandb_dir))
    table, html_files = table_rows(run)
    assert [(r["step"], r["micro_batch"], r["masked_ratio"]) for r in table] == [
        (1, 0, 0.5), (1, 1, 0.25), (2, 0, 0.4)]
    assert [r["train/global_step"] for r in run.history_rows("mask_monitor/worst_sequences/_type")] == [1, 2]
    # history rows still carry every step, table or not
    assert [r["train/global_step"] for r in run.history_rows("mask_monitor/masked_ratio")] == [1, 2, 3]
    text = html_files[table[2]["tokens"]["path"]]
    assert html_statuses(text) == token_statuses(seq(5, 2)["labels"][0])[:4]
    assert "... (+2 tokens)" in text


def test_other_ranks_log_nothing(wandb_dir):  # noqa: F811
    wandb.init(mode="offline", project="mask-monitor-tests")  # a run on a non-main rank (user's choice)
    sink = WandbSink.maybe_create()
    sink.on_train_begin(RunInfo(rank=1, world_size=2, is_main_process=False))
    drive.auditor = MaskAuditor(sync=False)
    drive(sink, 1, [{"input_ids": [[1, 2, 3]], "labels": [[X, 2, 3]]}])
    sink.on_train_end({"steps": 1})
    wandb.finish()
    run = read_run(find_run_dir(wandb_dir))
    assert not [k for row in run.history for k in row if k.startswith("mask_monitor/")]
    assert not [k for k in run.summary if k.startswith("mask_monitor/")]
    assert "mask_monitor/*" not in run.metrics


class _NoWandb(importlib.abc.MetaPathFinder):
    """Makes ``import wandb`` fail as if wandb were not installed, and records each attempt."""

    def __init__(self) -> None:
        self.attempts: list[str] = []

    def find_spec(self, name, path=None, target=None):
        if name == "wandb" or name.startswith("wandb."):
            self.attempts.append(name)
            raise ModuleNotFoundError(f"No module named {name!r}", name=name)
        return None


@pytest.fixture
def no_wandb(monkeypatch):
    finder = _NoWandb()
    for name in [n for n in sys.modules if n == "wandb" or n.startswith("wandb.")]:
        monkeypatch.delitem(sys.modules, name)  # restored after the test
    monkeypatch.setattr(sys, "meta_path", [finder, *sys.meta_path])
    monkeypatch.delenv("WANDB_DISABLED", raising=False)
    monkeypatch.setenv("WANDB_MODE", "offline")
    return finder


def test_no_wandb_in_the_process_is_never_imported(no_wandb, caplog):
    caplog.set_level(logging.DEBUG, logger="mask_monitor")
    assert WandbSink.maybe_create() is None
    assert no_wandb.attempts == []  # a run cannot be active without wandb imported: no import cost
    assert [r.levelno for r in caplog.records if r.name == "mask_monitor"] == [logging.DEBUG]


def test_wandb_not_installed_but_asked_for_is_one_warning(no_wandb, caplog):
    assert WandbSink.maybe_create(force=True) is None
    assert no_wandb.attempts == ["wandb"]
    (record,) = [r for r in caplog.records if r.name == "mask_monitor"]
    assert record.levelno == logging.WARNING
    assert record.getMessage() == (
        "mask-monitor: wandb is not installed (pip install 'mask-monitor[wandb]'): W&B logging off"
    )
