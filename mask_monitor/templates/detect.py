"""Find the chat template of a tokenizer (or of a template string): registry first, derivation otherwise.

:func:`detect_template` renders a probe conversation (sentinel contents) through the template, then
tries the registry entries whose ``requires`` strings occur in the template source, in order; the
first entry whose markers *agree with the render* (its assistant opener precedes each assistant
content, its end of turn follows it, its user opener precedes the user content) is returned. When no
entry agrees, the markers are derived from the render (``family="derived"``). A tokenizer without a
chat template gives ``None``.

Example:
    >>> src = ("{% for m in messages %}{{ '<|im_start|>' + m.role + '\\n' + m.content + '<|im_end|>\\n' }}"
    ...        "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}")
    >>> detect_template(src).family
    'chatml'
    >>> detect_template(src.replace("im_", "turn_")).family
    'derived'
"""

from __future__ import annotations

import logging
from collections.abc import Iterable
from typing import Any

from mask_monitor.templates.chat_template import ChatTemplate
from mask_monitor.templates.derive import SENTINELS, ProbeRender, derive_template, render_probe
from mask_monitor.templates.registry import REGISTRY
from mask_monitor.templates.render import TemplateRenderer

__all__ = [
    "detect_template",
    "renderer_for",
    "agrees_with_render",
    "TemplateUnreadable",
    "why_unreadable",
    "REGISTER_HINT",
]

logger = logging.getLogger(__name__)

#: What to pass when a template cannot be read (said in every such message).
REGISTER_HINT = (
    "pass template=ChatTemplate(family=..., assistant=..., end_of_turn=..., user=...) or register the format "
    "with mask_monitor.register_template(...)"
)


class TemplateUnreadable(ValueError):
    """A chat template the monitor cannot read: the message says why, in one line, and what to pass."""


def why_unreadable(tokenizer_or_template: Any, special_tokens: Any = None, **render_kwargs: Any) -> str:
    """One line: why no :class:`ChatTemplate` can be read for this tokenizer, and what to pass instead."""
    renderer = renderer_for(tokenizer_or_template, special_tokens)
    if renderer is None:
        return f"the tokenizer has no chat template; {REGISTER_HINT}"
    try:
        render_probe(renderer, **render_kwargs)
    except ValueError as exc:
        return f"{_first_line(exc)}; {REGISTER_HINT}"
    try:
        derive_template(renderer, **render_kwargs)
    except ValueError as exc:
        return f"no turn markers can be read off the chat template's render ({_first_line(exc)}); {REGISTER_HINT}"
    return f"the chat template could not be read; {REGISTER_HINT}"


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__


def renderer_for(
    tokenizer_or_template: Any, special_tokens: dict[str, Any] | Iterable[str] | None = None
) -> TemplateRenderer | None:
    """A :class:`TemplateRenderer` for a tokenizer or a template string (``None``: no template)."""
    if isinstance(tokenizer_or_template, TemplateRenderer):
        return tokenizer_or_template
    if isinstance(tokenizer_or_template, str):
        return TemplateRenderer.from_template(tokenizer_or_template, special_tokens)
    tok = getattr(tokenizer_or_template, "tokenizer", tokenizer_or_template)  # processors wrap one
    renderer = TemplateRenderer.from_tokenizer(tokenizer_or_template)
    if renderer is None and tok is not tokenizer_or_template:
        renderer = TemplateRenderer.from_tokenizer(tok)
    return renderer


def _starts_with_eot(text: str, eots: tuple[str, ...]) -> bool:
    for e in eots:
        if not e.strip():
            if text.startswith(e):
                return True
        elif text.lstrip().startswith(e):
            return True
    return False


def agrees_with_render(template: ChatTemplate, probe: ProbeRender) -> bool:
    """Whether ``template``'s markers (placeholders resolved) fit a render of the probe conversation."""
    _, u1, a1, u2, a2 = SENTINELS
    text = probe.text
    eots = template.end_of_turns
    for a in (a1, a2):
        if template.assistant not in probe.gap_before(a):
            return False
    after = probe.gap_after(a1)
    if eots:
        if not _starts_with_eot(after, eots):
            return False
        tail = text[probe.end(a2) :]
        if tail.strip() and not _starts_with_eot(tail, eots):
            return False
        if not tail.strip() and any(e.strip() for e in eots):
            return False
    elif template.user is not None and not after.lstrip().startswith(template.user.strip()):
        return False
    if template.user is not None and template.user not in probe.gap_before(u2):
        return False
    if template.user_end is not None and not probe.gap_after(u1).lstrip().startswith(template.user_end):
        return False
    return True


def detect_template(
    tokenizer_or_template: Any,
    special_tokens: dict[str, Any] | Iterable[str] | None = None,
    **render_kwargs: Any,
) -> ChatTemplate | None:
    """The :class:`ChatTemplate` of a tokenizer, or of a Jinja template string plus its special tokens.

    Args:
        tokenizer_or_template: a tokenizer or processor with a ``chat_template``, a template string,
            or a :class:`ChatTemplate` (returned as is).
        special_tokens: for a template string: ``{"bos_token": ..., "eos_token": ..., "added_tokens": [...]}``
            or a list of special token strings.
        render_kwargs: extra template variables for the probe renders (e.g. ``enable_thinking=False``).

    Returns:
        A registry entry (``source="registry"`` or ``"user"``) whose markers agree with a render, else
        markers derived from the render (``family="derived"``), or ``None`` when there is no template
        or it cannot render a user/assistant conversation.
    """
    if isinstance(tokenizer_or_template, ChatTemplate):
        return tokenizer_or_template
    renderer = renderer_for(tokenizer_or_template, special_tokens)
    if renderer is None:
        return None
    source = renderer.chat_template
    candidates = [t for t in REGISTRY if all(r in source for r in t.requires)]
    try:
        probe = render_probe(renderer, **render_kwargs)
    except ValueError as exc:
        logger.warning("mask-monitor: %s; %s", _first_line(exc), REGISTER_HINT)
        return None
    for entry in candidates:
        try:
            resolved = entry.resolved(renderer.bos_token, renderer.eos_token)
        except ValueError:
            continue
        if agrees_with_render(resolved, probe):
            return resolved
    try:
        return derive_template(renderer, **render_kwargs)
    except ValueError as exc:
        logger.warning("mask-monitor: no turn markers can be read off the chat template's render (%s); %s",
                       _first_line(exc), REGISTER_HINT)
        return None
