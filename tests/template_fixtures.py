"""The 69 fixture chat templates, a tokenizer for each, test conversations, and the INDEPENDENT reference
mask of issue 13 (computed from renders and messages only, never from the monitor's markers).

The reference of a conversation, token by token (a token belongs to a character span when its first
non-blank character lies in it; offsets of the rendered text):

* the assistant's content, located in the rendered text by character offsets: the message's content
  (stripped) found after the previous message's content; when the template drops the reasoning of an
  earlier turn (Qwen3, DeepSeek-R1), the part after ``</think>``; an empty content is located by
  rendering a sentinel in its place (the two renders agree up to it, whitespace aside);
* plus its end of turn: the first token after the content when only whitespace separates them and it
  is one special (added) token of the tokenizer (the whitespace tokens in between included), or, when the
  template writes its end of turn as text that is no token of this tokenizer, that text (the fixture's own
  ``markers.end_of_turn`` reading, e.g. Gemma 4's ``<turn|>`` on a base tokenizer without it);
* minus whatever the generation prompt contains: the tokens that
  ``apply_chat_template(messages[:k], add_generation_prompt=True)`` shares, as a prefix, with the
  conversation's tokens, for each assistant message ``k``.

A tool-call turn (``tool_calls``) is the assistant's from where its generation prompt (and what the template
writes before any answer, read off a plain turn) ends to the last special token the turn writes (in the
part of the render that a render cut after the turn shares with the whole one; when the cut render differs,
to the end-of-turn token its plain turns end with); when the template ends turns only with the next turn's
special token (GLM), that token too: the model writes the call and ends it.
"""

from __future__ import annotations

import ast
import json
from functools import cache, lru_cache
from pathlib import Path
from typing import Any

FIXTURES = Path(__file__).resolve().parents[1].parent / "shared" / "fixtures"
NAMES = sorted(p.stem for p in (FIXTURES / "chat_templates").glob("*.json")) if FIXTURES.is_dir() else []
SENTINEL = "Qzxslotword"

SYSTEM = {"role": "system", "content": "You are a careful math tutor."}


def _u(text: str) -> dict[str, str]:
    return {"role": "user", "content": text}


def _a(text: str) -> dict[str, str]:
    return {"role": "assistant", "content": text}


#: 1 to 4 turns, with and without system, empty assistant contents, multi-line and reasoning answers.
CONVERSATIONS: dict[str, list[dict[str, str]]] = {
    "one_turn": [_u("What is 2+2?"), _a("2+2 equals 4.")],
    "system_two_turns": [SYSTEM, _u("What is 2+2?"), _a("2+2 equals 4."), _u("Show 5 times 7, step by step!"),
                         _a("First: 5 * 7 = 35.\nSo the answer is 35")],
    "system_three_turns": [SYSTEM, _u("What is 2+2?"), _a("2+2 equals 4."), _u("Show 5 times 7, step by step!"),
                           _a("First: 5 * 7 = 35.\nSo the answer is 35"), _u("Thanks (really)"),
                           _a("You're welcome!")],
    "four_turns": [_u("Question number 1?"), _a("Answer number 1."), _u("Question number 2?"), _a("Answer number 2."),
                   _u("Question number 3?"), _a("Answer number 3."), _u("Question number 4?"), _a("Answer number 4.")],
    "empty_earlier_answer": [SYSTEM, _u("Say nothing."), _a(""), _u("Now greet me"), _a("Good morning to you")],
    "empty_last_answer": [_u("Greet me"), _a("Good morning to you"), _u("Now say nothing."), _a("")],
    "reasoning": [_u("Add 10 and 5?"), _a("<think>\nTen plus five.\n</think>\n\nIt is 15."), _u("And 20 plus 1?"),
                  _a("<think>\nTwenty plus one.\n</think>\n\nIt is 21.")],
}


def fixture(name: str) -> dict:
    return json.loads((FIXTURES / "chat_templates" / f"{name}.json").read_text())


@lru_cache(maxsize=2)
def _base_json(kind: str) -> str:
    from transformers import AutoTokenizer

    folder = "hf-internal-testing__tiny-random-LlamaForCausalLM" if kind == "sp" else "falcon-7b-instruct__composed"
    return AutoTokenizer.from_pretrained(FIXTURES / "tokenizers" / folder).backend_tokenizer.to_str()


def has_real_tokenizer(name: str) -> bool:
    return bool(fixture(name).get("tokenizer_dir"))


@cache
def tokenizer_for(name: str):
    """The fixture's real tokenizer, or a real base tokenizer plus the template's special tokens."""
    from tokenizers import Tokenizer
    from transformers import AutoTokenizer, PreTrainedTokenizerFast

    d = fixture(name)
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


def render(tok, messages: list[dict[str, Any]], **kwargs: Any) -> tuple[list[dict[str, Any]], str]:
    """(messages actually used, text): drops the system turn when the template rejects it."""
    try:
        return messages, tok.apply_chat_template(messages, tokenize=False, **kwargs)
    except Exception:  # noqa: BLE001 - e.g. "System role not supported", "roles must alternate"
        messages = [m for m in messages if m["role"] != "system"]
        return messages, tok.apply_chat_template(messages, tokenize=False, **kwargs)


@cache
def prompt_render(name: str) -> str:
    """The fixture's own render of the prompt (add_generation_prompt=True)."""
    lines = (FIXTURES / "rendered" / f"{name}.txt").read_text().splitlines()
    return ast.literal_eval(lines[lines.index("# ===== repr(PROMPT) =====") + 1])


# --------------------------------------------------------------------------- the independent reference
def _prefix_len(a: list, b: list) -> int:
    n = 0
    for x, y in zip(a, b, strict=False):
        if x != y:
            break
        n += 1
    return n


def _core(text: str, s: int, e: int) -> int:
    piece = text[s:e]
    lead = len(piece) - len(piece.lstrip())
    return s if lead == len(piece) else s + lead


def _ids(tok, messages, **kwargs) -> list[int]:
    return list(tok.apply_chat_template(messages, tokenize=True, return_dict=True, **kwargs)["input_ids"])


def reference_mask(tok, messages: list[dict[str, Any]], text_end_of_turn: str | None = None,
                   **kwargs: Any) -> tuple[list[int], list[int], int]:
    """(input_ids, 0/1 targets, assistant turns with at least one target) of ``messages`` by the reference
    above. Raises ValueError where the reference itself cannot be computed (the text tokenization differs
    from the template's, content not found)."""
    text = tok.apply_chat_template(messages, tokenize=False, **kwargs)
    ids = _ids(tok, messages, **kwargs)
    enc = tok(text, add_special_tokens=False, return_offsets_mapping=True)
    if list(enc["input_ids"]) != ids:
        raise ValueError("tokenizing the rendered text differs from apply_chat_template(tokenize=True)")
    offs = [tuple(o) for o in enc["offset_mapping"]]
    cores = [_core(text, s, e) for s, e in offs]
    special = set(tok.added_tokens_decoder) | set(tok.all_special_ids)
    eot_text = (text_end_of_turn or "").strip()
    mask = [0] * len(ids)
    visible = 0
    plain_eots: set[int] = set()
    glues: list[str] = []
    cursor = 0
    tool_turns: list[tuple[int, int]] = []  # (first target token, cursor) of tool-call turns
    for k, m in enumerate(messages):
        content = (m.get("content") or "").strip() if isinstance(m.get("content"), str | None) else ""
        if m["role"] != "assistant":
            p = text.find(content, cursor) if content else -1
            if p >= 0:
                cursor = p + len(content)
            continue
        gen = _ids(tok, messages[:k], add_generation_prompt=True, **kwargs)
        given = _prefix_len(gen, ids)  # tokens the generation prompt holds: never targets
        if m.get("tool_calls"):
            # what the turn writes: the tokens a render cut after it shares with the whole render
            shared = _prefix_len(_ids(tok, messages[: k + 1], **kwargs), ids)
            args = [str(v) for c in m["tool_calls"] for v in _arguments(c).values()]
            arg_end = cursor
            for v in args:
                q = text.find(v, arg_end)
                arg_end = q + len(v) if q >= 0 else arg_end
            tool_turns.append((given, shared, arg_end))
            continue
        raw = m.get("content") or ""
        a = text.find(raw, cursor) if raw.strip() else -1  # as written, then stripped
        if a >= 0:
            content = raw
        else:
            a = text.find(content, cursor) if content else -1
        if content and a < 0 and "</think>" in content:
            reasoning = content.split("</think>")[0].split("<think>")[-1].strip()
            answer = content.split("</think>")[-1]
            a = text.find(answer, cursor)
            if a < 0:
                answer = answer.strip()
                a = text.find(answer, cursor)
            r = text.find(reasoning, cursor, max(a, 0)) if reasoning else -1
            if a >= 0 and r >= 0:
                # the template writes the reasoning its own way: the model writes all of it, from where
                # the generation prompt ends
                start = max(cursor, offs[given][0] if given < len(offs) else len(text))
                content, a = text[start : a + len(answer)], start
            else:  # the template drops the reasoning: the answer is what remains of the content
                content = answer
        if content and a < 0:
            raise ValueError(f"assistant content {content!r} not found in the render")
        if not content:
            alt = [dict(x) for x in messages]
            alt[k]["content"] = SENTINEL
            alt_text = tok.apply_chat_template(alt, tokenize=False, **kwargs)
            slot = alt_text.find(SENTINEL, cursor)
            a = _prefix_len(list(alt_text[:slot]), list(text))
            if slot < 0 or alt_text[a:slot].strip():
                raise ValueError("the empty content cannot be located")
        b = a + len(content)
        for i, (s, e) in enumerate(offs):
            if i >= given and e > s and a <= cores[i] < b:
                mask[i] = 1
        nxt = next((i for i, (s, e) in enumerate(offs) if e > s and s >= b and text[s:e].strip()), None)
        q = len(text[:b]) + len(text[b:]) - len(text[b:].lstrip())  # first non-blank character after it
        if given < len(offs) and offs[given][0] < a:
            glues.append(text[offs[given][0] : a])
        if nxt is not None and not text[b : offs[nxt][0]].strip() and ids[nxt] in special:
            for i in [i for i, (s, e) in enumerate(offs) if e > s and b <= s < offs[nxt][0]] + [nxt]:
                mask[i] = int(i >= given)
            plain_eots.add(ids[nxt])
        elif eot_text and text.startswith(eot_text, q) and not any(
            ids[i] in special for i, (s, e) in enumerate(offs) if e > s and q <= cores[i] < q + len(eot_text)
        ):
            for i, (s, e) in enumerate(offs):
                if e > s and (b <= s < q or q <= cores[i] < q + len(eot_text)) and cores[i] >= b:
                    mask[i] = int(i >= given)
        visible += any(mask[i] for i, (s, e) in enumerate(offs) if s >= a and (s < b or i == nxt))
        cursor = b
    implicit = tool_turns and _implicit_end(tok, **kwargs)
    for given, shared, arg_end in tool_turns:
        start = given
        at = offs[given][0] if given < len(offs) else len(text)
        for g in glues:  # what the template writes before any answer (read off a plain turn)
            if g.strip() and text.startswith(g, at):
                start = next(i for i in range(given, len(ids)) if offs[i][0] >= at + len(g))
        if shared < len(offs) and offs[shared][0] > arg_end:  # the turn renders the same when it is last
            stop = max((i for i in range(start, shared) if ids[i] in special), default=None)
            if stop is None:  # no special token of its own (a tokenizer without the template's tokens)
                stop = max((i for i in range(start, shared) if text[offs[i][0] : offs[i][1]].strip()), default=None)
        else:  # it does not (loop.last): it ends with the end-of-turn token its plain turns end with
            stop = next((i for i in range(start, len(ids)) if offs[i][0] >= arg_end and ids[i] in plain_eots), None)
        if stop is None:
            raise ValueError("a tool-call turn whose end cannot be read")
        nxt = next((i for i in range(stop + 1, len(ids)) if text[offs[i][0] : offs[i][1]].strip()), None)
        if implicit and nxt is not None and ids[nxt] in special:
            stop = nxt  # the template ends turns with the next turn's special token (GLM)
        for i in range(start, stop + 1):
            mask[i] = 1
        visible += 1
    return ids, mask, visible


def _arguments(call: dict[str, Any]) -> dict[str, Any]:
    args = call.get("function", call).get("arguments", {})
    return json.loads(args) if isinstance(args, str) else dict(args)


def _implicit_end(tok, **kwargs: Any) -> bool:
    """Whether the template ends an answer only with the next turn's special token (GLM): the token right
    after an answer is not in a render that stops at that answer."""
    conv = [_u("Qzxone"), _a("Qzxtwo"), _u("Qzxthree"), _a("Qzxfour")]
    full = tok.apply_chat_template(conv, tokenize=False, **kwargs)
    cut = tok.apply_chat_template(conv[:2], tokenize=False, **kwargs)
    after = full[full.index("Qzxtwo") + len("Qzxtwo") :].lstrip()
    return not cut[cut.index("Qzxtwo") + len("Qzxtwo") :].strip() and bool(after)
