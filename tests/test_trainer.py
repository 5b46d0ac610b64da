"""Real SFTTrainer / Trainer runs of tiny random Llama models with the real TinyLlama tokenizer.

Covers the proof list of the core issue: healthy masking, the classic all -100 failure, masking
disabled, truncated sequences, gradient accumulation with one or four dead micro-batches (default and
strict policy), packing with a fully masked document, NaN loss at step 3, and the plain Trainer's
num_items_in_batch agreement.
"""

from __future__ import annotations

import json
import logging

import pytest
import torch
from trainer_utils import (
    IGNORE,
    assert_params_equal,
    dataset,
    expected_counts,
    params_snapshot,
    rows,
    tiny_llama,
)
from transformers import DataCollatorForSeq2Seq, Trainer, TrainerCallback, TrainingArguments

from mask_monitor import MaskMonitorAbort, MaskMonitorCallback, Sink

trl = pytest.importorskip("trl")
pytestmark = pytest.mark.slow


class Recorder(Sink):
    """A user sink that keeps every step report (what a custom sink sees)."""

    name = "recorder"

    def __init__(self):
        self.steps = []
        self.findings = []
        self.windows = []

    def on_step(self, report, findings):
        self.steps.append(report)
        self.findings.extend(findings)

    def on_log(self, window):
        self.windows.append(window)


def sft(tokenizer, examples, tmp_path, *, callbacks, epochs=1, bs=2, accum=1, packing=False, max_steps=-1,
        model=None, eval_examples=None, **cfg):
    config = trl.SFTConfig(
        output_dir=str(tmp_path / "out"),
        per_device_train_batch_size=bs,
        gradient_accumulation_steps=accum,
        num_train_epochs=epochs,
        max_steps=max_steps,
        learning_rate=1e-2,
        logging_steps=1,
        report_to="none",
        use_cpu=True,
        packing=packing,
        dataloader_num_workers=0,
        disable_tqdm=True,
        seed=0,
        # max_length would make TRL drop fully masked examples before training
        **{"max_length": None, "save_strategy": "no", **cfg},
    )
    model = model or tiny_llama(len(tokenizer))
    trainer = trl.SFTTrainer(
        model=model, args=config, train_dataset=dataset(examples), processing_class=tokenizer, callbacks=callbacks,
        eval_dataset=dataset(eval_examples) if eval_examples else None,
    )
    return trainer, model


def pick(summary, keys):
    return {k: summary[k] for k in keys}


COUNT_KEYS = ("sequences", "target_tokens", "supervised_tokens", "masked_tokens", "fully_masked_sequences",
              "unmasked_sequences")


# --------------------------------------------------------------------------- 1. healthy
def test_healthy_assistant_only_counts_match_independent_count(zephyr_tokenizer, tmp_path, caplog):
    examples = rows(zephyr_tokenizer, "assistant")
    rec = Recorder()
    cb = MaskMonitorCallback(sinks=[rec])
    trainer, _ = sft(zephyr_tokenizer, examples, tmp_path, callbacks=[cb], epochs=2)
    out = trainer.train()
    s = cb.summary()
    exp = expected_counts(examples)
    assert pick(s, COUNT_KEYS) == {k: 2 * v for k, v in exp.items()}  # two epochs
    assert s["batches"] == s["micro_batches"] == 8 and s["steps"] == 8 == out.global_step
    assert s["all_masked_batches"] == s["zero_loss_batches"] == s["non_finite_loss_batches"] == 0
    assert s["aborted"] is None
    assert s["masked_ratio"] == pytest.approx(exp["masked_tokens"] / exp["target_tokens"])
    assert [r.step for r in rec.steps] == list(range(1, 9))
    assert s["loss_batches"] == 8
    assert not [f for f in rec.findings if f.check != "unmasked"]
    assert "prompt_leakage" not in s["findings"]


# --------------------------------------------------------------------------- 2. the classic failure
def test_all_labels_masked_aborts_at_first_step_weights_untouched(zephyr_tokenizer, tmp_path):
    examples = rows(zephyr_tokenizer, "all")
    cb = MaskMonitorCallback()
    trainer, model = sft(zephyr_tokenizer, examples, tmp_path, callbacks=[cb], save_strategy="steps", save_steps=1)
    before = params_snapshot(model)
    with pytest.raises(MaskMonitorAbort) as info:
        trainer.train()
    err = info.value
    assert err.reason == "all_masked" and err.step == 1 and err.rank == 0
    assert trainer.state.global_step == 0
    assert_params_equal(before, params_snapshot(model))
    assert "response/assistant template was not found" in str(err)
    assert "every one of them -100" in str(err)
    ev = json.loads(open(err.evidence_path).read())
    assert err.evidence_path == str(tmp_path / "out" / "mask_monitor" / "abort-rank0.json")
    assert ev["reason"] == "all_masked" and ev["step"] == 1 and ev["rank"] == 0
    # the first micro-batch's rows, exactly as trained (SFTTrainer pads right with the pad token)
    sample = ev["offending_micro_batch"]
    first = [e for e in examples if e["input_ids"] == sample["input_ids"][0][: len(e["input_ids"])]]
    assert first, "evidence rows are not rows of the dataset"
    assert all(t == IGNORE for row in sample["labels"] for t in row)
    assert sample["decoded"][0].startswith("<|user|>")
    step_total = ev["step_total"]
    assert step_total["supervised_tokens"] == 0 and step_total["micro_batches"] == 1
    assert cb.summary()["aborted"] == "all_masked"
    assert not (tmp_path / "out" / "checkpoint-1").exists()


# --------------------------------------------------------------------------- 3. masking disabled
def test_masking_disabled_warns_and_counts(zephyr_tokenizer, tmp_path, caplog):
    examples = rows(zephyr_tokenizer, "none")
    rec = Recorder()
    cb = MaskMonitorCallback(sinks=[rec], template=None)
    trainer, _ = sft(zephyr_tokenizer, examples, tmp_path, callbacks=[cb])
    out = trainer.train()
    assert out.global_step == 4
    s = cb.summary()
    exp = expected_counts(examples)
    assert pick(s, COUNT_KEYS) == exp
    assert s["masked_tokens"] == 0 and s["unmasked_sequences"] == 8 and s["unmasked_batches"] == 4
    assert s["findings"]["unmasked"] == 4
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert sum("[unmasked]" in w for w in warnings) == 1  # logged once, then counted
    assert "prompt included" in next(w for w in warnings if "[unmasked]" in w)


# --------------------------------------------------------------------------- 4. truncation
def test_truncated_sequences_counted_not_aborted(zephyr_tokenizer, tmp_path, caplog):
    full = rows(zephyr_tokenizer, "assistant")
    cut = 18  # shorter than every prompt of the first two conversations
    examples = [{"input_ids": e["input_ids"][:cut], "labels": e["labels"][:cut]} if i < 2 else e
                for i, e in enumerate(full)]
    exp = expected_counts(examples)
    assert exp["fully_masked_sequences"] == 2
    cb = MaskMonitorCallback()
    trainer, _ = sft(zephyr_tokenizer, examples, tmp_path, callbacks=[cb], bs=4)
    trainer.train()
    s = cb.summary()
    assert pick(s, COUNT_KEYS) == exp
    assert s["aborted"] is None and s["all_masked_batches"] == 0
    assert s["findings"]["fully_masked_sequences"] >= 1
    assert any("[fully_masked_sequences]" in r.getMessage() for r in caplog.records)


# --------------------------------------------------------------------------- 5. gradient accumulation
def _accum_examples(tokenizer, n_masked):
    ex = rows(tokenizer, "assistant", n=4)
    for i in range(n_masked):
        ex[i] = {"input_ids": ex[i]["input_ids"], "labels": [IGNORE] * len(ex[i]["labels"])}
    return ex


def test_accumulation_one_dead_micro_batch_warns_and_trains(zephyr_tokenizer, tmp_path, caplog):
    examples = _accum_examples(zephyr_tokenizer, 1)
    rec = Recorder()
    cb = MaskMonitorCallback(sinks=[rec])
    trainer, model = sft(zephyr_tokenizer, examples, tmp_path, callbacks=[cb], bs=1, accum=4)
    before = params_snapshot(model)
    out = trainer.train()
    assert out.global_step == 1
    r = rec.steps[0]
    assert r.total.micro_batches == 4 and r.total.all_masked_batches == 1
    assert sorted(m.supervised_tokens == 0 for m in r.micro_batches) == [False, False, False, True]
    assert cb.summary()["all_masked_batches"] == 1 and cb.summary()["aborted"] is None
    assert any("[all_masked_micro_batch]" in m.getMessage() for m in caplog.records)
    with pytest.raises(AssertionError):
        assert_params_equal(before, params_snapshot(model))  # the step was applied


def test_accumulation_one_dead_micro_batch_strict_aborts_before_update(zephyr_tokenizer, tmp_path):
    examples = _accum_examples(zephyr_tokenizer, 1)
    cb = MaskMonitorCallback(strict=True)
    trainer, model = sft(zephyr_tokenizer, examples, tmp_path, callbacks=[cb], bs=1, accum=4)
    before = params_snapshot(model)
    with pytest.raises(MaskMonitorAbort) as info:
        trainer.train()
    assert info.value.reason == "all_masked_micro_batch" and info.value.step == 1
    assert info.value.numbers["all_masked_batches"] == 1 and info.value.numbers["micro_batches"] == 4
    assert_params_equal(before, params_snapshot(model))


def test_accumulation_all_four_dead_aborts_by_default(zephyr_tokenizer, tmp_path):
    examples = _accum_examples(zephyr_tokenizer, 4)
    cb = MaskMonitorCallback()
    trainer, model = sft(zephyr_tokenizer, examples, tmp_path, callbacks=[cb], bs=1, accum=4)
    before = params_snapshot(model)
    with pytest.raises(MaskMonitorAbort) as info:
        trainer.train()
    assert info.value.reason == "all_masked" and info.value.numbers["micro_batches"] == 4
    assert_params_equal(before, params_snapshot(model))


def test_packing_counts_fully_masked_document(zephyr_tokenizer, tmp_path):
    examples = rows(zephyr_tokenizer, "assistant", n=4)
    examples[1] = {"input_ids": examples[1]["input_ids"], "labels": [IGNORE] * len(examples[1]["labels"])}
    # TRL < 1 packs only input_ids / completion_mask (a labels column is dropped): give both
    examples = [{**e, "completion_mask": [int(t != IGNORE) for t in e["labels"]]} for e in examples]
    rec = Recorder()
    cb = MaskMonitorCallback(sinks=[rec])
    trainer, _ = sft(zephyr_tokenizer, examples, tmp_path, callbacks=[cb], bs=1, packing=True, max_length=512,
                     completion_only_loss=True)
    trainer.train()
    s = cb.summary()
    # padding-free packing: documents restart position_ids at 0; the first token of each document is no target
    exp = expected_counts(examples)
    assert s["sequences"] == 4 and s["fully_masked_sequences"] == 1
    assert s["target_tokens"] == exp["target_tokens"]
    assert s["supervised_tokens"] == exp["supervised_tokens"]
    assert s["aborted"] is None


# --------------------------------------------------------------------------- 6. NaN at step 3
class PoisonAt(TrainerCallback):
    """Sets a weight to NaN when step `at` begins (optionally on one rank only)."""

    def __init__(self, at: int, snapshots: dict):
        self.at = at
        self.snapshots = snapshots

    def on_step_end(self, args, state, control, model=None, **kw):
        self.snapshots[state.global_step] = params_snapshot(model)

    def on_step_begin(self, args, state, control, model=None, **kw):
        if state.global_step + 1 == self.at:
            with torch.no_grad():
                model.model.norm.weight.fill_(float("nan"))


def test_nan_loss_at_step_3_aborts_before_update(zephyr_tokenizer, tmp_path):
    snaps = {}
    examples = rows(zephyr_tokenizer, "assistant")
    cb = MaskMonitorCallback()
    trainer, model = sft(zephyr_tokenizer, examples, tmp_path, callbacks=[PoisonAt(3, snaps), cb], bs=1)
    with pytest.raises(MaskMonitorAbort) as info:
        trainer.train()
    assert info.value.reason == "non_finite_loss" and info.value.step == 3
    assert trainer.state.global_step == 2
    assert sorted(snaps) == [1, 2]
    assert_params_equal(snaps[2], params_snapshot(model), skip=("model.norm.weight",))
    assert cb.summary()["non_finite_loss_batches"] == 1


# --------------------------------------------------------------------------- zero loss
def test_zero_loss_with_supervised_targets_aborts(zephyr_tokenizer, tmp_path):
    examples = rows(zephyr_tokenizer, "assistant", n=4)

    class ZeroLossTrainer(trl.SFTTrainer):
        def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
            loss = super().compute_loss(model, inputs, return_outputs, num_items_in_batch)
            return loss * 0.0

    cb = MaskMonitorCallback()
    config = trl.SFTConfig(output_dir=str(tmp_path), per_device_train_batch_size=2, report_to="none",
                           use_cpu=True, save_strategy="no", disable_tqdm=True, max_steps=2)
    model = tiny_llama(len(zephyr_tokenizer))

    # A broken loss: the model's own forward reports 0 while targets are supervised.
    def zero_hook(module, args, kwargs, output):
        output.loss = output.loss * 0.0
        return output

    model.register_forward_hook(zero_hook, with_kwargs=True)
    trainer = ZeroLossTrainer(model=model, args=config, train_dataset=dataset(examples),
                              processing_class=zephyr_tokenizer, callbacks=[cb])
    with pytest.raises(MaskMonitorAbort) as info:
        trainer.train()
    assert info.value.reason == "zero_loss" and info.value.step == 1
    assert info.value.numbers["zero_loss_batches"] == 1


# --------------------------------------------------------------------------- plain Trainer agreement
def test_plain_trainer_supervised_count_equals_num_items_in_batch(zephyr_tokenizer, tmp_path):
    examples = rows(zephyr_tokenizer, "assistant")
    seen = []

    class CountingTrainer(Trainer):
        def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
            if len(seen) == 0 or seen[-1][0] != self.state.global_step:
                seen.append((self.state.global_step, int(num_items_in_batch)))
            return super().compute_loss(model, inputs, return_outputs, num_items_in_batch)

    rec = Recorder()
    cb = MaskMonitorCallback(sinks=[rec])
    args = TrainingArguments(output_dir=str(tmp_path), per_device_train_batch_size=2, gradient_accumulation_steps=2,
                             num_train_epochs=1, report_to="none", use_cpu=True, save_strategy="no",
                             disable_tqdm=True, logging_steps=1, remove_unused_columns=False)
    model = tiny_llama(len(zephyr_tokenizer))
    collator = DataCollatorForSeq2Seq(zephyr_tokenizer, padding=True, label_pad_token_id=IGNORE)
    trainer = CountingTrainer(model=model, args=args, train_dataset=dataset(examples), data_collator=collator,
                              callbacks=[cb])
    trainer.train()
    assert [int(r.total.supervised_tokens) for r in rec.steps] == [n for _, n in seen]
    assert len(seen) == 2
    assert cb.summary()["supervised_tokens"] == expected_counts(examples)["supervised_tokens"]


def test_plain_trainer_all_masked_nan_is_caught_as_all_masked(zephyr_tokenizer, tmp_path):
    examples = rows(zephyr_tokenizer, "all", n=4)
    cb = MaskMonitorCallback()
    args = TrainingArguments(output_dir=str(tmp_path), per_device_train_batch_size=2, report_to="none",
                             use_cpu=True, save_strategy="no", disable_tqdm=True, remove_unused_columns=False)
    model = tiny_llama(len(zephyr_tokenizer))
    before = params_snapshot(model)
    collator = DataCollatorForSeq2Seq(zephyr_tokenizer, padding=True, label_pad_token_id=IGNORE)
    trainer = Trainer(model=model, args=args, train_dataset=dataset(examples), data_collator=collator, callbacks=[cb])
    with pytest.raises(MaskMonitorAbort) as info:
        trainer.train()
    assert info.value.reason == "all_masked"  # NaN (0/0) is also flagged, all_masked is the cause
    assert cb.last_report.total.non_finite_loss_batches == 1
    assert_params_equal(before, params_snapshot(model))


def test_label_smoothing_plain_trainer_is_audited(zephyr_tokenizer, tmp_path):
    """Label smoothing pops the labels before the model's forward; the monitor reads them where the Trainer
    computes the loss: exact counts on a healthy run, and an all -100 run stops at step 1."""

    def run(examples, out):
        cb = MaskMonitorCallback()
        args = TrainingArguments(output_dir=str(out), per_device_train_batch_size=2, report_to="none",
                                 use_cpu=True, save_strategy="no", disable_tqdm=True, remove_unused_columns=False,
                                 label_smoothing_factor=0.1, num_train_epochs=1)
        collator = DataCollatorForSeq2Seq(zephyr_tokenizer, padding=True, label_pad_token_id=IGNORE)
        trainer = Trainer(model=tiny_llama(len(zephyr_tokenizer)), args=args, train_dataset=dataset(examples),
                          data_collator=collator, callbacks=[cb])
        return cb, trainer

    examples = rows(zephyr_tokenizer, "assistant", n=4)
    cb, trainer = run(examples, tmp_path / "ok")
    assert trainer.train().global_step == 2
    s, exp = cb.summary(), expected_counts(examples)
    assert {k: s[k] for k in exp} == exp and s["unaudited_batches"] == 0
    cb, trainer = run(rows(zephyr_tokenizer, "all", n=4), tmp_path / "dead")
    with pytest.raises(MaskMonitorAbort) as err:
        trainer.train()
    assert err.value.reason == "all_masked" and err.value.step == 1


# --------------------------------------------------------------------------- resume
def test_resume_from_checkpoint_continues_run_totals(zephyr_tokenizer, tmp_path):
    examples = rows(zephyr_tokenizer, "assistant")
    whole = MaskMonitorCallback()
    trainer, _ = sft(zephyr_tokenizer, examples, tmp_path / "a", callbacks=[whole])
    trainer.train()

    first = MaskMonitorCallback()
    trainer, _ = sft(zephyr_tokenizer, examples, tmp_path / "b", callbacks=[first], save_strategy="steps",
                     save_steps=2)
    trainer.train()
    assert first.summary()["steps"] == 4
    resumed = MaskMonitorCallback()
    trainer, _ = sft(zephyr_tokenizer, examples, tmp_path / "b", callbacks=[resumed], save_strategy="steps",
                     save_steps=2)
    trainer.train(resume_from_checkpoint=str(tmp_path / "b" / "out" / "checkpoint-2"))
    got, exp = resumed.summary(), whole.summary()
    assert got["steps"] == 4 and got["last_step"] == 4
    assert pick(got, COUNT_KEYS) == pick(exp, COUNT_KEYS)
