"""Counting the audit: run totals from :func:`mask_monitor.stats.batch_stats`, plus one row per sequence.

Totals are the training callback's numbers by construction: every collated batch goes through the same
:func:`~mask_monitor.stats.batch_stats` the callback calls on each micro-batch, and the vectors are
summed with :func:`~mask_monitor.stats.combine`. The per-sequence split
(:func:`~mask_monitor.stats.sequence_stats`, built from the same slot definitions) feeds the
distribution, the fully masked examples and the worst examples; :class:`AuditCounter` also checks, batch
by batch, that it adds up to ``batch_stats`` exactly.
"""

from __future__ import annotations

import heapq
import itertools
from array import array
from dataclasses import dataclass, field
from typing import Any

import torch

from ..reports import Totals
from ..stats import FIELDS, SEQUENCE_FIELDS, batch_stats, combine, sequence_stats

__all__ = ["SequenceRecord", "AuditCounter"]

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
    max_length: int | None = None  # the truncation limit: tells truncated responses from unterminated ones
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
        position_ids = batch.get("position_ids")
        given = dict(attention_mask=batch.get("attention_mask"), position_ids=position_ids, roles=roles,
                     ignore_index=self.ignore_index, max_length=self.max_length)
        vec = batch_stats(labels, **given)
        table = sequence_stats(labels, **given)
        values = vec.tolist()
        for name in SEQUENCE_FIELDS:
            expected = values[FIELDS.index(name)]
            got = int(table[name].sum())
            if got != int(expected):
                raise AssertionError(f"per-sequence {name} sums to {got}, batch_stats says {expected}")
        if self.totals_vectors:
            vec = combine(torch.stack([self.totals_vectors[0], vec]))
        self.totals_vectors = [vec]
        self.batches += 1
        self.rows += len(source_index)

        # which source example each sequence is (rows without padding-free; documents in padding-free)
        seg_examples: list[int | None]
        if packed:
            seg_examples = [None] * len(table["target_tokens"])
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

        slots = table["target_tokens"].tolist()
        sup = table["supervised_tokens"].tolist()
        leak = table["prompt_leakage_tokens"].tolist()
        content = table["assistant_content_tokens"].tolist()
        sup_content = table["supervised_assistant_content_tokens"].tolist()
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
