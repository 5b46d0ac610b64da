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

from typing import NamedTuple

import torch
import torch.nn.functional as F

from .counters import FIELDS, REDUCTIONS, SEQUENCE_FIELDS, SUM_FIELDS

__all__ = [
    "FIELDS",
    "REDUCTIONS",
    "ROLE_OTHER",
    "ROLE_SYSTEM",
    "ROLE_USER",
    "ROLE_ASSISTANT_HEADER",
    "ROLE_ASSISTANT_CONTENT",
    "ROLE_END_OF_TURN",
    "ROLE_SEPARATOR",
    "ROLE_UNKNOWN",
    "ROLE_NAMES",
    "ANSWER_ROLES",
    "UnsupportedBatch",
    "SEQUENCE_FIELDS",
    "SLOT_STATUSES",
    "batch_stats",
    "sequence_stats",
    "slot_status",
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
ROLE_END_OF_TURN = 5  # the end-of-turn token closing an *assistant* turn, and what follows it in that turn
ROLE_SEPARATOR = 6  # text that closes an assistant turn without a token of its own (Falcon's "\n" before "User:")
ROLE_UNKNOWN = 7  # a fragment cut from a conversation before its first opener (wrapped packing, keep_end)
ROLE_NAMES = (
    "other", "system", "user", "assistant_header", "assistant_content", "end_of_turn", "separator", "unknown",
)
#: Roles that belong to an assistant answer: supervising them is not prompt leakage.
ANSWER_ROLES = (ROLE_ASSISTANT_HEADER, ROLE_ASSISTANT_CONTENT, ROLE_END_OF_TURN, ROLE_SEPARATOR)

_FIRST_MAX = len(SUM_FIELDS)  # max-reduced columns come last (counters.py orders them so)


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


class _Slots(NamedTuple):
    """The loss's view of one micro-batch: one column per target slot (``width`` of them per row)."""

    supervised: torch.Tensor  # (b, width) bool: the target is not ignore_index
    valid: torch.Tensor | None  # (b, width) bool: the target is a real, same-document token; None = all are
    starts: torch.Tensor | None  # (b, width) bool: the slot's own position starts a packed document
    role_t: torch.Tensor | None  # (b, width) role code of the token each slot predicts
    seq_len: int  # input positions per row


def _slots(
    labels: torch.Tensor,
    attention_mask: torch.Tensor | None,
    position_ids: torch.Tensor | None,
    shift_labels: torch.Tensor | None,
    roles: torch.Tensor | None,
    ignore_index: int,
    causal: bool = True,
) -> _Slots:
    """The definitions every count in this module (and the audit's per-sequence table) is made of.

    Slot ``j`` predicts input token ``j + 1``. Without ``shift_labels`` the last input position predicts
    nothing, so slots are width ``seq - 1`` views of the unshifted tensors (no padded copies). With
    ``shift_labels`` (width ``seq``) the same rules apply to the same tokens: the last column has no
    known next token, so it is a slot only when supervised. Either form of one batch counts the same.

    ``causal=False`` (encoder-decoder models): ``labels`` are the decoder's targets position for position
    (the model shifts its decoder *inputs*, not the labels); every column is a slot, padding given by the
    decoder's own ``attention_mask`` (``decoder_attention_mask``) when there is one; no packing.
    """
    if not causal:
        targets = _as_2d("labels", labels)
        full = targets.shape
        mask = _as_2d("attention_mask", attention_mask, full)
        valid_ed = (mask != 0) if mask is not None else None
        role_ed = _as_2d("roles", roles, full)
        return _Slots(targets != ignore_index, valid_ed, None, role_ed, full[1])
    if shift_labels is not None:
        targets = _as_2d("shift_labels", shift_labels)
        full = targets.shape
    else:
        lab = _as_2d("labels", labels)
        full = lab.shape
        targets = lab[:, 1:]
    attention_mask = _as_2d("attention_mask", attention_mask, full)
    position_ids = _as_2d("position_ids", position_ids, full)
    roles = _as_2d("roles", roles, full)
    b, width = targets.shape
    shifted = shift_labels is not None

    def next_tok(t: torch.Tensor, fill: bool | int) -> torch.Tensor:  # value at j + 1, per slot j
        return F.pad(t[:, 1:], (0, 1), value=fill) if shifted else t[:, 1:]

    valid = None
    if attention_mask is not None:
        valid = next_tok(attention_mask != 0, False)
    starts = None
    if position_ids is not None:
        starts = position_ids[:, :width] == 0
        crosses = next_tok(position_ids == 0, True)  # past the last column: unknown, like a boundary
        valid = ~crosses if valid is None else valid & ~crosses
    if shifted and valid is None:  # the last column's next token is unknown: a slot only if supervised
        valid = torch.ones((b, width), dtype=torch.bool, device=targets.device)
        if width:
            valid[:, -1] = False
    role_t = next_tok(roles, ROLE_OTHER) if roles is not None else None
    return _Slots(targets != ignore_index, valid, starts, role_t, full[1])


def _role_masks(role_t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Slots predicting: assistant content; the first token of an assistant end of turn; an assistant
    header; any part of an assistant answer (content, end of turn, header, separator text: supervising
    anything else is prompt leakage; headers are counted apart, see ``supervised_header_tokens``)."""
    content = role_t == ROLE_ASSISTANT_CONTENT
    eot = role_t == ROLE_END_OF_TURN
    eot_first = eot & ~F.pad(eot[:, :-1], (1, 0), value=False)
    header = role_t == ROLE_ASSISTANT_HEADER
    return content, eot_first, header, content | eot | header | (role_t == ROLE_SEPARATOR)


class _Responses(NamedTuple):
    """Assistant responses, each flagged once, at the slot predicting its last token."""

    ended: torch.Tensor  # (b, width) bool: a response (a header's turn with content or a closer) ends here
    unterminated: torch.Tensor  # ... without an end of turn, before its sequence ends or not at a cut
    truncated: torch.Tensor  # ... without an end of turn, at the end of a sequence that may have been cut


def _responses(
    content: torch.Tensor,
    answer: torch.Tensor,
    header: torch.Tensor,
    valid: torch.Tensor | None,
    starts: torch.Tensor | None,
    seq_len: int,
    max_length: int | None,
) -> _Responses:
    """Assistant responses, one per turn whether or not it ends with its end-of-turn token.

    A turn is a run of answer slots (header, content, end of turn, separator) of one sequence, split where
    a header starts. It is a response unless it is a header alone (a generation prompt a template appends
    after the last turn). It is *closed* when its last slot is an end of turn or separator text (the
    tagger gives nothing else after them in a turn); an open one is *unterminated* when another turn
    follows it, or when it runs into the end of a sequence that cannot have been cut by a length limit,
    and *truncated* when that sequence may have been cut: as long as ``max_length`` (when given), or else
    the longest sequence of the micro-batch, or ending at the end of a row without padding. A few shifted
    compares and one running count per row; no scatter, no loop over tokens, no host sync.
    """
    b, width = answer.shape
    dev = answer.device
    if b * width == 0:
        none = torch.zeros((b, width), dtype=torch.bool, device=dev)
        return _Responses(none, none, none)
    if valid is not None:
        answer = answer & valid
    continues = F.pad(answer[:, :-1], (1, 0), value=False)  # the previous slot is this turn's
    if starts is not None:
        continues = continues & ~starts
    head_start = header & ~(continues & F.pad(header[:, :-1], (1, 0), value=False))
    goes_on = F.pad((answer & continues & ~head_start)[:, 1:], (0, 1), value=False)
    last = answer & ~goes_on & ~header  # the last slot of a turn that is more than a header
    open_ = last & content  # neither an end of turn nor a separator closes it
    row_end = torch.zeros((b, width), dtype=torch.bool, device=dev)  # the slot predicting a row's last token
    if seq_len >= 2:
        row_end[:, seq_len - 2] = True
    if valid is None and starts is None:  # whole rows of one length: only a row's end can be a cut
        if max_length is not None and seq_len < max_length:
            return _Responses(last, open_, torch.zeros_like(open_))
        unterminated = open_ & ~row_end
        return _Responses(last, unterminated, open_ & row_end)
    same_doc = valid if starts is None else (~starts if valid is None else valid & ~starts)
    followed = F.pad(same_doc[:, 1:], (0, 1), value=False)  # a real slot of the same sequence follows
    # real slots of the sequence so far (at a sequence's last real slot: its length in slots)
    real = valid if valid is not None else torch.ones((b, width), dtype=torch.bool, device=dev)
    so_far = torch.cumsum(real, dim=1, dtype=torch.int32)
    if starts is not None:
        pos = torch.arange(width, device=dev, dtype=torch.int32)  # a product, not a (slower) where
        doc_start = torch.cummax(starts * pos, dim=1).values.long()  # column 0 starts a row's first sequence
        so_far = so_far - (so_far - real.to(torch.int32)).gather(1, doc_start)
    if max_length is None:
        may_be_cut = (so_far == so_far.max()) | row_end
    else:  # a sequence of n slots has n + 1 tokens
        may_be_cut = (so_far + 1 >= max_length) | (row_end & (seq_len >= max_length))
    unterminated = open_ & (followed | ~may_be_cut)
    return _Responses(last, unterminated, open_ & ~unterminated)


def batch_stats(
    labels: torch.Tensor | None,
    *,
    attention_mask: torch.Tensor | None = None,
    position_ids: torch.Tensor | None = None,
    shift_labels: torch.Tensor | None = None,
    loss: torch.Tensor | float | None = None,
    roles: torch.Tensor | None = None,
    ignore_index: int = -100,
    causal: bool = True,
    max_length: int | None = None,
) -> torch.Tensor:
    """Statistics of one micro-batch as a 1-D tensor laid out as :data:`FIELDS`, on ``labels.device``.

    Args:
        labels: ``(batch, seq)`` (or ``(seq,)``) unshifted labels, as passed to a causal LM; ``None`` when
            the labels cannot be read: the micro-batch then counts as ``unaudited_batches`` and only its
            loss is checked (a loss of exactly 0 counts as ``zero_loss_batches``: nothing says it had
            no target).
        attention_mask: optional ``(batch, seq)`` mask; 0 marks padding.
        position_ids: optional ``(batch, seq)``; a 0 after the first column starts a packed document.
        shift_labels: optional ``(batch, seq)`` already shifted targets; they replace ``labels``.
        loss: the micro-batch's loss, when there is one: a scalar, a per-row vector (checked row by row)
            or any other vector (checked element by element); see :func:`_loss_cols`.
        roles: optional ``(batch, seq)`` role codes (``ROLE_*``) of each *input* position, from a
            template tagger; enables the prompt-leakage, response-coverage and end-of-turn counts. Rows
            (packed documents) with no template marker at all are not a chat render: they are counted as
            ``untemplated_sequences`` and their targets are not audited for prompt leakage.
        ignore_index: the label value the loss ignores.
        causal: ``False`` for encoder-decoder models: ``labels`` are decoder targets, not shifted, and
            ``attention_mask`` is the decoder's; "no masking" is then the norm (the prompt is the
            encoder's), so ``unmasked_*`` are not counted.
        max_length: the length limit sequences were truncated to, when known: an unclosed response
            running into the end of a sequence that long is counted as truncated, not unterminated
            (unknown: the longest sequence of the micro-batch, or a row without padding, may be cut).

    Raises:
        UnsupportedBatch: shapes the audit cannot interpret (the caller decides whether to skip).
    """
    if labels is None and shift_labels is None:
        return _loss_only(loss)
    view = _slots(labels, attention_mask, position_ids, shift_labels, roles, ignore_index, causal)
    supervised, valid, starts = view.supervised, view.valid, view.starts
    device = supervised.device
    dtype = stats_dtype(device)
    b, width = supervised.shape

    seq_sup = torch.count_nonzero(supervised, dim=1)  # count_nonzero: no int64 copy of the bool mask
    row_sup = seq_sup  # per row, kept for a per-row loss vector (packing below re-splits seq_sup)
    n_sup = seq_sup.sum()
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
        seg = _segment_ids(starts)
        seq_slots = _per_segment(seg, slots)  # position_ids make `valid`, so `slots` exists here
        seq_sup = _per_segment(seg, supervised)
    has_slots = seq_slots > 0
    n_seq = torch.count_nonzero(has_slots)
    n_fully = torch.count_nonzero(has_slots & (seq_sup == 0))
    n_unmasked_seq = torch.count_nonzero(has_slots & (seq_sup == seq_slots))

    zero = torch.zeros((), dtype=dtype, device=device)
    one = torch.ones((), dtype=dtype, device=device)
    n_slots_f = n_slots.to(dtype)
    cols: dict[str, torch.Tensor] = {
        "micro_batches": one,
        "sequences": n_seq.to(dtype),
        "target_tokens": n_slots_f,
        "supervised_tokens": n_sup.to(dtype),
        "masked_tokens": n_masked.to(dtype),
        "supervised_padding_tokens": n_sup_padding.to(dtype),
        "fully_masked_sequences": n_fully.to(dtype),
        "all_masked_batches": (n_sup == 0).to(dtype),
        "max_masked_ratio": torch.where(n_slots > 0, n_masked.to(dtype) / n_slots_f.clamp(min=1), zero),
    }
    if causal:
        cols["unmasked_sequences"] = n_unmasked_seq.to(dtype)
        cols["unmasked_batches"] = ((n_masked == 0) & (n_slots > 0)).to(dtype)
    if loss is not None:
        cols.update(_loss_cols(loss, row_sup, device, dtype))
    if view.role_t is not None:
        content, eot_first, header, answer = _role_masks(view.role_t)
        in_slot = slots if slots is not None else True
        # rows / packed documents without any template marker are not a chat render (plain text, pre-packed
        # ids), and a fragment cut before its first turn (ROLE_UNKNOWN) has no role anyone can tell: neither
        # is audited for leakage
        marked = _template_marked(roles, position_ids, width)
        audited = supervised & marked & (view.role_t != ROLE_UNKNOWN)
        if starts is None:
            seq_marked = marked[:, 0]
        else:
            seq_marked = _per_segment(seg, marked.expand(b, width)) > 0
        cols["untemplated_sequences"] = torch.count_nonzero(has_slots & ~seq_marked).to(dtype)
        cols["audited_supervised_tokens"] = torch.count_nonzero(audited).to(dtype)
        cols["prompt_leakage_tokens"] = torch.count_nonzero(audited & ~answer).to(dtype)
        cols["supervised_header_tokens"] = torch.count_nonzero(supervised & header).to(dtype)
        cols["assistant_content_tokens"] = torch.count_nonzero(content & in_slot).to(dtype)
        cols["supervised_assistant_content_tokens"] = torch.count_nonzero(content & supervised).to(dtype)
        cols["assistant_turns"] = torch.count_nonzero(eot_first & in_slot).to(dtype)
        cols["supervised_eot_turns"] = torch.count_nonzero(eot_first & supervised).to(dtype)
        resp = _responses(content, answer, header, valid, starts, view.seq_len, max_length)
        cols["assistant_responses"] = torch.count_nonzero(resp.ended).to(dtype)
        cols["unterminated_responses"] = torch.count_nonzero(resp.unterminated).to(dtype)
        cols["truncated_responses"] = torch.count_nonzero(resp.truncated).to(dtype)
    return torch.stack([cols.get(f, zero) for f in FIELDS])


def _loss_only(loss: torch.Tensor | float | None) -> torch.Tensor:
    """The vector of a micro-batch whose labels cannot be read: only its loss is checked."""
    device = loss.device if isinstance(loss, torch.Tensor) else torch.device("cpu")
    dtype = stats_dtype(device)
    zero = torch.zeros((), dtype=dtype, device=device)
    cols = {"unaudited_batches": torch.ones((), dtype=dtype, device=device)}
    if loss is not None:
        cols.update(_loss_cols(loss, None, device, dtype))
    return torch.stack([cols.get(f, zero) for f in FIELDS])


def _loss_cols(
    loss: torch.Tensor | float, row_sup: torch.Tensor | None, device: torch.device, dtype: torch.dtype
) -> dict[str, torch.Tensor]:
    """The loss columns of one micro-batch, element by element when the loss is a vector.

    A scalar is the micro-batch's loss. A vector as long as the batch has rows is a per-row loss, aligned
    with ``row_sup`` (supervised targets per row): it is zero only when every row with supervised targets
    has a loss of exactly 0 (a fully masked row's 0 is no finding). A vector of another length (one loss
    per device, per token...) is zero only when every element is 0 and the batch has supervised targets.
    Any non-finite element makes the micro-batch non-finite. ``row_sup=None``: labels unread (nothing says
    the batch had no target). The loss summed for the mean is the mean of the elements (0 if any is
    non-finite). Shapes only are read on the host: no synchronisation.
    """
    loss_t = torch.as_tensor(loss, device=device).detach().to(dtype).reshape(-1)
    zero = torch.zeros((), dtype=dtype, device=device)
    if loss_t.numel() == 0:
        return {}
    finite = torch.isfinite(loss_t).all()
    is_zero = loss_t == 0
    if row_sup is None:
        zero_loss = is_zero.all()
    elif loss_t.numel() == row_sup.numel() and loss_t.numel() > 1:
        has = row_sup > 0
        zero_loss = has.any() & (is_zero | ~has).all()
    else:
        zero_loss = is_zero.all() & (row_sup.sum() > 0)
    return {
        "loss_batches": torch.ones((), dtype=dtype, device=device),
        "loss_sum": torch.where(finite, loss_t.mean(), zero),
        "zero_loss_batches": (finite & zero_loss).to(dtype),
        "non_finite_loss_batches": (~finite).to(dtype),
    }


def _template_marked(roles: torch.Tensor, position_ids: torch.Tensor | None, width: int) -> torch.Tensor:
    """Which slots lie in a row (or packed document) that holds a chat-template marker at all (a role other
    than ``ROLE_OTHER`` / ``ROLE_UNKNOWN``): ``(b, 1)`` per row, ``(b, width)`` per slot for packed batches.
    Plain text or pre-packed ids under a chat-template tokenizer carry no marker: not a chat render, not
    audited for prompt leakage (never read as 100% prompt)."""
    roles = _as_2d("roles", roles)
    has = (roles != ROLE_OTHER) & (roles != ROLE_UNKNOWN)
    if position_ids is None:
        return has.any(dim=1, keepdim=True)
    seg = _segment_ids(_as_2d("position_ids", position_ids, roles.shape) == 0)
    per_doc = _per_segment(seg, has) > 0
    return per_doc[seg].reshape(roles.shape)[:, :width]


def _segment_ids(starts: torch.Tensor) -> torch.Tensor:
    """Flat index of the sequence (row, or packed document) each position belongs to."""
    starts = starts.clone()
    if starts.shape[1]:
        starts[:, 0] = True  # a row always starts a sequence: documents never span rows
    return torch.cumsum(starts.reshape(-1), 0) - 1


def _per_segment(seg: torch.Tensor, mask: torch.Tensor, n: int | None = None) -> torch.Tensor:
    """How many positions of each segment ``mask`` marks (length ``n``, default one per position)."""
    out = torch.zeros(seg.numel() if n is None else n, dtype=torch.int64, device=seg.device)
    return out.scatter_add_(0, seg, mask.reshape(-1).to(torch.int64))


def sequence_stats(
    labels: torch.Tensor,
    *,
    attention_mask: torch.Tensor | None = None,
    position_ids: torch.Tensor | None = None,
    shift_labels: torch.Tensor | None = None,
    roles: torch.Tensor | None = None,
    ignore_index: int = -100,
    max_length: int | None = None,
) -> dict[str, torch.Tensor]:
    """The counts of :func:`batch_stats` split by sequence (a row, or a packed document).

    For audits and evidence, not for the training hot path: it reads the number of sequences back to
    the host. Returns 1-D tensors with one entry per sequence that has at least one target slot: the
    columns of :data:`SEQUENCE_FIELDS` (each sums to the same-named :func:`batch_stats` field; a
    sequence is fully masked when ``supervised_tokens == 0``), plus ``row``, ``start`` and ``end`` (its
    input positions ``[start, end)`` in that row, trailing right padding excluded) and ``segment``
    (its index among all rows and documents of the batch, empty ones included).

    Example:
        >>> import torch
        >>> t = sequence_stats(torch.tensor([[-100, -100, 5, 6], [-100, -100, -100, -100]]))
        >>> t["target_tokens"].tolist(), t["supervised_tokens"].tolist(), t["end"].tolist()
        ([3, 3], [2, 0], [4, 4])
    """
    view = _slots(labels, attention_mask, position_ids, shift_labels, roles, ignore_index)
    supervised, valid = view.supervised, view.valid
    n_rows, width = supervised.shape
    length = view.seq_len
    if width < length:  # unshifted: give the last input position its (never valid) slot column
        supervised = F.pad(supervised, (0, 1), value=False)
        valid = F.pad(valid, (0, 1), value=False) if valid is not None else None
    if valid is None:
        valid = torch.ones_like(supervised)
        if width < length:
            valid[:, -1] = False
    slots = valid | supervised
    if position_ids is not None:
        starts = _as_2d("position_ids", position_ids) == 0
    else:
        starts = torch.zeros_like(supervised)
    seg = _segment_ids(starts)
    first = seg.new_ones(1, dtype=torch.bool) if seg.numel() else seg.new_zeros(0, dtype=torch.bool)
    is_start = torch.cat([first, seg[1:] != seg[:-1]])
    start_flat = torch.nonzero(is_start).flatten()
    n_seg = int(start_flat.numel())
    row = start_flat // length
    start = start_flat % length
    end = torch.cat([start_flat[1:], start_flat.new_tensor([n_rows * length])]) - row * length
    end = end.clamp(max=length)
    if attention_mask is not None and position_ids is None:  # right padding: the row ends at its last token
        real = _as_2d("attention_mask", attention_mask).sum(dim=1).to(torch.int64)
        end = torch.minimum(end, real[row].clamp(min=1))

    def per_seg(mask: torch.Tensor) -> torch.Tensor:
        return _per_segment(seg, mask, n_seg)

    table = {
        "target_tokens": per_seg(slots),
        "supervised_tokens": per_seg(supervised),
        "supervised_padding_tokens": per_seg(supervised & ~valid),
    }
    if view.role_t is not None:
        role_t = view.role_t if width == length else F.pad(view.role_t, (0, 1), value=ROLE_OTHER)
        content, eot_first, header, answer = _role_masks(role_t)
        marked = _template_marked(roles, position_ids, supervised.shape[1])
        resp = _responses(content[:, :width], answer[:, :width], header[:, :width], view.valid, view.starts,
                          view.seq_len, max_length)
        table["prompt_leakage_tokens"] = per_seg(supervised & marked & ~answer & (role_t != ROLE_UNKNOWN))
        table["supervised_header_tokens"] = per_seg(supervised & header)
        table["assistant_content_tokens"] = per_seg(content & slots)
        table["supervised_assistant_content_tokens"] = per_seg(content & supervised)
        table["assistant_turns"] = per_seg(eot_first & slots)
        table["supervised_eot_turns"] = per_seg(eot_first & supervised)
        pad = (0, length - width)
        table["assistant_responses"] = per_seg(F.pad(resp.ended, pad, value=False))
        table["unterminated_responses"] = per_seg(F.pad(resp.unterminated, pad, value=False))
        table["truncated_responses"] = per_seg(F.pad(resp.truncated, pad, value=False))
    for k in SEQUENCE_FIELDS:
        if k not in table:
            table[k] = torch.zeros(n_seg, dtype=torch.int64, device=seg.device)
    keep = table["target_tokens"] > 0
    out = {k: v[keep] for k, v in table.items()}
    out["row"] = row[keep]
    out["start"] = start[keep]
    out["end"] = end[keep]
    out["segment"] = torch.arange(n_seg, device=seg.device)[keep]
    return out


def slot_status(
    labels: torch.Tensor,
    *,
    attention_mask: torch.Tensor | None = None,
    position_ids: torch.Tensor | None = None,
    shift_labels: torch.Tensor | None = None,
    roles: torch.Tensor | None = None,
    ignore_index: int = -100,
) -> torch.Tensor:
    """Per *input* token, what the loss does with it, as codes into :data:`SLOT_STATUSES`.

    Token ``j`` is the target of slot ``j - 1`` (token 0 is nobody's target: ``none``). The rules are
    :func:`batch_stats`' own: ``supervised`` / ``leakage`` (supervised, but not part of an assistant
    answer by the template's roles) / ``masked`` (a target slot set to ``ignore_index``) / ``padding``
    (not a slot: padding, or the first token of the next packed document) / ``none``. For display.

    Example:
        >>> import torch
        >>> [SLOT_STATUSES[c] for c in slot_status(torch.tensor([-100, -100, 5, 6]))[0].tolist()]
        ['none', 'masked', 'supervised', 'supervised']
    """
    view = _slots(labels, attention_mask, position_ids, shift_labels, roles, ignore_index)
    supervised = view.supervised
    code = torch.full_like(supervised, SLOT_STATUSES.index("masked"), dtype=torch.int8)
    if view.valid is not None:
        code[~(view.valid | supervised)] = SLOT_STATUSES.index("padding")
    code[supervised] = SLOT_STATUSES.index("supervised")
    if view.role_t is not None:
        answer = _role_masks(view.role_t)[3]
        marked = _template_marked(roles, position_ids, supervised.shape[1])
        code[supervised & marked & ~answer & (view.role_t != ROLE_UNKNOWN)] = SLOT_STATUSES.index("leakage")
    n_rows = supervised.shape[0]
    out = torch.full((n_rows, view.seq_len), SLOT_STATUSES.index("none"), dtype=torch.int8, device=code.device)
    out[:, 1:] = code[:, : view.seq_len - 1]
    return out


#: Names of the codes :func:`slot_status` returns.
SLOT_STATUSES: tuple[str, ...] = ("none", "supervised", "masked", "leakage", "padding")


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
