"""Template knowledge: registry detection, derivation, registration, describe(), and agreement with
``{% generation %}`` spans. The fixture's render is the truth; its ``markers`` field is a reading the
detected markers are checked against."""

from __future__ import annotations

import ast
import json
from pathlib import Path

import pytest
import torch

from mask_monitor.stats import ROLE_ASSISTANT_HEADER, ROLE_END_OF_TURN, ROLE_SEPARATOR
from mask_monitor.templates import (
    ChatTemplate,
    RoleTagger,
    assistant_token_mask,
    derive_template,
    describe,
    detect_template,
    families,
    lookup,
    register_template,
    unregister_template,
)
from mask_monitor.templates.render import TemplateRenderer

FIXTURES = Path(__file__).resolve().parents[1].parent / "shared" / "fixtures"
NAMES = sorted(p.stem for p in (FIXTURES / "chat_templates").glob("*.json")) if FIXTURES.is_dir() else []
ANSWERS = ("2+2 equals 4.", "3+3 equals 6.")


def _fixture(name: str) -> dict:
    return json.loads((FIXTURES / "chat_templates" / f"{name}.json").read_text())


def _specials(d: dict) -> dict:
    return {"bos_token": d["bos_token"], "eos_token": d["eos_token"], "added_tokens": d["added_tokens"]}


def _full_render(name: str) -> str:
    lines = (FIXTURES / "rendered" / f"{name}.txt").read_text().splitlines()
    return ast.literal_eval(lines[lines.index("# ===== repr(FULL) =====") + 1])


@pytest.fixture(scope="module", autouse=True)
def _need_fixtures():
    if not FIXTURES.is_dir():
        pytest.skip(f"third-party fixtures not found at {FIXTURES}")


# ---------------------------------------------------------------- registry detection on every fixture
@pytest.mark.parametrize("name", NAMES)
def test_fixture_template_is_detected_with_markers_that_fit_its_render(name: str):
    d = _fixture(name)
    t = detect_template(d["chat_template"], _specials(d))
    assert t is not None
    assert (t.family, t.source) == (d["family"], "registry")
    # the fixture's own render (transformers 5.24) is the truth: each answer follows an assistant
    # opener and is followed by an end of turn (or, with none, by the next opener or the end)
    text = _full_render(name)
    cursor = 0
    for k, answer in enumerate(ANSWERS):
        pos = text.index(answer, cursor)
        assert t.assistant in text[cursor:pos], (t.assistant, text[cursor:pos])
        rest = text[pos + len(answer) :]
        last = k == len(ANSWERS) - 1
        if any(e.strip() for e in t.end_of_turns):
            assert any(rest.lstrip().startswith(e) for e in t.end_of_turns if e.strip()), rest[:40]
        elif t.end_of_turns and not last:
            assert any(rest.startswith(e) for e in t.end_of_turns), rest[:40]
        elif not last:
            assert rest.lstrip().startswith(t.user.strip())
        if not last and t.user is not None:
            assert t.user in text[pos : text.index(ANSWERS[k + 1])]
        cursor = pos + len(answer)
    # and agree with the fixture's reading (documented: the header may stop earlier, before a think
    # block, gpt-oss's channel, or the space after [/INST])
    m = d["markers"]
    assert m["response"].strip().startswith(t.assistant.strip())
    if t.end_of_turns:
        assert any((e.strip() and e.strip() in m["end_of_turn"]) or e == m["end_of_turn"] for e in t.end_of_turns)
    else:
        assert m["end_of_turn"].strip() == ""
    assert t.user is not None and t.user.strip() in m["user"]


def test_registry_knows_all_27_fixture_families():
    fixture_families = {_fixture(n)["family"] for n in NAMES}
    assert len(fixture_families) == 27
    assert fixture_families <= set(families())


def test_phi3_and_zephyr_are_told_apart_by_their_end_of_turn(tokenizers_dir: Path):
    from transformers import AutoTokenizer

    phi3 = detect_template(AutoTokenizer.from_pretrained(tokenizers_dir / "Phi-3-mini-4k-instruct"))
    zephyr = detect_template(AutoTokenizer.from_pretrained(tokenizers_dir / "TinyLlama-1.1B-Chat-v1.0__composed"))
    assert (phi3.family, phi3.assistant, phi3.end_of_turn) == ("phi3", "<|assistant|>\n", "<|end|>")
    assert (zephyr.family, zephyr.assistant, zephyr.end_of_turn) == ("zephyr", "<|assistant|>\n", "</s>")
    # the same opener: only the end of turn (and Zephyr's eos-closed user turns) tells them apart
    z = _fixture("zephyr__zephyr-7b-beta")
    swapped = z["chat_template"].replace("eos_token", "'<|end|>'")
    assert detect_template(swapped, _specials(z)).family == "phi3"


def test_tokenizer_without_chat_template_gives_none(tokenizers_dir: Path):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tokenizers_dir / "phi-2")
    assert not getattr(tok, "chat_template", None)
    assert detect_template(tok) is None
    assert describe(None) == (
        "no chat template: leakage audit off, masked-fraction audit on "
        "(register one with mask_monitor.register_template(...) to enable it)"
    )


def test_template_that_cannot_render_a_conversation_gives_none(caplog):
    assert detect_template("{{ raise_exception('no chat here') }}") is None
    assert "cannot render" in caplog.text


# ---------------------------------------------------------------- derivation
NOVEL = (
    "{{ bos_token }}{% for m in messages %}"
    "{% if m.role == 'system' %}<<sys>>{{ m.content }}\n"
    "{% elif m.role == 'user' %}<<human>> {{ m.content | trim }}\n"
    "{% else %}<<bot>> {{ m.content | trim }}<<done>>\n{% endif %}{% endfor %}"
    "{% if add_generation_prompt %}<<bot>>{% endif %}"
)


def test_a_new_family_is_derived_from_its_renders():
    t = detect_template(NOVEL, {"bos_token": "<s>", "added_tokens": ["<<done>>"]})
    assert (t.family, t.source) == ("derived", "derived")
    # "<<bot>> " renders with a space, but the generation prompt stops at "<<bot>>": the model writes the rest
    assert (t.assistant, t.end_of_turn, t.user, t.system) == ("<<bot>>", "<<done>>", "<<human>> ", "<<sys>>")
    assert describe(t) == (
        "chat template: derived (derived from the tokenizer's chat template): assistant '<<bot>>', "
        "end of turn '<<done>>', user '<<human>> ', system '<<sys>>'"
    )


def test_derivation_handles_moved_system_prompt_and_dropped_think_blocks():
    mistral = _fixture("mistral__Mistral-7B-Instruct-v0.3")  # system moved into the last user turn
    t = derive_template(TemplateRenderer.from_template(mistral["chat_template"], _specials(mistral)))
    assert (t.assistant, t.end_of_turn, t.user, t.system) == ("[/INST]", "</s>", "[INST] ", None)
    qwen3 = _fixture("qwen3__Qwen3-0.6B")  # earlier <think> blocks dropped, last one forced
    t = derive_template(TemplateRenderer.from_template(qwen3["chat_template"], _specials(qwen3)))
    assert (t.assistant, t.end_of_turn, t.user) == ("<|im_start|>assistant\n", "<|im_end|>", "<|im_start|>user\n")
    gpt_oss = _fixture("gpt-oss__gpt-oss-120b")  # last turn ends with <|return|>, earlier ones with <|end|>
    t = derive_template(TemplateRenderer.from_template(gpt_oss["chat_template"], _specials(gpt_oss)))
    assert (t.assistant, t.end_of_turns) == ("<|start|>assistant", ("<|return|>", "<|end|>"))


# ---------------------------------------------------------------- registration
def test_registered_template_is_detected_before_builtins_and_tags_roles(zephyr_tokenizer):
    entry = register_template(
        family="acme", assistant="<<bot>>", end_of_turn="<<done>>", user="<<human>>", requires=("<<bot>>",)
    )
    try:
        assert entry.source == "user" and lookup("acme") is entry
        t = detect_template(NOVEL, {"bos_token": "<s>", "added_tokens": ["<<done>>"]})
        assert (t.family, t.source) == ("acme", "user")
        assert describe(t).startswith("chat template: acme (registered): assistant '<<bot>>'")
        # a tokenizer whose own template is something else: the conversation is assembled from markers
        tagger = RoleTagger.from_tokenizer(zephyr_tokenizer, t)
        text = "<<human>> hi there\n<<bot>> hello<<done>>\n"
        ids = zephyr_tokenizer(text, add_special_tokens=False)["input_ids"]
        roles = tagger(torch.tensor(ids)).tolist()
        pieces = zephyr_tokenizer.convert_ids_to_tokens(ids)
        content = "".join(p for p, r in zip(pieces, roles, strict=True) if r == 4).replace("▁", " ")
        assert content.strip() == "hello"
        # "<<done>>" is not a special token of this tokenizer: an end of turn written as text, all of it,
        # and the "\n" after it is the turn's tail
        assert roles.count(ROLE_END_OF_TURN) == len(tagger.end_of_turn.seqs[0]) > 1
        assert roles.count(ROLE_SEPARATOR) == 1
    finally:
        unregister_template("acme")
    assert "acme" not in families()


def test_chat_template_validation():
    with pytest.raises(ValueError, match="assistant opener"):
        ChatTemplate("x", assistant="  ", end_of_turn="</s>")
    with pytest.raises(ValueError, match="source"):
        ChatTemplate("x", assistant="A:", end_of_turn="", source="guess")  # type: ignore[arg-type]
    t = ChatTemplate("x", assistant="A:", end_of_turn="{eos}", user="{bos}U:").resolved("<s>", "</s>")
    assert (t.end_of_turn, t.user) == ("</s>", "<s>U:")
    with pytest.raises(ValueError, match="eos"):
        ChatTemplate("x", assistant="A:", end_of_turn="{eos}").resolved(None, None)


# ---------------------------------------------------------------- {% generation %} spans
GENERATION = [n for n in NAMES if "{% generation %}" in _fixture(n)["chat_template"]
              or "{%- generation %}" in _fixture(n)["chat_template"]]
#: Fixtures whose generation spans include (part of) the assistant header: the mask leaves it out
#: (Qwen3's: the empty think block the template writes before a last answer without reasoning).
SPANS_WITH_HEADER = {
    "qwen3__Qwen3__trl-training",
    "smollm3__SmolLM3-3B",
    "gpt-oss__gpt-oss-120b__trl-training",
    "deepseek-v3__DeepSeek-V3__trl-training",
    "qwen2.5__Qwen2.5-7B-Instruct__trl-training",
}


def test_generation_fixtures_are_the_expected_ones():
    assert len(GENERATION) == 10
    assert SPANS_WITH_HEADER <= set(GENERATION)


_SPANS_DIFFER_ON_TRANSFORMERS_4 = {
    "gemma3__gemma-3-4b-it__trl-training",
    "qwen2.5__Qwen2.5-7B-Instruct__trl-training",
    "qwen3__Qwen3__trl-training",
}


@pytest.mark.parametrize("name", GENERATION)
def test_mask_agrees_with_generation_spans(name: str):
    import transformers
    from template_fixtures import CONVERSATIONS, render, tokenizer_for

    if int(transformers.__version__.split(".")[0]) < 5 and name in _SPANS_DIFFER_ON_TRANSFORMERS_4:
        pytest.skip("transformers < 5 builds return_assistant_tokens_mask differently at end-of-turn positions "
                    "for TRL's training templates; the spans are checked on transformers >= 5")

    tok = tokenizer_for(name)
    tagger = RoleTagger.from_tokenizer(tok, detect_template(tok))
    headers_seen = 0
    for conversation in CONVERSATIONS.values():
        messages, _ = render(tok, conversation)
        enc = tok.apply_chat_template(messages, tokenize=True, return_dict=True, return_assistant_tokens_mask=True)
        spans = list(enc["assistant_masks"])
        mask = assistant_token_mask(tok, messages)
        assert sum(spans) > 0 and len(mask) == len(spans)
        roles = tagger(torch.tensor([enc["input_ids"]]))[0].tolist()
        differ = [i for i, (a, b) in enumerate(zip(mask, spans, strict=True)) if a != b]
        # every difference is a token the spans supervise and the mask does not: a header token, or the
        # tail a turn writes after its end-of-turn token (the "\n" after <|im_end|>, a final <|endoftext|>)
        assert all(spans[i] == 1 and mask[i] == 0 for i in differ), name
        assert all(roles[i] in (ROLE_ASSISTANT_HEADER, ROLE_SEPARATOR) for i in differ), name
        header = [i for i in differ if roles[i] == ROLE_ASSISTANT_HEADER]
        assert not header or name in SPANS_WITH_HEADER, f"{name}: header tokens in the spans: {header}"
        headers_seen += len(header)
    assert bool(headers_seen) == (name in SPANS_WITH_HEADER), name
