"""When one micro-batch reaches the audit in parts: row chunks and sequence shards.

Two engines hand the audit pieces of one micro-batch instead of the whole:

* ``nn.DataParallel`` runs the model's replicas in one thread per GPU, each on a chunk of the batch's
  *rows*. A forward hook sees one chunk per replica (on its own device). :func:`merge_row_parts` turns the
  chunks' stats vectors back into the micro-batch's vector: token and sequence counts add up (the chunks
  hold different rows); what is decided per micro-batch (all masked, unmasked, the masked ratio, the loss
  checks) is decided again on the sums, so a chunk whose rows are all prompt is not an all-masked
  micro-batch, and the loss is the mean of the replicas' losses, the one the Trainer trains.
* Context / sequence parallelism splits each *sequence* over the ranks of a sequence group, each holding
  a shard of every row (``shift_labels`` are made before the split, so each column keeps its own target).
  Per shard, :func:`shard_rows` counts per row what the combination needs; summed over the group (one
  ``all_reduce``), :func:`from_shards` rebuilds the micro-batch's vector from the sums: a shard holding
  only prompt tokens is never an all-masked micro-batch, and each sequence is counted once.

Rules under a sequence group (stated in ``docs/distributed.md``): ``shift_labels`` are required; rows are
right-padded or not padded; a row is one sequence (packed documents inside a sharded row are counted as
one sequence); the chat-template audit is off (a shard starts mid-conversation).

Everything here stays on the device: no host synchronisation.
"""

from __future__ import annotations

import torch

from .counters import FIELDS
from .stats import UnsupportedBatch

__all__ = ["merge_row_parts", "shard_rows", "from_shards", "first_positive", "SHARD_COLUMNS"]

_I = {name: i for i, name in enumerate(FIELDS)}
#: Per row, per shard: real input tokens, supervised targets, supervised targets on padding inputs.
SHARD_COLUMNS = ("real_tokens", "supervised_tokens", "supervised_padding_tokens")
#: Columns that are 0/1 per micro-batch: several parts of one micro-batch still make one.
_FLAGS = ("micro_batches", "unaudited_batches", "loss_batches", "non_finite_loss_batches")


def _decide(out: torch.Tensor, s: torch.Tensor) -> torch.Tensor:
    """Set the per-micro-batch columns of ``out`` from the summed counts (``out`` holds the sums)."""
    for name in _FLAGS:
        out[_I[name]] = s[_I[name]].clamp(max=1)
    target, sup = out[_I["target_tokens"]], out[_I["supervised_tokens"]]
    masked = (target - sup).clamp(min=0)
    out[_I["masked_tokens"]] = masked
    audited = out[_I["micro_batches"]] > 0
    out[_I["all_masked_batches"]] = (audited & (sup == 0)).to(out.dtype)
    out[_I["max_masked_ratio"]] = torch.where(target > 0, masked / target.clamp(min=1), torch.zeros_like(target))
    finite = s[_I["non_finite_loss_batches"]] == 0
    has_loss = s[_I["loss_batches"]] > 0
    out[_I["zero_loss_batches"]] = (has_loss & finite & (out[_I["loss_sum"]] == 0) & (sup > 0)).to(out.dtype)
    return out


def merge_row_parts(vectors: torch.Tensor) -> torch.Tensor:
    """One micro-batch's stats vector from those of its row chunks (``(parts, len(FIELDS))``).

    Example:
        >>> import torch
        >>> from mask_monitor.stats import as_dict, batch_stats
        >>> full = torch.tensor([[-100, -100, 5, 6], [-100, -100, -100, -100]])
        >>> parts = torch.stack([batch_stats(full[:1], loss=torch.tensor(2.0)),
        ...                      batch_stats(full[1:], loss=torch.tensor(0.0))])
        >>> m = as_dict(merge_row_parts(parts))
        >>> m["micro_batches"], m["all_masked_batches"], m["zero_loss_batches"], m["loss_sum"]
        (1.0, 0.0, 0.0, 1.0)
    """
    s = vectors.sum(dim=0)
    out = s.clone()
    n_finite = s[_I["loss_batches"]] - s[_I["non_finite_loss_batches"]]
    out[_I["loss_sum"]] = s[_I["loss_sum"]] / n_finite.clamp(min=1)  # the mean, as the Trainer trains
    out = _decide(out, s)
    # causal parts count unmasked_batches (no masked target); encoder-decoder parts never do
    out[_I["unmasked_batches"]] = ((s[_I["unmasked_batches"]] > 0) & (out[_I["masked_tokens"]] == 0)
                                   & (out[_I["target_tokens"]] > 0)).to(s.dtype)
    return out


def shard_rows(
    shift_labels: torch.Tensor | None,
    attention_mask: torch.Tensor | None,
    *,
    labels: torch.Tensor | None = None,
    ignore_index: int = -100,
    causal: bool = True,
) -> torch.Tensor:
    """Per row of one shard: ``SHARD_COLUMNS`` counts, ``(rows, 3)`` int64 on the shard's device.

    Raises:
        UnsupportedBatch: no ``shift_labels`` (unshifted labels lose each shard boundary's target), or an
            encoder-decoder batch.
    """
    if not causal:
        raise UnsupportedBatch("a sequence group (context/sequence parallelism) needs a causal LM batch")
    if shift_labels is None:
        what = "labels only" if labels is not None else "no labels"
        raise UnsupportedBatch(
            f"a sequence group (context/sequence parallelism) needs shift_labels, made before the sequence is "
            f"split; this shard has {what}")
    t = shift_labels.unsqueeze(0) if shift_labels.dim() == 1 else shift_labels
    sup = t != ignore_index
    if attention_mask is not None:
        m = attention_mask.unsqueeze(0) if attention_mask.dim() == 1 else attention_mask
        if m.shape != t.shape:
            raise UnsupportedBatch(f"attention_mask has shape {tuple(m.shape)}, shift_labels {tuple(t.shape)}")
        real = m != 0
        n_real = torch.count_nonzero(real, dim=1)
        sup_pad = torch.count_nonzero(sup & ~real, dim=1)
    else:
        n_real = torch.full((t.shape[0],), t.shape[1], dtype=torch.int64, device=t.device)
        sup_pad = torch.zeros((t.shape[0],), dtype=torch.int64, device=t.device)
    return torch.stack([n_real, torch.count_nonzero(sup, dim=1), sup_pad], dim=1)


def from_shards(summed: torch.Tensor, rows: torch.Tensor, sizes: list[int]) -> torch.Tensor:
    """The micro-batches' vectors from shard sums: ``summed`` ``(n, len(FIELDS))`` (each micro-batch's shard
    vectors summed over the sequence group) and ``rows`` ``(sum(sizes), 3)`` (:func:`shard_rows`, summed
    over the group), ``sizes[i]`` rows for micro-batch ``i``.

    A row's target slots are its real tokens but the last (whose target is padding or nothing), plus any
    supervised target on padding, as for the unsplit row.
    """
    n = summed.shape[0]
    out = summed.clone()
    if n == 0:
        return out
    dtype = summed.dtype
    real, sup, sup_pad = (rows[:, i].to(dtype) for i in range(3))
    slots = (real - 1).clamp(min=0) + sup_pad
    has = slots > 0
    # which micro-batch each row belongs to, built by fills (no host-to-device copy, no synchronisation)
    owner = torch.cat([torch.full((size,), i, dtype=torch.int64, device=rows.device) for i, size in enumerate(sizes)])

    def per_mb(x: torch.Tensor) -> torch.Tensor:
        acc = torch.zeros(n, dtype=dtype, device=rows.device)
        return acc.index_add_(0, owner, x.to(dtype)).to(summed.device)

    out[:, _I["target_tokens"]] = per_mb(slots)
    out[:, _I["supervised_tokens"]] = per_mb(sup)
    out[:, _I["supervised_padding_tokens"]] = per_mb(sup_pad)
    out[:, _I["sequences"]] = per_mb(has)
    out[:, _I["fully_masked_sequences"]] = per_mb(has & (sup == 0))
    out[:, _I["unmasked_sequences"]] = per_mb(has & (sup >= slots))
    for i in range(n):
        _decide(out[i], summed[i])
        target = out[i, _I["target_tokens"]]
        out[i, _I["unmasked_batches"]] = ((out[i, _I["masked_tokens"]] == 0) & (target > 0)).to(dtype)
    return out


def first_positive(mb: torch.Tensor) -> torch.Tensor:
    """Per column of ``mb`` ``(n, k)``: the index of the first row where it is positive, -1 where none is."""
    k = mb.shape[1]
    if mb.shape[0] == 0:
        return torch.full((k,), -1.0, dtype=mb.dtype, device=mb.device)
    pos = mb > 0
    first = pos.to(mb.dtype).argmax(dim=0).to(mb.dtype)  # argmax returns the first maximal index
    return torch.where(pos.any(dim=0), first, torch.full_like(first, -1.0))
