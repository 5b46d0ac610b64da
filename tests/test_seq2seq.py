"""Encoder-decoder models under ``Seq2SeqTrainer``: T5 and BART built from tiny configs, random ids.

Labels of an encoder-decoder model are the decoder's targets position for position (the model shifts its
decoder *inputs*, not the labels), padding is the decoder's (``decoder_attention_mask``), and the encoder's
``attention_mask`` describes another sequence. Each healthy run is counted exactly against a count made
here from the examples, with no finding at all (no false ``unmasked``: the prompt is the encoder's); an all
-100 run, a zero loss and a NaN loss each stop at step 1 with the weights untouched.
"""

from __future__ import annotations

import random

import pytest
import torch
from trainer_utils import assert_params_equal, dataset, params_snapshot
from transformers import (
    BartConfig,
    BartForConditionalGeneration,
    Seq2SeqTrainer,
    Seq2SeqTrainingArguments,
    T5Config,
    T5ForConditionalGeneration,
)

from mask_monitor import MaskMonitorAbort, MaskMonitorCallback

pytestmark = pytest.mark.slow

VOCAB = 64
IGNORE = -100
LABEL_LEN = 10  # the collator pads every batch's labels to this length


def t5() -> torch.nn.Module:
    torch.manual_seed(0)
    return T5ForConditionalGeneration(T5Config(vocab_size=VOCAB, d_model=16, d_ff=32, num_layers=1,
                                               num_decoder_layers=1, num_heads=2, d_kv=8, pad_token_id=0,
                                               decoder_start_token_id=0, eos_token_id=1))


def bart() -> torch.nn.Module:
    torch.manual_seed(0)
    return BartForConditionalGeneration(BartConfig(vocab_size=VOCAB, d_model=16, encoder_layers=1, decoder_layers=1,
                                                   encoder_attention_heads=2, decoder_attention_heads=2,
                                                   encoder_ffn_dim=32, decoder_ffn_dim=32, max_position_embeddings=64,
                                                   pad_token_id=1, bos_token_id=0, eos_token_id=2,
                                                   decoder_start_token_id=2))


MODELS = {"t5": t5, "bart": bart}


def examples(*, ragged: bool, masked_prefix: bool = False, all_masked: bool = False, n: int = 8) -> list[dict]:
    """Source ids of 5..9 tokens; targets of 9 tokens (``ragged``: 4..9); ``masked_prefix``: the first two
    targets of every other example are -100 (a forced prefix the loss must not learn)."""
    rng = random.Random(7)
    out = []
    for i in range(n):
        src = [rng.randrange(3, VOCAB) for _ in range(5 + i % 5)]
        tgt = [rng.randrange(3, VOCAB) for _ in range(4 + i % 6 if ragged else 9)]
        if masked_prefix and i % 2:
            tgt[:2] = [IGNORE, IGNORE]
        if all_masked:
            tgt = [IGNORE] * len(tgt)
        out.append({"input_ids": src, "labels": tgt})
    return out


class Collate:
    """Pads sources to the batch's longest (pad id, attention_mask) and targets to LABEL_LEN with
    ``label_pad``; ``decoder_mask`` adds ``decoder_attention_mask`` (1 on real targets); ``pad_labels=False``
    leaves the targets as they are (every example's targets have the same length)."""

    def __init__(self, pad_id: int, *, label_pad: int = IGNORE, decoder_mask: bool = False, pad_labels: bool = True):
        self.pad_id, self.label_pad, self.decoder_mask, self.pad_labels = pad_id, label_pad, decoder_mask, pad_labels

    def __call__(self, feats: list[dict]) -> dict[str, torch.Tensor]:
        n = max(len(f["input_ids"]) for f in feats)
        width = LABEL_LEN if self.pad_labels else max(len(f["labels"]) for f in feats)
        batch = {
            "input_ids": torch.tensor([f["input_ids"] + [self.pad_id] * (n - len(f["input_ids"])) for f in feats]),
            "attention_mask": torch.tensor([[1] * len(f["input_ids"]) + [0] * (n - len(f["input_ids"]))
                                            for f in feats]),
            "labels": torch.tensor([f["labels"] + [self.label_pad] * (width - len(f["labels"])) for f in feats]),
        }
        if self.decoder_mask:
            batch["decoder_attention_mask"] = torch.tensor([[1] * len(f["labels"]) + [0] * (width - len(f["labels"]))
                                                            for f in feats])
        return batch


def train(model, data, collate, tmp_path, *, hooks=(), **cb_kwargs):
    cb = MaskMonitorCallback(**cb_kwargs)
    args = Seq2SeqTrainingArguments(output_dir=str(tmp_path), per_device_train_batch_size=4, num_train_epochs=1,
                                    report_to="none", use_cpu=True, save_strategy="no", disable_tqdm=True,
                                    remove_unused_columns=False, logging_steps=1, learning_rate=1e-3)
    for hook in hooks:
        model.register_forward_hook(hook, with_kwargs=True)
    trainer = Seq2SeqTrainer(model=model, args=args, train_dataset=dataset(data), data_collator=collate,
                             callbacks=[cb])
    return trainer, cb


def expected(data: list[dict], *, padded_to: int | None) -> dict[str, int]:
    """What the decoder's loss sees, counted example by example: every target position is a slot
    (no shift); right padding is a slot only when nothing marks it (no decoder_attention_mask)."""
    target = sum(padded_to if padded_to is not None else len(e["labels"]) for e in data)
    supervised = sum(1 for e in data for t in e["labels"] if t != IGNORE)
    return {"sequences": len(data), "target_tokens": target, "supervised_tokens": supervised,
            "masked_tokens": target - supervised,
            "fully_masked_sequences": sum(1 for e in data if all(t == IGNORE for t in e["labels"]))}


# (examples, collator settings, label length each example counts for: None = its own)
CASES = {
    "equal_lengths": (dict(ragged=False), dict(pad_labels=False), None),
    "padded_no_decoder_mask": (dict(ragged=True), dict(), LABEL_LEN),
    "padded_decoder_mask": (dict(ragged=True), dict(decoder_mask=True), None),
    "masked_prefix_decoder_mask": (dict(ragged=True, masked_prefix=True), dict(decoder_mask=True), None),
}


@pytest.mark.parametrize("case", CASES)
@pytest.mark.parametrize("arch", MODELS)
def test_healthy_counts_are_exact_and_quiet(arch, case, tmp_path):
    data_kw, collate_kw, padded_to = CASES[case]
    data = examples(**data_kw)
    model = MODELS[arch]()
    trainer, cb = train(model, data, Collate(model.config.pad_token_id, **collate_kw), tmp_path)
    assert trainer.train().global_step == 2
    s = cb.summary()
    exp = expected(data, padded_to=padded_to)
    assert {k: s[k] for k in exp} == exp
    if case == "equal_lengths":  # the reported case: 8 x 9 targets, every one supervised (not 66 of 72)
        assert (s["supervised_tokens"], s["target_tokens"]) == (72, 72)
    assert s["findings"] == {} and s["aborted"] is None  # no false `unmasked`: the prompt is the encoder's
    assert s["unmasked_sequences"] == 0 and s["unaudited_batches"] == 0 and s["unread_fields"] == {}
    assert s["micro_batches"] == s["loss_batches"] == 2


def test_labels_padded_with_the_pad_id_are_supervised_padding(tmp_path, caplog):
    """The classic bug: targets padded with the pad id (not -100) while the decoder mask marks them as
    padding. The loss trains on them; the monitor counts exactly those positions."""
    data = examples(ragged=True)
    model = t5()
    trainer, cb = train(model, data, Collate(0, label_pad=0, decoder_mask=True), tmp_path)
    trainer.train()
    s = cb.summary()
    pads = sum(LABEL_LEN - len(e["labels"]) for e in data)
    assert pads > 0
    assert s["supervised_padding_tokens"] == pads
    assert s["supervised_tokens"] == sum(len(e["labels"]) for e in data) + pads
    assert s["findings"] == {"supervised_padding": 2} and s["aborted"] is None


def _zero(module, args, kwargs, output):
    output.loss = output.loss * 0.0
    return output


def _nan(module, args, kwargs, output):
    output.loss = output.loss * float("nan")
    return output


DEAD = {
    "all_masked": (dict(ragged=True, all_masked=True), ()),
    "zero_loss": (dict(ragged=True), (_zero,)),
    "non_finite_loss": (dict(ragged=True), (_nan,)),
}


@pytest.mark.parametrize("reason", DEAD)
@pytest.mark.parametrize("arch", MODELS)
def test_dead_runs_stop_at_step_1(arch, reason, tmp_path):
    data_kw, hooks = DEAD[reason]
    model = MODELS[arch]()
    before = params_snapshot(model)
    trainer, cb = train(model, examples(**data_kw), Collate(model.config.pad_token_id, decoder_mask=True), tmp_path,
                        hooks=hooks)
    with pytest.raises(MaskMonitorAbort) as info:
        trainer.train()
    assert (info.value.reason, info.value.step) == (reason, 1)
    assert trainer.state.global_step == 0
    assert_params_equal(before, params_snapshot(model))
    if reason == "zero_loss":
        assert "from the first step audited" in str(info.value) and "broken loss" in str(info.value)
    if reason == "all_masked":  # 4 rows' targets, every one -100 (T5's mean over no target is NaN: also seen)
        first = examples(**data_kw)
        assert cb.summary()["supervised_tokens"] == 0 and cb.summary()["target_tokens"] > 0
        assert cb.summary()["target_tokens"] <= sum(len(e["labels"]) for e in first)
