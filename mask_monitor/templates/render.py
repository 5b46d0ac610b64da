"""Render conversations through a Jinja chat template, from a tokenizer or from a template string.

:class:`TemplateRenderer` is the one place the templates package renders text: detection verifies
registry entries against a render, derivation reads markers off renders of probe conversations, and
the role tagger tokenizes renders to find marker token ids in context. It also knows the special
tokens, so that text cut from a render never splits one (:func:`snap_prefix`, :func:`snap_suffix`).

Example:
    >>> r = TemplateRenderer("{% for m in messages %}<{{ m.role }}>{{ m.content }}</s>{% endfor %}",
    ...                      special_tokens={"eos_token": "</s>"})
    >>> r.render([{"role": "user", "content": "hi"}])
    '<user>hi</s>'
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

__all__ = [
    "TemplateRenderer",
    "common_prefix",
    "common_suffix",
    "snap_prefix",
    "snap_suffix",
    "probe_conversation",
]

_SPECIAL_KEYS = ("bos_token", "eos_token", "pad_token", "unk_token")


@dataclass(frozen=True)
class TemplateRenderer:
    """A Jinja chat template plus the special tokens its renders may contain."""

    chat_template: str
    special_tokens: dict[str, str | None] = field(default_factory=dict)
    added_tokens: tuple[str, ...] = ()

    @classmethod
    def from_tokenizer(cls, tokenizer: Any) -> TemplateRenderer | None:
        """The tokenizer's own chat template, or ``None`` when it has none."""
        template = getattr(tokenizer, "chat_template", None)
        if isinstance(template, dict):
            template = template.get("default") or next(iter(template.values()), None)
        if not isinstance(template, str) or not template.strip():
            return None
        specials: dict[str, str | None] = {}
        for key in _SPECIAL_KEYS:
            value = getattr(tokenizer, key, None)
            specials[key] = value if isinstance(value, str) else None
        added = tuple(getattr(tokenizer, "added_tokens_encoder", {}) or {})
        return cls(template, specials, added)

    @classmethod
    def from_template(
        cls, chat_template: str, special_tokens: dict[str, Any] | Iterable[str] | None = None
    ) -> TemplateRenderer:
        """A template string; ``special_tokens`` maps ``bos_token``/``eos_token``/... to their text
        (an ``added_tokens`` key may list further special token strings), or is a plain list of them."""
        specials: dict[str, str | None] = {}
        added: list[str] = []
        if isinstance(special_tokens, dict):
            for key, value in special_tokens.items():
                if key in _SPECIAL_KEYS:
                    specials[key] = value if isinstance(value, str) else None
                elif key in ("added_tokens", "additional_special_tokens") and value:
                    added.extend(str(v) for v in value)
        elif special_tokens is not None:
            added.extend(str(v) for v in special_tokens)
        return cls(chat_template, specials, tuple(added))

    @property
    def bos_token(self) -> str | None:
        return self.special_tokens.get("bos_token")

    @property
    def eos_token(self) -> str | None:
        return self.special_tokens.get("eos_token")

    @property
    def all_special(self) -> tuple[str, ...]:
        """Every special token string known, longest first."""
        toks = {t for t in (*self.special_tokens.values(), *self.added_tokens) if t}
        return tuple(sorted(toks, key=len, reverse=True))

    def render(self, messages: list[dict[str, Any]], add_generation_prompt: bool = False, **kwargs: Any) -> str:
        """Render one conversation to text, as ``apply_chat_template(tokenize=False)`` would."""
        from transformers.utils.chat_template_utils import render_jinja_template

        values = {k: v for k, v in self.special_tokens.items() if v is not None}
        values.update(kwargs)
        rendered, _ = render_jinja_template(
            conversations=[messages],
            chat_template=self.chat_template,
            add_generation_prompt=add_generation_prompt,
            **values,
        )
        return rendered[0]


def common_prefix(a: str, b: str) -> str:
    n = 0
    for x, y in zip(a, b, strict=False):
        if x != y:
            break
        n += 1
    return a[:n]


def common_suffix(a: str, b: str) -> str:
    n = 0
    for x, y in zip(reversed(a), reversed(b), strict=False):
        if x != y:
            break
        n += 1
    return a[len(a) - n :]


def _cut_points_inside(text: str, specials: Iterable[str]) -> list[tuple[int, int]]:
    spans = []
    for tok in specials:
        start = text.find(tok)
        while start >= 0:
            spans.append((start, start + len(tok)))
            start = text.find(tok, start + 1)
    return spans


def snap_prefix(text: str, n: int, specials: Iterable[str]) -> str:
    """``text[:n]``, moved back so it does not end inside a special token."""
    spans = _cut_points_inside(text, specials)
    moved = True
    while moved:
        moved = False
        for a, b in spans:
            if a < n < b:
                n, moved = a, True
    return text[:n]


def snap_suffix(text: str, n: int, specials: Iterable[str]) -> str:
    """The last ``n`` characters of ``text``, shortened so they do not start inside a special token."""
    start = len(text) - n
    spans = _cut_points_inside(text, specials)
    moved = True
    while moved:
        moved = False
        for a, b in spans:
            if a < start < b:
                start, moved = b, True
    return text[start:]


def probe_conversation(
    contents: tuple[str, str, str, str, str], system: bool = True
) -> list[dict[str, str]]:
    """system, user, assistant, user, assistant messages with the given contents."""
    sys_c, u1, a1, u2, a2 = contents
    msgs = [
        {"role": "user", "content": u1},
        {"role": "assistant", "content": a1},
        {"role": "user", "content": u2},
        {"role": "assistant", "content": a2},
    ]
    if system:
        msgs.insert(0, {"role": "system", "content": sys_c})
    return msgs
