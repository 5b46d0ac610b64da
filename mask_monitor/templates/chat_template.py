"""What a chat template looks like at training time: the text that opens and closes each turn.

A :class:`ChatTemplate` names a family and holds the *training-time* turn markers: the text that opens
an assistant turn (the header the loss should not train on), a user turn and a system turn, and the
text that closes an assistant turn (which the loss should train on, so the model learns to stop).
Markers are plain text here; :class:`~mask_monitor.templates.roles.RoleTagger` turns them into token
ids by rendering and tokenizing whole conversations.

Example:
    >>> t = ChatTemplate("vicuna", assistant="ASSISTANT:", end_of_turn="{eos}", user="USER:")
    >>> t.resolved(bos_token="<s>", eos_token="</s>").end_of_turns
    ('</s>',)
    >>> describe(t.resolved("<s>", "</s>"))
    "chat template: vicuna (registry): assistant 'ASSISTANT:', end of turn '</s>', user 'USER:'"
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import Literal

__all__ = ["ChatTemplate", "TemplateSource", "describe"]

TemplateSource = Literal["registry", "derived", "user"]


@dataclass(frozen=True)
class ChatTemplate:
    """Training-time turn markers of one chat format.

    Args:
        family: family name (``"chatml"``, ``"llama3"``, ...; ``"derived"`` for derived templates).
        assistant: text that opens an assistant turn, as rendered in a training conversation
            (``"<|im_start|>assistant\\n"``). Never empty.
        end_of_turn: text that closes an assistant turn (``"<|im_end|>"``); ``""`` when the template
            closes a turn only by opening the next one (GLM). A whitespace-only end of turn
            (``"\\n"``) only counts where the next turn's opener follows it directly.
        user: text that opens a user turn, or ``None``.
        system: text that opens a system turn, or ``None`` (system folded into the user turn, or
            rendered bare).
        source: ``"registry"`` (a known family), ``"derived"`` (read off a render of the tokenizer's
            own template) or ``"user"`` (registered with :func:`register_template`).
        alt_end_of_turn: further texts that also close an assistant turn (gpt-oss ``<|return|>``).
        user_end: text that closes a user turn; only checked when detection verifies a registry
            entry against a render (tells Zephyr, whose user turns end with eos, from Tulu).
        requires: substrings a Jinja chat template must contain for this registry entry to be
            tried on it (detection then verifies the entry against a render).
        models: example models using the format (documentation only).
    """

    family: str
    assistant: str
    end_of_turn: str
    user: str | None = None
    system: str | None = None
    source: TemplateSource = "registry"
    alt_end_of_turn: tuple[str, ...] = ()
    user_end: str | None = field(default=None, compare=False)
    requires: tuple[str, ...] = field(default=(), compare=False)
    models: tuple[str, ...] = field(default=(), compare=False)

    def __post_init__(self) -> None:
        if not isinstance(self.assistant, str) or not self.assistant.strip():
            raise ValueError(f"ChatTemplate(family={self.family!r}): the assistant opener must be non-empty text")
        if self.source not in ("registry", "derived", "user"):
            raise ValueError(f"ChatTemplate(source={self.source!r}): expected 'registry', 'derived' or 'user'")

    @property
    def end_of_turns(self) -> tuple[str, ...]:
        """Every text that closes an assistant turn (empty tuple when only the next opener does)."""
        return tuple(t for t in (self.end_of_turn, *self.alt_end_of_turn) if t)

    def resolved(self, bos_token: str | None, eos_token: str | None) -> ChatTemplate:
        """This template with ``{bos}`` / ``{eos}`` placeholders replaced by the tokenizer's tokens."""

        def sub(text: str | None) -> str | None:
            if text is None:
                return None
            if "{eos}" in text:
                if not eos_token:
                    raise ValueError(f"template {self.family!r} needs an eos token")
                text = text.replace("{eos}", eos_token)
            if "{bos}" in text:
                if not bos_token:
                    raise ValueError(f"template {self.family!r} needs a bos token")
                text = text.replace("{bos}", bos_token)
            return text

        return replace(
            self,
            assistant=sub(self.assistant) or "",
            end_of_turn=sub(self.end_of_turn) or "",
            user=sub(self.user),
            system=sub(self.system),
            alt_end_of_turn=tuple(sub(t) or "" for t in self.alt_end_of_turn),
            user_end=sub(self.user_end),
        )


def describe(template: ChatTemplate | str | None) -> str:
    """One log line saying which template the audit uses (or that there is none)."""
    if isinstance(template, str):
        from mask_monitor.templates.spec import resolve_template

        resolved = resolve_template(template)
        if resolved == "auto":
            return "chat template: detected from the tokenizer"
        template = resolved  # type: ignore[assignment]
    if template is None:
        return (
            "no chat template: leakage audit off, masked-fraction audit on "
            "(register one with mask_monitor.register_template(...) to enable it)"
        )
    how = {"registry": "registry", "derived": "derived from the tokenizer's chat template", "user": "registered"}
    parts = [f"assistant {template.assistant!r}"]
    eots = " or ".join(repr(t) for t in template.end_of_turns) or "none (next turn's opener)"
    parts.append(f"end of turn {eots}")
    if template.user is not None:
        parts.append(f"user {template.user!r}")
    if template.system is not None:
        parts.append(f"system {template.system!r}")
    return f"chat template: {template.family} ({how[template.source]}): " + ", ".join(parts)
