"""The monitor's own faults never stop a healthy run; what it cannot see is skipped with one warning.

Eval forwards, gradient checkpointing, torch.compile, PEFT, a failing sink, odd batches.
"""

from __future__ import annotations

import logging

import pytest
import torch
from test_trainer import COUNT_KEYS, Recorder, pick, sft
from trainer_utils import dataset, expected_counts, rows, tiny_llama
from transformers import Trainer, TrainingArguments

from mask_monitor import MaskMonitorCallback, Sink

pytestmark = pytest.mark.slow


def _warnings(caplog, needle):
    return [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING and needle in r.getMessage()]


def test_eval_forwards_are_not_counted(zephyr_tokenizer, tmp_path):
    examples = rows(zephyr_tokenizer, "assistant")
    cb = MaskMonitorCallback()
    trainer, _ = sft(zephyr_tokenizer, examples, tmp_path, callbacks=[cb], eval_strategy="steps", eval_steps=1,
                     eval_examples=examples)
    trainer.train()
    assert pick(cb.summary(), COUNT_KEYS) == expected_counts(examples)
    assert cb.summary()["micro_batches"] == 4


def test_gradient_checkpointing_counts_unchanged(zephyr_tokenizer, tmp_path):
    examples = rows(zephyr_tokenizer, "assistant")
    cb = MaskMonitorCallback()
    trainer, _ = sft(zephyr_tokenizer, examples, tmp_path, callbacks=[cb], gradient_checkpointing=True)
    trainer.train()
    assert pick(cb.summary(), COUNT_KEYS) == expected_counts(examples)


def test_torch_compile_counts_unchanged(zephyr_tokenizer, tmp_path):
    examples = rows(zephyr_tokenizer, "assistant", n=4)
    cb = MaskMonitorCallback()
    trainer, _ = sft(zephyr_tokenizer, examples, tmp_path, callbacks=[cb], torch_compile=True,
                     torch_compile_backend="aot_eager")
    trainer.train()
    assert pick(cb.summary(), COUNT_KEYS) == expected_counts(examples)


def test_peft_lora_counts_unchanged(zephyr_tokenizer, tmp_path):
    peft = pytest.importorskip("peft")
    examples = rows(zephyr_tokenizer, "assistant", n=4)
    model = peft.get_peft_model(tiny_llama(len(zephyr_tokenizer)),
                                peft.LoraConfig(r=2, target_modules=["q_proj", "v_proj"], task_type="CAUSAL_LM"))
    cb = MaskMonitorCallback()
    trainer, _ = sft(zephyr_tokenizer, examples, tmp_path, callbacks=[cb], model=model)
    trainer.train()
    assert pick(cb.summary(), COUNT_KEYS) == expected_counts(examples)


def test_failing_sink_warns_once_and_training_goes_on(zephyr_tokenizer, tmp_path, caplog):
    class Broken(Sink):
        name = "broken"

        def on_step(self, report, findings):
            raise ConnectionError("gateway down")

    rec = Recorder()
    cb = MaskMonitorCallback(sinks=[Broken(), rec])
    trainer, _ = sft(zephyr_tokenizer, rows(zephyr_tokenizer, "assistant"), tmp_path, callbacks=[cb])
    assert trainer.train().global_step == 4
    assert len(rec.steps) == 4  # the other sinks keep reporting
    msgs = _warnings(caplog, "the broken sink failed")
    assert len(msgs) == 1 and "ConnectionError: gateway down" in msgs[0]


class OddModel(torch.nn.Module):
    """A model whose labels are not a (batch, seq) tensor: the monitor must skip, not crash."""

    def __init__(self):
        super().__init__()
        self.w = torch.nn.Linear(4, 1)

    def forward(self, x, labels=None):
        loss = ((self.w(x).squeeze(-1) - labels.float().mean(dim=(-1, -2))) ** 2).mean()
        return {"loss": loss}


def test_odd_labels_are_named_and_the_loss_is_still_checked(tmp_path, caplog):
    data = [{"x": [float(i), 1.0, 2.0, 3.0], "labels": [[[i, 1], [2, 3]]]} for i in range(8)]
    cb = MaskMonitorCallback()
    args = TrainingArguments(output_dir=str(tmp_path), per_device_train_batch_size=2, num_train_epochs=1,
                             report_to="none", use_cpu=True, save_strategy="no", disable_tqdm=True)
    trainer = Trainer(model=OddModel(), args=args, train_dataset=dataset(data), callbacks=[cb])
    assert trainer.train().global_step == 4
    msgs = _warnings(caplog, "cannot read labels")
    assert len(msgs) == 1 and "labels: a 4-D torch.int64 tensor" in msgs[0]
    s = cb.summary()
    # labels unreadable: masking not audited, but every micro-batch's loss was (4 steps x 1 micro-batch)
    assert (s["micro_batches"], s["unaudited_batches"], s["loss_batches"]) == (0, 4, 4)
    assert s["aborted"] is None


def test_disabled_by_environment(zephyr_tokenizer, tmp_path, monkeypatch):
    monkeypatch.setenv("MASK_MONITOR_ENABLED", "0")
    cb = MaskMonitorCallback()
    trainer, _ = sft(zephyr_tokenizer, rows(zephyr_tokenizer, "all", n=2), tmp_path, callbacks=[cb])
    trainer.train()  # the dead run is not stopped: the operator turned the monitor off
    assert cb.summary()["micro_batches"] == 0
