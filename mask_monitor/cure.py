"""The cure: train on the assistant's answers only, for any chat template the monitor can read.

One line before the trainer::

    train_dataset = mask_monitor.assistant_only(train_dataset, tokenizer)
    trainer = SFTTrainer(model, args=SFTConfig(...), train_dataset=train_dataset, processing_class=tokenizer)

:func:`assistant_only` turns a conversational dataset (a ``messages`` column, ``prompt``/``completion`` in
conversational form, or ShareGPT ``conversations``; with the optional ``tools`` and
``chat_template_kwargs`` columns TRL reads) into what ``SFTTrainer`` trains on:

* ``input_ids``: the conversation tokenized exactly as TRL tokenizes it
  (``tokenizer.apply_chat_template(messages, tokenize=True, tools=..., **chat_template_kwargs)``);
* ``assistant_masks``: 1 on each assistant turn's content and its end-of-turn token (what the model
  emits to stop), 0 on everything else: system and user turns, headers, whatever the generation prompt
  holds (``<think>\\n``, an empty think block), what a turn writes after its end of turn. For a
  prompt/completion example only the completion's assistant turns are 1.

TRL honours ``assistant_masks`` of a pre-tokenized dataset on every path, without ``assistant_only_loss``
and whether or not the template has ``{% generation %}`` spans: TRL >= 1 folds it into ``labels`` before
truncation (``max_length``) and packing; TRL 0.2x keeps it through truncation and packing and applies it
in the collator, ``padding_free`` included. The masks come from the same
:class:`~mask_monitor.templates.RoleTagger` the training callback audits with, so a run through the cure
shows prompt leakage 0, response coverage 1 and every end of turn supervised.

For vision-language data (TRL collates images and text on the fly), wrap the trainer's collator instead:
``trainer.data_collator = assistant_only_collator(trainer.data_collator, processor)``.

A template the monitor cannot read, or a conversation the template refuses, raises one line that says
why and what to pass (:func:`~mask_monitor.templates.register_template`, ``template=``); nothing is
guessed silently.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterable, Mapping
from typing import Any

import torch

from .stats import ROLE_ASSISTANT_HEADER
from .templates.assistant_mask import tagger_for
from .templates.chat_template import ChatTemplate
from .templates.roles import RoleTagger, answer_mask

__all__ = [
    "AssistantOnly",
    "assistant_only",
    "assistant_only_collator",
    "AssistantOnlyCollator",
    "MASK_COLUMN",
    "CureError",
]

#: The column TRL reads (``assistant_masks``: 1 = train on this token).
MASK_COLUMN = "assistant_masks"
#: Columns the cure reads; they are replaced by ``input_ids`` and ``assistant_masks``.
SOURCE_COLUMNS = ("messages", "prompt", "completion", "conversations", "tools", "chat_template_kwargs")
_SHAREGPT_ROLES = {"human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant",
                   "system": "system", "tool": "tool", "function_call": "assistant", "observation": "tool"}


class CureError(ValueError):
    """An example the cure cannot encode: the message names it, says why and what to do (one line)."""


def _conversation(example: Mapping[str, Any], index: int | None) -> tuple[list[dict[str, Any]], int]:
    """(messages, number of leading messages that are prompt only) of one example."""
    where = f"example {index}" if index is not None else "an example"
    if example.get("messages") is not None:
        return list(example["messages"]), 0
    if example.get("conversations") is not None:  # ShareGPT: {"from": "human", "value": ...}
        msgs = []
        for turn in example["conversations"]:
            role = _SHAREGPT_ROLES.get(str(turn.get("from", turn.get("role"))), str(turn.get("from")))
            msgs.append({"role": role, "content": turn.get("value", turn.get("content"))})
        return msgs, 0
    prompt, completion = example.get("prompt"), example.get("completion")
    if isinstance(prompt, list) and isinstance(completion, list):
        return list(prompt) + list(completion), len(prompt)
    if prompt is not None or completion is not None:
        raise CureError(
            f"mask-monitor: {where} is prompt/completion text, not conversations: TRL already trains on the "
            "completion only there (completion_only_loss); the cure is for conversational data"
        )
    raise CureError(
        f"mask-monitor: {where} has no 'messages', 'conversations' or conversational 'prompt'/'completion' "
        f"column (columns: {sorted(example)}); the cure needs conversations"
    )


def _tools(value: Any) -> Any:
    return json.loads(value) if isinstance(value, str) else value


class AssistantOnly:
    """Encode conversations with exact assistant-only masks (see the module docstring).

    Args:
        tokenizer: the tokenizer (or processor) the trainer uses; a fast tokenizer with a chat template.
        template: the turn markers; detected from the tokenizer when ``None`` (registry, then derivation).
        chat_template_kwargs: template variables for every example (``enable_thinking=False``...); an
            example's own ``chat_template_kwargs`` column adds to them, as in TRL.

    Raises:
        TemplateUnreadable: the template cannot be read; the message says why and what to pass.

    Example:
        >>> cure = AssistantOnly(tokenizer)  # doctest: +SKIP
        >>> row = cure.encode([{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}])
        >>> row["input_ids"][:3], row["assistant_masks"][-3:]  # doctest: +SKIP
    """

    def __init__(
        self,
        tokenizer: Any,
        template: ChatTemplate | None = None,
        *,
        chat_template_kwargs: Mapping[str, Any] | None = None,
    ) -> None:
        self.tokenizer = tokenizer
        self.template = template
        self.chat_template_kwargs = dict(chat_template_kwargs or {})
        self.tagger = self._tagger(self.chat_template_kwargs)  # fails early, in one line, when unreadable

    def _tagger(self, kwargs: Mapping[str, Any]) -> RoleTagger:
        return tagger_for(self.tokenizer, self.template, **kwargs)

    # ------------------------------------------------------------------ one example
    def encode(
        self,
        messages: list[dict[str, Any]],
        *,
        prompt_messages: int = 0,
        tools: Any = None,
        index: int | None = None,
        **chat_template_kwargs: Any,
    ) -> dict[str, list[int]]:
        """``{"input_ids": [...], "assistant_masks": [...]}`` of one conversation.

        Args:
            messages: the conversation.
            prompt_messages: how many leading messages are prompt only (a prompt/completion example):
                assistant turns among them are not trained on.
            tools: tool definitions, as TRL passes them to ``apply_chat_template``.
            index: the example's index, for messages.
        """
        return self.encode_batch([messages], [prompt_messages], [tools], [chat_template_kwargs],
                                 first_index=index)[0]

    def encode_batch(
        self,
        conversations: list[list[dict[str, Any]]],
        prompt_messages: Iterable[int] | None = None,
        tools: Iterable[Any] | None = None,
        chat_template_kwargs: Iterable[Mapping[str, Any] | None] | None = None,
        *,
        first_index: int | None = None,
    ) -> list[dict[str, list[int]]]:
        """:meth:`encode` for several conversations, tagged in one vectorised pass."""
        n = len(conversations)
        prompt_messages = list(prompt_messages) if prompt_messages is not None else [0] * n
        tools = list(tools) if tools is not None else [None] * n
        kwargs_list = list(chat_template_kwargs) if chat_template_kwargs is not None else [None] * n
        ids: list[list[int]] = []
        groups: dict[tuple, list[int]] = {}
        for i, msgs in enumerate(conversations):
            kwargs = {**self.chat_template_kwargs, **(kwargs_list[i] or {})}
            where = f"example {first_index + i}" if first_index is not None else "a conversation"
            try:
                enc = self.tokenizer.apply_chat_template(msgs, tokenize=True, return_dict=True,
                                                         tools=_tools(tools[i]), **kwargs)
            except Exception as exc:  # noqa: BLE001 - templates raise anything (TemplateError, ValueError...)
                text = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
                raise CureError(
                    f"mask-monitor: {where}: the chat template refuses this conversation ({type(exc).__name__}: "
                    f"{text}); fix or drop it (e.g. merge a system message the template rejects into the "
                    "first user turn), the cure does not rewrite conversations"
                ) from exc
            row = enc["input_ids"]
            if row and isinstance(row[0], list):  # processors return a batch of one
                row = row[0]
            ids.append(list(row))
            key = tuple(sorted((k, repr(v)) for k, v in kwargs.items()))
            groups.setdefault(key, []).append(i)
        masks: list[list[int]] = [[] for _ in range(n)]
        for members in groups.values():
            kwargs = {**self.chat_template_kwargs, **(kwargs_list[members[0]] or {})}
            tagger = self._tagger(kwargs) if kwargs != self.chat_template_kwargs else self.tagger
            longest = max((len(ids[i]) for i in members), default=0)
            batch = torch.full((len(members), max(longest, 1)), -1, dtype=torch.long)
            for r, i in enumerate(members):
                batch[r, : len(ids[i])] = torch.tensor(ids[i], dtype=torch.long)
            roles = tagger(batch)
            keep = answer_mask(roles)
            skip = torch.tensor([prompt_messages[i] for i in members])
            if bool((skip > 0).any()):
                # assistant turns of the prompt are context: count headers, keep the completion's turns
                prompt_turns = torch.tensor(
                    [sum(m.get("role") == "assistant" for m in conversations[i][: prompt_messages[i]])
                     for i in members]
                )
                header = roles == ROLE_ASSISTANT_HEADER
                starts = header & ~torch.nn.functional.pad(header[:, :-1], (1, 0), value=False)
                turn = torch.cumsum(starts.long(), dim=1)
                keep = keep & (turn > prompt_turns.unsqueeze(1))
            for r, i in enumerate(members):
                masks[i] = keep[r, : len(ids[i])].long().tolist()
        return [{"input_ids": ids[i], MASK_COLUMN: masks[i]} for i in range(n)]

    # ------------------------------------------------------------------ datasets
    def __call__(self, batch: Mapping[str, list[Any]], indices: list[int] | None = None) -> dict[str, list[Any]]:
        """Batched ``datasets.map`` function: a batch of source columns to ``input_ids`` + ``assistant_masks``."""
        n = len(next(iter(batch.values())))
        rows = [{k: batch[k][j] for k in batch} for j in range(n)]
        convs, prompts = [], []
        for j, row in enumerate(rows):
            msgs, n_prompt = _conversation(row, indices[j] if indices is not None else None)
            convs.append(msgs)
            prompts.append(n_prompt)
        out = self.encode_batch(
            convs, prompts, [row.get("tools") for row in rows], [row.get("chat_template_kwargs") for row in rows],
            first_index=indices[0] if indices else None,
        )
        return {"input_ids": [o["input_ids"] for o in out], MASK_COLUMN: [o[MASK_COLUMN] for o in out]}

    def apply(self, dataset: Any, *, num_proc: int | None = None, batch_size: int = 256,
              keep_columns: bool = False) -> Any:
        """``dataset.map`` of this cure (a ``Dataset``, ``IterableDataset`` or ``DatasetDict``); the source
        columns are dropped (``keep_columns=True`` keeps them, TRL ignores them on tokenized data)."""
        try:
            from datasets import DatasetDict, IterableDatasetDict
        except ImportError:  # pragma: no cover - datasets ships with TRL
            DatasetDict = IterableDatasetDict = ()  # noqa: N806
        if isinstance(dataset, DatasetDict | IterableDatasetDict):
            return type(dataset)({k: self.apply(v, num_proc=num_proc, batch_size=batch_size,
                                                keep_columns=keep_columns) for k, v in dataset.items()})
        columns = list(getattr(dataset, "column_names", None) or [])
        if "input_ids" in columns:
            raise CureError(
                "mask-monitor: the dataset is already tokenized (it has input_ids); give the cure the "
                "conversations (messages, or conversational prompt/completion)"
            )
        remove = [] if keep_columns else [c for c in columns if c in SOURCE_COLUMNS]
        kwargs: dict[str, Any] = {"batched": True, "batch_size": batch_size, "with_indices": True,
                                  "remove_columns": remove or None}
        if num_proc is not None and hasattr(dataset, "__len__"):
            kwargs["num_proc"] = num_proc
        if hasattr(dataset, "__len__"):
            kwargs["desc"] = "mask-monitor: assistant-only masks"
        if getattr(dataset, "_fingerprint", None):
            # datasets would otherwise pickle this object (tokenizer, tagger) to fingerprint the map: a third
            # of the cost. The fingerprint of what decides the output is enough.
            kwargs["new_fingerprint"] = self.fingerprint(dataset._fingerprint, remove, batch_size)
        return dataset.map(self, **kwargs)

    def fingerprint(self, *extra: Any) -> str:
        """A hash of what decides this cure's output (tokenizer vocabulary and template, markers, variables)."""
        import hashlib

        tok = getattr(self.tokenizer, "tokenizer", self.tokenizer)
        h = hashlib.sha256()
        for part in (
            "mask-monitor-cure-v1",
            getattr(tok, "name_or_path", ""),
            len(tok) if hasattr(tok, "__len__") else "",
            getattr(self.tokenizer, "chat_template", None),
            repr(self.tagger),
            repr(sorted(self.chat_template_kwargs.items())),
            *map(repr, extra),
        ):
            h.update(str(part).encode("utf-8", "replace"))
        return h.hexdigest()[:16]


def assistant_only(
    dataset: Any,
    tokenizer: Any,
    template: ChatTemplate | None = None,
    *,
    chat_template_kwargs: Mapping[str, Any] | None = None,
    num_proc: int | None = None,
    keep_columns: bool = False,
) -> Any:
    """Tokenize a conversational dataset with exact assistant-only masks, for ``SFTTrainer``.

    Returns the dataset with ``input_ids`` and ``assistant_masks`` (see the module docstring); pass it as
    ``train_dataset`` with the same tokenizer. Composes with TRL's defaults, ``packing=True``,
    ``padding_free=True`` and ``max_length`` on TRL 0.26 as on TRL 1.x; ``assistant_only_loss`` is not
    needed (leave it off: it would swap in TRL's own training template).

    Raises:
        TemplateUnreadable: the tokenizer's template cannot be read (one line: why, and what to pass).
        CureError: an example is not a conversation, or the template refuses it.
    """
    cure = AssistantOnly(tokenizer, template, chat_template_kwargs=chat_template_kwargs)
    return cure.apply(dataset, num_proc=num_proc, keep_columns=keep_columns)


class AssistantOnlyCollator:
    """Wrap a collator (TRL's vision-language collator, or any that returns ``input_ids`` and ``labels``)
    so that only assistant answers keep their labels: every other label becomes ``ignore_index``.

    For data TRL collates on the fly (images): ``trainer.data_collator = assistant_only_collator(
    trainer.data_collator, processor)``. Labels are only ever masked, never unmasked, so padding and packed
    boundaries keep whatever the wrapped collator gave them.
    """

    def __init__(self, collator: Callable[[list[Any]], Mapping[str, Any]], tokenizer: Any,
                 template: ChatTemplate | None = None, *, ignore_index: int = -100) -> None:
        self.collator = collator
        self.tagger = tagger_for(tokenizer, template)
        self.ignore_index = ignore_index

    def __call__(self, examples: list[Any]) -> Any:
        batch = self.collator(examples)
        labels = batch.get("labels")
        input_ids = batch.get("input_ids")
        if labels is None or input_ids is None:
            raise CureError("mask-monitor: the wrapped collator returned no input_ids/labels to mask")
        roles = self.tagger(input_ids, batch.get("position_ids"))
        batch["labels"] = labels.masked_fill(~answer_mask(roles), self.ignore_index)
        return batch

    def __getattr__(self, name: str) -> Any:  # the trainer may read attributes of its collator
        if name == "collator":
            raise AttributeError(name)
        return getattr(self.collator, name)


def assistant_only_collator(collator: Callable[[list[Any]], Mapping[str, Any]], tokenizer: Any,
                            template: ChatTemplate | None = None, *, ignore_index: int = -100) -> AssistantOnlyCollator:
    """:class:`AssistantOnlyCollator` around ``collator`` (for data collated on the fly, e.g. images)."""
    return AssistantOnlyCollator(collator, tokenizer, template, ignore_index=ignore_index)
