"""What a trainer's dataset preparation removed before training: rows dropped as fully masked.

TRL >= 1 (``SFTTrainer`` with ``max_length`` set and no packing, its default) truncates every example and
then *drops* the examples whose labels are all -100 (``dataset.filter``), while the trainer is being built,
before any callback event but ``on_init_end``. A dataset whose masking failed everywhere is then empty, and
``train()`` dies in torch's sampler (``num_samples=0``) without a word about masking; half-failed masking
silently halves the data. :func:`dropped_rows` reads this back from the prepared ``datasets.Dataset``: a
filter keeps the unfiltered Arrow table and records the kept rows as an indices mapping, so the rows it
removed are the complement. Each dropped row of a sample is checked to be fully masked (so a user's own
``select`` is never reported as TRL's drop), and their lengths say why: as long as ``max_length`` (the
response was truncated away) or shorter (no supervised label at all).

Example (the callback does this at ``on_init_end``)::

    info = dropped_rows(trainer.train_dataset, max_length=trainer.args.max_length)
    if info is not None:
        info.dropped, info.kept, info.reasons      # 4, 4, {'no_response': 4}
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

__all__ = ["DroppedRows", "dropped_rows"]

#: Dropped rows whose labels are read to confirm they are fully masked.
VERIFY_ROWS = 256


@dataclass
class DroppedRows:
    """Rows a dataset preparation dropped as fully masked."""

    kept: int
    dropped: int
    #: why, by count: ``truncated_away`` (the row is as long as max_length) / ``no_response`` (shorter)
    reasons: dict[str, int] = field(default_factory=dict)
    #: the first dropped rows (``input_ids``, ``labels`` lists), for evidence
    rows: list[dict[str, list[int]]] = field(default_factory=list)
    #: source positions (in the prepared, unfiltered table) of those rows
    positions: list[int] = field(default_factory=list)

    @property
    def share(self) -> float:
        total = self.kept + self.dropped
        return self.dropped / total if total else 0.0


def dropped_rows(
    dataset: Any, *, max_length: int | None = None, ignore_index: int = -100, keep: int = 2
) -> DroppedRows | None:
    """The rows a preparation filter dropped from ``dataset`` as fully masked, or None (nothing dropped,
    not a map-style ``datasets.Dataset``, or rows removed for another reason).

    Args:
        dataset: the trainer's prepared training dataset.
        max_length: the truncation length used (tells ``truncated_away`` from ``no_response``).
        ignore_index: the label value the loss ignores.
        keep: how many dropped rows to return for evidence.
    """
    try:
        import datasets
        import numpy as np
        import pyarrow.compute as pc
    except ImportError:  # pragma: no cover - TRL needs datasets
        return None
    if not isinstance(dataset, datasets.Dataset):
        return None
    indices = getattr(dataset, "_indices", None)
    data = getattr(dataset, "_data", None)
    table = getattr(data, "table", data)
    if indices is None or table is None or "labels" not in table.column_names:
        return None
    total, kept = table.num_rows, len(dataset)
    if kept >= total:
        return None
    mask = np.ones(total, dtype=bool)
    mask[indices.column(0).to_numpy()] = False
    missing = np.nonzero(mask)[0]
    if missing.size == 0:
        return None
    sample = table.take(missing[:VERIFY_ROWS].tolist())
    for labels in sample.column("labels").to_pylist():
        if labels is None or any(t != ignore_index for t in labels):
            return None  # not a fully-masked filter: rows removed by something else (a select, a shard)
    ids_col = "input_ids" if "input_ids" in table.column_names else "labels"
    lengths = pc.list_value_length(table.column(ids_col).take(missing.tolist())).to_numpy(zero_copy_only=False)
    reasons: dict[str, int] = {}
    if max_length is not None:
        truncated = int((lengths >= max_length).sum())
        reasons = {"truncated_away": truncated, "no_response": int(missing.size) - truncated}
    else:
        reasons = {"no_response": int(missing.size)}
    reasons = {k: v for k, v in reasons.items() if v}
    rows = []
    head = sample.slice(0, keep)
    for i in range(head.num_rows):
        row: dict[str, list[int]] = {"labels": head.column("labels")[i].as_py()}
        if "input_ids" in head.column_names:
            row["input_ids"] = head.column("input_ids")[i].as_py()
        rows.append(row)
    return DroppedRows(kept=kept, dropped=int(missing.size), reasons=reasons, rows=rows,
                       positions=missing[:keep].tolist())
