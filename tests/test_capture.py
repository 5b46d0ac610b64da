"""How micro-batches reach the auditor (mask_monitor.capture), on real Trainers: where the Trainer computes the
loss, the forward-hook fallback, orphan forwards of a custom training_step, and what cannot be read."""

from __future__ import annotations

import pytest
import torch
from trainer_utils import IGNORE, assert_params_equal, dataset, expected_counts, params_snapshot, rows, tiny_llama
from transformers import DataCollatorForSeq2Seq, Trainer, TrainingArguments
from transformers.modeling_outputs import CausalLMOutput

from mask_monitor import MaskMonitorAbort, MaskMonitorCallback
from mask_monitor.capture import loss_of_output, read_batch

COUNTS = ("sequences", "target_tokens", "supervised_tokens", "masked_tokens", "fully_masked_sequences")


def test_read_batch_keeps_what_it_can_and_names_the_rest():
    labels = torch.zeros(2, 5, dtype=torch.long)
    mb = read_batch({"labels": labels, "attention_mask": torch.ones(2, 1, 5, 5), "position_ids": torch.zeros(2, 5),
                     "input_ids": torch.ones(2, 6, dtype=torch.long)})
    assert mb.labels is labels and mb.attention_mask is None and mb.input_ids is None
    assert mb.position_ids is not None
    assert mb.unread == ["attention_mask: a 4-D tensor, not (batch, seq) like the labels",
                         "input_ids: another shape than the labels"]
    mb = read_batch({"labels": [[1, 2]], "input_ids": torch.ones(1, 2)})
    assert mb.labels is None and mb.unread == ["labels: a list, not a tensor"]
    mb = read_batch({"labels": torch.ones(2, 3), "attention_mask": torch.ones(2, 3)})
    assert mb.labels is None and mb.unread == ["labels: a 2-D torch.float32 tensor, not (batch, seq) integer labels"]
    # encoder-decoder: the encoder's mask is another sequence; only the decoder's counts
    mb = read_batch({"labels": labels, "attention_mask": torch.ones(2, 9), "decoder_attention_mask": torch.ones(2, 5)},
                    encoder_decoder=True)
    assert not mb.causal and mb.attention_mask is not None and mb.attention_mask.shape == (2, 5) and mb.unread == []


def test_loss_of_output_reads_it_as_the_trainer_does():
    loss = torch.tensor(1.5)
    assert loss_of_output({"loss": loss}) == loss
    assert loss_of_output(CausalLMOutput(loss=loss, logits=torch.zeros(1))) == loss
    assert loss_of_output((loss, torch.zeros(2, 3))) == loss
    assert loss_of_output((torch.tensor([1.0, float("nan")]), torch.zeros(2, 3))).isnan().any()  # per-sample kept
    assert loss_of_output((torch.zeros(2, 3),)) is None  # logits first: no loss (no labels given)


def _args(tmp_path, **kw):
    return TrainingArguments(output_dir=str(tmp_path), per_device_train_batch_size=2, report_to="none", use_cpu=True,
                             save_strategy="no", disable_tqdm=True, remove_unused_columns=False, num_train_epochs=1,
                             **kw)


class OwnStep(Trainer):
    """A custom training_step that runs the model itself and never calls compute_loss."""

    def training_step(self, model, inputs, num_items_in_batch=None):
        model.train()
        inputs = self._prepare_inputs(inputs)
        loss = model(**inputs).loss
        self.accelerator.backward(loss)
        return loss.detach()


def test_custom_training_step_without_compute_loss_is_still_audited(zephyr_tokenizer, tmp_path):
    collator = DataCollatorForSeq2Seq(zephyr_tokenizer, padding=True, label_pad_token_id=IGNORE)
    examples = rows(zephyr_tokenizer, "assistant", n=4)
    cb = MaskMonitorCallback()
    trainer = OwnStep(model=tiny_llama(len(zephyr_tokenizer)), args=_args(tmp_path / "ok"),
                      train_dataset=dataset(examples), data_collator=collator, callbacks=[cb])
    trainer.train()
    s, exp = cb.summary(), expected_counts(examples)
    assert {k: s[k] for k in COUNTS} == {k: exp[k] for k in COUNTS} and s["micro_batches"] == 2

    cb = MaskMonitorCallback()
    model = tiny_llama(len(zephyr_tokenizer))
    before = params_snapshot(model)
    dead = dataset(rows(zephyr_tokenizer, "all", 4))
    trainer = OwnStep(model=model, args=_args(tmp_path / "dead"), train_dataset=dead, data_collator=collator,
                      callbacks=[cb])
    with pytest.raises(MaskMonitorAbort) as err:
        trainer.train()
    assert err.value.reason == "all_masked" and err.value.step == 1
    assert_params_equal(before, params_snapshot(model))


def test_compute_loss_is_restored_after_train(zephyr_tokenizer, tmp_path):
    collator = DataCollatorForSeq2Seq(zephyr_tokenizer, padding=True, label_pad_token_id=IGNORE)
    cb = MaskMonitorCallback()
    trainer = Trainer(model=tiny_llama(len(zephyr_tokenizer)), args=_args(tmp_path),
                      train_dataset=dataset(rows(zephyr_tokenizer, "assistant", n=2)), data_collator=collator,
                      callbacks=[cb])
    trainer.train()
    assert "compute_loss" not in trainer.__dict__  # the class's method again
    trainer.train()  # a second train() installs and removes it again, and reports its own run
    assert cb.summary()["steps"] == 1 and "compute_loss" not in trainer.__dict__
