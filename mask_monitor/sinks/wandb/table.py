"""The evidence table ``mask_monitor/worst_sequences``: the worst sequences seen, each rendered as HTML.

One row per sequence (step, rank, micro-batch, row, masked ratio, supervised and target tokens, fully
masked, prompt leakage when a chat template is known, source ``log`` or ``abort``), its counts computed
by :func:`mask_monitor.stats.batch_stats` (the counting rules of the audit), and its tokens rendered as
HTML, each coloured by what the loss does with it. Bounded: a sequence enters only when it is worse than
the ``top_k``-th worst seen, at most ``max_rows`` rows per run, ``html_max_tokens`` tokens per sequence.

What a token shows depends on :attr:`MonitorConfig.decoded_text <mask_monitor.config.MonitorConfig>`:
its tokenizer piece (``▁Paris``) only with ``"all"``; otherwise its id (``[3681]``): the colours, counts
and ids say which tokens are trained on without sending training text to W&B.
"""

from __future__ import annotations

import heapq
import html
import logging
from typing import Any

import torch

from ...stats import SLOT_STATUSES, as_dict, batch_stats, slot_status
from .history import PREFIX

__all__ = ["TABLE_KEY", "TABLE_COLUMNS", "STATUS_COLOURS", "EvidenceTable", "token_statuses", "token_pieces"]

logger = logging.getLogger("mask_monitor")

TABLE_KEY = PREFIX + "worst_sequences"
TABLE_COLUMNS: tuple[str, ...] = (
    "step",
    "rank",
    "micro_batch",
    "row",
    "masked_ratio",
    "supervised_tokens",
    "target_tokens",
    "fully_masked_sequences",
    "prompt_leakage_tokens",
    "source",
    "tokens",
)

#: Background of each token by what the loss does with it (:data:`mask_monitor.stats.SLOT_STATUSES`).
STATUS_COLOURS: dict[str, str] = {
    "supervised": "#c8f7c5",  # green: trained on
    "masked": "#e6e6e6",  # grey: label -100
    "leakage": "#ffb3b3",  # red: a prompt token trained on
    "padding": "#ffffff",
    "none": "#ffffff",  # position 0: never a target
}

_ROW_KEYS = ("input_ids", "labels", "shift_labels", "attention_mask", "position_ids", "roles")


def token_statuses(
    labels: list[int],
    *,
    shift_labels: list[int] | None = None,
    attention_mask: list[int] | None = None,
    position_ids: list[int] | None = None,
    roles: list[int] | None = None,
    ignore_index: int = -100,
) -> list[str]:
    """What the loss does with each *input* token of one sequence: ``supervised``, ``masked``,
    ``leakage``, ``padding`` or ``none`` (:func:`mask_monitor.stats.slot_status`, the counting rules).

    >>> token_statuses([-100, -100, 5, 6])
    ['none', 'masked', 'supervised', 'supervised']
    """

    def t(x: list[int] | None) -> torch.Tensor | None:
        return torch.tensor([x], dtype=torch.long) if x is not None else None

    codes = slot_status(torch.tensor([labels], dtype=torch.long), shift_labels=t(shift_labels),
                        attention_mask=t(attention_mask), position_ids=t(position_ids), roles=t(roles),
                        ignore_index=ignore_index)
    return [SLOT_STATUSES[c] for c in codes[0].tolist()]


def token_pieces(tokenizer: Any, ids: list[int]) -> list[str]:
    """The tokenizer's piece of each id (``convert_ids_to_tokens``), ``[id]`` where there is none.

    >>> token_pieces(None, [1, 2])
    ['[1]', '[2]']
    """
    if tokenizer is not None:
        try:
            pieces = tokenizer.convert_ids_to_tokens(ids)
            return [str(p) if p is not None else f"[{i}]" for p, i in zip(pieces, ids, strict=True)]
        except Exception:  # noqa: BLE001 - fall back to ids
            pass
    return [f"[{i}]" for i in ids]


class EvidenceTable:
    """The bounded, incremental table of the worst sequences of one run.

    Args:
        top_k, max_rows, html_max_tokens: the bounds (see the module docstring).

    Per run, the sink sets :attr:`tokenizer`, :attr:`role_tagger` (the auditor's
    ``tagger(input_ids, position_ids) -> roles``, for per-sequence prompt leakage), :attr:`ignore_index`
    and :attr:`token_text` (whether tokens may show as text) and calls :meth:`reset`.
    """

    def __init__(self, top_k: int = 8, max_rows: int = 64, html_max_tokens: int = 256) -> None:
        self.top_k = top_k
        self.max_rows = max_rows
        self.html_max_tokens = html_max_tokens
        self.tokenizer: Any = None
        self.role_tagger: Any = None
        self.ignore_index = -100
        self.token_text = False
        self.table: Any = None
        self.rows = 0
        self._worst: list[float] = []

    def reset(self) -> None:
        """Start an empty table (a new run)."""
        self.table = None
        self.rows = 0
        self._worst = []

    # ------------------------------------------------------------------ candidates
    def candidates(
        self, step: int, rank: int, mb_index: int, batch: dict[str, list[list[int]]], source: str
    ) -> list[dict[str, Any]]:
        """One candidate row per sequence of a micro-batch's kept rows (those with a target slot)."""
        labels = batch.get("labels") or []
        out = []
        for i in range(len(labels)):
            one = {k: torch.tensor([batch[k][i]]) for k in _ROW_KEYS if k in batch and len(batch[k]) > i}
            roles = one.get("roles")
            if roles is None and self.role_tagger is not None and "input_ids" in one:
                roles = self.role_tagger(one["input_ids"], one.get("position_ids"))
            s = as_dict(
                batch_stats(
                    one["labels"],
                    attention_mask=one.get("attention_mask"),
                    position_ids=one.get("position_ids"),
                    shift_labels=one.get("shift_labels"),
                    roles=roles,
                    ignore_index=self.ignore_index,
                )
            )
            if s["target_tokens"] <= 0:
                continue
            out.append(
                {
                    "step": int(step),
                    "rank": int(rank),
                    "micro_batch": int(mb_index),
                    "row": i,
                    "masked_ratio": s["masked_tokens"] / s["target_tokens"],
                    "supervised_tokens": int(s["supervised_tokens"]),
                    "target_tokens": int(s["target_tokens"]),
                    "fully_masked_sequences": int(s["fully_masked_sequences"]),
                    "prompt_leakage_tokens": int(s["prompt_leakage_tokens"]) if roles is not None else None,
                    "source": source,
                    "_batch": one,
                    "_roles": roles,
                }
            )
        return out

    # ------------------------------------------------------------------ rows
    def add_worst(self, wandb: Any, candidates: list[dict]) -> list[dict]:
        """Add the candidates worse than the ``top_k``-th worst seen so far (worst first); returns them."""
        chosen = []
        for c in sorted(candidates, key=lambda c: (-c["masked_ratio"], c["supervised_tokens"])):
            r = c["masked_ratio"]
            if len(self._worst) < self.top_k:
                heapq.heappush(self._worst, r)
            elif r > self._worst[0]:
                heapq.heapreplace(self._worst, r)
            else:
                continue
            chosen.append(c)
        return self.add_rows(wandb, chosen)

    def add_rows(self, wandb: Any, chosen: list[dict]) -> list[dict]:
        """Add rows until the table is full; returns those added."""
        added = []
        for c in chosen:
            if self.rows >= self.max_rows:
                logger.debug("mask-monitor: W&B evidence table full (%d rows)", self.max_rows)
                break
            if self.table is None:
                self.table = wandb.Table(columns=list(TABLE_COLUMNS), log_mode="INCREMENTAL")
            values = [c[k] for k in TABLE_COLUMNS[:-1]]
            rendered = wandb.Html(self.render_html(c), inject=False, data_is_not_path=True)
            self.table.add_data(*values, rendered)
            self.rows += 1
            added.append(c)
        return added

    # ------------------------------------------------------------------ HTML
    def render_html(self, cand: dict[str, Any]) -> str:
        """One sequence's tokens, each coloured by what the loss does with it (bounded length); token text
        only when :attr:`token_text` is set, token ids otherwise."""
        batch = cand["_batch"]
        labels = batch["labels"][0].tolist()
        ids = batch["input_ids"][0].tolist() if "input_ids" in batch else None
        shift = batch["shift_labels"][0].tolist() if "shift_labels" in batch else None
        attn = batch["attention_mask"][0].tolist() if "attention_mask" in batch else None
        pos = batch["position_ids"][0].tolist() if "position_ids" in batch else None
        roles = cand["_roles"][0].tolist() if cand.get("_roles") is not None else None
        statuses = token_statuses(labels, shift_labels=shift, attention_mask=attn, position_ids=pos, roles=roles,
                                  ignore_index=self.ignore_index)
        shown = len(statuses) if ids is None else len(ids)
        n = min(shown, self.html_max_tokens)
        if ids is None:
            pieces = [f"[{lab}]" for lab in labels[:n]]
        else:
            pieces = token_pieces(self.tokenizer if self.token_text else None, ids[:n])
        spans = []
        for j in range(n):
            status = statuses[j]
            tid = ids[j] if ids is not None else labels[j]
            spans.append(
                f'<span class="{status}" title="{status} id={tid}" style="background:{STATUS_COLOURS[status]}">'
                f"{html.escape(pieces[j])}</span>"
            )
        more = f" <i>... (+{shown - n} tokens)</i>" if shown > n else ""
        head = (
            f"<div><b>step {cand['step']}, rank {cand['rank']}, micro-batch {cand['micro_batch']}, "
            f"row {cand['row']}</b>: masked {cand['masked_ratio']:.1%}, {cand['supervised_tokens']} of "
            f"{cand['target_tokens']} targets supervised"
        )
        if cand.get("prompt_leakage_tokens") is not None:
            head += f", {cand['prompt_leakage_tokens']} prompt tokens trained on"
        legend = " ".join(
            f'<span style="background:{STATUS_COLOURS[s]}">{s}</span>' for s in ("supervised", "masked", "leakage")
        )
        return (
            f"{head}</div><div>{legend}</div>"
            f'<div style="font-family:monospace;white-space:pre-wrap">{"".join(spans)}{more}</div>'
        )
