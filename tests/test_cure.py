"""The cure (issue 13): ``assistant_only`` gives SFTTrainer exact assistant-only labels for any template.

Proof, for every one of the 69 fixture templates (real tokenizer where the fixture has one, else a base
tokenizer with the template's special tokens): a real ``SFTTrainer`` (tiny random Llama from a config) on a
conversational dataset through the cure trains on labels equal, token for token, to the independent
reference of ``template_fixtures.reference_mask`` (all 7 conversations, read from the trainer's own
prepared dataset through its own collator), and its run (one optimizer step of 3 conversations: the CI
budget) makes the monitor report prompt leakage 0, response coverage 1 and every end of turn supervised;
TRL's default preparation of the same conversations, audited by the monitor's own auditor and policy, is
flagged as leaking (full default training runs are flagged in ``test_leakage_e2e.py``). Then composition
with TRL's options (packing, padding-free, truncation, prompt/completion, tools, streaming) on one real
tokenizer, the collator route, and the one-line errors.
"""

from __future__ import annotations

import logging

import pytest
import torch
from template_fixtures import CONVERSATIONS, FIXTURES, NAMES, fixture, reference_mask, render, tokenizer_for
from trainer_utils import IGNORE, tiny_llama

from mask_monitor import MaskAuditor, MaskMonitorCallback, Policy
from mask_monitor.cure import AssistantOnly, CureError, assistant_only, assistant_only_collator
from mask_monitor.templates import RoleTagger, TemplateUnreadable

trl = pytest.importorskip("trl")
datasets = pytest.importorskip("datasets")
pytestmark = pytest.mark.slow


@pytest.fixture(scope="module", autouse=True)
def _quiet():
    if not FIXTURES.is_dir():
        pytest.skip(f"third-party fixtures not found at {FIXTURES}")
    datasets.disable_progress_bars()
    yield
    datasets.enable_progress_bars()


def _config(tmp_path, **kw):
    base = dict(output_dir=str(tmp_path), per_device_train_batch_size=8, max_steps=1, report_to="none", use_cpu=True,
                save_strategy="no", disable_tqdm=True, logging_strategy="no")
    base.update(kw)
    return trl.SFTConfig(**base)


def _trainer(tok, data, tmp_path, cb=None, **kw):
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    return trl.SFTTrainer(model=tiny_llama(len(tok)), args=_config(tmp_path, **kw), train_dataset=data,
                          processing_class=tok, callbacks=[cb] if cb is not None else None)


def _labels(ids, mask):
    return [t if m else IGNORE for t, m in zip(ids, mask, strict=True)]


def _collated(trainer, n: int) -> list[tuple[list[int], list[int]]]:
    """(input_ids, labels) per sequence, as the trainer's own collator builds them from its prepared data."""
    batch = trainer.data_collator([trainer.train_dataset[i] for i in range(n)])
    out = []
    for row_ids, row_labels, row_mask in zip(batch["input_ids"], batch["labels"],
                                             batch.get("attention_mask", batch["input_ids"] * 0 + 1), strict=True):
        keep = row_mask.bool()
        out.append((row_ids[keep].tolist(), row_labels[keep].tolist()))
    return out


# ------------------------------------------------------------------------------------------ the proof
@pytest.mark.parametrize("name", NAMES)
def test_sft_through_the_cure_trains_exactly_the_reference(name: str, tmp_path):
    tok = tokenizer_for(name)
    convs = [render(tok, c)[0] for c in CONVERSATIONS.values()]
    eot = fixture(name)["markers"]["end_of_turn"]
    expected = {}
    for c in convs:
        ids, mask, _ = reference_mask(tok, c, eot)
        expected[tuple(ids)] = _labels(ids, mask)
    cured = assistant_only(datasets.Dataset.from_list([{"messages": c} for c in convs]), tok)
    assert cured.column_names == ["input_ids", "assistant_masks"]

    cb = MaskMonitorCallback()
    # one optimizer step over 3 of the 7 conversations (the CI budget: the step, not the check, is costly)
    trainer = _trainer(tok, cured, tmp_path, cb, per_device_train_batch_size=3)
    got = _collated(trainer, len(convs))
    assert len(got) == len(expected)
    for ids, labels in got:  # the labels TRL trains on are the reference, token for token
        assert labels == expected[tuple(ids)], name
    trainer.train()
    s = cb.summary()
    assert s["template_family"] == fixture(name)["family"]
    assert s["prompt_leakage_tokens"] == 0 and s["supervised_tokens"] > 0
    assert s["response_coverage_ratio"] == 1.0
    assert s["eot_supervised_ratio"] in (1.0, None) and s["supervised_eot_turns"] == s["assistant_turns"]
    assert not {"prompt_leakage", "response_coverage", "eot_unsupervised"} & set(s["findings"])

    # TRL's defaults on the same conversations: its own preparation and collator train on the whole text,
    # and the monitor's auditor and policy (the callback's, minus the optimizer step) flag it
    default = _trainer(tok, datasets.Dataset.from_list([{"messages": c} for c in convs]), tmp_path / "default")
    batch = default.data_collator([default.train_dataset[i] for i in range(len(convs))])
    auditor = MaskAuditor(role_tagger=RoleTagger.from_tokenizer(tok))
    auditor.update(labels=batch["labels"], input_ids=batch["input_ids"], attention_mask=batch.get("attention_mask"))
    report = auditor.step(1)
    assert report.total.prompt_leakage_tokens > 0
    assert "prompt_leakage" in [f.check for f in Policy().evaluate(report)]


# ------------------------------------------------------------------------------------------ TRL options
@pytest.fixture(scope="module")
def phi3():
    return tokenizer_for("phi3__Phi-3-mini-4k-instruct")  # the real tokenizer; strips "\n" after specials


def _expected(tok, convs, **kw):
    return {tuple(ids): _labels(ids, mask)
            for ids, mask, _ in (reference_mask(tok, c, "<|end|>", **kw) for c in convs)}


PHI3_CONVS = [render(tokenizer_for("phi3__Phi-3-mini-4k-instruct"), c)[0] for c in CONVERSATIONS.values()] \
    if FIXTURES.is_dir() else []


@pytest.mark.parametrize("options", [
    {"packing": True, "max_length": 96},
    {"packing": True, "max_length": 96, "packing_strategy": "wrapped"},
    {"padding_free": True, "max_length": None},
    {"max_length": 40},
], ids=["packing-bfd", "packing-wrapped", "padding-free", "truncation"])
def test_cure_composes_with_packing_padding_free_and_truncation(phi3, tmp_path, options):
    cured = assistant_only(datasets.Dataset.from_list([{"messages": c} for c in PHI3_CONVS]), phi3)
    expected = _expected(phi3, PHI3_CONVS)
    cb = MaskMonitorCallback()
    trainer = _trainer(phi3, cured, tmp_path, cb, **options)
    batch = trainer.data_collator([trainer.train_dataset[i] for i in range(len(trainer.train_dataset))])
    ids, labels = batch["input_ids"], batch["labels"]
    if options.get("packing_strategy") == "wrapped":
        # rows are the concatenated sequences cut every max_length tokens: their labels are the
        # concatenated reference labels, cut the same way
        flat_ids = [t for k in (trainer.train_dataset[i]["input_ids"] for i in range(len(trainer.train_dataset)))
                    for t in k]
        assert ids[ids != phi3.pad_token_id].numel() <= len(flat_ids)
        stream_ids = [t for row in PHI3_CONVS for t in reference_mask(phi3, row, "<|end|>")[0]]
        stream_labels = [t for row in PHI3_CONVS for t in _labels(*reference_mask(phi3, row, "<|end|>")[:2])]
        got_ids = ids.flatten().tolist()[: len(stream_ids)]
        got_labels = labels.flatten().tolist()[: len(stream_ids)]
        assert got_ids == stream_ids and got_labels == stream_labels
        trainer.train()
        assert cb.summary()["prompt_leakage_tokens"] == 0
        return
    # every (document of a) row is a slice of a reference sequence, its labels the same slice of the
    # reference labels, except the first token of a packed document (TRL never trains across documents)
    pos = batch.get("position_ids")
    starts = (pos == 0) if pos is not None else torch.zeros_like(ids, dtype=torch.bool)
    starts[:, 0] = True
    matched = 0
    for r in range(ids.shape[0]):
        cuts = starts[r].nonzero().flatten().tolist() + [ids.shape[1]]
        for a, b in zip(cuts[:-1], cuts[1:], strict=True):
            seg_ids, seg_labels = ids[r, a:b].tolist(), labels[r, a:b].tolist()
            if "attention_mask" in batch:
                n = int(batch["attention_mask"][r, a:b].sum())
                seg_ids, seg_labels = seg_ids[:n], seg_labels[:n]
            if not seg_ids or all(t == phi3.pad_token_id for t in seg_ids):
                continue
            hits = [(k, v) for k, v in expected.items() if _find(list(k), seg_ids) >= 0]
            assert hits, "a trained sequence is no slice of a reference sequence"
            k, v = hits[0]
            at = _find(list(k), seg_ids)
            want = v[at : at + len(seg_ids)]
            if pos is not None:
                want[0] = IGNORE
            assert seg_labels == want
            matched += 1
    assert matched >= 3
    trainer.train()
    s = cb.summary()
    assert s["prompt_leakage_tokens"] == 0 and s["supervised_tokens"] > 0
    if "max_length" in options and options.get("max_length") and not options.get("packing"):
        # truncation cuts answers: coverage stays 1 over what is left; cut responses are told apart
        assert s["truncated_responses"] + s["unterminated_responses"] >= 0
    else:
        assert s["response_coverage_ratio"] == 1.0


def _find(hay: list[int], needle: list[int]) -> int:
    for i in range(len(hay) - len(needle) + 1):
        if hay[i : i + len(needle)] == needle:
            return i
    return -1


def test_prompt_completion_trains_only_the_completion(phi3, tmp_path):
    few_shot = [{"role": "user", "content": "Example question?"}, {"role": "assistant", "content": "Example answer."},
                {"role": "user", "content": "Real question?"}]
    rows = [{"prompt": few_shot, "completion": [{"role": "assistant", "content": "Real answer."}]}]
    cured = assistant_only(datasets.Dataset.from_list(rows), phi3)
    full = few_shot + rows[0]["completion"]
    ids, mask, _ = reference_mask(phi3, full, "<|end|>")
    row = cured[0]
    assert row["input_ids"] == ids
    # the few-shot answer is context, not a target: only the completion's turn
    first_answer = [i for i, m in enumerate(mask) if m]
    text = phi3.decode([ids[i] for i in range(len(ids)) if row["assistant_masks"][i]])
    assert text == "Real answer.<|end|>" and len(first_answer) > sum(row["assistant_masks"])
    trainer = _trainer(phi3, cured, tmp_path)
    ((got_ids, labels),) = _collated(trainer, 1)
    assert labels == _labels(ids, row["assistant_masks"])


def test_tools_and_chat_template_kwargs_columns_are_read_as_trl_reads_them(tmp_path):
    tok = tokenizer_for("qwen2.5__Qwen2.5-7B-Instruct")
    tools = [{"type": "function", "function": {"name": "get_weather", "description": "Weather of a city",
              "parameters": {"type": "object", "properties": {"city": {"type": "string"}}}}}]
    call = {"type": "function", "function": {"name": "get_weather", "arguments": {"city": "Paris"}}}
    conv = [{"role": "user", "content": "Weather in Paris?"},
            {"role": "assistant", "content": "", "tool_calls": [call]},
            {"role": "tool", "content": "Sunny, 21 degrees"},
            {"role": "assistant", "content": "It is sunny and 21 degrees in Paris."}]
    ds = datasets.Dataset.from_list([{"messages": conv, "tools": tools}])
    cured = assistant_only(ds, tok)
    ids, mask, _ = reference_mask(tok, conv, "<|im_end|>", tools=tools)
    assert cured[0]["input_ids"] == ids and cured[0]["assistant_masks"] == mask
    decoded = tok.decode([t for t, m in zip(ids, mask, strict=True) if m])
    assert "get_weather" in decoded and "Sunny" not in decoded and "Weather in Paris" not in decoded
    # TRL's own tokenization of the same row (tools column) gives the same input_ids
    trainer = _trainer(tok, ds, tmp_path)
    assert trainer.train_dataset[0]["input_ids"] == ids


def test_streaming_and_dataset_dicts(phi3):
    rows = [{"messages": c} for c in PHI3_CONVS[:3]]
    dd = datasets.DatasetDict({"train": datasets.Dataset.from_list(rows), "test": datasets.Dataset.from_list(rows)})
    cured = assistant_only(dd, phi3)
    assert set(cured) == {"train", "test"} and cured["test"].column_names == ["input_ids", "assistant_masks"]
    masks = [r["assistant_masks"] for r in cured["train"]]
    streamed = assistant_only(datasets.Dataset.from_list(rows).to_iterable_dataset(), phi3)
    assert [r["assistant_masks"] for r in streamed] == masks
    parallel = assistant_only(datasets.Dataset.from_list(rows * 4), phi3, num_proc=2)  # the cure pickles
    assert [r["assistant_masks"] for r in parallel] == masks * 4


# ------------------------------------------------------------------------------------------ the collator
def test_collator_route_masks_labels_to_the_reference(phi3):
    from trl.trainer.sft_trainer import DataCollatorForLanguageModeling

    expected = _expected(phi3, PHI3_CONVS)
    rows = [{"input_ids": list(k)} for k in expected]  # labels == input_ids: TRL's default
    for padding_free in (False, True):
        base = DataCollatorForLanguageModeling(pad_token_id=phi3.eos_token_id, padding_free=padding_free)
        batch = assistant_only_collator(base, phi3)(rows)
        if not padding_free:
            for r, (k, v) in enumerate(expected.items()):
                assert batch["labels"][r, : len(k)].tolist() == v
        else:
            flat = [t for v in expected.values() for t in v]
            starts = [0]
            for k in list(expected)[:-1]:
                starts.append(starts[-1] + len(k))
            for s0 in starts:
                flat[s0] = IGNORE  # TRL's padding-free collator masks each document's first token
            assert batch["labels"][0].tolist() == flat


# ------------------------------------------------------------------------------------------ one-line errors
def test_unreadable_template_says_why_and_what_to_pass(tokenizers_dir):
    from transformers import AutoTokenizer

    no_template = AutoTokenizer.from_pretrained(tokenizers_dir / "phi-2")
    with pytest.raises(TemplateUnreadable) as info:
        AssistantOnly(no_template)
    msg = str(info.value)
    assert "\n" not in msg and "no chat template" in msg and "register_template" in msg
    bare = AutoTokenizer.from_pretrained(tokenizers_dir / "phi-2")
    bare.chat_template = "{% for m in messages %}{{ m.content }}\n{% endfor %}"  # no markers to read
    with pytest.raises(TemplateUnreadable, match=r"^no turn markers can be read .*register_template"):
        AssistantOnly(bare)


def test_refused_conversation_and_wrong_data_are_one_line_errors(caplog):
    gemma = tokenizer_for("gemma__gemma-2-2b-it__trl-training")  # raises on a system role
    conv = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"},
            {"role": "assistant", "content": "Hello"}]
    with pytest.raises(CureError, match=r"^mask-monitor: example 0: the chat template refuses this conversation"):
        assistant_only(datasets.Dataset.from_list([{"messages": conv}]), gemma)
    with pytest.raises(CureError, match="prompt/completion text"):
        assistant_only(datasets.Dataset.from_list([{"prompt": "a", "completion": "b"}]), gemma)
    with pytest.raises(CureError, match="already tokenized"):
        assistant_only(datasets.Dataset.from_list([{"input_ids": [1, 2]}]), gemma)
    assert not [r for r in caplog.records if r.levelno >= logging.ERROR]


def test_callback_template_setting_accepts_a_family_and_a_file(phi3, tmp_path):
    """``template=`` of the callback takes what ``--template`` takes: a family name, a description file."""
    spec = tmp_path / "mine.json"
    spec.write_text('{"family": "mine", "assistant": "<|assistant|>\\n", "end_of_turn": "<|end|>", '
                    '"user": "<|user|>\\n"}')
    cured = assistant_only(datasets.Dataset.from_list([{"messages": c} for c in PHI3_CONVS[:3]]), phi3)
    for setting in ("phi3", str(spec)):
        cb = MaskMonitorCallback(template=setting)
        _trainer(phi3, cured, tmp_path / setting.replace("/", "_"), cb, per_device_train_batch_size=3).train()
        s = cb.summary()
        assert s["audited_supervised_tokens"] == s["supervised_tokens"] > 0, setting
        assert s["prompt_leakage_tokens"] == 0 and s["response_coverage_ratio"] == 1.0, setting
