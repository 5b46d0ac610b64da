"""Setups users run every day, each on a real trainer with its truth counted here, independently.

TRL's defaults (rows dropped while the dataset is prepared), plain-text and pre-packed data under a
chat-template tokenizer, a 4-D attention mask, a model returning a tuple, per-sample loss vectors, labels the
model never receives (``compute_loss_func``, a ``compute_loss`` that pops them) or that cannot be found at
all, and a loss that reaches exactly 0 (converged, or broken).
"""

from __future__ import annotations

import json
import logging
import random

import pytest
import torch
import torch.nn.functional as F
from test_trainer import COUNT_KEYS, pick
from trainer_utils import (
    CONVERSATIONS,
    IGNORE,
    assert_params_equal,
    dataset,
    expected_counts,
    params_snapshot,
    rows,
    tiny_llama,
)
from transformers import DataCollatorForSeq2Seq, Trainer, TrainingArguments

from mask_monitor import MaskAuditor, MaskMonitorAbort, MaskMonitorCallback, Policy, assistant_token_mask

trl = pytest.importorskip("trl")
pytestmark = pytest.mark.slow

TRL_1 = int(trl.__version__.split(".")[0]) >= 1
needs_trl_1 = pytest.mark.skipif(not TRL_1, reason="TRL < 1 does not drop fully masked rows while preparing data")


def _messages(caplog, needle: str, level: int = logging.INFO) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.levelno >= level and needle in r.getMessage()]


def sft_defaults(tokenizer, data, tmp_path, cb, **cfg):
    """SFTTrainer on TRL's own defaults (max_length, no packing...), CPU, no reports."""
    config = trl.SFTConfig(output_dir=str(tmp_path), per_device_train_batch_size=2, num_train_epochs=1,
                           report_to="none", use_cpu=True, save_strategy="no", disable_tqdm=True, logging_steps=1,
                           seed=0, **cfg)
    return trl.SFTTrainer(model=tiny_llama(len(tokenizer)), args=config, train_dataset=dataset(data),
                          processing_class=tokenizer, callbacks=[cb])


def plain_trainer(model, data, tmp_path, cb, *, collator, trainer_cls=Trainer, bs=2, **kw):
    settings = dict(output_dir=str(tmp_path), per_device_train_batch_size=bs, num_train_epochs=1, report_to="none",
                    use_cpu=True, save_strategy="no", disable_tqdm=True, logging_steps=1, remove_unused_columns=False,
                    seed=0)
    args = TrainingArguments(**{**settings, **kw.pop("args", {})})
    return trainer_cls(model=model, args=args, train_dataset=dataset(data), data_collator=collator, callbacks=[cb],
                       **kw)


# ============================================================================ TRL's defaults
@needs_trl_1
def test_trl_defaults_every_row_masked_stops_at_sfttrainer_with_evidence(zephyr_tokenizer, tmp_path):
    data = rows(zephyr_tokenizer, "all")
    assert all(set(e["labels"]) == {IGNORE} for e in data)  # the truth: 8 of 8 rows have no target
    cb = MaskMonitorCallback()
    with pytest.raises(MaskMonitorAbort) as info:
        sft_defaults(zephyr_tokenizer, data, tmp_path, cb)  # stops here, before train() is even called
    err = info.value
    assert (err.reason, err.step) == ("all_masked", 0)
    assert "all 8 examples were dropped as fully masked (8 with no supervised label at all)" in str(err)
    assert "num_samples=0" in str(err)
    ev = json.loads(open(err.evidence_path).read())
    assert ev["reason"] == "all_masked" and ev["step"] == 0
    assert ev["step_total"]["dropped_sequences"] == 8 and ev["step_total"]["sequences"] == 0
    assert ev["offending_micro_batch"]["labels"][0] == data[0]["labels"]
    s = cb.summary()
    assert s["aborted"] == "all_masked" and s["dropped_sequences"] == 8
    assert s["dropped_reasons"] == {"no_response": 8}


@needs_trl_1
def test_trl_defaults_half_the_rows_masked_counted_warned_and_trained(zephyr_tokenizer, tmp_path, caplog):
    data = rows(zephyr_tokenizer, "assistant")
    for i in (1, 3, 4, 6):
        data[i] = {"input_ids": data[i]["input_ids"], "labels": [IGNORE] * len(data[i]["labels"])}
    kept = [e for e in data if any(t != IGNORE for t in e["labels"])]
    cb = MaskMonitorCallback()
    trainer = sft_defaults(zephyr_tokenizer, data, tmp_path, cb)
    warned = _messages(caplog, "[dropped_sequences]", logging.WARNING)
    assert len(warned) == 1
    assert "4 of 8 examples (50.0%, threshold 1.0%) were dropped as fully masked" in warned[0]
    assert "(4 with no supervised label at all)" in warned[0]
    assert trainer.train().global_step == 2
    s = cb.summary()
    assert s["dropped_sequences"] == 4 and s["dropped_reasons"] == {"no_response": 4}
    assert pick(s, COUNT_KEYS) == expected_counts(kept)  # the rows that do reach training, exactly
    assert s["aborted"] is None


@needs_trl_1
def test_trl_defaults_rows_truncated_away_by_max_length(zephyr_tokenizer, tmp_path, caplog):
    data = rows(zephyr_tokenizer, "assistant")
    prompts = sorted(e["labels"].index(next(t for t in e["labels"] if t != IGNORE)) for e in data)
    max_length = prompts[len(prompts) // 2]  # as long as the median prompt: the longer half loses its answer
    # the truth, row by row: which rows keep no supervised label after TRL's truncation to max_length
    gone = [i for i, e in enumerate(data) if all(t == IGNORE for t in e["labels"][:max_length])]
    assert 0 < len(gone) < len(data)
    cb = MaskMonitorCallback()
    trainer = sft_defaults(zephyr_tokenizer, data, tmp_path, cb, max_length=max_length)
    trainer.train()
    s = cb.summary()
    assert s["dropped_sequences"] == len(gone)
    assert s["dropped_reasons"] == {"truncated_away": len(gone)}
    kept = [{"input_ids": e["input_ids"][:max_length], "labels": e["labels"][:max_length]}
            for i, e in enumerate(data) if i not in gone]
    assert pick(s, COUNT_KEYS) == expected_counts(kept)
    assert "whose supervised labels max_length cut off" in _messages(caplog, "[dropped_sequences]")[0]


# ============================================================================ not a chat render
def _trl_dataset_supervised(trainer) -> tuple[int, int]:
    """(sequences, supervised targets) of what TRL prepared, read from its own columns."""
    n = sup = 0
    for row in trainer.train_dataset:
        n += 1
        if row.get("labels") is not None:
            sup += sum(1 for t in row["labels"][1:] if t != IGNORE)
        elif row.get("completion_mask") is not None:
            sup += sum(row["completion_mask"][1:])
        else:
            sup += len(row["input_ids"]) - 1
    return n, sup


def test_plain_text_prompt_completion_is_not_read_as_prompt_leakage(zephyr_tokenizer, tmp_path, caplog):
    data = [{"prompt": q, "completion": " " + a} for q, a in CONVERSATIONS]
    cb = MaskMonitorCallback(prompt_leakage="abort")  # a healthy run must still finish
    trainer = sft_defaults(zephyr_tokenizer, data, tmp_path, cb)
    assert trainer.train().global_step == 4
    s = cb.summary()
    n, supervised = _trl_dataset_supervised(trainer)
    assert (s["sequences"], s["supervised_tokens"]) == (n, supervised) == (8, supervised)
    assert s["template_family"] == "zephyr"
    assert s["untemplated_sequences"] == 8 and s["audited_supervised_tokens"] == 0
    assert s["prompt_leakage_tokens"] == 0 and s["prompt_leakage_ratio"] is None
    assert s["aborted"] is None and "prompt_leakage" not in s["findings"]
    assert s["not_audited"]["prompt_leakage"].startswith("not audited: the zephyr chat template's markers occur in "
                                                         "none of the 8 sequences")
    assert len(_messages(caplog, "prompt leakage NOT audited")) == 1  # said once, not per step


def test_packed_random_ids_are_not_read_as_prompt_leakage(zephyr_tokenizer, tmp_path, caplog):
    from mask_monitor import RoleTagger, detect_template

    tagger = RoleTagger.from_tokenizer(zephyr_tokenizer, detect_template(zephyr_tokenizer))
    marker_ids = {t for m in (tagger.assistant, tagger.user, tagger.system, tagger.end_of_turn) for s in m.seqs
                  for t in s}
    rng = random.Random(3)
    pool = [t for t in range(1000, 3000) if t not in marker_ids]
    data = [{"input_ids": [rng.choice(pool) for _ in range(8 + i % 7)]} for i in range(12)]
    cb = MaskMonitorCallback(prompt_leakage="abort")
    trainer = sft_defaults(zephyr_tokenizer, data, tmp_path, cb, packing=True, max_length=64)
    trainer.train()
    s = cb.summary()
    # every example is one packed document (each is shorter than max_length); labels == input_ids; the first
    # token of each document is nobody's target
    assert s["sequences"] == s["untemplated_sequences"] == 12
    assert s["supervised_tokens"] == s["target_tokens"] == sum(len(e["input_ids"]) - 1 for e in data)
    assert s["audited_supervised_tokens"] == 0 and s["prompt_leakage_ratio"] is None
    assert s["aborted"] is None and "prompt_leakage" not in s["findings"]
    assert len(_messages(caplog, "prompt leakage NOT audited")) == 1


def test_chat_and_plain_rows_mixed_leakage_counts_only_the_chat_rows(zephyr_tokenizer, tmp_path):
    tok = zephyr_tokenizer
    chats = [[{"role": "user", "content": q}, {"role": "assistant", "content": a}] for q, a in CONVERSATIONS[:4]]
    data, leaked, audited = [], 0, 0
    for m in chats:  # masking disabled (labels == input_ids): the prompt part of each chat row leaks
        ids = list(tok.apply_chat_template(m, tokenize=True, return_dict=False))
        answer = assistant_token_mask(tok, m)
        header = (len(tok.apply_chat_template(m[:-1], add_generation_prompt=True, tokenize=True, return_dict=False))
                  - len(tok.apply_chat_template(m[:-1], tokenize=True, return_dict=False)))
        # what the turn writes after its end of turn (zephyr's "\n" after </s>) is the answer's tail, not prompt
        tail = len(ids) - 1 - max(i for i, a in enumerate(answer) if a)
        audited += len(ids) - 1
        leaked += (len(ids) - 1) - sum(answer[1:]) - header - tail
        data.append({"input_ids": ids, "labels": ids})
    plain = [tok(f"{q} {a}")["input_ids"] for q, a in CONVERSATIONS[4:]]
    data += [{"input_ids": ids, "labels": ids} for ids in plain]
    random.Random(0).shuffle(data)
    cb = MaskMonitorCallback()
    sft_defaults(tok, data, tmp_path, cb).train()
    s = cb.summary()
    assert s["untemplated_sequences"] == 4
    assert (s["audited_supervised_tokens"], s["prompt_leakage_tokens"]) == (audited, leaked)
    assert s["supervised_tokens"] == audited + sum(len(ids) - 1 for ids in plain)
    assert s["prompt_leakage_ratio"] == pytest.approx(leaked / audited)
    assert s["not_audited"]["prompt_leakage"] == ("not audited in 4 of 8 sequences: the zephyr chat template's "
                                                  "markers do not occur in them")


# ============================================================================ a 4-D attention mask
class FourD:
    """Pads like DataCollatorForSeq2Seq, then replaces the attention mask by the 4-D additive mask
    (batch, 1, query, key) a custom attention setup passes; records each batch's labels."""

    def __init__(self, tok):
        self.pad = DataCollatorForSeq2Seq(tok, padding=True, label_pad_token_id=IGNORE)
        self.labels: list[torch.Tensor] = []

    def __call__(self, feats):
        b = self.pad(feats)
        keep = b["attention_mask"].bool()
        n = keep.shape[1]
        allowed = torch.tril(torch.ones(n, n, dtype=torch.bool))[None, None] & keep[:, None, None, :]
        b["attention_mask"] = torch.zeros(allowed.shape).masked_fill(~allowed, torch.finfo(torch.float32).min)
        self.labels.append(b["labels"].clone())
        return b


def test_4d_attention_mask_counts_from_labels_and_names_the_field_once(zephyr_tokenizer, tmp_path, caplog):
    data = rows(zephyr_tokenizer, "assistant")
    collate = FourD(zephyr_tokenizer)
    cb = MaskMonitorCallback()
    trainer = plain_trainer(tiny_llama(len(zephyr_tokenizer)), data, tmp_path, cb, collator=collate)
    assert trainer.train().global_step == 4
    s = cb.summary()
    # labels alone: every shifted position is a slot (the padding the 4-D mask marks is not read)
    assert s["supervised_tokens"] == expected_counts(data)["supervised_tokens"]
    assert s["target_tokens"] == sum(lab.shape[0] * (lab.shape[1] - 1) for lab in collate.labels)
    assert s["supervised_tokens"] == sum(int((lab[:, 1:] != IGNORE).sum()) for lab in collate.labels)
    note = "attention_mask: a 4-D tensor, not (batch, seq) like the labels"
    assert s["unread_fields"] == {note: 4}
    assert len(_messages(caplog, "cannot read attention_mask", logging.WARNING)) == 1
    assert s["aborted"] is None and s["all_masked_batches"] == 0 and s["unaudited_batches"] == 0


def test_4d_attention_mask_dead_run_still_stops(zephyr_tokenizer, tmp_path):
    model = tiny_llama(len(zephyr_tokenizer))
    before = params_snapshot(model)
    trainer = plain_trainer(model, rows(zephyr_tokenizer, "all"), tmp_path, MaskMonitorCallback(),
                            collator=FourD(zephyr_tokenizer))
    with pytest.raises(MaskMonitorAbort) as info:
        trainer.train()
    assert (info.value.reason, info.value.step) == ("all_masked", 1)
    assert_params_equal(before, params_snapshot(model))


# ============================================================================ loss shapes
class TupleLlama(torch.nn.Module):
    """A model returning a plain tuple ``(loss, logits)``, as many custom models do."""

    def __init__(self, vocab: int, scale: float = 1.0):
        super().__init__()
        self.inner = tiny_llama(vocab)
        self.scale = scale

    def forward(self, input_ids=None, attention_mask=None, labels=None):
        out = self.inner(input_ids=input_ids, attention_mask=attention_mask, labels=labels)
        return (out.loss * self.scale, out.logits)


def test_tuple_model_loss_is_read_at_outputs_0(zephyr_tokenizer, tmp_path):
    data = rows(zephyr_tokenizer, "assistant")
    collate = DataCollatorForSeq2Seq(zephyr_tokenizer, padding=True, label_pad_token_id=IGNORE)
    cb = MaskMonitorCallback()
    result = plain_trainer(TupleLlama(len(zephyr_tokenizer)), data, tmp_path / "ok", cb, collator=collate).train()
    s = cb.summary()
    assert s["loss_batches"] == 4 and pick(s, COUNT_KEYS) == expected_counts(data)
    assert s["mean_loss"] == pytest.approx(result.training_loss, rel=1e-4)  # the Trainer's own mean
    model = TupleLlama(len(zephyr_tokenizer), scale=float("nan"))
    before = params_snapshot(model)
    trainer = plain_trainer(model, data, tmp_path / "nan", MaskMonitorCallback(), collator=collate)
    with pytest.raises(MaskMonitorAbort) as info:
        trainer.train()
    assert (info.value.reason, info.value.step) == ("non_finite_loss", 1)
    assert_params_equal(before, params_snapshot(model))


def per_row_loss(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Each row's mean shifted cross-entropy (0 for a row with no target), shape (batch,)."""
    t = labels[:, 1:]
    ce = F.cross_entropy(logits[:, :-1].transpose(1, 2).float(), t, ignore_index=IGNORE, reduction="none")
    return ce.sum(1) / (t != IGNORE).sum(1).clamp(min=1)


class PerRowLlama(torch.nn.Module):
    """Returns a per-sample loss vector (batch,); ``nan_row`` poisons that row's loss."""

    def __init__(self, vocab: int, nan_row: int | None = None):
        super().__init__()
        self.inner = tiny_llama(vocab)
        self.nan_row = nan_row

    def forward(self, input_ids=None, attention_mask=None, labels=None):
        logits = self.inner(input_ids=input_ids, attention_mask=attention_mask).logits
        loss = per_row_loss(logits, labels)
        if self.nan_row is not None:
            loss = loss.clone()
            loss[self.nan_row] = float("nan")
        return {"loss": loss, "logits": logits}


class MeanOfRows(Trainer):
    """The usual way to train on a per-sample loss: reduce it in compute_loss."""

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        out = model(**inputs)
        return (out["loss"].mean(), out) if return_outputs else out["loss"].mean()


def test_per_sample_loss_nan_in_row_2_stops_the_run(zephyr_tokenizer, tmp_path):
    model = PerRowLlama(len(zephyr_tokenizer), nan_row=2)
    before = params_snapshot(model)
    collate = DataCollatorForSeq2Seq(zephyr_tokenizer, padding=True, label_pad_token_id=IGNORE)
    trainer = plain_trainer(model, rows(zephyr_tokenizer, "assistant"), tmp_path, MaskMonitorCallback(),
                            collator=collate, trainer_cls=MeanOfRows, bs=4)
    with pytest.raises(MaskMonitorAbort) as info:
        trainer.train()
    assert (info.value.reason, info.value.step) == ("non_finite_loss", 1)
    assert_params_equal(before, params_snapshot(model))


def test_per_sample_loss_fully_masked_first_row_is_not_a_zero_loss(zephyr_tokenizer, tmp_path):
    data = rows(zephyr_tokenizer, "assistant", n=4)
    data[0] = {"input_ids": data[0]["input_ids"], "labels": [IGNORE] * len(data[0]["labels"])}
    cb = MaskMonitorCallback()
    collate = DataCollatorForSeq2Seq(zephyr_tokenizer, padding=True, label_pad_token_id=IGNORE)
    trainer = plain_trainer(PerRowLlama(len(zephyr_tokenizer)), data, tmp_path, cb, collator=collate,
                            trainer_cls=MeanOfRows, bs=4, args={"num_train_epochs": 2})
    assert trainer.train().global_step == 2
    s = cb.summary()
    assert s["zero_loss_batches"] == 0 and "zero_loss" not in s["findings"] and s["aborted"] is None
    assert s["fully_masked_sequences"] == 2  # row 0 in each of the 2 epochs, counted, not fatal


def test_per_sample_loss_vectors_in_a_plain_loop_are_checked_row_by_row(zephyr_tokenizer):
    """The plain-loop API receives the vector itself: every row is checked, row by row."""
    tok = zephyr_tokenizer
    data = rows(tok, "assistant", n=4)
    data[0] = {"input_ids": data[0]["input_ids"], "labels": [IGNORE] * len(data[0]["labels"])}
    batch = DataCollatorForSeq2Seq(tok, padding=True, label_pad_token_id=IGNORE)(data)
    model = tiny_llama(len(tok))
    auditor, policy = MaskAuditor(), Policy()
    with torch.no_grad():
        loss = per_row_loss(model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits,
                            batch["labels"])
    assert loss[0].item() == 0.0 and bool((loss[1:] > 0).all())  # the fully masked row's loss is 0
    auditor.update(batch["labels"], attention_mask=batch["attention_mask"], loss=loss)
    assert [f.check for f in policy.evaluate(auditor.step())] == ["fully_masked_sequences"]
    poisoned = loss.clone()
    poisoned[2] = float("nan")
    auditor.update(batch["labels"], attention_mask=batch["attention_mask"], loss=poisoned)
    report = auditor.step()
    assert report.total.non_finite_loss_batches == 1
    assert "non_finite_loss" in [f.check for f in policy.evaluate(report)]
    auditor.update(batch["labels"], attention_mask=batch["attention_mask"], loss=torch.zeros(4))
    assert auditor.step().total.zero_loss_batches == 1  # every supervised row at exactly 0


# ============================================================================ labels the model never sees
def _shifted_ce(outputs, labels, num_items_in_batch=None):
    logits = outputs.logits[:, :-1]
    total = F.cross_entropy(logits.reshape(-1, logits.shape[-1]).float(), labels[:, 1:].reshape(-1),
                            ignore_index=IGNORE, reduction="sum")
    return total / (num_items_in_batch if num_items_in_batch is not None else (labels[:, 1:] != IGNORE).sum())


class PopsLabels(Trainer):
    """A custom compute_loss that pops the labels before the model's forward."""

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        labels = inputs.pop("labels")
        outputs = model(**inputs)
        loss = _shifted_ce(outputs, labels)
        return (loss, outputs) if return_outputs else loss


@pytest.mark.parametrize("how", ["compute_loss_func", "custom_compute_loss"])
def test_labels_popped_before_the_forward_are_audited(zephyr_tokenizer, tmp_path, how):
    kw = {"compute_loss_func": _shifted_ce} if how == "compute_loss_func" else {"trainer_cls": PopsLabels}
    collate = DataCollatorForSeq2Seq(zephyr_tokenizer, padding=True, label_pad_token_id=IGNORE)
    healthy = rows(zephyr_tokenizer, "assistant")
    cb = MaskMonitorCallback()
    plain_trainer(tiny_llama(len(zephyr_tokenizer)), healthy, tmp_path / "ok", cb, collator=collate, **kw).train()
    s = cb.summary()
    assert pick(s, COUNT_KEYS) == expected_counts(healthy) and s["unaudited_batches"] == 0
    assert s["loss_batches"] == 4 and s["aborted"] is None
    model = tiny_llama(len(zephyr_tokenizer))
    before = params_snapshot(model)
    trainer = plain_trainer(model, rows(zephyr_tokenizer, "all"), tmp_path / "dead", MaskMonitorCallback(),
                            collator=collate, **kw)
    with pytest.raises(MaskMonitorAbort) as info:
        trainer.train()
    assert (info.value.reason, info.value.step) == ("all_masked", 1)
    assert_params_equal(before, params_snapshot(model))


class OwnLabels(torch.nn.Module):
    """Takes its targets as ``targets=``: no labels anywhere the monitor can look."""

    def __init__(self, vocab: int, scale: float = 1.0):
        super().__init__()
        self.inner = tiny_llama(vocab)
        self.scale = scale

    def forward(self, input_ids=None, attention_mask=None, targets=None):
        loss = self.inner(input_ids=input_ids, attention_mask=attention_mask, labels=targets).loss
        return {"loss": loss * self.scale}


def _own_labels_collate(feats):
    n = max(len(f["input_ids"]) for f in feats)
    pad = [n - len(f["input_ids"]) for f in feats]
    return {"input_ids": torch.tensor([f["input_ids"] + [0] * p for f, p in zip(feats, pad, strict=True)]),
            "attention_mask": torch.tensor([[1] * len(f["input_ids"]) + [0] * p
                                            for f, p in zip(feats, pad, strict=True)]),
            "targets": torch.tensor([f["targets"] + [IGNORE] * p for f, p in zip(feats, pad, strict=True)])}


def test_labels_that_cannot_be_found_are_reported_not_audited(zephyr_tokenizer, tmp_path, caplog):
    data = [{"input_ids": e["input_ids"], "targets": e["labels"]} for e in rows(zephyr_tokenizer, "assistant")]
    cb = MaskMonitorCallback()
    plain_trainer(OwnLabels(len(zephyr_tokenizer)), data, tmp_path / "ok", cb, collator=_own_labels_collate).train()
    s = cb.summary()
    assert (s["unaudited_batches"], s["micro_batches"], s["loss_batches"]) == (4, 0, 4)
    assert s["not_audited"]["masking"] == ("4 of 4 micro-batches NOT audited: their labels could not be read "
                                           "(only their loss was checked)")
    assert len(_messages(caplog, "its masking is NOT audited", logging.WARNING)) == 1
    line = _messages(caplog, "mask-monitor summary:")[-1]
    assert "4 of 4 micro-batches NOT audited" in line and "warnings: none" not in line
    # the loss alone still stops a NaN run
    trainer = plain_trainer(OwnLabels(len(zephyr_tokenizer), scale=float("nan")), data, tmp_path / "nan",
                            MaskMonitorCallback(), collator=_own_labels_collate)
    with pytest.raises(MaskMonitorAbort) as info:
        trainer.train()
    assert (info.value.reason, info.value.step) == ("non_finite_loss", 1)


# ============================================================================ a loss of exactly 0
def bf16_cross_entropy(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Mean shifted cross-entropy whose log-sum-exp is rounded to bfloat16 op by op (as a bf16 model's loss
    is), whatever kernels the backend picks: once the answer is certain, ``lse - logit`` is exactly 0."""
    logits, target = logits[:, :-1].to(torch.bfloat16), labels[:, 1:]
    top = logits.max(-1, keepdim=True).values
    lse = top + (logits - top).exp().sum(-1, keepdim=True).log()
    keep = target != IGNORE
    picked = logits.gather(-1, target.clamp(min=0).unsqueeze(-1))
    nll = (lse - picked).squeeze(-1).float()
    return (nll * keep).sum() / keep.sum()


class Memoriser(torch.nn.Module):
    """A bigram language model (embedding -> head) in bfloat16 that memorises one example quickly; its
    loss (computed in bf16) underflows to exactly 0 once the answer is certain. Records every loss."""

    def __init__(self, vocab: int = 32, hidden: int = 8):
        super().__init__()
        torch.manual_seed(0)
        self.emb = torch.nn.Embedding(vocab, hidden)
        self.head = torch.nn.Linear(hidden, vocab, bias=False)
        self.to(torch.bfloat16)
        self.losses: list[float] = []

    def forward(self, input_ids=None, labels=None, **kw):
        logits = self.head(self.emb(input_ids))
        loss = bf16_cross_entropy(logits, labels)
        if self.training:
            self.losses.append(loss.item())
        return {"loss": loss, "logits": logits}


def _memorise_data(vocab: int = 32) -> list[dict]:
    ids = random.Random(0).sample(range(vocab), 12)
    return [{"input_ids": ids, "labels": [IGNORE] * 4 + ids[4:]}]


def _memorise_trainer(model, tmp_path, cb, steps=30):
    def collate(feats):
        return {k: torch.tensor([f[k] for f in feats]) for k in ("input_ids", "labels")}

    return plain_trainer(model, _memorise_data(), tmp_path, cb, collator=collate, bs=1,
                         args={"max_steps": steps, "learning_rate": 0.1, "lr_scheduler_type": "constant",
                               "weight_decay": 0.0, "max_grad_norm": 0.0})


def test_converged_loss_underflowing_to_zero_is_not_killed(tmp_path, caplog):
    model = Memoriser()
    cb = MaskMonitorCallback()
    assert _memorise_trainer(model, tmp_path, cb).train().global_step == 30
    losses = model.losses
    first_zero = losses.index(0.0)  # the model's own record: step first_zero + 1 is the first exact 0
    assert 0.0 < losses[first_zero - 1] <= 0.1
    assert len(losses) - first_zero > 8  # exactly 0 for longer than the policy's history: still converged
    s = cb.summary()
    assert s["aborted"] is None and "zero_loss" not in s["findings"]
    assert s["findings"]["zero_loss_converged"] == sum(1 for x in losses if x == 0.0)
    assert s["first_step"]["zero_loss_converged"] == first_zero + 1
    msg = _messages(caplog, "[zero_loss_converged]", logging.WARNING)
    assert len(msg) == 1 and "convergence, not a broken loss" in msg[0]
    assert f"after a mean loss of {losses[first_zero - 1]:.3g} in step {first_zero}" in msg[0]


def test_loss_jumping_straight_to_zero_is_a_broken_loss(zephyr_tokenizer, tmp_path):
    seen: list[float] = []

    def break_at_step_3(module, args, kwargs, output):
        if module.training:
            seen.append(output.loss.item())
            if len(seen) >= 3:
                output.loss = output.loss * 0.0
        return output

    model = tiny_llama(len(zephyr_tokenizer))
    model.register_forward_hook(break_at_step_3, with_kwargs=True)
    collate = DataCollatorForSeq2Seq(zephyr_tokenizer, padding=True, label_pad_token_id=IGNORE)
    trainer = plain_trainer(model, rows(zephyr_tokenizer, "assistant"), tmp_path, MaskMonitorCallback(),
                            collator=collate)
    with pytest.raises(MaskMonitorAbort) as info:
        trainer.train()
    assert (info.value.reason, info.value.step) == ("zero_loss", 3)
    assert f"straight after a mean loss of {seen[1]:.3g} in step 2" in str(info.value)
    assert "This is a broken loss, not convergence" in str(info.value)
