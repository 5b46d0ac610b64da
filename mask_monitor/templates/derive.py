"""Read a chat template's turn markers off renders of probe conversations.

For a template no registry entry knows, :func:`derive_template` renders a system + two-turn probe
conversation whose contents are unique sentinel words, and reads the text *between* the sentinels:

* assistant end of turn: what follows an assistant turn both before the next user turn and at the very
  end (their common prefix, never cutting a special token); when those share nothing (gpt-oss ``<|end|>``
  vs ``<|return|>``), both; when only whitespace separates the turns, that whitespace;
* user opener: what follows that end of turn up to the next user content;
* assistant opener: the text between a user content and the next assistant content, minus the user
  turn's own closer (read from a render that ends on the user turn) unless that leaves only
  whitespace, cut to what it shares with the generation prompt (``[/INST]`` vs ``[/INST] ``), and cut
  before a ``<think>`` block, which the model generates;
* system opener: the short text before the system content (bos removed), when the template renders one.

Templates that move the system prompt (Mistral v0.3) or reject the system role (Gemma 2) work: gaps run
to the next sentinel whatever its role, and a probe without system is tried when the first raises.

Example:
    >>> src = ("{% for m in messages %}<|{{ m.role }}|>{{ m.content }}{% if m.role == 'assistant' %}"
    ...        "<|stop|>{% endif %}{% endfor %}{% if add_generation_prompt %}<|assistant|>{% endif %}")
    >>> t = derive_template(TemplateRenderer.from_template(src, ["<|stop|>"]))
    >>> (t.family, t.assistant, t.end_of_turn, t.user, t.system)
    ('derived', '<|assistant|>', '<|stop|>', '<|user|>', '<|system|>')
"""

from __future__ import annotations

from typing import Any

from mask_monitor.templates.chat_template import ChatTemplate
from mask_monitor.templates.render import (
    TemplateRenderer,
    common_prefix,
    probe_conversation,
    snap_prefix,
)

__all__ = ["derive_template", "render_probe", "ProbeRender", "SENTINELS", "THINK_OPEN"]

#: Contents of the probe conversation: system, user 1, assistant 1, user 2, assistant 2.
SENTINELS: tuple[str, str, str, str, str] = ("Qzxsysword", "Qzxuserone", "Qzxbotone", "Qzxusertwo", "Qzxbottwo")
#: A header never extends into a reasoning block: the model generates it.
THINK_OPEN = "<think>"
_MAX_SYSTEM_OPENER = 48


class ProbeRender:
    """One render of the probe conversation with the sentinel positions located."""

    def __init__(self, text: str, contents: tuple[str, ...], with_system: bool) -> None:
        self.text = text
        self.with_system = with_system
        self.start: dict[str, int] = {}
        for c in contents if with_system else contents[1:]:
            pos = text.find(c)
            if pos < 0:
                raise ValueError(f"probe content {c!r} not found in the render")
            self.start[c] = pos
        self.contents = contents

    def end(self, c: str) -> int:
        return self.start[c] + len(c)

    def next_start(self, pos: int) -> int:
        """Start of the first sentinel after ``pos`` (or the end of the text)."""
        later = [s for s in self.start.values() if s >= pos]
        return min(later) if later else len(self.text)

    def prev_end(self, pos: int) -> int:
        """End of the last sentinel before ``pos`` (or 0)."""
        earlier = [s + len(c) for c, s in self.start.items() if s + len(c) <= pos]
        return max(earlier) if earlier else 0

    def gap_before(self, c: str) -> str:
        return self.text[self.prev_end(self.start[c]) : self.start[c]]

    def gap_after(self, c: str) -> str:
        return self.text[self.end(c) : self.next_start(self.end(c))]


def render_probe(
    renderer: TemplateRenderer,
    contents: tuple[str, str, str, str, str] = SENTINELS,
    **kwargs: Any,
) -> ProbeRender:
    """Render the probe conversation (with a system turn if the template accepts one)."""
    errors = []
    for with_system in (True, False):
        try:
            text = renderer.render(probe_conversation(contents, system=with_system), **kwargs)
            return ProbeRender(text, contents, with_system)
        except Exception as exc:  # noqa: BLE001 - templates raise anything (TemplateError, ValueError...)
            first = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
            errors.append(f"{type(exc).__name__}: {first}")
    raise ValueError("the chat template cannot render a user/assistant conversation: " + "; ".join(errors))


def _leading_special(text: str, specials: tuple[str, ...]) -> str | None:
    for tok in specials:
        if text.startswith(tok):
            return tok
    return None


def derive_template(renderer: TemplateRenderer, **render_kwargs: Any) -> ChatTemplate:
    """Derive the training-time markers of ``renderer``'s template (``family="derived"``).

    Raises:
        ValueError: the template cannot render the probe conversation, or no assistant opener can be read.
    """
    specials = renderer.all_special
    probe = render_probe(renderer, **render_kwargs)
    s_sys, u1, a1, u2, a2 = SENTINELS
    text = probe.text

    # Renders that end on the last user turn, without and with the generation prompt.
    msgs = probe_conversation(SENTINELS, system=probe.with_system)[:-1]
    try:
        no_gen = renderer.render(msgs, add_generation_prompt=False, **render_kwargs)
        user_tail = no_gen[no_gen.rindex(u2) + len(u2) :]
    except Exception:  # noqa: BLE001
        user_tail = ""
    try:
        gen = renderer.render(msgs, add_generation_prompt=True, **render_kwargs)
        gen_tail: str | None = gen[gen.rindex(u2) + len(u2) :]
    except Exception:  # noqa: BLE001
        gen_tail = None

    # End of an assistant turn: what follows it both mid-conversation and at the very end.
    g_au = probe.gap_after(a1)
    g_end = text[probe.end(a2) :]
    if gen_tail is not None:
        # a template that writes a generation prompt after the last turn even without
        # add_generation_prompt: that prompt is not part of the turn's end
        gen_only = gen_tail[len(snap_prefix(gen_tail, len(common_prefix(gen_tail, user_tail)), specials)) :]
        if gen_only.strip() and g_end.endswith(gen_only):
            g_end = g_end[: len(g_end) - len(gen_only)]
    closer = snap_prefix(g_au, len(common_prefix(g_au, g_end)), specials)
    alt: tuple[str, ...] = ()
    if closer.strip():
        eot = closer.strip()
    elif g_end.strip():
        eot = g_end.strip()
        lead = _leading_special(g_au.lstrip(), specials)
        if lead and lead != eot:
            alt = (lead,)
            closer = g_au[: g_au.index(lead) + len(lead)]
    else:
        # nothing closes the last turn: whitespace between turns (or nothing at all) is the closer
        ws = g_au[: len(g_au) - len(g_au.lstrip())]
        eot, closer = ws, ws
    user_opener = g_au[len(closer) :].lstrip() or None

    # Assistant opener: the gap before the last assistant content minus the user turn's closer.
    g_ua = probe.gap_before(a2)
    if gen_tail is None:
        gen_tail = g_ua
    user_closer = snap_prefix(g_ua, len(common_prefix(g_ua, user_tail)), specials)
    opener = g_ua[len(user_closer) :]
    if not opener.strip() and closer.strip() and g_ua.startswith(closer) and g_ua[len(closer) :].strip():
        # the template writes the assistant header with the user turn (early Phi-3, Yi): a user turn
        # usually closes like an assistant turn
        user_closer = closer
        opener = g_ua[len(closer) :]
    if opener.strip():
        gen_opener = gen_tail[len(user_closer) :] if gen_tail.startswith(user_closer) else gen_tail
    else:
        opener, gen_opener = g_ua, gen_tail
    shared = snap_prefix(opener, len(common_prefix(opener, gen_opener)), specials)
    if shared.strip():
        opener = shared
    if THINK_OPEN in opener and opener[: opener.index(THINK_OPEN)].strip():
        opener = opener[: opener.index(THINK_OPEN)]
    opener = opener.lstrip()
    if not opener.strip():
        raise ValueError(f"cannot read an assistant turn opener off the render {text[:200]!r}")

    # System opener: the short text before the system content, when the system turn comes first.
    system_opener = None
    if probe.with_system and probe.start[s_sys] == min(probe.start.values()):
        pre = text[: probe.start[s_sys]]
        for tok in (renderer.bos_token,):
            while tok and pre.startswith(tok):
                pre = pre[len(tok) :]
        pre = pre.lstrip()
        if pre.strip() and len(pre) <= _MAX_SYSTEM_OPENER and pre != user_opener:
            system_opener = pre
    return ChatTemplate(
        family="derived",
        assistant=opener,
        end_of_turn=eot,
        user=user_opener,
        system=system_opener,
        source="derived",
        alt_end_of_turn=alt,
    )
