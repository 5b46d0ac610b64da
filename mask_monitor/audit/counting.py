"""Counting the audit: run totals from :func:`mask_monitor.stats.batch_stats`, plus one row per sequence.

Totals are the training callback's numbers by construction: every collated batch goes through the same
:func:`~mask_monitor.stats.batch_stats` the callback calls on each micro-batch, and the vectors are
summed with :func:`~mask_monitor.stats.combine`. The per-sequence table (:func:`sequence_table`)
splits the same quantities by sequence (a row, or a packed document) for the distribution, the fully
masked examples and the worst examples; :class:`AuditCounter` checks, batch by batch, that the table
adds up to ``batch_stats`` exactly, so the two can never drift apart.

Example:
    >>> import torch
    >>> t = sequence_table(torch.tensor([[-100, -100, 5, 6], [-100, -100, -100, -100]]))
    >>> t["slots"].tolist(), t["supervised"].tolist()
    ([3, 3], [2, 0])
"""

from __future__ import annotations

import heapq
import itertools
from array import array
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F

from ..reports import Totals
from ..stats import (
    FIELDS,
    ROLE_ASSISTANT_CONTENT,
    ROLE_ASSISTANT_HEADER,
    ROLE_END_OF_TURN,
    batch_stats,
    combine,
)

__all__ = ["sequence_table", "SequenceRecord", "AuditCounter", "TABLE_TO_FIELD"]

#: per-sequence column -> the batch_stats field it must add up to
TABLE_TO_FIELD: dict[str, str] = {
    "slots": "target_tokens",
    "supervised": "supervised_tokens",
    "supervised_padding": "supervised_padding_tokens",
    "leakage": "prompt_leakage_tokens",
    "supervised_header": "supervised_header_tokens",
    "content": "assistant_content_tokens",
    "supervised_content": "supervised_assistant_content_tokens",
    "turns": "assistant_turns",
    "supervised_turns": "supervised_eot_turns",
}


def _next(t: torch.Tensor, fill: bool | int) -> torch.Tensor:
    if t.dtype == torch.bool:
        return F.pad(t[:, 1:], (0, 1), value=bool(fill))
    return F.pad(t[:, 1:], (0, 1), value=int(fill))


def _2d(t: torch.Tensor | None) -> torch.Tensor | None:
    if t is None:
        return None
    return t.unsqueeze(0) if t.dim() == 1 else t


def sequence_table(
    labels: torch.Tensor,
    *,
    attention_mask: torch.Tensor | None = None,
    position_ids: torch.Tensor | None = None,
    roles: torch.Tensor | None = None,
    ignore_index: int = -100,
) -> dict[str, torch.Tensor]:
    """Per-sequence counts of one collated batch, with the definitions of ``batch_stats``.

    Returns 1-D tensors, one entry per sequence that has at least one target slot: the columns of
    :data:`TABLE_TO_FIELD` plus ``row``, ``start``, ``end`` (where the sequence sits in the batch).
    """
    lab = _2d(labels)
    attention_mask = _2d(attention_mask)
    position_ids = _2d(position_ids)
    roles = _2d(roles)
    targets = _next(lab, ignore_index)
    n_rows, length = targets.shape
    supervised = targets != ignore_index
    if attention_mask is not None:
        valid = _next(attention_mask.bool(), False)
    else:
        valid = torch.ones_like(supervised)
        valid[:, -1] = False
    if position_ids is not None:
        starts = position_ids == 0
        valid = valid & ~_next(starts, False)
        starts = starts.clone()
        starts[:, 0] = True
    else:
        starts = torch.zeros_like(supervised)
        starts[:, 0] = True
    slots = valid | supervised

    flat_starts = starts.reshape(-1)
    seg = torch.cumsum(flat_starts.to(torch.int64), 0) - 1
    n_seg = int(flat_starts.sum())
    start_flat = torch.nonzero(flat_starts).flatten()
    row = start_flat // length
    start = start_flat % length
    end_flat = torch.cat([start_flat[1:], torch.tensor([n_rows * length])])
    end = end_flat - row * length
    end = torch.minimum(end, torch.full_like(end, length))
    if attention_mask is not None and position_ids is None:
        end = torch.minimum(end, attention_mask.sum(dim=1).to(torch.int64)[row].clamp(min=1))

    def per_seg(mask: torch.Tensor) -> torch.Tensor:
        return torch.zeros(n_seg, dtype=torch.int64).scatter_add_(0, seg, mask.reshape(-1).to(torch.int64))

    table = {
        "slots": per_seg(slots),
        "supervised": per_seg(supervised),
        "supervised_padding": per_seg(supervised & ~valid),
    }
    if roles is not None:
        role_t = _next(roles, 0)
        content = role_t == ROLE_ASSISTANT_CONTENT
        eot = role_t == ROLE_END_OF_TURN
        eot_first = eot & ~F.pad(eot[:, :-1], (1, 0), value=False)
        header = role_t == ROLE_ASSISTANT_HEADER
        table["leakage"] = per_seg(supervised & ~(content | eot | header))
        table["supervised_header"] = per_seg(supervised & header)
        table["content"] = per_seg(content & slots)
        table["supervised_content"] = per_seg(content & supervised)
        table["turns"] = per_seg(eot_first & slots)
        table["supervised_turns"] = per_seg(eot_first & supervised)
    else:
        zeros = torch.zeros(n_seg, dtype=torch.int64)
        for k in ("leakage", "supervised_header", "content", "supervised_content", "turns", "supervised_turns"):
            table[k] = zeros
    keep = table["slots"] > 0
    out = {k: v[keep] for k, v in table.items()}
    out["row"] = row[keep]
    out["start"] = start[keep]
    out["end"] = end[keep]
    out["segment"] = torch.arange(n_seg)[keep]
    return out


@dataclass
class SequenceRecord:
    """One example (or packed document) as the loss sees it, kept for display."""

    index: int | None  # source example index (None for packed documents)
    target_tokens: int
    supervised_tokens: int
    prompt_leakage_tokens: int
    assistant_content_tokens: int
    supervised_assistant_content_tokens: int
    input_ids: list[int]
    labels: list[int]
    roles: list[int] | None
    reason: str | None = None  # why it is flagged
    category: str = "ok"  # fully_masked | leakage | unmasked | ok

    @property
    def supervised_ratio(self) -> float:
        return self.supervised_tokens / self.target_tokens if self.target_tokens else 0.0

    def as_dict(self) -> dict[str, Any]:
        return {
            "index": self.index,
            "category": self.category,
            "reason": self.reason,
            "target_tokens": self.target_tokens,
            "supervised_tokens": self.supervised_tokens,
            "supervised_ratio": self.supervised_ratio,
            "prompt_leakage_tokens": self.prompt_leakage_tokens,
            "assistant_content_tokens": self.assistant_content_tokens,
            "supervised_assistant_content_tokens": self.supervised_assistant_content_tokens,
            "length": len(self.input_ids),
        }


@dataclass
class AuditCounter:
    """Accumulates totals (batch_stats), per-sequence ratios, fully masked reasons and worst examples."""

    ignore_index: int = -100
    keep_worst: int = 10
    keep_first: int = 0
    totals_vectors: list[torch.Tensor] = field(default_factory=list)
    ratios: array = field(default_factory=lambda: array("f"))
    fully_masked_reasons: dict[str, int] = field(default_factory=dict)
    seen: bytearray = field(default_factory=bytearray)
    first: list[SequenceRecord] = field(default_factory=list)
    rows: int = 0
    batches: int = 0
    _heap: list[tuple[tuple[float, float], int, SequenceRecord]] = field(default_factory=list)
    _tie: Any = field(default_factory=itertools.count)

    # ------------------------------------------------------------------ per batch
    def add(
        self,
        batch: dict[str, Any],
        source_index: list[int | None],
        *,
        roles: torch.Tensor | None = None,
        pre_supervised: Any = None,
        packed: bool = False,
    ) -> None:
        labels = batch["labels"]
        attention_mask = batch.get("attention_mask")
        position_ids = batch.get("position_ids")
        vec = batch_stats(
            labels,
            attention_mask=attention_mask,
            position_ids=position_ids,
            roles=roles,
            ignore_index=self.ignore_index,
        )
        table = sequence_table(
            labels,
            attention_mask=attention_mask,
            position_ids=position_ids,
            roles=roles,
            ignore_index=self.ignore_index,
        )
        values = vec.tolist()
        for col, name in TABLE_TO_FIELD.items():
            expected = values[FIELDS.index(name)]
            got = int(table[col].sum())
            if got != int(expected):
                raise AssertionError(f"per-sequence {col} sums to {got}, batch_stats says {expected} ({name})")
        if self.totals_vectors:
            vec = combine(torch.stack([self.totals_vectors[0], vec]))
        self.totals_vectors = [vec]
        self.batches += 1
        self.rows += len(source_index)

        # which source example each sequence is (rows without padding-free; documents in padding-free)
        seg_examples: list[int | None]
        if packed:
            seg_examples = [None] * len(table["slots"])
        elif position_ids is not None and labels.shape[0] == 1 and len(source_index) > 1:
            segs = table["segment"].tolist()
            seg_examples = [source_index[s] if s < len(source_index) else None for s in segs]
        else:
            rows = table["row"].tolist()
            seg_examples = [source_index[r] if r < len(source_index) else None for r in rows]
        for i in source_index:
            if i is not None:
                if i >= len(self.seen):
                    self.seen.extend(b"\0" * (i + 1 - len(self.seen)))
                self.seen[i] = 1

        slots = table["slots"].tolist()
        sup = table["supervised"].tolist()
        leak = table["leakage"].tolist()
        content = table["content"].tolist()
        sup_content = table["supervised_content"].tolist()
        self.ratios.extend(s / n for s, n in zip(sup, slots, strict=True))
        ids_cpu = batch["input_ids"]
        for k in range(len(slots)):
            src = seg_examples[k]
            if sup[k] == 0:
                category = "fully_masked"
                if src is None or pre_supervised is None:
                    reason = "fully masked"
                elif pre_supervised[src] == 0:
                    reason = "no response found (no supervised token before truncation)"
                    self.fully_masked_reasons["no_response"] = self.fully_masked_reasons.get("no_response", 0) + 1
                else:
                    reason = "response truncated away (max_length)"
                    self.fully_masked_reasons["truncated_away"] = (
                        self.fully_masked_reasons.get("truncated_away", 0) + 1
                    )
                score = (3.0, float(slots[k]))
            elif leak[k] > 0:
                category, reason = "leakage", f"{leak[k]} prompt token(s) supervised"
                score = (2.0, leak[k] / sup[k])
            elif sup[k] == slots[k]:
                category, reason = "unmasked", "no masking at all"
                score = (1.5, float(slots[k]))
            else:
                category, reason = "ok", None
                score = (1.0, 1.0 - sup[k] / slots[k])
            want_first = len(self.first) < self.keep_first
            want_worst = self.keep_worst > 0 and (
                len(self._heap) < self.keep_worst or score > self._heap[0][0]
            )
            if not (want_first or want_worst):
                continue
            r, s, e = int(table["row"][k]), int(table["start"][k]), int(table["end"][k])
            rec = SequenceRecord(
                index=src,
                target_tokens=slots[k],
                supervised_tokens=sup[k],
                prompt_leakage_tokens=leak[k],
                assistant_content_tokens=content[k],
                supervised_assistant_content_tokens=sup_content[k],
                input_ids=ids_cpu[r, s:e].tolist(),
                labels=labels[r, s:e].tolist(),
                roles=roles[r, s:e].tolist() if roles is not None else None,
                reason=reason,
                category=category,
            )
            if want_first:
                self.first.append(rec)
            if want_worst:
                item = (score, next(self._tie), rec)
                if len(self._heap) < self.keep_worst:
                    heapq.heappush(self._heap, item)
                else:
                    heapq.heapreplace(self._heap, item)

    # ------------------------------------------------------------------ results
    def totals(self) -> Totals:
        if not self.totals_vectors:
            return Totals()
        return Totals.from_values(combine(torch.stack(self.totals_vectors)).tolist())

    def worst(self) -> list[SequenceRecord]:
        """Kept worst sequences, worst first (fully masked, then prompt leakage, then least supervised)."""
        return [rec for _, _, rec in sorted(self._heap, key=lambda x: (x[0], -x[1]), reverse=True)]
