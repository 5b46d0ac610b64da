"""Give every token of a batch its conversational role, on the batch's own device.

:class:`RoleTagger` is built once per tokenizer and template. It finds each marker's token ids by
rendering whole probe conversations with the tokenizer's chat template and tokenizing them: a marker's
ids are the tokens whose first non-blank character lies inside the marker's text in the render (so a
space that SentencePiece merges into the next content token, or a newline the Phi-3 tokenizer strips,
is never part of a marker), collected over several probe contents (a marker can tokenize differently
in different contexts; every variant seen is matched). A marker string is never tokenized alone.

What is *header* is read off the renders, not the marker text: everything the template writes between
an assistant opener and the message's content (gpt-oss's ``<|channel|>final<|message|>``, the empty
``<think>\\n\\n</think>\\n\\n`` Qwen3 writes before a last answer, the space after ``[/INST]``), and
everything the *generation prompt* holds (``<think>\\n`` forced by a reasoning template): the model is
given those at inference, so they are never answer.

Calling the tagger on ``input_ids`` (and ``position_ids`` for packed batches) returns a tensor of role
codes from :mod:`mask_monitor.stats`, computed with a few vectorised ops (shifted compares to find
marker occurrences, ``cummax`` of event positions to carry the current role forward), no Python loop
over tokens and no device-to-host sync:

* ``ROLE_SYSTEM`` / ``ROLE_USER``: from a system / user opener up to the next opener;
* ``ROLE_ASSISTANT_HEADER``: the tokens of an assistant header (above);
* ``ROLE_ASSISTANT_CONTENT``: after the header until the end of turn (reasoning blocks of the message
  included), whitespace the template writes before its end-of-turn token included;
* ``ROLE_END_OF_TURN``: the end of turn closing an assistant turn, what the model emits to stop: one
  special token (``<|im_end|>``, ``</s>``, ``<|eot_id|>``; the first, when the template writes several),
  or an end of turn written as plain text (all of it). A template that writes no end of turn but opens
  the next turn with a special token (GLM's ``<|user|>``) has that token as the end of the turn before;
* ``ROLE_SEPARATOR``: what an assistant turn writes after its end of turn before the next opener (the
  ``"\n"`` after ``<|im_end|>``, Phi-3's final ``<|endoftext|>``), and whitespace that closes a turn
  without an end of turn (Falcon's ``"\n"`` before ``User:``; only where an opener or the end of the row
  follows): answer (supervising it is not prompt leakage), but not a target of its own;
* ``ROLE_OTHER``: anything before the first opener of a row or packed document that starts the way a
  conversation does (bos, a bare system prompt), and the whole document when it has no opener;
* ``ROLE_UNKNOWN``: the same for a row or document that starts some other way: a fragment cut out of a
  conversation (wrapped packing, ``truncation_mode="keep_end"``, a left-padded row), whose role nothing
  tells.

A packed document starts where ``position_ids == 0``; roles never carry across documents.

Example (needs a tokenizer; the callback does exactly this at train begin)::

    tagger = RoleTagger.from_tokenizer(tokenizer, detect_template(tokenizer))
    roles = tagger(batch["input_ids"], batch.get("position_ids"))  # same device, no host sync
    stats = batch_stats(batch["labels"], roles=roles)
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import Any

import torch
import torch.nn.functional as F

from mask_monitor.stats import (
    ROLE_ASSISTANT_CONTENT,
    ROLE_ASSISTANT_HEADER,
    ROLE_END_OF_TURN,
    ROLE_OTHER,
    ROLE_SEPARATOR,
    ROLE_SYSTEM,
    ROLE_UNKNOWN,
    ROLE_USER,
)
from mask_monitor.templates.chat_template import ChatTemplate
from mask_monitor.templates.render import TemplateRenderer, common_prefix, probe_conversation, snap_prefix

__all__ = ["RoleTagger", "MarkerIds", "PROBE_CONTENTS", "answer_mask", "special_ids"]

#: Probe conversations (system, user, assistant, user, assistant) tokenized to find marker ids. Empty
#: answers show what a header is followed by when nothing follows it (the end of turn directly).
PROBE_CONTENTS: tuple[tuple[str, str, str, str, str], ...] = (
    ("You are a helpful assistant.", "What is 2+2?", "2+2 equals 4.", "And 3+3?", "3+3 equals 6."),
    ("Be brief", "hello there", "Hi! How can I help", "write one line", "Sure thing: done"),
    ("Answer in French.", "Name a colour", "bleu", "Thanks!", "De rien :)"),
    ("<b>Rules</b> apply", "(quick) 7*6?", "<b>42</b> it is", "- one more\n- list", "42, as before."),
    ("# Role", "1) go", "* done (1)", "[ok]?", "\"quoted\" reply"),
    ("Say little.", "Reply with nothing.", "", "Now one word.", "Fine"),
    ("Say little.", "One word please.", "Okay", "Now nothing.", ""),
)
_EMPTY_SENTINEL = "Qzxemptyslot"


class MarkerIds:
    """Token-id sequences of one marker kind, grouped by length as ``(k, LongTensor[n, k])``."""

    def __init__(self, seqs: Iterable[Sequence[int]]) -> None:
        self.seqs: tuple[tuple[int, ...], ...] = tuple(sorted({tuple(s) for s in seqs if len(s) > 0}))
        by_len: dict[int, list[tuple[int, ...]]] = {}
        for s in self.seqs:
            by_len.setdefault(len(s), []).append(s)
        self._groups = [(k, torch.tensor(v, dtype=torch.long)) for k, v in sorted(by_len.items())]
        self._on: dict[torch.device, list[tuple[int, torch.Tensor]]] = {}

    def __bool__(self) -> bool:
        return bool(self.seqs)

    def __repr__(self) -> str:
        return f"MarkerIds({list(self.seqs)})"

    def groups(self, device: torch.device) -> list[tuple[int, torch.Tensor]]:
        if device not in self._on:
            self._on[device] = [(k, t.to(device)) for k, t in self._groups]
        return self._on[device]


def special_ids(tokenizer: Any) -> set[int]:
    """Ids of the tokenizer's special and added tokens (atomic tokens no text merge produces)."""
    tok = getattr(tokenizer, "tokenizer", tokenizer)
    ids = set(getattr(tok, "all_special_ids", []) or [])
    ids |= set(getattr(tok, "added_tokens_decoder", {}) or {})
    return {int(i) for i in ids}


def answer_mask(roles: torch.Tensor) -> torch.Tensor:
    """The tokens an assistant-only loss trains on, from role codes: the content of each assistant
    turn and its end of turn (the token the model emits to stop). Same shape as ``roles``, bool."""
    return (roles == ROLE_ASSISTANT_CONTENT) | (roles == ROLE_END_OF_TURN)


def _match(ids: torch.Tensor, k: int, seqs: torch.Tensor) -> torch.Tensor:
    """``[B, L]`` bool: a sequence of ``seqs`` (``[n, k]``) starts at this position."""
    b, length = ids.shape
    if k > length:
        return torch.zeros((b, length), dtype=torch.bool, device=ids.device)
    # Compare one marker position at a time (k is the marker length, a small constant, not the sequence
    # length): [B, L-k+1, n] booleans instead of materialising [B, L-k+1, n, k] windows.
    n = length - k + 1
    hit = ids[:, :n].unsqueeze(-1) == seqs[:, 0]
    for j in range(1, k):
        hit &= ids[:, j : j + n].unsqueeze(-1) == seqs[:, j]
    return F.pad(hit.any(-1), (0, k - 1), value=False)


def _core_start(text: str, start: int, end: int) -> int:
    piece = text[start:end]
    stripped = len(piece) - len(piece.lstrip())
    return start if stripped == len(piece) else start + stripped


def _ids_in_span(text: str, ids: list[int], offsets: list[tuple[int, int]], a: int, b: int) -> tuple[int, ...]:
    out = []
    for tid, (s, e) in zip(ids, offsets, strict=True):
        if e <= s:
            continue
        if a <= _core_start(text, s, e) < b:
            out.append(tid)
    return tuple(out)


def _is_blank(tok: Any, tid: int) -> bool:
    return not tok.decode([tid]).strip()


def _strip_blank_tail(tok: Any, seq: tuple[int, ...]) -> tuple[int, ...]:
    n = len(seq)
    while n > 1 and _is_blank(tok, seq[n - 1]):
        n -= 1
    return seq[:n]


def _specific(tok: Any, seq: tuple[int, ...], added: set[int]) -> bool:
    """A variant is matched only if it holds a special token, or at least two non-blank tokens one of
    which has a letter or digit ("|>" alone would match inside any markup)."""
    if any(t in added for t in seq):
        return True
    pieces = [tok.decode([t]) for t in seq]
    return sum(1 for p in pieces if p.strip()) >= 2 and any(c.isalnum() for p in pieces for c in p)


class RoleTagger:
    """Tag each position of ``input_ids`` with a ``ROLE_*`` code (see the module docstring).

    Build it with :meth:`from_tokenizer`; call it as ``tagger(input_ids, position_ids=None)``.

    Attributes:
        template: the markers the ids were read for.
        assistant, user, system: opener ids (every variant seen in context).
        end_of_turn: end-of-turn ids: one special token, or a whole end of turn written as text.
        whitespace_separator: whitespace that closes a turn when an opener follows it.
        implicit_end: the template writes no end-of-turn token: a special token opening the next turn
            closes the assistant turn before it.
        padding: ids that pad a row (the tokenizer's pad token, and -1): a whitespace closer followed by
            padding ends its row.
        conversation_starts: the first token id of every rendered conversation, when it is always the
            same (``<|im_start|>``, ``<s>``): a row or document starting otherwise is a cut fragment.
    """

    def __init__(
        self,
        template: ChatTemplate,
        assistant: MarkerIds,
        end_of_turn: MarkerIds,
        user: MarkerIds | None = None,
        system: MarkerIds | None = None,
        whitespace_separator: MarkerIds | None = None,
        specials: Iterable[int] = (),
        conversation_starts: Iterable[int] = (),
        padding: Iterable[int] = (-1,),
    ) -> None:
        if not assistant:
            raise ValueError(f"no token ids for the assistant opener {template.assistant!r}")
        self.template = template
        self.assistant = assistant
        self.end_of_turn = end_of_turn
        self.user = user or MarkerIds(())
        self.system = system or MarkerIds(())
        self.whitespace_separator = whitespace_separator or MarkerIds(())
        self.implicit_end = not end_of_turn
        self._specials = torch.tensor(sorted(set(specials)), dtype=torch.long)
        self._specials_on: dict[torch.device, torch.Tensor] = {}
        self._padding = torch.tensor(sorted(set(padding)), dtype=torch.long)
        self._padding_on: dict[torch.device, torch.Tensor] = {}
        self.conversation_starts = tuple(sorted(set(conversation_starts)))
        self._starts = torch.tensor(self.conversation_starts, dtype=torch.long)
        self._starts_on: dict[torch.device, torch.Tensor] = {}

    def __repr__(self) -> str:
        return (
            f"RoleTagger({self.template.family}: assistant={list(self.assistant.seqs)}, "
            f"end_of_turn={list(self.end_of_turn.seqs)}, "
            f"separator={list(self.whitespace_separator.seqs)}, "
            f"user={list(self.user.seqs)}, system={list(self.system.seqs)})"
        )

    # ------------------------------------------------------------------ construction
    @classmethod
    def from_tokenizer(
        cls, tokenizer: Any, template: ChatTemplate | str | None = None, **chat_template_kwargs: Any
    ) -> RoleTagger:
        """Find the marker token ids of ``template`` (detected when ``None`` or ``"auto"``; a family name or
        a description file is resolved with :func:`~mask_monitor.templates.resolve_template`) for ``tokenizer``.

        Probe conversations are rendered with the tokenizer's chat template when it has one and the
        template's markers appear in its render; otherwise a conversation is assembled from the marker
        texts. Either way the whole conversation is tokenized (``add_special_tokens=False``) with
        offsets, and each marker's ids are read off its span. ``chat_template_kwargs`` are passed to the
        renders (``enable_thinking=False`` changes the generation prompt, hence the header).

        Raises:
            TemplateUnreadable: no template could be detected or read, the tokenizer gives no offsets,
                or the assistant opener has no tokens of its own (the message says what to pass).
        """
        from mask_monitor.templates.detect import TemplateUnreadable, detect_template, why_unreadable

        if isinstance(template, str):  # "auto", a family name, a description file
            from mask_monitor.templates.spec import resolve_template

            resolved = resolve_template(template)
            if resolved is None:
                raise TemplateUnreadable("template='none': the chat-template audit is off")
            template = None if resolved == "auto" else resolved
        tok = getattr(tokenizer, "tokenizer", tokenizer)
        if getattr(tok, "is_fast", True) is False:
            raise TemplateUnreadable(
                "the role tagger needs a fast tokenizer (it reads marker ids off offsets); load it with "
                "use_fast=True"
            )
        if template is None:
            template = detect_template(tokenizer, **chat_template_kwargs)
            if template is None:
                raise TemplateUnreadable(why_unreadable(tokenizer, **chat_template_kwargs))
        bos, eos = getattr(tok, "bos_token", None), getattr(tok, "eos_token", None)
        template = template.resolved(bos if isinstance(bos, str) else None, eos if isinstance(eos, str) else None)
        renderer = TemplateRenderer.from_tokenizer(tokenizer) or TemplateRenderer.from_tokenizer(tok)
        added = special_ids(tok)

        found: dict[str, set[tuple[int, ...]]] = {k: set() for k in ("assistant", "eot", "ws_sep", "user", "system")}

        firsts: set[int] = set()  # first token of each rendered probe conversation

        def collect(text: str, spans: list[tuple[str, int, int]], whole: bool = True) -> None:
            enc = tok(text, add_special_tokens=False, return_offsets_mapping=True)
            ids, offsets = list(enc["input_ids"]), [tuple(o) for o in enc["offset_mapping"]]
            if ids and whole:
                firsts.add(ids[0])
            for kind, a, b in spans:
                seq = _ids_in_span(text, ids, offsets, a, b)
                if kind == "eot":
                    lead = 0
                    while lead < len(seq) and _is_blank(tok, seq[lead]):
                        lead += 1
                    if not text[a:b].strip() or lead == len(seq):
                        kind = "ws_sep"  # whitespace closes the turn: no token to learn to stop on
                    elif seq[lead] in added:
                        seq = seq[lead : lead + 1]  # one special token ends the turn; what follows is tail
                    else:
                        seq = seq[lead:]  # an end of turn written as text: all of it
                if seq:
                    found[kind].add(seq)

        for contents in PROBE_CONTENTS:
            text, spans, rendered = _probe_spans(renderer, template, contents, chat_template_kwargs)
            collect(text, spans, rendered)
        gen = _generation_header(renderer, template, chat_template_kwargs)
        if gen is not None:
            collect(*gen)
        for text, spans in _tool_probe(renderer, template, chat_template_kwargs):
            collect(text, spans, False)
        bare: set[int] = set()  # first token of conversations without a system turn
        for contents in PROBE_CONTENTS[:3] if renderer is not None else ():
            try:
                text = renderer.render(probe_conversation(contents, system=False), **chat_template_kwargs)
            except Exception:  # noqa: BLE001 - templates raise anything
                break
            first_ids = tok(text, add_special_tokens=False)["input_ids"][:1]
            bare.update(first_ids)
        # The first token of a plain-text marker can merge with the character before it ("![" in
        # SentencePiece): also match the rest, when it is at least two tokens long.
        # Likewise its trailing whitespace can merge with what follows ("\n\n" + "<"): also match an
        # opener without its trailing whitespace tokens (the longest match wins where both do).
        seen = {kind: set(seqs) for kind, seqs in found.items()}
        for kind, seqs in found.items():
            variants = {s[1:] for s in seqs if s[0] not in added}
            if kind in ("assistant", "user", "system"):
                variants |= {_strip_blank_tail(tok, s) for s in seqs}
            # a shortened variant that is another kind's marker too would tag one as the other
            # ("[/INST]" and "[INST]" both lose their "[" to a merge and leave "INST]")
            clash = set().union(*(v for k, v in seen.items() if k != kind))
            seqs.update(v for v in variants if v and _specific(tok, v, added) and v not in clash)
        if not found["assistant"]:
            raise TemplateUnreadable(
                f"the assistant opener {template.assistant!r} has no tokens of its own in this tokenizer's "
                "renders; register the template's real markers with mask_monitor.register_template(...)"
            )
        return cls(
            template,
            assistant=MarkerIds(found["assistant"]),
            end_of_turn=MarkerIds(found["eot"]),
            user=MarkerIds(found["user"]),
            system=MarkerIds(found["system"]),
            whitespace_separator=MarkerIds(found["ws_sep"]),
            specials=added,
            padding=(-1, *([tok.pad_token_id] if isinstance(getattr(tok, "pad_token_id", None), int) else [])),
            # conversations that start with their own text (a bare system prompt) start any way: then no
            # row can be told to be a fragment
            conversation_starts=firsts | bare if len(firsts) <= 1 and len(bare) <= 1 else (),
        )

    # ------------------------------------------------------------------ tagging
    def __call__(self, input_ids: torch.Tensor, position_ids: torch.Tensor | None = None) -> torch.Tensor:
        """Role codes, same shape and device as ``input_ids`` (``(B, L)`` or ``(L,)``), dtype long."""
        squeeze = input_ids.dim() == 1
        ids = input_ids.unsqueeze(0) if squeeze else input_ids
        ids = ids.long()
        b, length = ids.shape
        dev = ids.device
        if length == 0:
            return torch.zeros_like(input_ids, dtype=torch.long)
        pos = torch.arange(length, device=dev).expand(b, length)
        minus_one = torch.full_like(pos, -1)

        open_kind = torch.zeros_like(pos)
        open_len = torch.zeros_like(pos)
        kinds = ((ROLE_USER, self.user), (ROLE_SYSTEM, self.system), (ROLE_ASSISTANT_HEADER, self.assistant))
        for kind, marker in kinds:
            for k, seqs in marker.groups(dev):
                better = _match(ids, k, seqs) & (open_len < k)
                open_kind = torch.where(better, kind, open_kind)
                open_len = torch.where(better, k, open_len)
        # Markers do not overlap: an opener starting inside an earlier opener's tokens is not one.
        starts = open_len > 0
        covered = torch.cummax(torch.where(starts, pos + open_len - 1, minus_one), dim=1).values
        opens = starts & (F.pad(covered[:, :-1], (1, 0), value=-1) < pos)
        open_kind = torch.where(opens, open_kind, 0)
        open_len = torch.where(opens, open_len, 0)

        first = pos == 0
        if position_ids is not None:
            p = position_ids.unsqueeze(0) if position_ids.dim() == 1 else position_ids
            first = first | (p.expand(b, length) == 0)
        doc_start = torch.cummax(torch.where(first, pos, minus_one), dim=1).values
        if self.conversation_starts:
            if dev not in self._starts_on:
                self._starts_on[dev] = self._starts.to(dev)
            # a row or document that does not start the way a conversation does is a fragment cut out of one
            fragment = ~torch.isin(ids.gather(1, doc_start.clamp(min=0)), self._starts_on[dev])
        else:
            fragment = torch.zeros_like(first)

        last_open = torch.cummax(torch.where(opens, pos, minus_one), dim=1).values
        in_turn = last_open >= doc_start
        at = last_open.clamp(min=0)
        kind_at = open_kind.gather(1, at)
        content_start = last_open + open_len.gather(1, at)

        eot_len = torch.zeros_like(pos)
        for k, seqs in self.end_of_turn.groups(dev):
            eot_len = torch.where(_match(ids, k, seqs) & (eot_len < k), k, eot_len)
        sep = torch.zeros_like(opens)
        if self.whitespace_separator:
            if dev not in self._padding_on:
                self._padding_on[dev] = self._padding.to(dev)
            ends = opens | torch.isin(ids, self._padding_on[dev])  # an opener, padding, or (below) the row's end
        for k, seqs in self.whitespace_separator.groups(dev):
            opener_follows = F.pad(ends, (0, k), value=True)[:, k : k + length]
            sep = sep | (_match(ids, k, seqs) & opener_follows)
        any_eot = torch.cummax(torch.where(eot_len > 0, pos, minus_one), dim=1).values
        before = F.pad(any_eot[:, :-1], (1, 0), value=-1)
        # the turn's end of turn is its first one; a later one in the same turn is part of its tail
        first_eot = (eot_len > 0) & (before < content_start)
        last_eot = torch.cummax(torch.where(first_eot, pos, minus_one), dim=1).values
        eot_end = last_eot + eot_len.gather(1, last_eot.clamp(min=0))  # first position after that end of turn
        last_sep = torch.cummax(torch.where(sep, pos, minus_one), dim=1).values

        assistant = in_turn & (kind_at == ROLE_ASSISTANT_HEADER)
        roles = torch.where(fragment, ROLE_UNKNOWN, ROLE_OTHER)
        roles = torch.where(in_turn & (kind_at == ROLE_USER), ROLE_USER, roles)
        roles = torch.where(in_turn & (kind_at == ROLE_SYSTEM), ROLE_SYSTEM, roles)
        roles = torch.where(assistant, ROLE_ASSISTANT_HEADER, roles)
        in_content = assistant & (pos >= content_start)
        roles = torch.where(in_content, ROLE_ASSISTANT_CONTENT, roles)
        roles = torch.where(in_content & (last_sep >= content_start), ROLE_SEPARATOR, roles)
        ended = in_content & (last_eot >= content_start)
        roles = torch.where(ended, ROLE_END_OF_TURN, roles)
        roles = torch.where(ended & (pos >= eot_end), ROLE_SEPARATOR, roles)  # what the turn writes after it
        if self.implicit_end and self._specials.numel():
            # no end-of-turn token: the special token opening the next turn is what closes this one
            if dev not in self._specials_on:
                self._specials_on[dev] = self._specials.to(dev)
            prev = F.pad(roles[:, :-1], (1, 0), value=ROLE_OTHER)
            after_answer = (
                (prev == ROLE_ASSISTANT_CONTENT) | (prev == ROLE_ASSISTANT_HEADER) | (prev == ROLE_SEPARATOR)
            )
            closes = opens & ~first & after_answer & torch.isin(ids, self._specials_on[dev])
            roles = torch.where(closes, ROLE_END_OF_TURN, roles)
        return roles.squeeze(0) if squeeze else roles


def _content_starts(
    renderer: TemplateRenderer,
    msgs: list[dict[str, str]],
    text: str,
    kwargs: dict[str, Any],
) -> list[int] | None:
    """Start of each non-system message's content in ``text``, in order; an empty content is located
    by rendering a sentinel in its place (the render must agree up to it)."""
    out: list[int] = []
    cursor = 0
    for i, m in enumerate(msgs):
        if m["role"] == "system":
            continue
        c = m["content"].strip()
        if c:
            pos = text.find(c, cursor)
        else:
            alt = [dict(x) for x in msgs]
            alt[i]["content"] = _EMPTY_SENTINEL
            try:
                alt_text = renderer.render(alt, **kwargs)
            except Exception:  # noqa: BLE001 - templates raise anything
                return None
            pos = alt_text.find(_EMPTY_SENTINEL, cursor)
            if pos < 0:
                return None
            same = len(common_prefix(alt_text[:pos], text))
            if alt_text[same:pos].strip():  # the renders must agree up to the slot, whitespace aside
                return None
            pos = same
        if pos < 0:
            return None
        out.append(pos)
        cursor = pos + len(c)
    return out


def _probe_spans(
    renderer: TemplateRenderer | None,
    template: ChatTemplate,
    contents: tuple[str, str, str, str, str],
    kwargs: dict[str, Any] | None = None,
) -> tuple[str, list[tuple[str, int, int]], bool]:
    """A probe conversation's text, the character spans of its markers ``(kind, start, end)``, and whether
    the text is a render of the template (not assembled from the marker texts)."""
    kwargs = kwargs or {}
    if renderer is not None:
        for with_system in (True, False):
            msgs = probe_conversation(contents, system=with_system)
            try:
                text = renderer.render(msgs, **kwargs)
            except Exception:  # noqa: BLE001 - templates raise anything
                continue
            try:  # the same conversation cut after the first answer: what that turn itself emits
                first = renderer.render(msgs[:-2], **kwargs)
            except Exception:  # noqa: BLE001
                first = None
            starts = _content_starts(renderer, msgs, text, kwargs)
            if starts is None:
                continue
            spans = _spans_in_render(text, first, template, contents, starts, with_system, renderer.all_special)
            if spans is not None:
                return text, spans, True
    return (*_synthetic(template, contents), False)


def _spans_in_render(
    text: str,
    first: str | None,
    template: ChatTemplate,
    contents: tuple[str, ...],
    starts_list: list[int],
    with_system: bool,
    specials: tuple[str, ...],
) -> list[tuple[str, int, int]] | None:
    sys_c, u1, a1, u2, a2 = (c.strip() for c in contents)
    order = ("u1", "a1", "u2", "a2")
    value = dict(zip(order, (u1, a1, u2, a2), strict=True))
    starts = dict(zip(order, starts_list, strict=True))
    spans: list[tuple[str, int, int]] = []
    prev_end = 0
    eots = template.end_of_turns
    for key in order:
        c = value[key]
        start, end = starts[key], starts[key] + len(c)
        if key in ("a1", "a2"):
            m = text.rfind(template.assistant, prev_end, start)
            if m < 0:
                return None
            # the header: the opener and whatever the template writes before the content
            spans.append(("assistant", m, max(start, m + len(template.assistant))))
            limit = starts["u2"] if key == "a1" else len(text)
            for e in eots:
                q = text.find(e, end, limit)
                if q >= 0 and not text[end:q].strip():
                    spans.append(("eot", q, q + len(e)))
        elif template.user is not None:
            m = text.rfind(template.user, prev_end, start)
            if m >= 0:
                a = m
                if key == "u2" and first is not None and a1 and a1 in first:
                    # Text between the first answer's own closing text (what a render ending there
                    # emits) and the user marker is emitted with the user turn: " [INST]", "<s>[INST]".
                    gap = text[prev_end:m]
                    own = first[first.rindex(a1) + len(a1) :]
                    closer = snap_prefix(gap, len(common_prefix(gap, own)), specials)
                    extra = gap[len(closer) :]
                    for e in eots:  # an end of turn is never the user turn's: the answer's own closer
                        if e.strip() and extra.lstrip().startswith(e):
                            cut = len(gap) - len(extra) + extra.index(e) + len(e)
                            rest = gap[cut:]
                            closer, extra = gap[: cut + len(rest) - len(rest.lstrip())], rest.lstrip()
                    if extra and not any(extra.endswith(e) for e in eots if e):
                        a = prev_end + len(closer)
                spans.append(("user", a, m + len(template.user)))
        prev_end = end
    if with_system and template.system is not None:
        s = text.find(sys_c)
        if s >= 0:
            m = text.rfind(template.system, 0, s)
            if m >= 0:
                spans.append(("system", m, m + len(template.system)))
    return spans


def _generation_header(
    renderer: TemplateRenderer | None, template: ChatTemplate, kwargs: dict[str, Any]
) -> tuple[str, list[tuple[str, int, int]]] | None:
    """The generation prompt of a probe conversation and the span of its assistant header (from the
    opener to the end): what the model is given at inference, so never answer."""
    if renderer is None:
        return None
    for with_system in (True, False):
        msgs = probe_conversation(PROBE_CONTENTS[0], system=with_system)[:-1]
        try:
            text = renderer.render(msgs, add_generation_prompt=True, **kwargs)
        except Exception:  # noqa: BLE001 - templates raise anything
            continue
        u2 = msgs[-1]["content"]
        tail = text.rfind(u2)
        m = text.rfind(template.assistant, max(tail, 0))
        if tail < 0 or m < 0 or not text[m:].strip():
            return None
        return text, [("assistant", m, len(text))]
    return None


_TOOL_NAME = "qzxtool"
_TOOL_DEF = {"type": "function", "function": {
    "name": _TOOL_NAME, "description": "A probe tool",
    "parameters": {"type": "object", "properties": {"arg": {"type": "string"}}, "required": ["arg"]}}}
_TOOL_CALL = {"id": "qzxcall01", "type": "function",
              "function": {"name": _TOOL_NAME, "arguments": {"arg": "Qzxargword"}}}
_TOOL_CONV = [
    {"role": "user", "content": "Call the probe tool."},
    {"role": "assistant", "content": "", "tool_calls": [_TOOL_CALL]},
    {"role": "tool", "content": "Qzxtoolword", "tool_call_id": "qzxcall01", "name": _TOOL_NAME},
    {"role": "assistant", "content": "Qzxfinalword"},
]


def _tool_conv_text_arguments() -> list[dict[str, Any]]:
    import json

    conv = [dict(m) for m in _TOOL_CONV]
    call = dict(_TOOL_CALL, function=dict(_TOOL_CALL["function"], arguments=json.dumps({"arg": "Qzxargword"})))
    conv[1] = dict(conv[1], tool_calls=[call])
    return conv


def _tool_probe(
    renderer: TemplateRenderer | None, template: ChatTemplate, kwargs: dict[str, Any]
) -> list[tuple[str, list[tuple[str, int, int]]]]:
    """Tool results and what follows them, for templates that accept ``tools``: the text that opens a
    tool result (prompt: the model reads it) from a render ending on the tool call to one that goes on
    with its result, cut before the tool's name; and, when the template writes no assistant opener after
    a tool result (DeepSeek), what its generation prompt writes there (the header of the next answer)."""
    if renderer is None or "tool" not in renderer.chat_template:
        return []
    for conv in (_TOOL_CONV, _tool_conv_text_arguments()):  # templates take arguments as a dict or as text
        try:
            call = renderer.render(conv[:2], tools=[_TOOL_DEF], **kwargs)
            result = renderer.render(conv[:3], tools=[_TOOL_DEF], **kwargs)
            gen = renderer.render(conv[:3], add_generation_prompt=True, tools=[_TOOL_DEF], **kwargs)
            break
        except Exception:  # noqa: BLE001 - templates without tool support raise anything
            continue
    else:
        return []
    arg, out = result.find("Qzxargword"), result.find("Qzxtoolword")
    shared = len(snap_prefix(result, len(common_prefix(call, result)), renderer.all_special))
    if arg < 0 or out < 0 or not arg < shared <= out:  # the call renders differently when it is last
        return []
    start = shared + len(result[shared:out]) - len(result[shared:out].lstrip())
    name = result.find(_TOOL_NAME, start, out)
    end = name if name > start else out
    found: list[tuple[str, list[tuple[str, int, int]]]] = []
    if result[start:end].strip():
        found.append((result, [("user", start, end)]))
    if gen.startswith(result[: out + len("Qzxtoolword")]):
        tail_at = out + len("Qzxtoolword")
        tail = gen[tail_at:]
        if tail.strip() and template.assistant not in tail:
            # from the special tokens the tail ends with (the tool result's own text, ids, quotes aside)
            cut = len(tail.rstrip())
            while True:
                tok_end = next((t for t in renderer.all_special if tail[:cut].endswith(t)), None)
                if tok_end is None:
                    break
                cut -= len(tok_end)
                cut = len(tail[:cut].rstrip())
            start_at = tail_at + (cut if cut < len(tail.rstrip()) else 0)
            found.append((gen, [("assistant", start_at, len(gen))]))
            try:  # and as written before an answer (a space the tokenizer keeps apart, say)
                full = renderer.render(conv, tools=[_TOOL_DEF], **kwargs)
            except Exception:  # noqa: BLE001
                full = ""
            answer = full.find("Qzxfinalword")
            if full.startswith(gen[:start_at]) and answer >= len(gen.rstrip()):
                found.append((full, [("assistant", start_at, answer)]))
    return found


def _synthetic(
    template: ChatTemplate, contents: tuple[str, str, str, str, str]
) -> tuple[str, list[tuple[str, int, int]]]:
    """Assemble a conversation from the marker texts when no render carries them."""
    sys_c, u1, a1, u2, a2 = contents
    parts: list[tuple[str | None, str]] = []
    if template.system is not None:
        parts += [("system", template.system), (None, sys_c + "\n")]
    eot = template.end_of_turn
    for u, a in ((u1, a1), (u2, a2)):
        if template.user is not None:
            parts.append(("user", template.user))
        parts += [(None, u + "\n"), ("assistant", template.assistant), (None, a)]
        if eot:
            parts.append(("eot", eot))
        parts.append((None, "\n"))
    text, spans, pos = "", [], 0
    for kind, piece in parts:
        if kind is not None:
            spans.append((kind, pos, pos + len(piece)))
        text += piece
        pos += len(piece)
    return text, spans
