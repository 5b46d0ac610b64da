"""Per-micro-batch label statistics, computed on the batch's own device.

One function, :func:`batch_stats`, turns a micro-batch (labels plus whatever the model sees) into a
single 1-D tensor of counts, laid out as :data:`FIELDS`. It uses a handful of vectorised tensor ops,
never loops over tokens or rows in Python and never reads a value back to the host, so it adds no
device-to-host synchronisation. Vectors of several micro-batches (or ranks) combine column by column
with :data:`REDUCTIONS` (``sum`` for counts, ``max`` for the worst-batch column).

What is counted is what a causal-LM loss sees:

* targets are ``labels[..., 1:]`` (or ``shift_labels`` when the batch carries them);
* a *supervised* target is one whose label is not ``ignore_index``; their number is exactly what the
  loss normalises by (the plain Trainer's ``num_items_in_batch``);
* a *target slot* is a position whose target token is real (not padding by ``attention_mask``) and,
  for packed / padding-free batches (``position_ids`` restarting at 0), not the first token of the
  next document; supervised targets outside such slots are counted as slots too, and separately as
  ``supervised_padding_tokens`` (the loss trains on padding or across a document boundary);
* a *sequence* is a row, or a packed document (a run of ``position_ids`` starting at 0), that has at
  least one target slot.

Example:
    >>> import torch
    >>> labels = torch.tensor([[-100, -100, 5, 6], [-100, -100, -100, -100]])
    >>> s = as_dict(batch_stats(labels))
    >>> s["target_tokens"], s["supervised_tokens"], s["masked_tokens"]
    (6.0, 2.0, 4.0)
    >>> s["sequences"], s["fully_masked_sequences"], s["all_masked_batches"]
    (2.0, 1.0, 0.0)
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

__all__ = [
    "FIELDS",
    "REDUCTIONS",
    "ROLE_OTHER",
    "ROLE_SYSTEM",
    "ROLE_USER",
    "ROLE_ASSISTANT_HEADER",
    "ROLE_ASSISTANT_CONTENT",
    "ROLE_END_OF_TURN",
    "ROLE_NAMES",
    "UnsupportedBatch",
    "batch_stats",
    "combine",
    "as_dict",
    "stats_dtype",
]

# Roles a template-aware tagger gives each token position (see mask_monitor.templates).
ROLE_OTHER = 0
ROLE_SYSTEM = 1
ROLE_USER = 2
ROLE_ASSISTANT_HEADER = 3
ROLE_ASSISTANT_CONTENT = 4
ROLE_END_OF_TURN = 5  # the end-of-turn token(s) closing an *assistant* turn
ROLE_NAMES = ("other", "system", "user", "assistant_header", "assistant_content", "end_of_turn")

#: Column names of a stats vector, in order.
FIELDS: tuple[str, ...] = (
    "micro_batches",
    "sequences",
    "target_tokens",
    "supervised_tokens",
    "masked_tokens",
    "supervised_padding_tokens",
    "fully_masked_sequences",
    "unmasked_sequences",
    "all_masked_batches",
    "unmasked_batches",
    "loss_batches",
    "loss_sum",
    "zero_loss_batches",
    "non_finite_loss_batches",
    "audited_supervised_tokens",
    "prompt_leakage_tokens",
    "supervised_header_tokens",
    "assistant_content_tokens",
    "supervised_assistant_content_tokens",
    "assistant_turns",
    "supervised_eot_turns",
    "max_masked_ratio",
)
#: How each column combines across micro-batches, steps and ranks.
REDUCTIONS: tuple[str, ...] = tuple("max" if f.startswith("max_") else "sum" for f in FIELDS)
_FIRST_MAX = REDUCTIONS.index("max")
assert all(r == "max" for r in REDUCTIONS[_FIRST_MAX:]), "max-reduced columns must come last"


class UnsupportedBatch(ValueError):
    """The batch's shape is not one the audit understands (the callback skips it with one warning)."""


def stats_dtype(device: torch.device) -> torch.dtype:
    """float64 holds every count exactly; MPS has no float64."""
    return torch.float32 if device.type == "mps" else torch.float64


def _as_2d(name: str, t: torch.Tensor | None, shape: torch.Size | None = None) -> torch.Tensor | None:
    if t is None:
        return None
    if not isinstance(t, torch.Tensor):
        raise UnsupportedBatch(f"{name} is a {type(t).__name__}, not a tensor")
    if t.dim() == 1:
        t = t.unsqueeze(0)
    if t.dim() != 2:
        raise UnsupportedBatch(f"{name} has shape {tuple(t.shape)}; expected (batch, sequence)")
    if shape is not None and t.shape != shape:
        raise UnsupportedBatch(f"{name} has shape {tuple(t.shape)}, labels have {tuple(shape)}")
    return t


def batch_stats(
    labels: torch.Tensor,
    *,
    attention_mask: torch.Tensor | None = None,
    position_ids: torch.Tensor | None = None,
    shift_labels: torch.Tensor | None = None,
    loss: torch.Tensor | float | None = None,
    roles: torch.Tensor | None = None,
    ignore_index: int = -100,
) -> torch.Tensor:
    """Statistics of one micro-batch as a 1-D tensor laid out as :data:`FIELDS`, on ``labels.device``.

    Args:
        labels: ``(batch, seq)`` (or ``(seq,)``) unshifted labels, as passed to a causal LM.
        attention_mask: optional ``(batch, seq)`` mask; 0 marks padding.
        position_ids: optional ``(batch, seq)``; a 0 after the first column starts a packed document.
        shift_labels: optional ``(batch, seq)`` already shifted targets; they replace ``labels``.
        loss: the micro-batch's loss (a scalar tensor), when the forward produced one.
        roles: optional ``(batch, seq)`` role codes (``ROLE_*``) of each *input* position, from a
            template tagger; enables the prompt-leakage, response-coverage and end-of-turn counts.
        ignore_index: the label value the loss ignores.

    Raises:
        UnsupportedBatch: shapes the audit cannot interpret (the caller decides whether to skip).
    """
    # Slot j predicts the token at j+1. Without shift_labels the last position predicts nothing (never a
    # slot), so the audit works on width seq-1 views of the unshifted tensors: no padded copies.
    if shift_labels is not None:
        targets = _as_2d("shift_labels", shift_labels)
        full = targets.shape
        cut = slice(None)
    else:
        lab = _as_2d("labels", labels)
        full = lab.shape
        targets = lab[:, 1:]
        cut = slice(1, None)
    device = targets.device
    dtype = stats_dtype(device)
    attention_mask = _as_2d("attention_mask", attention_mask, full)
    position_ids = _as_2d("position_ids", position_ids, full)
    roles = _as_2d("roles", roles, full)
    b, width = targets.shape

    supervised = targets != ignore_index
    seq_sup = torch.count_nonzero(supervised, dim=1)  # count_nonzero: no int64 copy of the bool mask
    n_sup = seq_sup.sum()
    # A slot is valid when the token it predicts is real and starts no new packed document.
    valid = None
    if attention_mask is not None:
        valid = attention_mask[:, cut] != 0
    starts = None
    if position_ids is not None:
        starts = position_ids[:, :width] == 0  # slot j's own position starts a document
        next_start = position_ids[:, 1:] == 0
        if shift_labels is not None:
            next_start = F.pad(next_start, (0, 1), value=False)
        valid = ~next_start if valid is None else valid & ~next_start
    if valid is None:  # no padding, no packing: every slot is valid and nothing more needs reading
        slots = None
        seq_slots = torch.full((b,), width, dtype=torch.int64, device=device)
        n_sup_padding = torch.zeros((), dtype=torch.int64, device=device)
    else:
        slots = valid | supervised
        seq_slots = torch.count_nonzero(slots, dim=1)
        n_sup_padding = seq_slots.sum() - torch.count_nonzero(valid)  # supervised & ~valid
    n_slots = seq_slots.sum()
    n_masked = n_slots - n_sup

    # Per sequence (row, or packed document) slot and supervised counts.
    if starts is not None:
        starts = starts.clone()
        if width:
            starts[:, 0] = True
        seg = torch.cumsum(starts.reshape(-1), 0) - 1
        seq_slots = torch.zeros(starts.numel(), dtype=torch.int64, device=device)
        seq_sup = torch.zeros_like(seq_slots)
        seq_slots.scatter_add_(0, seg, slots.reshape(-1).to(torch.int64))
        seq_sup.scatter_add_(0, seg, supervised.reshape(-1).to(torch.int64))
    has_slots = seq_slots > 0
    n_seq = torch.count_nonzero(has_slots)
    n_fully = torch.count_nonzero(has_slots & (seq_sup == 0))
    n_unmasked_seq = torch.count_nonzero(has_slots & (seq_sup == seq_slots))

    zero = torch.zeros((), dtype=dtype, device=device)
    one = torch.ones((), dtype=dtype, device=device)
    if loss is not None:
        loss_t = torch.as_tensor(loss, device=device).detach().to(dtype).reshape(-1)[:1].sum()
        finite = torch.isfinite(loss_t)
        loss_cols = [
            one,
            torch.where(finite, loss_t, zero),
            (finite & (loss_t == 0) & (n_sup > 0)).to(dtype),
            (~finite).to(dtype),
        ]
    else:
        loss_cols = [zero, zero, zero, zero]

    if roles is not None:
        role_t = roles[:, 1:]  # role of the token each slot predicts
        if shift_labels is not None:
            role_t = F.pad(role_t, (0, 1), value=ROLE_OTHER)
        content = role_t == ROLE_ASSISTANT_CONTENT
        eot = role_t == ROLE_END_OF_TURN
        eot_first = eot & ~F.pad(eot[:, :-1], (1, 0), value=False)
        header = role_t == ROLE_ASSISTANT_HEADER
        in_slot = slots if slots is not None else True
        role_cols = [
            n_sup.to(dtype),
            torch.count_nonzero(supervised & ~(content | eot | header)).to(dtype),
            torch.count_nonzero(supervised & header).to(dtype),
            torch.count_nonzero(content & in_slot).to(dtype),
            torch.count_nonzero(content & supervised).to(dtype),
            torch.count_nonzero(eot_first & in_slot).to(dtype),
            torch.count_nonzero(eot_first & supervised).to(dtype),
        ]
    else:
        role_cols = [zero] * 7

    n_slots_f = n_slots.to(dtype)
    max_ratio = torch.where(n_slots > 0, n_masked.to(dtype) / n_slots_f.clamp(min=1), zero)
    cols = [
        one,
        n_seq.to(dtype),
        n_slots_f,
        n_sup.to(dtype),
        n_masked.to(dtype),
        n_sup_padding.to(dtype),
        n_fully.to(dtype),
        n_unmasked_seq.to(dtype),
        (n_sup == 0).to(dtype),
        ((n_masked == 0) & (n_slots > 0)).to(dtype),
        *loss_cols,
        *role_cols,
        max_ratio,
    ]
    return torch.stack(cols)


def combine(vectors: torch.Tensor) -> torch.Tensor:
    """Reduce a ``(n, len(FIELDS))`` stack of stats vectors to one vector (sum, or max per column).

    Slicing only (the max columns are the trailing ones): no index tensor, no host round trip.
    """
    if vectors.dim() != 2 or vectors.shape[1] != len(FIELDS):
        raise ValueError(f"expected (n, {len(FIELDS)}) stats vectors, got {tuple(vectors.shape)}")
    if vectors.shape[0] == 0:
        return torch.zeros(len(FIELDS), dtype=vectors.dtype, device=vectors.device)
    return torch.cat([vectors[:, :_FIRST_MAX].sum(dim=0), vectors[:, _FIRST_MAX:].amax(dim=0)])


def as_dict(vector: torch.Tensor | list[float]) -> dict[str, float]:
    """Name the columns of one stats vector (reads it back to the host: not for hot paths)."""
    values = vector.tolist() if isinstance(vector, torch.Tensor) else list(vector)
    if len(values) != len(FIELDS):
        raise ValueError(f"expected {len(FIELDS)} values, got {len(values)}")
    return dict(zip(FIELDS, (float(v) for v in values), strict=True))
