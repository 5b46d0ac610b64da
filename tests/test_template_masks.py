"""assistant_token_mask and the on-device role tags on every fixture template, checked against an
independent character-span computation.

For each of the 69 fixture templates a tokenizer is built (the real one where the fixture names a
``tokenizer_dir``, otherwise a real base tokenizer, SentencePiece Llama or byte-level BPE Falcon, plus
that template's special tokens), multi-turn conversations are rendered and tokenized, and:

* the truth is computed from renders alone: each assistant turn spans from the end of the fixture's
  own response-marker reading before its answer to the end of its own text (below); a token is the
  assistant's when its first non-blank character lies in such a span (offset mapping). The header
  reading is cut before ``<think>`` and to what the fixture's generation prompt ends with (the model
  writes the rest: ``[/INST]`` then `` 2+2``); the turn ends where a render cut after that answer
  stops agreeing with the full render, i.e. with the text the assistant turn itself emits
  (``<|im_end|>\n``, not Mistral's `` [INST]``), or after the fixture's end-of-turn reading when it
  follows the answer directly (Falcon's ``\n``);
* ``assistant_token_mask`` must equal that truth exactly;
* ``batch_stats(labels, roles=tagger(input_ids))`` gives leakage 0 and coverage 1 for the truth labels,
  leakage = the number of non-assistant targets for labels == input_ids, coverage 0 for all -100.
"""

from __future__ import annotations

import ast
import json
from functools import cache, lru_cache
from pathlib import Path

import pytest
import torch

from mask_monitor.stats import as_dict, batch_stats
from mask_monitor.templates import RoleTagger, assistant_token_mask, derive_template, detect_template
from mask_monitor.templates.render import TemplateRenderer

FIXTURES = Path(__file__).resolve().parents[1].parent / "shared" / "fixtures"
NAMES = sorted(p.stem for p in (FIXTURES / "chat_templates").glob("*.json")) if FIXTURES.is_dir() else []

SYSTEM = {"role": "system", "content": "You are a careful math tutor."}
CONVERSATIONS = {
    "system_three_turns": [
        SYSTEM,
        {"role": "user", "content": "What is 2+2?"},
        {"role": "assistant", "content": "2+2 equals 4."},
        {"role": "user", "content": "Show 5 times 7, step by step!"},
        {"role": "assistant", "content": "First: 5 * 7 = 35.\nSo the answer is 35"},
        {"role": "user", "content": "Thanks (really)"},
        {"role": "assistant", "content": "You're welcome!"},
    ],
    "thinking_two_turns": [
        {"role": "user", "content": "Add 10 and 5?"},
        {"role": "assistant", "content": "<think>\nTen plus five.\n</think>\n\nIt is 15."},
        {"role": "user", "content": "And 20 plus 1?"},
        {"role": "assistant", "content": "<think>\nTwenty plus one.\n</think>\n\nIt is 21."},
    ],
}


def _fixture(name: str) -> dict:
    return json.loads((FIXTURES / "chat_templates" / f"{name}.json").read_text())


@lru_cache(maxsize=2)
def _base_json(kind: str) -> str:
    from transformers import AutoTokenizer

    folder = "hf-internal-testing__tiny-random-LlamaForCausalLM" if kind == "sp" else "falcon-7b-instruct__composed"
    return AutoTokenizer.from_pretrained(FIXTURES / "tokenizers" / folder).backend_tokenizer.to_str()


@cache
def tokenizer_for(name: str):
    """The fixture's real tokenizer, or a real base tokenizer plus the template's special tokens."""
    from tokenizers import Tokenizer
    from transformers import AutoTokenizer, PreTrainedTokenizerFast

    d = _fixture(name)
    if d.get("tokenizer_dir"):
        folder = FIXTURES / d["tokenizer_dir"]
        if name.startswith("chatglm3"):  # its config points at custom code
            tok = PreTrainedTokenizerFast(tokenizer_file=str(folder / "tokenizer.json"), eos_token=d["eos_token"])
        else:
            tok = AutoTokenizer.from_pretrained(folder)
    else:
        kind = "sp" if NAMES.index(name) % 2 == 0 else "bpe"
        tok = PreTrainedTokenizerFast(tokenizer_object=Tokenizer.from_str(_base_json(kind)))
        keys = ("bos_token", "eos_token", "pad_token", "unk_token")
        specials = [*(d["added_tokens"] or []), *(d.get(k) for k in keys)]
        tok.add_tokens(list(dict.fromkeys(t for t in specials if t)), special_tokens=True)
        tok.bos_token, tok.eos_token = d["bos_token"], d["eos_token"]
    tok.chat_template = d["chat_template"]
    return tok


def render(tok, messages):
    """(messages actually used, text): drops the system turn when the template rejects it."""
    try:
        return messages, tok.apply_chat_template(messages, tokenize=False)
    except Exception:  # noqa: BLE001 - e.g. "System role not supported", "roles must alternate"
        messages = [m for m in messages if m["role"] != "system"]
        return messages, tok.apply_chat_template(messages, tokenize=False)


@cache
def prompt_render(name: str) -> str:
    """The fixture's own render of the prompt (add_generation_prompt=True)."""
    lines = (FIXTURES / "rendered" / f"{name}.txt").read_text().splitlines()
    return ast.literal_eval(lines[lines.index("# ===== repr(PROMPT) =====") + 1])


def header_reading(name: str) -> str:
    """The fixture's response marker, cut before a think block, and cut to what the generation prompt
    ends with (what the model writes after the generation prompt is its answer: "[/INST] " -> "[/INST]")."""
    header = _fixture(name)["markers"]["response"]
    if "<think>" in header and header.index("<think>") > 0:
        header = header[: header.index("<think>")]
    prompt = prompt_render(name)
    if header in prompt[-(len(header) + 16) :]:
        return header
    for n in range(len(header), 0, -1):
        if prompt.endswith(header[:n]):
            return header[:n]
    return header


def answer_text(content: str) -> str:
    return content.split("</think>")[-1].strip()


def _snap(text: str, cut: int, specials) -> int:
    for tok in specials:
        start = text.find(tok)
        while start >= 0:
            if start < cut < start + len(tok):
                cut = start
            start = text.find(tok, start + 1)
    return cut


def truth_spans(name: str, tok, text: str, messages: list[dict]) -> list[tuple[int, int, int]]:
    """(span start, answer end, span end) of each assistant turn, from renders only: the turn starts
    after the header reading; it ends where a render of the conversation cut after this answer stops
    agreeing with the full render (what the turn itself emits), or after the fixture's end-of-turn
    reading when that directly follows the answer (Falcon's "\n"), whichever is later."""
    header = header_reading(name)
    eot = _fixture(name)["markers"]["end_of_turn"]
    specials = list(tok.added_tokens_encoder)
    spans, cursor = [], 0
    for i, m in enumerate(messages):
        if m["role"] != "assistant":
            continue
        ans = answer_text(m["content"])
        pos = text.index(ans, cursor)
        h = text.rindex(header, cursor, pos)
        own = tok.apply_chat_template(messages[: i + 1], tokenize=False)
        own_tail = own[own.rindex(ans) + len(ans) :]
        rest = text[pos + len(ans) :]
        n = 0
        while n < min(len(rest), len(own_tail)) and rest[n] == own_tail[n]:
            n += 1
        end = _snap(text, pos + len(ans) + n, specials)
        if eot and rest.lstrip(" ").startswith(eot):
            end = max(end, pos + len(ans) + len(rest) - len(rest.lstrip(" ")) + len(eot))
        spans.append((h + len(header), pos + len(ans), end))
        cursor = pos + len(ans)
    return spans


def token_truth(tok, text: str, spans) -> tuple[list[int], list[int], list[int]]:
    """Per-token (ids, assistant mask, index of the span after whose answer the token lies or -1)."""
    enc = tok(text, add_special_tokens=False, return_offsets_mapping=True)
    mask, after_answer = [], []
    for s, e in enc["offset_mapping"]:
        piece = text[s:e]
        core = s + (len(piece) - len(piece.lstrip()) if piece.strip() else 0)
        inside = [i for i, (a, ans_end, b) in enumerate(spans) if a <= core < b and e > s]
        mask.append(1 if inside else 0)
        after_answer.append(inside[0] if inside and core >= spans[inside[0]][1] else -1)
    return list(enc["input_ids"]), mask, after_answer


@pytest.fixture(scope="module", autouse=True)
def _need_fixtures():
    if not FIXTURES.is_dir():
        pytest.skip(f"third-party fixtures not found at {FIXTURES}")


def test_all_fixture_templates_are_covered():
    assert len(NAMES) == 69
    assert len({_fixture(n)["family"] for n in NAMES}) == 27


@pytest.mark.parametrize("name", NAMES)
def test_assistant_mask_and_roles_match_character_spans(name: str):
    tok = tokenizer_for(name)
    template = detect_template(tok)
    assert template is not None and template.family == _fixture(name)["family"]
    tagger = RoleTagger.from_tokenizer(tok, template)
    for conversation in sorted(CONVERSATIONS):
        check_conversation(name, tok, template, tagger, CONVERSATIONS[conversation])


def check_conversation(name, tok, template, tagger, conversation) -> None:
    messages, text = render(tok, conversation)
    n_assistant = sum(m["role"] == "assistant" for m in messages)
    spans = truth_spans(name, tok, text, messages)
    ids, truth, after_answer = token_truth(tok, text, spans)

    # the tokenization the mask is aligned with is the training one
    enc = tok.apply_chat_template(messages, tokenize=True, return_dict=True)
    assert list(enc["input_ids"]) == ids

    mask = assistant_token_mask(tok, messages, template=template)
    assert len(mask) == len(ids)
    if mask != truth:
        rows = enumerate(zip(ids, mask, truth, strict=True))
        diff = [(i, tok.convert_ids_to_tokens(t), m, w) for i, (t, m, w) in rows if m != w]
        pytest.fail(f"{name}: mask differs from the character-span truth at (i, token, got, want) {diff[:8]}")

    # the on-device audit, with independently computed expectations
    input_ids = torch.tensor([ids])
    roles = tagger(input_ids)
    truth_t = torch.tensor([truth])

    good = as_dict(batch_stats(torch.where(truth_t.bool(), input_ids, -100), roles=roles))
    assert good["prompt_leakage_tokens"] == 0
    assert good["assistant_content_tokens"] > 0
    assert good["supervised_assistant_content_tokens"] == good["assistant_content_tokens"]  # coverage 1
    # every turn whose answer is followed by text of its own has an end of turn, all supervised
    eot_turns = len({i for i in after_answer if i >= 0})
    assert good["assistant_turns"] == eot_turns
    assert good["supervised_eot_turns"] == eot_turns
    assert eot_turns >= n_assistant - 1 or _fixture(name)["markers"]["end_of_turn"].strip() == ""

    everything = as_dict(batch_stats(input_ids.clone(), roles=roles))
    # every non-answer target is either prompt leakage or an assistant header (counted apart)
    assert everything["prompt_leakage_tokens"] + everything["supervised_header_tokens"] == sum(1 - t for t in truth[1:])
    assert everything["prompt_leakage_tokens"] > 0
    assert everything["supervised_header_tokens"] >= n_assistant  # each assistant turn has a header

    nothing = as_dict(batch_stats(torch.full_like(input_ids, -100), roles=roles))
    assert nothing["supervised_assistant_content_tokens"] == 0
    assert nothing["assistant_content_tokens"] == good["assistant_content_tokens"]  # coverage 0


@pytest.mark.parametrize("name", NAMES)
def test_derived_markers_give_the_same_masks(name: str):
    """Derivation alone (as for a family no registry entry knows) gives exactly the same masks."""
    tok = tokenizer_for(name)
    template = derive_template(TemplateRenderer.from_tokenizer(tok))
    assert template.family == "derived" and template.source == "derived"
    tagger = RoleTagger.from_tokenizer(tok, template)
    for conversation in sorted(CONVERSATIONS):
        check_conversation(name, tok, template, tagger, CONVERSATIONS[conversation])
