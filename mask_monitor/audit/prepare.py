"""Run TRL's own dataset preparation for the given trainer settings, on the CPU, without model weights.

The labels the audit counts are produced by ``trl.SFTTrainer`` itself: a real trainer is built around
a tiny randomly initialised model (a few thousand parameters plus the embedding, nothing downloaded),
so its ``__init__`` decides exactly what training would decide (completion-only loss from the data
format, a training chat template for ``assistant_only_loss``, pad/eos tokens, padding-free) and its
``_prepare_dataset`` tokenizes, builds labels, truncates, drops fully masked examples and packs. The
trainer's own ``data_collator`` then turns rows into batches, as the training dataloader would.

Preparation runs in two TRL passes whose composition is exactly TRL's single pass: pass 1 tokenizes
and builds labels (``max_length=None``, no packing); pass 2 feeds that already-tokenized dataset back
to ``SFTTrainer`` with the user's ``max_length`` / truncation / packing, which TRL applies to a
tokenized dataset exactly as it would have in one go. In between, the audit reads the untruncated
labels, so it can say *why* an example is fully masked (no response at all, or truncated away) and
which examples TRL dropped. Each source example carries its index through both passes (column
``__mm_idx``; packing drops it, since packed rows mix examples).

Example (needs a tokenizer; see ``tests/test_audit_prepare.py``)::

    args = build_sft_config({"max_length": 512, "assistant_only_loss": False})
    prepared = prepare(tokenizer, load_data("train.jsonl"), args)
    batch = prepared.collator([row for row in rows])   # what the model's forward receives
"""

from __future__ import annotations

import contextlib
import json
import logging
import tempfile
import time
import warnings
from array import array
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from ..errors import InputError
from .data import LoadedData, is_conversational_example

__all__ = [
    "IDX_COLUMN",
    "LABEL_SETTINGS",
    "Prepared",
    "PreStats",
    "read_config_file",
    "build_sft_config",
    "label_settings",
    "prepare",
    "tiny_model",
]

IDX_COLUMN = "__mm_idx"

#: SFTConfig fields that change which tokens are supervised (reported, and settable from the CLI).
LABEL_SETTINGS: tuple[str, ...] = (
    "dataset_text_field",
    "max_length",
    "truncation_mode",
    "packing",
    "packing_strategy",
    "padding_free",
    "pad_to_multiple_of",
    "completion_only_loss",
    "assistant_only_loss",
    "eos_token",
    "pad_token",
    "chat_template_path",
    "dataset_kwargs",
    "shuffle_dataset",
    "seed",
)

# Fields forced so that a training config builds a trainer on a CPU-only machine; none changes labels.
_FORCED: dict[str, Any] = {
    "report_to": "none",
    "use_cpu": True,
    "fp16": False,
    "bf16": False,
    "tf32": None,
    "deepspeed": None,
    "fsdp": "",
    "torch_compile": False,
    "push_to_hub": False,
    "dataloader_num_workers": 0,
    "model_init_kwargs": None,
    "use_liger_kernel": False,
}


def read_config_file(path: str | Path) -> dict[str, Any]:
    """Read an SFTConfig file (YAML or JSON, a flat mapping of SFTConfig fields).

    A mapping nested under ``sft``/``args``/``training_args``/``sft_config`` is accepted too.
    """
    p = Path(path).expanduser()
    if not p.is_file():
        raise InputError(f"config file not found: {path}")
    text = p.read_text(encoding="utf-8")
    try:
        if p.suffix.lower() == ".json":
            data = json.loads(text)
        else:
            import yaml

            data = yaml.safe_load(text)
    except Exception as exc:  # noqa: BLE001
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise InputError(f"could not parse config {path}: {first}") from exc
    if data is None:
        data = {}
    if not isinstance(data, Mapping):
        raise InputError(f"config {path}: expected a mapping of SFTConfig fields, got {type(data).__name__}")
    for key in ("sft", "sft_config", "args", "training_args"):
        if len(data) == 1 and isinstance(data.get(key), Mapping):
            data = data[key]
    return dict(data)


def _sft_fields() -> set[str]:
    from dataclasses import fields

    from trl import SFTConfig

    return {f.name for f in fields(SFTConfig)}


def build_sft_config(values: Mapping[str, Any], output_dir: str | None = None) -> Any:
    """An ``SFTConfig`` from ``values`` (config file merged with CLI options), safe to build on a CPU.

    Raises:
        InputError: unknown field names, or values SFTConfig rejects.
    """
    from trl import SFTConfig

    known = _sft_fields()
    unknown = sorted(set(values) - known)
    if unknown:
        raise InputError(f"unknown SFTConfig field(s): {', '.join(unknown)}")
    kwargs = {k: v for k, v in values.items() if k != "output_dir"}
    kwargs.update({k: v for k, v in _FORCED.items() if k in known})
    kwargs["output_dir"] = output_dir or tempfile.mkdtemp(prefix="mask-monitor-audit-")
    try:
        with _quiet():
            return SFTConfig(**kwargs)
    except Exception as exc:  # noqa: BLE001 - SFTConfig validates its values
        raise InputError(f"invalid SFTConfig: {_first_line(exc)}") from exc


def label_settings(args: Any) -> dict[str, Any]:
    """The label-relevant settings of an SFTConfig, as plain values (for the report)."""
    out: dict[str, Any] = {}
    for name in LABEL_SETTINGS:
        if hasattr(args, name):
            v = getattr(args, name)
            out[name] = v if isinstance(v, str | int | float | bool | type(None) | dict | list) else str(v)
    return out


def tiny_model(vocab_size: int) -> Any:
    """A randomly initialised one-layer Llama: SFTTrainer needs *a* model object, never its weights."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(
        vocab_size=max(int(vocab_size), 1),
        hidden_size=8,
        intermediate_size=8,
        num_hidden_layers=1,
        num_attention_heads=1,
        num_key_value_heads=1,
        max_position_embeddings=32,
        tie_word_embeddings=True,
    )
    with torch.device("cpu"):
        return LlamaForCausalLM(config)


@dataclass
class PreStats:
    """Per source example, before truncation: supervised targets, any label at all, length."""

    supervised: array = field(default_factory=lambda: array("q"))  # labels[1:] != ignore_index
    any_label: array = field(default_factory=lambda: array("b"))  # some label != ignore_index (TRL's filter)
    length: array = field(default_factory=lambda: array("q"))

    def __len__(self) -> int:
        return len(self.length)

    def add_lists(self, labels_batch: list[list[int]], idx_batch: list[int], ignore_index: int) -> None:
        """Record examples by source index (a re-read of the same rows overwrites, never double counts)."""
        for lab, i in zip(labels_batch, idx_batch, strict=True):
            n_sup = sum(1 for t in lab[1:] if t != ignore_index)
            has = n_sup > 0 or (len(lab) > 0 and lab[0] != ignore_index)
            if i >= len(self.length):
                grow = i + 1 - len(self.length)
                self.supervised.extend([0] * grow)
                self.any_label.extend([0] * grow)
                self.length.extend([0] * grow)
            self.supervised[i] = n_sup
            self.any_label[i] = 1 if has else 0
            self.length[i] = len(lab)

    def add_arrow(self, list_array: Any, ignore_index: int) -> None:
        """Vectorised over an Arrow ``list<int>`` array (one chunk of the labels column)."""
        offsets = list_array.offsets.to_numpy(zero_copy_only=False).astype(np.int64)
        values = list_array.values.to_numpy(zero_copy_only=False)
        starts, ends = offsets[:-1], offsets[1:]
        lengths = ends - starts
        sup = values != ignore_index
        cs_any = np.concatenate([[0], np.cumsum(sup, dtype=np.int64)])
        n_any = cs_any[ends] - cs_any[starts]
        first_sup = np.zeros(len(starts), dtype=np.int64)
        nonempty = lengths > 0
        first_sup[nonempty] = sup[starts[nonempty]]
        self.supervised.extend((n_any - first_sup).tolist())
        self.any_label.extend((n_any > 0).astype(np.int8).tolist())
        self.length.extend(lengths.tolist())


@dataclass
class Prepared:
    """TRL's prepared training rows, its collator, and what TRL decided on the way."""

    dataset: Any  # rows with input_ids, labels (+ seq_lengths, __mm_idx)
    collator: Any
    args: Any  # the effective SFTConfig (the user's settings)
    padding_free: bool
    packing: bool
    completion_only_loss: bool
    training_chat_template: bool  # TRL swapped in a {% generation %} template for assistant_only_loss
    streaming: bool
    model_input_columns: tuple[str, ...]
    pre: PreStats
    trl_messages: list[str]
    seconds: dict[str, float] = field(default_factory=dict)
    signature_columns: tuple[str, ...] = ("input_ids", "labels", "seq_lengths", "completion_mask", "assistant_masks")

    @property
    def examples_in(self) -> int:
        return len(self.pre)

    def batches(self, batch_size: int) -> Iterator[tuple[dict[str, Any], list[int | None]]]:
        """Collated batches, as the training dataloader yields them, with each row's source index."""
        cols = [c for c in self.signature_columns if c in self.model_input_columns]
        if isinstance(self.dataset, _datasets().Dataset):
            # Rows as NumPy views of the Arrow buffers: the collator's torch.tensor() then copies memory
            # instead of converting Python ints; its output is the same tensors.
            read = [*cols, IDX_COLUMN] if IDX_COLUMN in self.model_input_columns else cols
            for tbl in self.dataset.select_columns(read).with_format("arrow").iter(batch_size=batch_size):
                per_col = {c: tbl.column(c).to_pylist() if c == "seq_lengths" else _rows_of(tbl.column(c))
                           for c in cols}
                n = tbl.num_rows
                examples = [{c: per_col[c][i] for c in cols} for i in range(n)]
                idx = tbl.column(IDX_COLUMN).to_pylist() if IDX_COLUMN in tbl.column_names else [None] * n
                yield self.collator(examples), idx
            return
        for chunk in self.dataset.iter(batch_size=batch_size):
            n = len(chunk["input_ids"])
            examples = [{c: chunk[c][i] for c in cols} for i in range(n)]
            idx = chunk.get(IDX_COLUMN) or [None] * n
            yield self.collator(examples), list(idx)


def _datasets() -> Any:
    import datasets

    return datasets


def _rows_of(column: Any) -> list[np.ndarray]:
    """Split an Arrow ``list<int>`` column into one int64 NumPy array per row (views, no Python ints)."""
    arr = column.combine_chunks() if hasattr(column, "combine_chunks") else column
    offsets = arr.offsets.to_numpy(zero_copy_only=False)
    values = arr.values.to_numpy(zero_copy_only=False).astype(np.int64, copy=False)
    return [values[offsets[i] : offsets[i + 1]] for i in range(len(offsets) - 1)]


class _Capture(logging.Handler):
    def __init__(self) -> None:
        super().__init__(logging.WARNING)
        self.messages: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        try:
            msg = record.getMessage()
        except Exception:  # noqa: BLE001
            return
        if msg not in self.messages:
            self.messages.append(msg)


@contextlib.contextmanager
def _quiet() -> Iterator[None]:
    import transformers

    level = transformers.logging.get_verbosity()
    transformers.logging.set_verbosity_error()
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            yield
    finally:
        transformers.logging.set_verbosity(level)


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__


def _sft_kwargs(args: Any) -> dict[str, Any]:
    """Constructor kwargs equivalent to ``args`` (public fields only)."""
    from dataclasses import fields

    out = {}
    for f in fields(args):
        if not f.init or f.name.startswith("_"):
            continue
        out[f.name] = getattr(args, f.name)
    return out


def _trainer(model: Any, tokenizer: Any, args: Any, dataset: Any, capture: _Capture) -> Any:
    from trl import SFTTrainer

    trl_logger = logging.getLogger("trl")
    trl_logger.addHandler(capture)
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            trainer = SFTTrainer(model=model, args=args, train_dataset=dataset, processing_class=tokenizer)
        for w in caught:
            msg = str(w.message)
            if "trl" in (w.filename or "") and msg not in capture.messages:
                capture.messages.append(msg)
    finally:
        trl_logger.removeHandler(capture)
    return trainer


def _check_chat_template(tokenizer: Any, example: dict[str, Any], args: Any) -> None:
    if "input_ids" in example:
        return
    try:
        conversational = is_conversational_example(example)
    except Exception:  # noqa: BLE001
        conversational = False
    if conversational and not getattr(tokenizer, "chat_template", None) and not args.chat_template_path:
        name = getattr(tokenizer, "name_or_path", "") or type(tokenizer).__name__
        raise InputError(
            f"tokenizer {name} has no chat template, but the data is conversational "
            "(set chat_template_path in --config or use a tokenizer with a template)"
        )


def prepare(
    tokenizer: Any,
    data: LoadedData,
    args: Any,
    *,
    num_proc: int | None = None,
    ignore_index: int = -100,
) -> Prepared:
    """Prepare ``data`` exactly as ``SFTTrainer(args=args, processing_class=tokenizer)`` would.

    Raises:
        InputError: settings TRL refuses, no chat template for conversational data, unreadable rows.
    """
    import datasets

    ds = data.dataset
    first = next(iter(ds))
    _check_chat_template(tokenizer, first, args)
    capture = _Capture()
    base = _sft_kwargs(args)
    if num_proc is not None:
        base["dataset_num_proc"] = num_proc
    if not isinstance(ds, datasets.Dataset) and base.get("max_steps", -1) <= 0:
        base["max_steps"] = 1  # Trainer wants a step count for an iterable dataset; preparation ignores it
    caching = datasets.is_caching_enabled()
    datasets.disable_caching()  # never audit a stale cached preparation
    try:
        # every source example carries its index through TRL's maps and filter
        if isinstance(ds, datasets.Dataset):
            if IDX_COLUMN in ds.column_names:
                ds = ds.remove_columns(IDX_COLUMN)
            ds = ds.add_column(IDX_COLUMN, np.arange(len(ds), dtype=np.int64))
        else:
            ds = ds.map(lambda ex, i: {IDX_COLUMN: i}, with_indices=True)
        model = tiny_model(len(tokenizer))
        clock = time.perf_counter()
        seconds: dict[str, float] = {}

        # pass 1: tokenize and build labels, nothing truncated or packed
        stage1 = dict(base, max_length=None, packing=False, padding_free=False, shuffle_dataset=False)
        with _quiet():
            args1 = type(args)(**stage1)
        try:
            t1 = _trainer(model, tokenizer, args1, ds, capture)
        except InputError:
            raise
        except Exception as exc:  # noqa: BLE001 - TRL refuses the settings or the data
            raise InputError(f"TRL could not prepare the data with these settings: {_first_line(exc)}") from exc
        ds1 = t1.train_dataset
        seconds["trl_pass1"] = time.perf_counter() - clock
        clock = time.perf_counter()
        completion_only_loss = bool(getattr(t1, "completion_only_loss", False))
        training_template = getattr(t1, "chat_template", None) is not None
        cols1 = set(ds1.column_names or next(iter(ds1)).keys())
        # TRL >= 1.x folds the masks into "labels" here; older TRL keeps completion_mask / assistant_masks
        # columns and applies them in its collator, so they must travel to pass 2 and the collator too.
        keep = [c for c in (*_ROW_COLUMNS, IDX_COLUMN) if c in cols1]
        mask_cols = [] if "labels" in cols1 else [
            c for c in ("completion_mask", "assistant_masks")
            if c in cols1 and (c != "completion_mask" or completion_only_loss)
        ]

        pre = PreStats()
        ds1 = ds1.select_columns(keep)
        if isinstance(ds1, datasets.Dataset) and not mask_cols:
            label_col = "labels" if "labels" in cols1 else "input_ids"
            for tbl in ds1.with_format("arrow").iter(batch_size=50_000):
                for chunk in tbl.column(label_col).chunks:
                    pre.add_arrow(chunk, ignore_index)
        elif isinstance(ds1, datasets.Dataset):
            for batch in ds1.iter(batch_size=10_000):
                pre.add_lists(_effective_labels(batch, mask_cols, ignore_index), batch[IDX_COLUMN], ignore_index)
        else:

            def _record(batch: dict[str, list]) -> dict[str, list]:
                pre.add_lists(_effective_labels(batch, mask_cols, ignore_index), batch[IDX_COLUMN], ignore_index)
                return batch

            ds1 = ds1.map(_record, batched=True, batch_size=1000)

        seconds["untruncated_stats"] = time.perf_counter() - clock
        clock = time.perf_counter()
        # pass 2: the user's truncation / packing / padding-free, applied by TRL to the tokenized rows
        # pass 1's decisions stay: masks already built (or carried as columns), chat template already applied
        stage2 = dict(base, assistant_only_loss=False, completion_only_loss=completion_only_loss,
                      chat_template_path=None)
        with _quiet():
            args2 = type(args)(**stage2)
        try:
            t2 = _trainer(model, tokenizer, args2, ds1, capture)
        except Exception as exc:  # noqa: BLE001
            raise InputError(f"TRL could not prepare the data with these settings: {_first_line(exc)}") from exc
        final = t2.train_dataset
        seconds["trl_pass2"] = time.perf_counter() - clock
        columns = tuple(final.column_names or next(iter(final)).keys())
        signature: tuple[str, ...] = _ROW_COLUMNS
        with contextlib.suppress(Exception):  # the columns the Trainer's dataloader keeps for the collator
            t2._set_signature_columns_if_needed()
            if t2._signature_columns:
                signature = tuple(t2._signature_columns)
    finally:
        if caching:
            datasets.enable_caching()
    return Prepared(
        dataset=final,
        collator=t2.data_collator,
        args=args,
        padding_free=bool(getattr(t2, "padding_free", False)),
        packing=bool(args.packing),
        completion_only_loss=completion_only_loss,
        training_chat_template=training_template,
        streaming=not isinstance(final, datasets.Dataset),
        model_input_columns=columns,
        pre=pre,
        trl_messages=capture.messages,
        seconds=seconds,
        signature_columns=signature,
    )


_ROW_COLUMNS = ("input_ids", "labels", "seq_lengths", "completion_mask", "assistant_masks")


def _effective_labels(batch: dict[str, list], mask_cols: list[str], ignore_index: int) -> list[list[int]]:
    """Labels of rows whose masks the collator applies (older TRL); labels or input_ids as they are otherwise."""
    if "labels" in batch:
        return batch["labels"]
    out = []
    for i, ids in enumerate(batch["input_ids"]):
        masks = [batch[c][i] for c in mask_cols]
        out.append([t if all(m[j] for m in masks) else ignore_index for j, t in enumerate(ids)])
    return out
