"""The W&B sink against real wandb in offline mode, read back from the run's ``.wandb`` records.

Real Trainer runs of a tiny random Llama with the real TinyLlama tokenizer and ``report_to="wandb"``
(transformers' WandbCallback opens the run): a healthy run, a gradient-accumulation run with a fully
masked example, and an all -100 run that aborts. Every expected value is computed here, example by
example, from the pre-tokenized dataset; the sink's output is read back from the transaction log
(history rows, summary, alert, exit code) and from the files and artifact entries it left on disk.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

import pytest
import torch
from trainer_utils import CONVERSATIONS, IGNORE, dataset, encode_pair, expected_counts, rows, tiny_llama
from transformers import DataCollatorForSeq2Seq, Trainer, TrainingArguments
from wandb_records import find_run_dir, read_run

from mask_monitor import MaskMonitorAbort, MaskMonitorCallback
from mask_monitor.config import ConfigError
from mask_monitor.sinks.wandb import TABLE_COLUMNS, WandbSink, token_statuses

wandb = pytest.importorskip("wandb")
pytestmark = pytest.mark.slow

P = "mask_monitor/"
S = "mask_monitor/run/"


@pytest.fixture
def wandb_dir(tmp_path, monkeypatch):
    """An isolated offline wandb: every directory it writes under tmp_path, no login, no network."""
    for var in ("WANDB_DISABLED", "WANDB_API_KEY", "WANDB_RUN_ID", "WANDB_RESUME"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    monkeypatch.setenv("WANDB_PROJECT", "mask-monitor-tests")
    for var, sub in (("WANDB_DIR", "wb"), ("WANDB_DATA_DIR", "wb-data"), ("WANDB_CACHE_DIR", "wb-cache"),
                     ("WANDB_CONFIG_DIR", "wb-config"), ("WANDB_ARTIFACT_DIR", "wb-artifacts")):
        (tmp_path / sub).mkdir()
        monkeypatch.setenv(var, str(tmp_path / sub))
    wandb.teardown()  # wandb caches its settings (WANDB_DIR included) per process: start clean
    yield tmp_path / "wb"
    if wandb.run is not None:
        wandb.finish()
    wandb.teardown()


class SequentialTrainer(Trainer):
    """Dataset order on every supported transformers: step k trains examples k*bs*accum... in order
    (TrainingArguments(train_sampling_strategy=...) exists only in transformers >= 5)."""

    def _get_train_sampler(self, train_dataset=None):
        return torch.utils.data.SequentialSampler(train_dataset if train_dataset is not None else self.train_dataset)


def trainer_for(tokenizer, examples, tmp_path, cb, *, bs=1, accum=1, logging_steps=2, report_to="wandb"):
    args = TrainingArguments(
        output_dir=str(tmp_path / "out"),
        per_device_train_batch_size=bs,
        gradient_accumulation_steps=accum,
        num_train_epochs=1,
        learning_rate=1e-2,
        logging_steps=logging_steps,
        save_strategy="no",
        report_to=report_to,
        run_name="mask-monitor-test",
        use_cpu=True,
        dataloader_num_workers=0,
        disable_tqdm=True,
        seed=0,
    )
    collator = DataCollatorForSeq2Seq(tokenizer, label_pad_token_id=IGNORE)
    return SequentialTrainer(
        model=tiny_llama(len(tokenizer)),
        args=args,
        train_dataset=dataset(examples),
        data_collator=collator,
        processing_class=tokenizer,
        callbacks=[cb],
    )


def masked_ratio(ex: dict) -> float:
    c = expected_counts([ex])
    return c["masked_tokens"] / c["target_tokens"]


def worst_step(steps: list[list[dict]], first_step: int) -> int:
    """The first step holding the window's worst micro-batch (batch size 1: a micro-batch is an example)."""
    per_step = [max(masked_ratio(e) for e in step) for step in steps]
    return first_step + per_step.index(max(per_step))


def by_badness(table: list[dict]) -> list[dict]:
    """Within one logging step the sink adds the worst rows first (masked ratio down, supervised up)."""
    return sorted(table, key=lambda r: (-r["masked_ratio"], r["supervised_tokens"]))


def window_values(examples: list[dict]) -> dict[str, float | int]:
    """Independent totals of one logging window (plain Python over the examples it trained)."""
    c = expected_counts(examples)
    ratios = [masked_ratio(e) for e in examples]
    return {
        P + "target_tokens": c["target_tokens"],
        P + "supervised_tokens": c["supervised_tokens"],
        P + "masked_tokens": c["masked_tokens"],
        P + "sequences": c["sequences"],
        P + "fully_masked_sequences": c["fully_masked_sequences"],
        P + "unmasked_sequences": c["unmasked_sequences"],
        P + "micro_batches": len(examples),  # batch size 1
        P + "all_masked_batches": c["fully_masked_sequences"],  # batch size 1: a dead row is a dead batch
        P + "masked_ratio": c["masked_tokens"] / c["target_tokens"],
        P + "supervised_ratio": c["supervised_tokens"] / c["target_tokens"],
        P + "fully_masked_sequence_ratio": c["fully_masked_sequences"] / c["sequences"],
        P + "worst_batch_masked_ratio": max(ratios),
    }


def assert_row(row: dict, expected: dict) -> None:
    for k, v in expected.items():
        assert row[k] == pytest.approx(v, abs=1e-12), k


def artifact_entries(run, key: str) -> list[dict]:
    """The table increments and HTML files of the run-table artifact, read from the local staging copies."""
    out = []
    for rec in run.records:
        if rec.WhichOneof("record_type") != "artifact" or rec.artifact.type != "wandb-run-incremental-table":
            continue
        entry = {"table": None, "html": []}
        for c in rec.artifact.manifest.contents:
            text = Path(c.local_path).read_text(encoding="utf-8")
            if c.path.endswith(".table.json") and key in c.path:
                entry["table"] = json.loads(text)
            elif c.path.startswith("media/html/"):
                entry["html"].append((c.path, text))
        out.append(entry)
    return out


def table_rows(run, key: str = P + "worst_sequences") -> tuple[list[dict], dict[str, str]]:
    """All rows of the incremental table (in logging order) and its HTML cells by file path."""
    rows_out, html_by_path = [], {}
    for entry in artifact_entries(run, key):
        for r in entry["table"]["data"]:
            rows_out.append(dict(zip(entry["table"]["columns"], r, strict=True)))
        html_by_path.update(dict(entry["html"]))
    return rows_out, html_by_path


def expected_table_row(ex: dict, step: int, mb: int, source: str = "log") -> dict:
    c = expected_counts([ex])
    return {
        "step": step,
        "rank": 0,
        "micro_batch": mb,
        "row": 0,
        "masked_ratio": c["masked_tokens"] / c["target_tokens"],
        "supervised_tokens": c["supervised_tokens"],
        "target_tokens": c["target_tokens"],
        "fully_masked_sequences": c["fully_masked_sequences"],
        "prompt_leakage_tokens": None,
        "source": source,
    }


def html_statuses(text: str) -> list[str]:
    """The label status of each rendered token (the class of each token span)."""
    body = text.split('white-space:pre-wrap">', 1)[1]
    return [part.split('"', 1)[0] for part in body.split('<span class="')[1:]]


def html_tokens(text: str) -> list[str]:
    """The (HTML-escaped) text of each rendered token."""
    body = text.split('white-space:pre-wrap">', 1)[1]
    return [part.split('">', 1)[1].split("</span>", 1)[0] for part in body.split('<span class="')[1:]]


# --------------------------------------------------------------------------- healthy run
def test_healthy_run_history_summary_and_table(zephyr_tokenizer, tmp_path, wandb_dir):
    examples = rows(zephyr_tokenizer, "assistant", n=4)
    cb = MaskMonitorCallback(template=None)
    trainer = trainer_for(zephyr_tokenizer, examples, tmp_path, cb, logging_steps=2)
    trainer.train()
    run_id = wandb.run.id
    wandb.finish()
    run = read_run(find_run_dir(wandb_dir))
    assert run.run_dir.name.endswith(run_id)

    # one monitor row per logging step, on exactly the step it describes, next to the trainer's loss
    mm = run.history_rows(P + "masked_ratio")
    assert [r["train/global_step"] for r in mm] == [2, 4]
    assert_row(mm[0], {**window_values(examples[:2]), P + "window_steps": 2,
                       P + "worst_batch_step": worst_step([[examples[0]], [examples[1]]], 1)})
    assert_row(mm[1], {**window_values(examples[2:]), P + "window_steps": 2,
                       P + "worst_batch_step": worst_step([[examples[2]], [examples[3]]], 3)})
    for r in mm:
        assert r[P + "zero_loss_batches"] == r[P + "non_finite_loss_batches"] == 0
        assert all(r[f"{P}findings/{c}"] == 0 for c in ("all_masked", "zero_loss", "fully_masked_sequences"))
        assert P + "prompt_leakage_ratio" not in r  # no template: leakage undefined, not 0
        assert P + "aborted" not in r
    assert [r["train/global_step"] for r in run.history_rows("train/loss")] == [2, 4]
    assert not any(P + "masked_ratio" in r for r in run.history if r.get("train/global_step") not in (2, 4))

    # the x-axis and the define_metric summaries
    assert run.metrics[P + "*"].step_metric == "train/global_step"
    assert run.metrics[P + "masked_ratio"].step_metric == "train/global_step"
    r1, r2 = mm[0][P + "masked_ratio"], mm[1][P + "masked_ratio"]
    assert run.summary[P + "masked_ratio"] == pytest.approx({"max": max(r1, r2), "mean": (r1 + r2) / 2, "last": r2})

    # the run summary: totals over the run, computed independently
    exp = expected_counts(examples)
    for k in ("target_tokens", "supervised_tokens", "masked_tokens", "sequences", "fully_masked_sequences"):
        assert run.summary[S + k] == exp[k], k
    assert run.summary[S + "masked_ratio"] == pytest.approx(exp["masked_tokens"] / exp["target_tokens"])
    assert run.summary[S + "steps"] == 4 and run.summary[S + "micro_batches"] == 4
    assert run.summary[S + "worst_micro_batch_masked_ratio"] == pytest.approx(max(map(masked_ratio, examples)))
    assert run.summary[S + "worst_micro_batch_step"] == worst_step([[e] for e in examples], 1)
    assert run.summary[S + "status"] == "completed"
    assert run.summary[S + "template_family"] == "none"
    assert not any(k.startswith(S + "first_step/") for k in run.summary)
    assert S + "abort_reason" not in run.summary
    assert run.alerts == [] and run.exit_code == 0

    # evidence table: the rows of the last step of each window (examples 1 and 3), exact values
    table, html_files = table_rows(run)
    assert [{k: r[k] for k in TABLE_COLUMNS[:-1]} for r in table] == [
        pytest.approx(expected_table_row(examples[1], 2, 0)),
        pytest.approx(expected_table_row(examples[3], 4, 0)),
    ]
    assert [r["train/global_step"] for r in run.history_rows(P + "worst_sequences/_type")] == [2, 4]
    for r, ex in zip(table, (examples[1], examples[3]), strict=True):
        assert r["tokens"]["_type"] == "html-file"
        text = html_files[r["tokens"]["path"]]
        statuses = html_statuses(text)
        assert statuses == token_statuses(ex["labels"])
        assert statuses.count("supervised") == expected_counts([ex])["supervised_tokens"]
        assert statuses[: len(ex["labels"]) - expected_counts([ex])["supervised_tokens"]].count("supervised") == 0
        # decoded_text="local" (the default): token ids go to W&B, never token text (test_decoded_text.py)
        assert html_tokens(text) == [f"[{i}]" for i in ex["input_ids"]]


# --------------------------------------------------------------------------- gradient accumulation
def test_gradient_accumulation_run_fully_masked_example(zephyr_tokenizer, tmp_path, wandb_dir):
    examples = rows(zephyr_tokenizer, "assistant", n=8)
    examples[6] = {"input_ids": examples[6]["input_ids"], "labels": [IGNORE] * len(examples[6]["labels"])}
    cb = MaskMonitorCallback(template=None)
    trainer = trainer_for(zephyr_tokenizer, examples, tmp_path, cb, bs=1, accum=2, logging_steps=2)
    out = trainer.train()
    assert out.global_step == 4
    wandb.finish()
    run = read_run(find_run_dir(wandb_dir))

    mm = run.history_rows(P + "masked_ratio")
    assert [r["train/global_step"] for r in mm] == [2, 4]
    assert_row(mm[0], {**window_values(examples[:4]), P + "window_steps": 2,
                       P + "worst_batch_step": worst_step([examples[0:2], examples[2:4]], 1)})
    assert_row(mm[1], {**window_values(examples[4:]), P + "window_steps": 2, P + "worst_batch_step": 4,
                       P + "worst_batch_rank": 0})
    assert mm[1][P + "worst_batch_masked_ratio"] == 1.0 and mm[1][P + "all_masked_batches"] == 1
    assert mm[0][P + "findings/all_masked_micro_batch"] == 0
    assert mm[1][P + "findings/all_masked_micro_batch"] == 1
    assert mm[1][P + "findings/fully_masked_sequences"] == 1

    assert run.summary[S + "first_step/all_masked_micro_batch"] == 4
    assert run.summary[S + "first_step/fully_masked_sequences"] == 4
    assert run.summary[S + "findings/all_masked_micro_batch"] == 1
    assert run.summary[S + "worst_micro_batch_masked_ratio"] == 1.0
    assert run.summary[S + "worst_micro_batch_step"] == 4
    assert run.summary[S + "fully_masked_sequences"] == 1
    assert run.summary[S + "status"] == "completed" and run.exit_code == 0
    assert run.summary[P + "worst_batch_masked_ratio"] == {"max": 1.0, "last": 1.0}

    # the last step of each window had two micro-batches: both rows logged, the worse one first
    table, html_files = table_rows(run)
    expected = by_badness([expected_table_row(examples[2], 2, 0), expected_table_row(examples[3], 2, 1)])
    expected += by_badness([expected_table_row(examples[6], 4, 0), expected_table_row(examples[7], 4, 1)])
    assert [{k: r[k] for k in TABLE_COLUMNS[:-1]} for r in table] == [pytest.approx(e) for e in expected]
    assert table[2]["masked_ratio"] == 1.0 and table[2]["micro_batch"] == 0
    dead = html_statuses(html_files[table[2]["tokens"]["path"]])
    assert dead == ["none"] + ["masked"] * (len(examples[6]["input_ids"]) - 1)


# --------------------------------------------------------------------------- abort
def test_all_masked_run_alerts_and_finishes_failed(zephyr_tokenizer, tmp_path, wandb_dir):
    examples = rows(zephyr_tokenizer, "all", n=2)
    cb = MaskMonitorCallback(template=None)
    trainer = trainer_for(zephyr_tokenizer, examples, tmp_path, cb, logging_steps=1)
    with pytest.raises(MaskMonitorAbort) as info:
        trainer.train()
    err = info.value
    assert err.reason == "all_masked" and err.step == 1
    assert wandb.run is None  # the sink finished the run
    run = read_run(find_run_dir(wandb_dir))
    assert run.exit_code == 1  # failed, never a success

    n_targets = len(examples[0]["input_ids"]) - 1
    (row,) = run.history_rows(P + "masked_ratio")
    assert row["train/global_step"] == 1 and row[P + "aborted"] == 1
    assert_row(row, {P + "masked_ratio": 1.0, P + "supervised_tokens": 0, P + "target_tokens": n_targets,
                     P + "masked_tokens": n_targets, P + "all_masked_batches": 1, P + "fully_masked_sequences": 1,
                     P + "findings/all_masked": 1, P + "findings/non_finite_loss": 1,
                     P + "non_finite_loss_batches": 1, P + "worst_batch_masked_ratio": 1.0, P + "window_steps": 1})

    (alert,) = run.alerts
    assert alert.level == "ERROR"
    assert alert.title == "mask-monitor stopped training: all_masked at step 1"
    assert alert.text.splitlines()[:6] == [
        "reason: all_masked",
        "step: 1 (rank 0 of 1)",
        f"supervised tokens: 0 of {n_targets} targets (masked 100.0%) in 1 micro-batch(es)",
        # the plain Trainer divides by num_items_in_batch == 0 here: the loss is NaN
        "fully masked sequences: 1 of 1; all-masked micro-batches: 1; zero-loss micro-batches: 0; "
        "non-finite-loss micro-batches: 1",
        f"evidence: {err.evidence_path}",
        "",
    ]
    assert alert.text.splitlines()[6].startswith("mask-monitor [all_masked]: no label in optimizer step 1")

    assert run.summary[S + "status"] == "aborted"
    assert run.summary[S + "abort_reason"] == "all_masked"
    assert run.summary[S + "abort_step"] == 1 and run.summary[S + "abort_rank"] == 0
    assert run.summary[S + "evidence_path"] == err.evidence_path == str(tmp_path / "out" / "mask_monitor" /
                                                                         "abort-rank0.json")
    assert run.summary[S + "first_step/all_masked"] == 1
    assert run.summary[S + "target_tokens"] == n_targets and run.summary[S + "supervised_tokens"] == 0
    assert run.summary[S + "worst_micro_batch_masked_ratio"] == 1.0

    # the evidence file is saved with the run, and its offending rows are in the table
    assert json.loads((run.files_dir / "abort-rank0.json").read_text())["reason"] == "all_masked"
    table, html_files = table_rows(run)
    assert [{k: r[k] for k in TABLE_COLUMNS[:-1]} for r in table] == [
        pytest.approx(expected_table_row(examples[0], 1, 0, source="abort"))
    ]
    assert html_statuses(html_files[table[0]["tokens"]["path"]]) == ["none"] + ["masked"] * n_targets


def test_dead_step_after_healthy_ones_aborts_on_its_own_step(zephyr_tokenizer, tmp_path, wandb_dir):
    examples = rows(zephyr_tokenizer, "assistant", n=4)
    examples[3] = {"input_ids": examples[3]["input_ids"], "labels": [IGNORE] * len(examples[3]["labels"])}
    cb = MaskMonitorCallback(template=None)
    trainer = trainer_for(zephyr_tokenizer, examples, tmp_path, cb, logging_steps=2)
    with pytest.raises(MaskMonitorAbort) as info:
        trainer.train()
    assert info.value.reason == "all_masked" and info.value.step == 4
    run = read_run(find_run_dir(wandb_dir))
    assert run.exit_code == 1
    mm = run.history_rows(P + "masked_ratio")
    assert [r["train/global_step"] for r in mm] == [2, 4]
    assert P + "aborted" not in mm[0]
    # the abort row covers the steps since the last logging step (3 and the stopped 4), on step 4
    assert_row(mm[1], {**window_values(examples[2:]), P + "window_steps": 2, P + "worst_batch_step": 4,
                       P + "aborted": 1, P + "findings/all_masked": 1})
    exp = expected_counts(examples)
    assert run.summary[S + "target_tokens"] == exp["target_tokens"]
    assert run.summary[S + "supervised_tokens"] == exp["supervised_tokens"]
    assert run.summary[S + "steps"] == 4 and run.summary[S + "abort_step"] == 4
    assert run.summary[S + "worst_micro_batch_step"] == 4
    assert [a.title for a in run.alerts] == ["mask-monitor stopped training: all_masked at step 4"]
    table, _ = table_rows(run)
    assert [{k: r[k] for k in TABLE_COLUMNS[:-1]} for r in table] == [
        pytest.approx(expected_table_row(examples[1], 2, 0)),
        pytest.approx(expected_table_row(examples[3], 4, 0, source="abort")),
    ]


# --------------------------------------------------------------------------- nothing to log to
def test_no_run_or_disabled_is_one_debug_line(monkeypatch, caplog):
    caplog.set_level(logging.DEBUG, logger="mask_monitor")
    monkeypatch.delenv("WANDB_DISABLED", raising=False)
    assert wandb.run is None

    def debug_lines() -> list[int]:
        levels = [r.levelno for r in caplog.records if r.name == "mask_monitor"]
        caplog.clear()
        return levels

    caplog.clear()
    monkeypatch.setenv("WANDB_MODE", "disabled")
    assert WandbSink.maybe_create() is None
    assert debug_lines() == [logging.DEBUG]
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_DISABLED", "true")
    assert WandbSink.maybe_create() is None
    assert debug_lines() == [logging.DEBUG]
    monkeypatch.delenv("WANDB_DISABLED")
    assert WandbSink.maybe_create() is None  # imported, no run
    assert debug_lines() == [logging.DEBUG]
    forced = WandbSink.maybe_create(force=True)  # asked for explicitly: kept, idle until a run exists
    assert isinstance(forced, WandbSink)


def test_training_without_run_logs_nothing(zephyr_tokenizer, tmp_path, wandb_dir, caplog):
    examples = rows(zephyr_tokenizer, "assistant", n=2)
    cb = MaskMonitorCallback(template=None, wandb=True)
    trainer = trainer_for(zephyr_tokenizer, examples, tmp_path, cb, logging_steps=1, report_to="none")
    caplog.set_level(logging.DEBUG, logger="mask_monitor")
    assert trainer.train().global_step == 2
    assert not list(Path(wandb_dir).glob("wandb/*run-*"))
    mine = [r for r in caplog.records if r.name == "mask_monitor"]
    assert not [r for r in mine if r.levelno >= logging.WARNING]
    about_wandb = [r for r in mine if "W&B" in r.getMessage() or "wandb" in r.getMessage()]
    assert [r.levelno for r in about_wandb] == [logging.DEBUG]  # one line for the whole run


def test_wandb_failure_never_stops_training(zephyr_tokenizer, tmp_path, wandb_dir, caplog):
    examples = rows(zephyr_tokenizer, "assistant", n=2)
    run = wandb.init(mode="offline", project="mask-monitor-tests")

    def broken_log(*args, **kwargs):
        raise RuntimeError("wandb backend went away")

    monkeypatch_log = run.log
    run.log = broken_log
    cb = MaskMonitorCallback(template=None)
    trainer = trainer_for(zephyr_tokenizer, examples, tmp_path, cb, logging_steps=1, report_to="none")
    assert trainer.train().global_step == 2
    run.log = monkeypatch_log
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert sum("W&B log failed" in w for w in warnings) == 1  # once, then debug
    wandb.finish()
    rec = read_run(find_run_dir(wandb_dir))
    assert rec.summary[S + "status"] == "completed"  # the summary still went through
    assert rec.summary[S + "steps"] == 2


def test_users_own_wandb_init_gets_the_step_axis(zephyr_tokenizer, tmp_path, wandb_dir):
    examples = rows(zephyr_tokenizer, "assistant", n=2)
    wandb.init(mode="offline", project="mask-monitor-tests")  # no WandbCallback: report_to="none"
    cb = MaskMonitorCallback(template=None)
    trainer = trainer_for(zephyr_tokenizer, examples, tmp_path, cb, logging_steps=1, report_to="none")
    assert trainer.train().global_step == 2
    wandb.finish()
    run = read_run(find_run_dir(wandb_dir))
    assert "train/global_step" in run.metrics  # defined by the sink, as WandbCallback would
    assert run.metrics[P + "*"].step_metric == "train/global_step"
    mm = run.history_rows(P + "masked_ratio")
    assert [r["train/global_step"] for r in mm] == [1, 2]
    assert_row(mm[0], window_values(examples[:1]))
    assert_row(mm[1], window_values(examples[1:]))


def test_template_audit_masking_disabled_logs_leakage_and_family(zephyr_tokenizer, tmp_path, wandb_dir):
    pytest.importorskip("mask_monitor.templates")
    examples = rows(zephyr_tokenizer, "none", n=2)  # labels == input_ids: the prompt is trained on
    prompt_lens = [encode_pair(zephyr_tokenizer, q, a)[2] for q, a in CONVERSATIONS[:2]]
    cb = MaskMonitorCallback()  # template="auto": TinyLlama's tokenizer carries the Zephyr template
    trainer = trainer_for(zephyr_tokenizer, examples, tmp_path, cb, logging_steps=2)
    assert trainer.train().global_step == 2
    wandb.finish()
    run = read_run(find_run_dir(wandb_dir))
    (row,) = run.history_rows(P + "prompt_leakage_ratio")
    # every target is supervised; the prompt's tokens after position 0 (user turn and assistant header)
    # are the leakage; the response (content and its end of turn) is fully covered
    supervised = sum(len(e["input_ids"]) - 1 for e in examples)
    # the assistant header (what the generation prompt adds) is counted apart from prompt leakage
    user_only = [[{"role": "user", "content": q}] for q, _ in CONVERSATIONS[:2]]
    render = zephyr_tokenizer.apply_chat_template
    headers = [len(render(m, add_generation_prompt=True, tokenize=True, return_dict=False))
               - len(render(m, tokenize=True, return_dict=False)) for m in user_only]
    assert all(h > 0 for h in headers)
    leaked = sum(n - 1 - h for n, h in zip(prompt_lens, headers, strict=True))
    assert row["train/global_step"] == 2
    assert_row(row, {P + "audited_supervised_tokens": supervised, P + "prompt_leakage_tokens": leaked,
                     P + "prompt_leakage_ratio": leaked / supervised, P + "response_coverage_ratio": 1.0,
                     P + "eot_supervised_ratio": 1.0, P + "masked_ratio": 0.0, P + "findings/prompt_leakage": 2,
                     P + "findings/unmasked": 2})
    assert run.summary[S + "template_family"] == "zephyr"
    assert run.summary[S + "first_step/prompt_leakage"] == 1
    assert run.summary[S + "prompt_leakage_tokens"] == leaked
    assert run.summary[P + "prompt_leakage_ratio"]["max"] == pytest.approx(leaked / supervised)

    # the evidence table counts and colours the leakage of its row (the roles the auditor kept with the rows;
    # the sink also holds the auditor's role tagger for rows that come without them)
    (sink,) = [s for s in cb.sinks.sinks if s.name == "wandb"]
    assert sink.role_tagger is cb.auditor.role_tagger is not None
    (trow,) = table_rows(run)[0]
    assert (trow["step"], trow["micro_batch"], trow["row"]) == (2, 0, 0)
    assert trow["prompt_leakage_tokens"] == prompt_lens[1] - 1 - headers[1]
    statuses = html_statuses(table_rows(run)[1][trow["tokens"]["path"]])
    assert statuses.count("leakage") == prompt_lens[1] - 1 - headers[1]
    assert statuses.count("supervised") == len(examples[1]["input_ids"]) - 1 - statuses.count("leakage")


# --------------------------------------------------------------------------- sinks as objects
def test_a_wandb_sink_object_is_the_one_used(zephyr_tokenizer, tmp_path, wandb_dir):
    examples = rows(zephyr_tokenizer, "assistant", n=4)
    sink = WandbSink(table_max_rows=1)
    cb = MaskMonitorCallback(template=None, sinks=[sink])  # wandb=None: no second, default sink is added
    trainer = trainer_for(zephyr_tokenizer, examples, tmp_path, cb, logging_steps=2)
    assert trainer.train().global_step == 4
    assert [s for s in cb.sinks.sinks if s.name == "wandb"] == [sink]
    wandb.finish()
    run = read_run(find_run_dir(wandb_dir))
    assert [r["train/global_step"] for r in run.history_rows(P + "masked_ratio")] == [2, 4]  # one row each
    table, _ = table_rows(run)
    assert [{k: r[k] for k in TABLE_COLUMNS[:-1]} for r in table] == [  # its own bound: one row
        pytest.approx(expected_table_row(examples[1], 2, 0))]
    assert run.summary[S + "status"] == "completed"


def test_wandb_argument_is_validated():
    with pytest.raises(ConfigError, match=r"wandb=False\) contradicts the WandbSink"):
        MaskMonitorCallback(wandb=False, sinks=[WandbSink()])
    with pytest.raises(ConfigError, match=r"MaskMonitorCallback\(wandb='yes'\): expected None \(auto\), True or False"):
        MaskMonitorCallback(wandb="yes")
    MaskMonitorCallback(wandb=True, sinks=[WandbSink()])  # the user's sink is the one W&B gets


def test_a_wandb_sink_object_with_wandb_disabled_is_one_warning(zephyr_tokenizer, tmp_path, wandb_dir, monkeypatch,
                                                                 caplog):
    monkeypatch.setenv("WANDB_MODE", "disabled")
    cb = MaskMonitorCallback(template=None, sinks=[WandbSink()])
    trainer = trainer_for(zephyr_tokenizer, rows(zephyr_tokenizer, "assistant", n=2), tmp_path, cb,
                          logging_steps=1, report_to="none")
    assert trainer.train().global_step == 2
    warnings = [r.getMessage() for r in caplog.records if r.name == "mask_monitor" and r.levelno >= logging.WARNING]
    assert warnings == ["mask-monitor: W&B logging off (WANDB_DISABLED / WANDB_MODE=disabled)"]
    assert not list(Path(wandb_dir).glob("wandb/*run-*"))


def test_a_second_train_with_the_same_sink_starts_clean(zephyr_tokenizer, tmp_path, wandb_dir):
    sink = WandbSink()
    cb = MaskMonitorCallback(template=None, sinks=[sink])
    dead = rows(zephyr_tokenizer, "all", n=1)
    with pytest.raises(MaskMonitorAbort):
        trainer_for(zephyr_tokenizer, dead, tmp_path / "a", cb, logging_steps=1).train()
    assert wandb.run is None  # the first run was finished as failed
    healthy = rows(zephyr_tokenizer, "assistant", n=2)
    assert trainer_for(zephyr_tokenizer, healthy, tmp_path / "b", cb, logging_steps=1).train().global_step == 2
    wandb.finish()
    runs = [read_run(d) for d in Path(wandb_dir).glob("wandb/offline-run-*")]
    assert len(runs) == 2
    first, second = sorted(runs, key=lambda r: r.exit_code, reverse=True)  # names may share one second
    assert first.exit_code == 1 and first.summary[S + "status"] == "aborted"
    assert second.exit_code == 0 and second.summary[S + "status"] == "completed"
    assert S + "abort_reason" not in second.summary
    assert [r["train/global_step"] for r in second.history_rows(P + "masked_ratio")] == [1, 2]
    assert not any(P + "aborted" in r for r in second.history)
    table, _ = table_rows(second)
    assert [{k: r[k] for k in TABLE_COLUMNS[:-1]} for r in table] == [
        pytest.approx(expected_table_row(healthy[0], 1, 0)), pytest.approx(expected_table_row(healthy[1], 2, 0))]
