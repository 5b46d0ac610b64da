"""The audit's parts: per-sequence table vs batch_stats, data loading and sampling, formats, streaming,
``--num-proc``, the verdict's thresholds (shared with the callback through MonitorConfig)."""

from __future__ import annotations

import doctest
import json
import random

import pytest

datasets = pytest.importorskip("datasets")
pytest.importorskip("trl")

from mask_monitor.audit import counting, data, report  # noqa: E402
from mask_monitor.audit.data import load_data  # noqa: E402
from mask_monitor.audit.pipeline import AuditOptions, run_audit  # noqa: E402
from mask_monitor.audit.prepare import PreStats  # noqa: E402
from mask_monitor.cli._errors import UsageError  # noqa: E402
from mask_monitor.config import MonitorConfig  # noqa: E402
from mask_monitor.stats import FIELDS  # noqa: E402

_TRL_MAJOR = int(__import__("trl").__version__.split(".")[0])
needs_trl1 = pytest.mark.skipif(
    _TRL_MAJOR < 1,
    reason="expectations encode TRL >= 1, which drops fully masked examples after truncation (TRL 0.26 keeps them)",
)


IGNORE = -100


@pytest.mark.parametrize("module", [counting, data, report])
def test_docstring_examples(module):
    assert doctest.testmod(module, raise_on_error=False).failed == 0


def test_pre_stats_arrow_equals_lists():
    import pyarrow as pa

    rng = random.Random(3)
    rows = [[rng.choice([IGNORE, 1, 2]) for _ in range(rng.randint(0, 9))] for _ in range(300)]
    a, b = PreStats(), PreStats()
    arr = pa.array(rows, type=pa.list_(pa.int64()))
    a.add_arrow(arr.slice(0, 120), IGNORE)
    a.add_arrow(arr.slice(120), IGNORE)
    b.add_lists(rows, list(range(len(rows))), IGNORE)
    assert list(a.supervised) == list(b.supervised) == [sum(1 for t in r[1:] if t != IGNORE) for r in rows]
    assert list(a.any_label) == list(b.any_label) == [int(any(t != IGNORE for t in r)) for r in rows]
    assert list(a.length) == list(b.length) == [len(r) for r in rows]


# ------------------------------------------------------------------------------------ data loading
ROWS = [{"prompt": f"Question {i}?", "completion": f" Answer {i}."} for i in range(40)]


def test_load_formats_and_errors(tmp_path):
    (tmp_path / "list.json").write_text(json.dumps(ROWS))
    ds = datasets.Dataset.from_list(ROWS)
    ds.to_parquet(str(tmp_path / "d.parquet"))
    ds.save_to_disk(str(tmp_path / "saved"))
    datasets.DatasetDict({"train": ds, "test": ds.select(range(3))}).save_to_disk(str(tmp_path / "dd"))
    for spec, source in [("list.json", "json file"), ("d.parquet", "parquet file"), ("saved", "save_to_disk folder")]:
        got = load_data(str(tmp_path / spec))
        assert got.source == source and got.examples_total == 40 and got.dataset[7] == ROWS[7]
    assert load_data(str(tmp_path / "dd"), split="test").examples_total == 3
    with pytest.raises(UsageError, match="no split 'dev'"):
        load_data(str(tmp_path / "dd"), split="dev")
    with pytest.raises(UsageError, match="data not found"):
        load_data(str(tmp_path / "missing.jsonl"))
    (tmp_path / "broken.jsonl").write_text('{"a": 1}\n{not json\n')
    with pytest.raises(UsageError, match="could not read data"):
        load_data(str(tmp_path / "broken.jsonl"))
    (tmp_path / "empty.jsonl").write_text("")
    with pytest.raises(UsageError):
        load_data(str(tmp_path / "empty.jsonl"))


def test_sample_is_seeded_and_uniform(tmp_path):
    path = tmp_path / "d.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in ROWS))
    a = load_data(str(path), sample=10, seed=1).dataset["prompt"]
    b = load_data(str(path), sample=10, seed=1).dataset["prompt"]
    c = load_data(str(path), sample=10, seed=2).dataset["prompt"]
    assert a == b and a != c and len(set(a)) == 10
    s = load_data(str(path), sample=10, seed=1, streaming=True)
    got = [r["prompt"] for r in s.dataset]
    assert s.sampled == 10 and len(set(got)) == 10 and set(got) <= {r["prompt"] for r in ROWS}
    # every example is equally likely: over many seeds each is picked about sample/total of the time
    from mask_monitor.audit.data import _reservoir

    picks = [0] * 40
    for seed in range(2000):
        for p in _reservoir(iter(range(40)), 10, seed):
            picks[p] += 1
    assert min(picks) > 400 and max(picks) < 600  # expected 500 each (sd about 19)


# ------------------------------------------------------------------------------------ pipeline variants
@pytest.mark.slow
def test_streaming_and_num_proc_agree(tmp_path, tok, tok_path):
    path = tmp_path / "d.jsonl"
    msgs = [{"messages": [{"role": "user", "content": f"Question number {i}?" * (1 + i % 4)},
                          {"role": "assistant", "content": f"Answer {i}."}]} for i in range(30)]
    path.write_text("".join(json.dumps(r) + "\n" for r in msgs))
    base = dict(tokenizer=tok_path, data=str(path), sft={"max_length": 24})
    plain = run_audit(AuditOptions(**base), tokenizer=tok)
    streamed = run_audit(AuditOptions(**base, streaming=True, batch_size=7), tokenizer=tok)
    multi = run_audit(AuditOptions(**base, num_proc=2), tokenizer=tok)
    per_sequence = ("micro_batches", "all_masked_batches", "unmasked_batches", "max_masked_ratio")
    for other in (streamed, multi):
        a, b = other.as_dict()["totals"], plain.as_dict()["totals"]
        assert a == b and not set(per_sequence) & set(a)
        assert other.dropped == plain.dropped and other.truncated_examples == plain.truncated_examples
        assert other.examples_in == 30
    assert plain.truncated_examples == sum(
        1 for m in msgs if len(tok.apply_chat_template(m["messages"], tokenize=True, return_dict=False)) > 24)
    sampled = run_audit(AuditOptions(**base, sample=12, seed=5), tokenizer=tok)
    assert sampled.examples_in == 12 and sampled.sampled == 12 and sampled.examples_total == 30


@pytest.mark.slow
@needs_trl1
def test_formats_text_and_assistant_masks(tmp_path, tok, tok_path):
    # language modelling text in a custom field: TRL appends eos and trains every token
    texts = [f"Plain text number {i} for the model." for i in range(6)]
    (tmp_path / "t.jsonl").write_text("".join(json.dumps({"body": t}) + "\n" for t in texts))
    r = run_audit(AuditOptions(tokenizer=tok_path, data=str(tmp_path / "t.jsonl"),
                               sft={"dataset_text_field": "body"}), tokenizer=tok)
    lengths = [len(tok(t + tok.eos_token)["input_ids"]) for t in texts]
    assert r.data_format == "language modeling (text)" and not r.role_audit and r.exit_code == 0
    assert (r.totals.target_tokens, r.totals.supervised_tokens) == (sum(lengths) - 6, sum(lengths) - 6)
    # pre-tokenized with assistant_masks: TRL always applies them
    rows = []
    for i in range(6):
        ids = tok(f"User asks {i}. Assistant answers {i}.")["input_ids"]
        rows.append({"input_ids": ids, "assistant_masks": [0] * 5 + [1] * (len(ids) - 5)})
    datasets.Dataset.from_list(rows).save_to_disk(str(tmp_path / "am"))
    r = run_audit(AuditOptions(tokenizer=tok_path, data=str(tmp_path / "am")), tokenizer=tok)
    assert r.data_format == "pre-tokenized (input_ids + assistant_masks)"
    assert r.totals.supervised_tokens == sum(len(x["input_ids"]) - 5 for x in rows)
    assert r.totals.target_tokens == sum(len(x["input_ids"]) - 1 for x in rows)


@pytest.mark.slow
def test_verdict_comes_from_the_callbacks_policy(tmp_path, tok, tok_path):
    msgs = [{"messages": [{"role": "user", "content": f"Q{i}?"}, {"role": "assistant", "content": f"A{i}."}]}
            for i in range(5)]
    (tmp_path / "m.jsonl").write_text("".join(json.dumps(r) + "\n" for r in msgs))

    def audit(**config):
        opts = AuditOptions(tokenizer=tok_path, data=str(tmp_path / "m.jsonl"), monitor=MonitorConfig(**config))
        return run_audit(opts, tokenizer=tok)

    r = audit()
    leak = r.leakage_ratio
    assert 0 < leak < 1
    assert r.totals.prompt_leakage_tokens == sum(
        len(tok.apply_chat_template(m["messages"][:1], tokenize=True, return_dict=False)) - 1 for m in msgs)
    # the default action of prompt_leakage is the callback's: warn, exit 0
    assert ("prompt_leakage", "warning") in {(f.check, f.severity) for f in r.findings} and r.exit_code == 0
    r = audit(prompt_leakage="abort")
    assert ("prompt_leakage", "blocking") in {(f.check, f.severity) for f in r.findings} and r.exit_code == 1
    r = audit(prompt_leakage="abort", prompt_leakage_threshold=leak + 0.01)
    assert "prompt_leakage" not in {f.check for f in r.findings} and r.exit_code == 0
    r = audit(prompt_leakage="off")
    assert "prompt_leakage" not in {f.check for f in r.findings}
    assert FIELDS.index("prompt_leakage_tokens") >= 0  # the counted field is the callback's
