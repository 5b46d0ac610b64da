"""RoleTagger: role codes per position, vectorised on the batch's device, packed-sequence aware.

Expected roles come from a plain sequential reading of the token ids (a state machine over the
tokenizer's own special-token ids), independent of the tagger's unfold/cummax implementation."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from mask_monitor.stats import (
    ROLE_ASSISTANT_CONTENT,
    ROLE_ASSISTANT_HEADER,
    ROLE_END_OF_TURN,
    ROLE_OTHER,
    ROLE_SEPARATOR,
    ROLE_SYSTEM,
    ROLE_UNKNOWN,
    ROLE_USER,
    as_dict,
    batch_stats,
)
from mask_monitor.templates import RoleTagger, assistant_token_mask, detect_template

CONV = [
    {"role": "system", "content": "You are terse."},
    {"role": "user", "content": "Name two primes."},
    {"role": "assistant", "content": "2 and 3."},
    {"role": "user", "content": "One more?"},
    {"role": "assistant", "content": "5.\nThat is all."},
]


@pytest.fixture(scope="module")
def phi3(tokenizers_dir: Path):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(tokenizers_dir / "Phi-3-mini-4k-instruct")


@pytest.fixture(scope="module")
def phi3_tagger(phi3):
    return RoleTagger.from_tokenizer(phi3, detect_template(phi3))


def sequential_roles(ids: list[int], openers: dict[int, int], eot: int, start: int) -> list[int]:
    """Reference: walk the ids once; an opener id sets the role, <|end|> closes an assistant turn (it is
    the end of turn, what follows it in the turn its tail); before the first opener a sequence that does
    not begin like a conversation (with ``start``) is a fragment of unknown role."""
    roles, state = [], (ROLE_OTHER if ids and ids[0] == start else ROLE_UNKNOWN)
    for t in ids:
        if t in openers:
            state = openers[t]
            roles.append(ROLE_ASSISTANT_HEADER if state == ROLE_ASSISTANT_CONTENT else state)
            continue
        if state == ROLE_END_OF_TURN:
            state = ROLE_SEPARATOR
        if t == eot and state == ROLE_ASSISTANT_CONTENT:
            state = ROLE_END_OF_TURN
        roles.append(state)
    return roles


def phi3_reference(phi3, ids: list[int]) -> list[int]:
    tid = phi3.convert_tokens_to_ids
    openers = {tid("<|system|>"): ROLE_SYSTEM, tid("<|user|>"): ROLE_USER, tid("<|assistant|>"): ROLE_ASSISTANT_CONTENT}
    return sequential_roles(ids, openers, tid("<|end|>"), tid("<|system|>"))


def test_real_phi3_tokenizer_strips_newlines_and_is_tagged_exactly(phi3, phi3_tagger):
    text = phi3.apply_chat_template(CONV, tokenize=False)
    ids = phi3.apply_chat_template(CONV, tokenize=True, return_dict=True)["input_ids"]
    assert phi3.decode(ids) != text  # the newline after each chat special token is gone
    assert phi3_tagger.assistant.seqs == ((phi3.convert_tokens_to_ids("<|assistant|>"),),)
    roles = phi3_tagger(torch.tensor([ids]))[0].tolist()
    assert roles == phi3_reference(phi3, ids)
    mask = assistant_token_mask(phi3, CONV)
    ref = phi3_reference(phi3, ids)
    # content, and the first token of each end of turn (the token the model emits to stop)
    first_eot = [r == ROLE_END_OF_TURN and (i == 0 or ref[i - 1] != ROLE_END_OF_TURN) for i, r in enumerate(ref)]
    assert mask == [int(r == ROLE_ASSISTANT_CONTENT or f) for r, f in zip(ref, first_eot, strict=True)]
    # the decoded assistant tokens are the answers and their end of turn (not the final <|endoftext|>)
    spans, cur = [], []
    for t, m in zip(ids, mask, strict=True):
        if m:
            cur.append(t)
        elif cur:
            spans.append(phi3.decode(cur))
            cur = []
    assert not cur and spans == ["2 and 3.<|end|>", "5.\nThat is all.<|end|>"]


def test_leakage_and_coverage_on_phi3(phi3, phi3_tagger):
    ids = torch.tensor([phi3.apply_chat_template(CONV, tokenize=True, return_dict=True)["input_ids"]])
    ref = torch.tensor([phi3_reference(phi3, ids[0].tolist())])
    answer = (ref == ROLE_ASSISTANT_CONTENT) | (ref == ROLE_END_OF_TURN)
    roles = phi3_tagger(ids)
    header = ref == ROLE_ASSISTANT_HEADER
    tail = ref == ROLE_SEPARATOR  # what a turn writes after its end of turn: answer, not a target of its own
    n_prompt_targets = int((~answer[0, 1:] & ~header[0, 1:] & ~tail[0, 1:]).sum())
    n_header_targets = int(header[0, 1:].sum())
    n_content = int((ref[0, 1:] == ROLE_ASSISTANT_CONTENT).sum())

    good = as_dict(batch_stats(torch.where(answer, ids, -100), roles=roles))
    assert (good["prompt_leakage_tokens"], good["assistant_content_tokens"]) == (0, n_content)
    assert good["supervised_assistant_content_tokens"] == n_content
    assert (good["assistant_turns"], good["supervised_eot_turns"]) == (2, 2)

    everything = as_dict(batch_stats(ids.clone(), roles=roles))
    assert everything["prompt_leakage_tokens"] == n_prompt_targets > 0
    assert everything["supervised_header_tokens"] == n_header_targets > 0  # counted apart, not leakage

    content_only = torch.where(ref == ROLE_ASSISTANT_CONTENT, ids, -100)  # end of turn never trained
    s = as_dict(batch_stats(content_only, roles=roles))
    assert (s["prompt_leakage_tokens"], s["supervised_eot_turns"], s["assistant_turns"]) == (0, 0, 2)

    nothing = as_dict(batch_stats(torch.full_like(ids, -100), roles=roles))
    assert (nothing["supervised_assistant_content_tokens"], nothing["assistant_content_tokens"]) == (0, n_content)


def test_packed_rows_reset_at_each_document(phi3, phi3_tagger):
    a = phi3.apply_chat_template(CONV, tokenize=True, return_dict=True)["input_ids"]
    b = phi3.apply_chat_template(CONV[1:3], tokenize=True, return_dict=True)["input_ids"]
    # a document cut mid-answer (no opener of its own) must not inherit the previous document's role
    tail = a[-6:]
    row = a + b + tail
    pos = list(range(len(a))) + list(range(len(b))) + list(range(len(tail)))
    roles = phi3_tagger(torch.tensor([row]), torch.tensor([pos]))[0].tolist()
    expected = phi3_reference(phi3, a) + phi3_reference(phi3, b) + [ROLE_UNKNOWN] * len(tail)
    assert roles == expected
    # without position_ids the rows are one document: the tail continues b's last state
    flat = phi3_tagger(torch.tensor([row]))[0].tolist()
    assert flat == phi3_reference(phi3, row)
    assert flat[-len(tail) :] == [ROLE_SEPARATOR] * len(tail)  # a second <|end|> in one turn is its tail
    # 1-D inputs (and 1-D position_ids) work the same way
    assert phi3_tagger(torch.tensor(row), torch.tensor(pos)).tolist() == expected


def test_padded_batch_rows_are_independent(phi3, phi3_tagger):
    a = phi3.apply_chat_template(CONV, tokenize=True, return_dict=True)["input_ids"]
    b = phi3.apply_chat_template(CONV[1:3], tokenize=True, return_dict=True)["input_ids"]
    pad = phi3.pad_token_id
    n = len(a)
    batch = torch.tensor([a, b + [pad] * (n - len(b)), [pad] * (n - len(b)) + b])
    roles = phi3_tagger(batch)
    assert roles.shape == batch.shape and roles.dtype == torch.long and roles.device == batch.device
    assert roles[0].tolist() == phi3_reference(phi3, a)
    assert roles[1, : len(b)].tolist() == phi3_reference(phi3, b)
    assert roles[2, n - len(b) :].tolist() == phi3_reference(phi3, b)
    assert roles[2, : n - len(b)].tolist() == [ROLE_UNKNOWN] * (n - len(b))  # left padding: no conversation start


class _CountOps(TorchDispatchMode):
    def __init__(self) -> None:
        super().__init__()
        self.ops: list[str] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.ops.append(str(func))
        return func(*args, **(kwargs or {}))


def test_tagging_is_vectorised_and_never_reads_the_device(zephyr_tokenizer):
    tagger = RoleTagger.from_tokenizer(zephyr_tokenizer)  # multi-token plain-text markers ("<|assistant|>\n")
    counts = set()
    for b, length in ((1, 16), (4, 512), (2, 4096)):
        ids = torch.randint(0, len(zephyr_tokenizer), (b, length))
        with _CountOps() as c:
            tagger(ids, torch.arange(length).repeat(b, 1))
        counts.add(len(c.ops))
        assert not any("_local_scalar_dense" in op or "item" in op for op in c.ops)
    assert len(counts) == 1  # the same ops whatever the batch and sequence length: no per-token loop
    # meta tensors have no data: any .item()/.tolist()/bool() on them raises
    meta = torch.zeros((3, 64), dtype=torch.long, device="meta")
    out = tagger(meta, torch.zeros_like(meta))
    assert out.device.type == "meta" and out.shape == (3, 64)


def test_from_tokenizer_without_template_raises(tokenizers_dir: Path):
    from transformers import AutoTokenizer

    with pytest.raises(ValueError, match="no chat template; pass template=ChatTemplate.*register_template"):
        RoleTagger.from_tokenizer(AutoTokenizer.from_pretrained(tokenizers_dir / "phi-2"), None)


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_tagging_without_host_sync(phi3, phi3_tagger):
    ids = phi3.apply_chat_template(CONV, tokenize=True, return_dict=True)["input_ids"]
    batch = torch.tensor([ids, ids], device="cuda")
    pos = torch.arange(len(ids), device="cuda").repeat(2, 1)
    phi3_tagger(batch, pos)  # warm-up: marker ids are copied to the device once
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        roles = phi3_tagger(batch, pos)
        stats = batch_stats(torch.where(roles >= ROLE_ASSISTANT_CONTENT, batch, -100), roles=roles)
    finally:
        torch.cuda.set_sync_debug_mode("default")
    assert roles.device.type == "cuda"
    assert roles[0].tolist() == phi3_reference(phi3, ids)
    assert as_dict(stats)["prompt_leakage_tokens"] == 0


def test_rows_shorter_than_a_marker_and_empty_rows(zephyr_tokenizer):
    tagger = RoleTagger.from_tokenizer(zephyr_tokenizer)
    assert max(len(s) for s in tagger.assistant.seqs) > 2
    # Zephyr conversations start with an opener: a row starting with anything else is a cut fragment
    assert tagger(torch.tensor([[1, 2]])).tolist() == [[ROLE_UNKNOWN, ROLE_UNKNOWN]]
    assert tagger(torch.zeros((2, 0), dtype=torch.long)).shape == (2, 0)
