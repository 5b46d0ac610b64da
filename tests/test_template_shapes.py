"""Template shapes the fixture set does not isolate (issue 13, part 1), each a rule not a special case:
templates written here in the style of public ones, each checked against the independent reference of
``template_fixtures.reference_mask`` through ``assistant_token_mask`` and the cure, plus the role tags'
counts. Then tool calls on every fixture template that accepts ``tools``, and the one-line reasons."""

from __future__ import annotations

import copy
import json
import re

import pytest
import torch
from template_fixtures import FIXTURES, NAMES, fixture, reference_mask, tokenizer_for

from mask_monitor.cure import AssistantOnly, CureError
from mask_monitor.stats import as_dict, batch_stats
from mask_monitor.templates import RoleTagger, TemplateUnreadable, assistant_token_mask, detect_template

CHATML_TURN = "{{ '<|im_start|>' + m.role + '\\n' + m.content + '<|im_end|>\\n' }}"
SHAPES = {
    # the generation prompt forces a reasoning block open: "<think>\n" is given, never a target
    "forced_think": (
        "{% for m in messages %}" + CHATML_TURN + "{% endfor %}"
        "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n<think>\\n' }}{% endif %}"
    ),
    # reasoning switched off: the generation prompt (and the last turn) carry an empty think block
    "reasoning_off": (
        "{% for m in messages %}{% if m.role == 'assistant' and loop.last %}"
        "{{ '<|im_start|>assistant\\n<think>\\n\\n</think>\\n\\n' + m.content + '<|im_end|>\\n' }}"
        "{% else %}" + CHATML_TURN + "{% endif %}{% endfor %}"
        "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n<think>\\n\\n</think>\\n\\n' }}{% endif %}"
    ),
    # earlier turns closed by <|im_end|>, the last one by eos: both are learnt
    "per_turn_end": (
        "{% for m in messages %}{{ '<|im_start|>' + m.role + '\\n' + m.content }}"
        "{% if m.role == 'assistant' and loop.last %}{{ eos_token }}{% else %}{{ '<|im_end|>\\n' }}{% endif %}"
        "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
    ),
    # the header is "<|bot|>: " in the conversation, "<|bot|>:" as the generation prompt
    "header_differs": (
        "{{ bos_token }}{% for m in messages %}{% if m.role == 'user' %}{{ '<|usr|>: ' + m.content + '\\n' }}"
        "{% elif m.role == 'system' %}{{ '<|sys|>: ' + m.content + '\\n' }}"
        "{% else %}{{ '<|bot|>: ' + m.content + eos_token + '\\n' }}{% endif %}{% endfor %}"
        "{% if add_generation_prompt %}{{ '<|bot|>:' }}{% endif %}"
    ),
    # a generation prompt after the last turn even when add_generation_prompt is false
    "trailing_generation_prompt": (
        "{% for m in messages %}" + CHATML_TURN + "{% endfor %}{{ '<|im_start|>assistant\\n' }}"
    ),
    # the system prompt moved into the first user turn
    "system_in_first_user": (
        "{% set sys = messages[0].content if messages[0].role == 'system' else '' %}"
        "{% for m in messages if m.role != 'system' %}{% if m.role == 'user' %}"
        "{{ '<|user|>\\n' + ((sys + '\\n\\n') if loop.first and sys else '') + m.content + '<|end|>\\n' }}"
        "{% else %}{{ '<|assistant|>\\n' + m.content + '<|end|>\\n' }}{% endif %}{% endfor %}"
        "{% if add_generation_prompt %}{{ '<|assistant|>\\n' }}{% endif %}"
    ),
    # a template that raises on a system role
    "raises_on_system": (
        "{% for m in messages %}{% if m.role == 'system' %}{{ raise_exception('System role not supported') }}"
        "{% endif %}{{ '<start_of_turn>' + ('model' if m.role == 'assistant' else m.role) + '\\n' + m.content "
        "+ '<end_of_turn>\\n' }}{% endfor %}{% if add_generation_prompt %}{{ '<start_of_turn>model\\n' }}{% endif %}"
    ),
}
SPECIALS = ["<|im_start|>", "<|im_end|>", "<|endoftext|>", "<think>", "</think>", "<|usr|>", "<|sys|>", "<|bot|>",
            "<|user|>", "<|assistant|>", "<|end|>", "<start_of_turn>", "<end_of_turn>"]
CONVS = [
    [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "What is 2+2?"},
     {"role": "assistant", "content": "It is 4."}, {"role": "user", "content": "And 3+3?"},
     {"role": "assistant", "content": "It is 6."}],
    [{"role": "user", "content": "Say hello."}, {"role": "assistant", "content": "Hello there!"}],
    [{"role": "user", "content": "Reply with nothing."}, {"role": "assistant", "content": ""},
     {"role": "user", "content": "Now answer."}, {"role": "assistant", "content": "Fine, an answer."}],
]


@pytest.fixture(scope="module", autouse=True)
def _need_fixtures():
    if not FIXTURES.is_dir():
        pytest.skip(f"third-party fixtures not found at {FIXTURES}")


def shape_tokenizer(template: str):
    from tokenizers import Tokenizer
    from transformers import AutoTokenizer, PreTrainedTokenizerFast

    base = AutoTokenizer.from_pretrained(FIXTURES / "tokenizers" / "hf-internal-testing__tiny-random-LlamaForCausalLM")
    tok = PreTrainedTokenizerFast(tokenizer_object=Tokenizer.from_str(base.backend_tokenizer.to_str()))
    tok.add_tokens(SPECIALS, special_tokens=True)
    tok.bos_token, tok.eos_token = "<s>", "<|endoftext|>"
    tok.chat_template = template
    return tok


@pytest.mark.parametrize("shape", sorted(SHAPES))
def test_every_shape_is_exact(shape: str):
    tok = shape_tokenizer(SHAPES[shape])
    template = detect_template(tok)
    assert template is not None
    tagger = RoleTagger.from_tokenizer(tok, template)
    cure = AssistantOnly(tok)
    kwargs = {}
    for conv in CONVS:
        if shape == "raises_on_system" and conv[0]["role"] == "system":
            with pytest.raises(CureError, match="System role not supported"):
                cure.encode(conv, index=0)
            conv = conv[1:]
        ids, truth, _ = reference_mask(tok, conv, **kwargs)
        assert assistant_token_mask(tok, conv) == truth, (shape, tok.convert_ids_to_tokens(ids))
        assert cure.encode(conv) == {"input_ids": ids, "assistant_masks": truth}
        roles = tagger(torch.tensor([ids]))
        s = as_dict(batch_stats(torch.where(torch.tensor([truth]).bool(), torch.tensor([ids]), -100), roles=roles))
        n = sum(m["role"] == "assistant" for m in conv)
        assert s["prompt_leakage_tokens"] == 0
        assert s["supervised_assistant_content_tokens"] == s["assistant_content_tokens"]
        assert s["assistant_turns"] == s["supervised_eot_turns"] == n  # every turn's end is learnt
        assert s["assistant_responses"] == n and s["unterminated_responses"] == 0
    if shape in ("forced_think", "reasoning_off"):  # the generation prompt's think tokens are never targets
        ids, truth, _ = reference_mask(tok, CONVS[1])
        think = {tok.convert_tokens_to_ids("<think>"), tok.convert_tokens_to_ids("</think>")}
        assert not any(t in think for t, m in zip(ids, truth, strict=True) if m)
    if shape == "per_turn_end":
        ids, truth, _ = reference_mask(tok, CONVS[0])
        ends = [tok.convert_ids_to_tokens(t) for t, m in zip(ids, truth, strict=True)
                if m and t in (tok.convert_tokens_to_ids("<|im_end|>"), tok.eos_token_id)]
        assert ends == ["<|im_end|>", "<|endoftext|>"]
    if shape == "trailing_generation_prompt":
        ids, truth, _ = reference_mask(tok, CONVS[1])
        assert truth[-1] == 0 and tok.convert_ids_to_tokens(ids[-4:-1]).count("<|im_start|>") == 1


def test_reasoning_with_forced_think_keeps_the_reasoning_and_drops_the_given_tag():
    tok = shape_tokenizer(SHAPES["forced_think"])
    conv = [{"role": "user", "content": "Add 2 and 2."},
            {"role": "assistant", "content": "<think>\nTwo plus two.\n</think>\n\nFour."}]
    ids, truth, _ = reference_mask(tok, conv)
    assert assistant_token_mask(tok, conv) == truth
    kept = tok.decode([t for t, m in zip(ids, truth, strict=True) if m])
    assert kept.startswith("Two plus two.") and kept.endswith("Four.<|im_end|>")  # <think>\n was given


# ------------------------------------------------------------------------------------------ tool calls
TOOLS = [{"type": "function", "function": {"name": "get_weather", "description": "Weather of a city",
          "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}}}]


def tool_conversation(arguments_as_text: bool = False) -> list[dict]:
    args = {"city": "Paris"}
    call = {"type": "function", "id": "call0A1b2", "function": {  # 9 alphanumerics: Mistral's rule
        "name": "get_weather", "arguments": json.dumps(args) if arguments_as_text else args}}
    return [{"role": "user", "content": "Weather in Paris?"},
            {"role": "assistant", "content": "", "tool_calls": [call]},
            {"role": "tool", "content": "Sunny, 21 degrees", "tool_call_id": "call0A1b2", "name": "get_weather"},
            {"role": "assistant", "content": "It is sunny and 21 degrees in Paris."}]


TOOL_CONV = tool_conversation()
TOOL_TEMPLATES = [n for n in NAMES if "tool_calls" in fixture(n)["chat_template"]] if FIXTURES.is_dir() else []
#: Templates whose tool-call turns are not exact, and why (measured; see docs/templates.md).
TOOL_NOT_EXACT: dict[str, str] = {}


@pytest.mark.parametrize("name", TOOL_TEMPLATES)
def test_tool_calls_and_results(name: str):
    tok = tokenizer_for(name)
    controls = sorted(set(re.findall(r"\[/?[A-Z_]{3,}\]", fixture(name)["chat_template"])))
    if controls and not fixture(name).get("tokenizer_dir"):
        # Mistral's control tokens ([INST], [TOOL_CALLS]...) are single tokens of its real tokenizers; the
        # fixture lists only bos/eos, so the base tokenizer gets them as the template's special tokens
        tok = copy.deepcopy(tok)
        tok.add_tokens(controls, special_tokens=True)
    errors = []
    variants = [(c, t) for c in (tool_conversation(), tool_conversation(arguments_as_text=True))
                for t in (TOOLS, [TOOLS[0]["function"]])]  # templates differ in what they accept here
    for conv, tools in variants:
        try:
            text = tok.apply_chat_template(conv, tools=tools, tokenize=False)
            break
        except Exception as exc:  # noqa: BLE001
            errors.append(f"{type(exc).__name__}: {exc}")
    else:  # the template cannot render a tool conversation at all: the cure says so, in one line
        with pytest.raises(CureError, match=r"^mask-monitor: example 0: the chat template refuses") as info:
            AssistantOnly(tok).encode(variants[0][0], tools=variants[0][1], index=0)
        assert "\n" not in str(info.value) and errors
        return
    assert "get_weather" in text and "Sunny" in text
    ids, truth, _ = reference_mask(tok, conv, fixture(name)["markers"]["end_of_turn"], tools=tools)
    mask = assistant_token_mask(tok, conv, tools=tools)
    if name in TOOL_NOT_EXACT:
        assert mask != truth, f"{name} is exact now: drop it from TOOL_NOT_EXACT"
        pytest.xfail(TOOL_NOT_EXACT[name])
    diff = [(i, tok.convert_ids_to_tokens(t), m, w) for i, (t, m, w) in enumerate(zip(ids, mask, truth, strict=True))
            if m != w]
    assert not diff, f"{name}: {diff[:8]}"
    kept = tok.decode([t for t, m in zip(ids, truth, strict=True) if m])
    assert "get_weather" in kept and "Sunny" not in kept and "Weather in Paris" not in kept


# ------------------------------------------------------------------------------------------ unreadable
def test_templates_that_cannot_be_read_say_why_in_one_line():
    for template, why in (
        ("{% for m in messages %}{{ m.content }}\n{% endfor %}", "no turn markers can be read"),
        ("{{ raise_exception('no chat here') }}", "cannot render a user/assistant conversation"),
    ):
        tok = shape_tokenizer(template)
        assert detect_template(tok) is None
        with pytest.raises(TemplateUnreadable) as info:
            AssistantOnly(tok)
        msg = str(info.value)
        assert why in msg and "register_template" in msg and "\n" not in msg
