"""Responses that never end (issue 13, part 3): assistant turns are counted where they start, and a
response that ends without its end-of-turn token is reported, told apart from truncation by max_length.

The TRL failure this catches: text formatted by hand without the template's end-of-turn token (here
Phi-3's ``<|end|>``; TRL appends ``eos_token``, ``<|endoftext|>``, which is not it), so the model never
learns to stop. Expected counts are made here from the rows' lengths and the batches, independently of
the monitor's vectorised code.
"""

from __future__ import annotations

import json

import pytest
import torch
from template_fixtures import FIXTURES, tokenizer_for
from trainer_utils import tiny_llama

from mask_monitor import MaskMonitorCallback
from mask_monitor.audit.pipeline import AuditOptions, run_audit
from mask_monitor.stats import as_dict, batch_stats, sequence_stats
from mask_monitor.templates import RoleTagger

trl = pytest.importorskip("trl")
datasets = pytest.importorskip("datasets")
pytestmark = pytest.mark.slow

# answers of strictly increasing length: in any batch exactly one row is the longest
QA = [(f"Question {i}?", "word " * (i + 1) + "end.") for i in range(8)]


@pytest.fixture(scope="module")
def phi3():
    if not FIXTURES.is_dir():
        pytest.skip(f"third-party fixtures not found at {FIXTURES}")
    tok = tokenizer_for("phi3__Phi-3-mini-4k-instruct")
    return tok


def _text(q: str, a: str) -> str:
    return f"<|user|>\n{q}<|end|>\n<|assistant|>\n{a}"  # formatted by hand: the answer's <|end|> forgotten


def test_text_without_end_of_turn_is_reported_in_training(phi3, tmp_path, caplog):
    rows = [{"text": _text(q, a)} for q, a in QA]
    cb = MaskMonitorCallback()
    cfg = trl.SFTConfig(output_dir=str(tmp_path), per_device_train_batch_size=4, num_train_epochs=1, report_to="none",
                        use_cpu=True, save_strategy="no", disable_tqdm=True, logging_strategy="no")
    if phi3.pad_token is None:
        phi3.pad_token = phi3.eos_token
    trainer = trl.SFTTrainer(model=tiny_llama(len(phi3)), args=cfg, train_dataset=datasets.Dataset.from_list(rows),
                             processing_class=phi3, callbacks=[cb])
    # TRL appended eos to the text: the rows end with <|endoftext|>, not with the turn's <|end|>
    end = phi3.convert_tokens_to_ids("<|end|>")
    for row in trainer.train_dataset:
        assert row["input_ids"][-1] == phi3.eos_token_id and row["input_ids"].count(end) == 1
    trainer.train()
    s = cb.summary()
    # 8 responses in 2 micro-batches of 4; the callback knows the run's max_length (TRL's default, 1024) and
    # every row is far shorter: none was cut, all 8 end without their end of turn (unterminated)
    assert cfg.max_length == 1024 and max(len(r["input_ids"]) for r in trainer.train_dataset) < 1024
    assert s["assistant_responses"] == 8 and s["assistant_turns"] == 0
    assert (s["unterminated_responses"], s["truncated_responses"]) == (8, 0)
    assert s["findings"].get("unterminated_responses") == 2  # once per step
    msgs = [r.getMessage() for r in caplog.records if "[unterminated_responses]" in r.getMessage()]
    assert msgs and "4 of 4 assistant responses in step 1 (100.0%) end without their end-of-turn token" in msgs[0]


def test_the_audit_knows_max_length_and_tells_truncation_apart(phi3, tmp_path):
    cut = [{"text": _text(q, a)} for q, a in QA]
    path = tmp_path / "text.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in cut))
    r = run_audit(AuditOptions(tokenizer="phi3", data=str(path), sft={"max_length": 1024}), tokenizer=phi3)
    assert (r.totals.assistant_responses, r.totals.unterminated_responses, r.totals.truncated_responses) == (8, 8, 0)
    assert "unterminated_responses" in [f.check for f in r.findings]

    # well-formed conversations cut by max_length: truncated, never unterminated
    convs = [{"messages": [{"role": "user", "content": q}, {"role": "assistant", "content": a}]} for q, a in QA]
    path = tmp_path / "chats.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in convs))
    encoded = [phi3.apply_chat_template(c["messages"], tokenize=True, return_dict=True)["input_ids"] for c in convs]
    end = phi3.convert_tokens_to_ids("<|end|>")
    answer_end = [max(i for i, t in enumerate(ids) if t == end) for ids in encoded]  # the answer's <|end|>
    limit = sorted(len(ids) for ids in encoded)[3]  # the 4 longest rows are cut
    lost = sum(e >= limit for e in answer_end)  # ... and these lose the answer's end of turn with it
    assert sum(len(ids) > limit for ids in encoded) == 4 and 0 < lost <= 4
    r = run_audit(AuditOptions(tokenizer="phi3", data=str(path), sft={"max_length": limit}), tokenizer=phi3)
    t = r.totals
    assert (t.assistant_responses, t.truncated_responses, t.unterminated_responses) == (8, lost, 0)
    assert t.assistant_turns == 8 - lost and "unterminated_responses" not in [f.check for f in r.findings]


def test_turns_are_counted_by_where_they_start_mid_sequence(phi3):
    """A middle turn that lost its end of turn is unterminated whatever the lengths: another turn follows."""
    tagger = RoleTagger.from_tokenizer(phi3)
    conv = [{"role": "user", "content": "A?"}, {"role": "assistant", "content": "One."},
            {"role": "user", "content": "B?"}, {"role": "assistant", "content": "Two."}]
    ids = phi3.apply_chat_template(conv, tokenize=True, return_dict=True)["input_ids"]
    end = phi3.convert_tokens_to_ids("<|end|>")
    first_end = [i for i, t in enumerate(ids) if t == end][1]  # user, assistant, user...: the first answer's
    broken = ids[:first_end] + ids[first_end + 1 :]
    batch = torch.tensor([broken])
    s = as_dict(batch_stats(batch.clone(), roles=tagger(batch)))
    assert (s["assistant_responses"], s["assistant_turns"], s["unterminated_responses"]) == (2, 1, 1)
    table = sequence_stats(batch.clone(), roles=tagger(batch))
    assert table["unterminated_responses"].tolist() == [1] and table["assistant_responses"].tolist() == [2]


LAYOUT_OPS = {"aten.view.default", "aten._unsafe_view.default", "aten.clone.default"}


def test_response_counts_are_vectorised_and_never_read_the_device():
    """batch_stats with roles: the same ops whatever the shape (no per-token loop), and it runs on meta
    tensors, which have no data (any .item() / bool() / .tolist() would raise)."""
    from torch.utils._python_dispatch import TorchDispatchMode

    class Ops(TorchDispatchMode):
        def __init__(self) -> None:
            super().__init__()
            self.ops: list[str] = []

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            self.ops.append(str(func))
            return func(*args, **(kwargs or {}))

    counts = set()
    for b, length in ((1, 16), (4, 512), (2, 4096)):
        labels = torch.randint(0, 50, (b, length))
        roles = torch.randint(0, 8, (b, length))
        kw = {"attention_mask": torch.ones_like(labels), "position_ids": torch.arange(length).repeat(b, 1)}
        with Ops() as ops:
            batch_stats(labels, roles=roles, max_length=length, **kw)
        # layout-only ops (a reshape of a sliced mask is a view for one row, a copy for several) aside, the
        # same ops run whatever the batch and sequence length: nothing loops over rows or tokens
        counts.add(len([op for op in ops.ops if op not in LAYOUT_OPS]))
        assert not any("_local_scalar_dense" in op or "item" in op for op in ops.ops)
    assert len(counts) == 1
    meta = torch.zeros((3, 64), dtype=torch.long, device="meta")
    out = batch_stats(meta, roles=meta, attention_mask=meta, position_ids=meta)
    assert out.device.type == "meta"
