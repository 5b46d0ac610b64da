"""The exact per-token assistant mask of a conversation, for any chat template.

:func:`assistant_token_mask` tokenizes a conversation the way training does
(``tokenizer.apply_chat_template(messages, tokenize=True)``) and marks the tokens the loss should
train on: each assistant turn's content and its end of turn (plus what the template writes after the
end of turn before the next opener, e.g. the ``"\\n"`` after ``<|im_end|>``), never a header. It uses
the same :class:`~mask_monitor.templates.roles.RoleTagger` the on-device audit uses, so it works for
templates that drop earlier ``<think>`` blocks, move the system prompt, strip content or emit bos
themselves: it reads the rendered tokens, not prefix renders.

Differences from ``{% generation %}`` spans (``return_assistant_tokens_mask=True``), by design: spans
of the SmolLM3, gpt-oss and DeepSeek-V3 training templates include the assistant header, and Qwen2.5's
include the ``"\\n"`` that ends its header; the header is prompt, so this mask leaves it out.
Everything else agrees with the fixture spans (content, think blocks, end of turn, trailing newline,
Phi-3's final ``<|endoftext|>``).

Example:
    >>> from transformers import AutoTokenizer  # doctest: +SKIP
    >>> tok = AutoTokenizer.from_pretrained("Qwen/Qwen2.5-0.5B-Instruct")  # doctest: +SKIP
    >>> assistant_token_mask(tok, [{"role": "user", "content": "hi"},
    ...                            {"role": "assistant", "content": "hello"}])  # doctest: +SKIP
    [0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 1, 1, 1]
"""

from __future__ import annotations

import weakref
from typing import Any

import torch

from mask_monitor.templates.chat_template import ChatTemplate
from mask_monitor.templates.roles import RoleTagger, answer_mask

__all__ = ["assistant_token_mask", "tagger_for"]

_TAGGERS: weakref.WeakKeyDictionary[Any, dict[Any, RoleTagger]] = weakref.WeakKeyDictionary()


def tagger_for(tokenizer: Any, template: ChatTemplate | None = None, **chat_template_kwargs: Any) -> RoleTagger:
    """A cached :class:`RoleTagger` for ``tokenizer`` (and ``template``, detected when ``None``; and the
    template variables the conversations are rendered with, which can change the generation prompt)."""
    key = (template, getattr(tokenizer, "chat_template", None), _freeze(chat_template_kwargs))
    try:
        per_tok = _TAGGERS.setdefault(tokenizer, {})
    except TypeError:  # not weak-referenceable
        return RoleTagger.from_tokenizer(tokenizer, template, **chat_template_kwargs)
    if key not in per_tok:
        per_tok[key] = RoleTagger.from_tokenizer(tokenizer, template, **chat_template_kwargs)
    return per_tok[key]


def _freeze(value: Any) -> Any:
    if isinstance(value, dict):
        return tuple(sorted((k, _freeze(v)) for k, v in value.items()))
    if isinstance(value, list | tuple):
        return tuple(_freeze(v) for v in value)
    try:
        hash(value)
    except TypeError:
        return repr(value)
    return value


def assistant_token_mask(
    tokenizer: Any,
    messages: list[dict[str, Any]],
    *,
    template: ChatTemplate | None = None,
    **chat_template_kwargs: Any,
) -> list[int]:
    """1 for each token of the tokenized conversation the loss should train on, else 0.

    Args:
        tokenizer: a tokenizer with a chat template (a fast tokenizer: offsets are needed once).
        messages: the conversation (``[{"role": ..., "content": ...}, ...]``).
        template: the markers to use; detected from the tokenizer when ``None``.
        chat_template_kwargs: passed to ``apply_chat_template`` (``tools=``, ``enable_thinking=``...).

    Returns:
        A list as long as ``apply_chat_template(messages, tokenize=True)["input_ids"]``.
    """
    enc = tokenizer.apply_chat_template(messages, tokenize=True, return_dict=True, **chat_template_kwargs)
    ids = list(enc["input_ids"])
    if not ids:
        return []
    kwargs = {k: v for k, v in chat_template_kwargs.items() if k not in ("tools", "documents", "chat_template")}
    roles = tagger_for(tokenizer, template, **kwargs)(torch.tensor([ids], dtype=torch.long))[0]
    return answer_mask(roles).to(torch.long).tolist()
