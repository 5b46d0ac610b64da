"""Exact masks on every fixture template (issue 13): ``assistant_token_mask`` and the on-device role tags
against the INDEPENDENT reference of ``template_fixtures.reference_mask`` (the assistant's content located
in the render by character offsets, plus its end-of-turn token, minus whatever the generation prompt
holds), on conversations of 1 to 4 turns, with and without system, with empty answers and reasoning.

For each of the 69 fixture templates a tokenizer is built (the real one where the fixture names a
``tokenizer_dir``, otherwise a real base tokenizer, SentencePiece Llama or byte-level BPE Falcon, plus that
template's special tokens). Per conversation:

* ``assistant_token_mask`` (and so the cure, which uses the same tagger) equals the reference exactly;
* ``batch_stats(labels, roles=tagger(input_ids))`` with the reference as labels has prompt leakage 0,
  response coverage 1 and every end of turn supervised; with labels == input_ids every target outside
  the reference is leakage or an answer part the reference leaves out (header, a turn's tail), counted;
  with every label -100, coverage 0.
Templates that reject a system turn are tried without it (the reference is computed on what renders).
"""

from __future__ import annotations

import pytest
import torch
from template_fixtures import CONVERSATIONS, FIXTURES, NAMES, fixture, reference_mask, render, tokenizer_for

from mask_monitor.stats import (
    ROLE_ASSISTANT_CONTENT,
    ROLE_ASSISTANT_HEADER,
    ROLE_END_OF_TURN,
    ROLE_SEPARATOR,
    as_dict,
    batch_stats,
)
from mask_monitor.templates import RoleTagger, assistant_token_mask, derive_template, detect_template
from mask_monitor.templates.render import TemplateRenderer


@pytest.fixture(scope="module", autouse=True)
def _need_fixtures():
    if not FIXTURES.is_dir():
        pytest.skip(f"third-party fixtures not found at {FIXTURES}")


def test_all_fixture_templates_are_covered():
    assert len(NAMES) == 69
    assert len({fixture(n)["family"] for n in NAMES}) == 27


def text_end_of_turn(name: str) -> str:
    """The fixture's own reading of the template's end of turn (used by the reference for text ones)."""
    return fixture(name)["markers"]["end_of_turn"]


def check_conversation(name, tok, template, tagger, conversation) -> dict[str, float]:
    messages, _ = render(tok, conversation)
    n_assistant = sum(m["role"] == "assistant" for m in messages)
    ids, truth, visible = reference_mask(tok, messages, text_end_of_turn(name))  # visible: turns with a target
    mask = assistant_token_mask(tok, messages, template=template)
    if mask != truth:
        rows = enumerate(zip(ids, mask, truth, strict=True))
        diff = [(i, tok.convert_ids_to_tokens(t), m, w) for i, (t, m, w) in rows if m != w]
        pytest.fail(f"{name}: mask differs from the reference at (i, token, got, want) {diff[:8]}")

    # the on-device audit, with independently computed expectations
    input_ids = torch.tensor([ids])
    roles = tagger(input_ids)
    truth_t = torch.tensor([truth])
    good = as_dict(batch_stats(torch.where(truth_t.bool(), input_ids, -100), roles=roles))
    assert good["prompt_leakage_tokens"] == 0
    assert good["supervised_assistant_content_tokens"] == good["assistant_content_tokens"]  # coverage 1
    assert good["supervised_eot_turns"] == good["assistant_turns"]  # every end of turn supervised
    # responses are counted by where they start: every turn with a target is one; an empty answer may
    # render as nothing at all, or as whitespace merged with its header's
    assert visible <= good["assistant_responses"] <= n_assistant
    if all((m.get("content") or "").strip() for m in messages if m["role"] == "assistant"):
        assert good["assistant_responses"] == n_assistant
    assert good["unterminated_responses"] + good["truncated_responses"] <= 1  # at most the last, by template
    # the end-of-turn tokens of the reference are exactly one per closed turn
    reference_eots = sum(1 for i, t in enumerate(truth) if t and roles[0, i] == ROLE_END_OF_TURN
                         and not (i and truth[i - 1] and roles[0, i - 1] == ROLE_END_OF_TURN))
    assert good["assistant_turns"] == reference_eots

    everything = as_dict(batch_stats(input_ids.clone(), roles=roles))
    # every target outside the reference is prompt leakage, a header token or a turn's tail, each counted
    outside = [i for i in range(1, len(ids)) if not truth[i]]
    header = sum(1 for i in outside if roles[0, i] == ROLE_ASSISTANT_HEADER)
    tail = sum(1 for i in outside if roles[0, i] == ROLE_SEPARATOR)
    assert everything["supervised_header_tokens"] == header >= n_assistant  # every turn has a header
    assert everything["prompt_leakage_tokens"] == len(outside) - header - tail > 0

    nothing = as_dict(batch_stats(torch.full_like(input_ids, -100), roles=roles))
    assert nothing["supervised_assistant_content_tokens"] == 0
    assert nothing["assistant_content_tokens"] == good["assistant_content_tokens"]  # coverage 0
    assert all(roles[0, i] in (ROLE_ASSISTANT_CONTENT, ROLE_END_OF_TURN) for i, t in enumerate(truth) if t)
    return good


@pytest.mark.parametrize("name", NAMES)
def test_assistant_mask_equals_the_independent_reference(name: str):
    tok = tokenizer_for(name)
    template = detect_template(tok)
    assert template is not None and template.family == fixture(name)["family"]
    tagger = RoleTagger.from_tokenizer(tok, template)
    for conversation in CONVERSATIONS:
        check_conversation(name, tok, template, tagger, CONVERSATIONS[conversation])


@pytest.mark.parametrize("name", NAMES)
def test_derived_markers_give_the_same_masks(name: str):
    """Derivation alone (as for a family no registry entry knows) gives exactly the same masks."""
    tok = tokenizer_for(name)
    template = derive_template(TemplateRenderer.from_tokenizer(tok))
    assert template.family == "derived" and template.source == "derived"
    tagger = RoleTagger.from_tokenizer(tok, template)
    for conversation in ("system_two_turns", "empty_last_answer", "reasoning"):
        check_conversation(name, tok, template, tagger, CONVERSATIONS[conversation])
