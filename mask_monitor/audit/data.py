"""Loading the dataset to audit: JSONL / JSON / Parquet / CSV files, a ``save_to_disk`` folder, a hub name.

:func:`load_data` returns a :class:`datasets.Dataset` (memory-mapped Arrow, so large files do not
have to fit in memory) or, with ``streaming=True``, a :class:`datasets.IterableDataset` read lazily.
``sample`` draws a seeded uniform random subset before anything is tokenized. :func:`describe_format`
names the TRL dataset format of an example.

Example:
    >>> describe_format({"messages": [{"role": "user", "content": "hi"}]})
    'conversational (messages)'
    >>> describe_format({"prompt": "2+2=", "completion": "4"})
    'prompt-completion'
    >>> describe_format({"input_ids": [1, 2], "completion_mask": [0, 1]})
    'pre-tokenized (input_ids + completion_mask)'
"""

from __future__ import annotations

import random
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..errors import InputError

__all__ = ["LoadedData", "load_data", "describe_format", "is_conversational_example", "FILE_BUILDERS"]

#: file suffix -> ``datasets`` builder
FILE_BUILDERS: dict[str, str] = {
    ".jsonl": "json",
    ".json": "json",
    ".ndjson": "json",
    ".parquet": "parquet",
    ".pq": "parquet",
    ".csv": "csv",
    ".arrow": "arrow",
}


@dataclass
class LoadedData:
    """A dataset ready for TRL's preparation, and where it came from."""

    dataset: Any  # datasets.Dataset | datasets.IterableDataset
    source: str  # "jsonl file", "save_to_disk folder", "hub dataset", ...
    streaming: bool
    examples_total: int | None  # rows in the source (None when streaming and not counted)
    sampled: int | None  # rows kept by --sample, or None


def is_conversational_example(example: dict[str, Any]) -> bool:
    """TRL's own test (``trl.data_utils.is_conversational``) for a messages/prompt list of role dicts."""
    from trl.data_utils import is_conversational

    return bool(is_conversational(example))


def describe_format(example: dict[str, Any]) -> str:
    """Name the TRL dataset format of one example (for the report)."""
    keys = set(example)
    if "input_ids" in keys:
        extra = [k for k in ("labels", "completion_mask", "assistant_masks") if k in keys]
        return "pre-tokenized (input_ids" + "".join(f" + {k}" for k in extra) + ")"
    conv = False
    try:
        conv = is_conversational_example(example)
    except Exception:  # noqa: BLE001 - only a label for the report
        conv = False
    if "prompt" in keys and "completion" in keys:
        return "prompt-completion (conversational)" if conv else "prompt-completion"
    if "messages" in keys or "conversations" in keys:
        return "conversational (messages)" if conv or "conversations" in keys else "messages (not role dicts)"
    if "prompt" in keys:
        return "prompt only"
    return "language modeling (text)"


def _load(spec: str, split: str, streaming: bool) -> tuple[Any, str]:
    import datasets

    path = Path(spec).expanduser()
    try:
        if path.is_dir():
            if (path / "dataset_info.json").is_file() or (path / "state.json").is_file() or (
                path / "dataset_dict.json"
            ).is_file():
                ds = datasets.load_from_disk(str(path))
                if isinstance(ds, datasets.DatasetDict):
                    if split not in ds:
                        raise InputError(f"{spec}: no split {split!r} (splits: {', '.join(ds)})")
                    ds = ds[split]
                if streaming:
                    ds = ds.to_iterable_dataset()
                return ds, "save_to_disk folder"
            return datasets.load_dataset(str(path), split=split, streaming=streaming), "data folder"
        if path.is_file():
            builder = FILE_BUILDERS.get(path.suffix.lower())
            if builder is None:
                raise InputError(
                    f"{spec}: unsupported file type {path.suffix!r} (use one of {', '.join(sorted(FILE_BUILDERS))})"
                )
            ds = datasets.load_dataset(builder, data_files=str(path), split="train", streaming=streaming)
            return ds, f"{path.suffix.lower().lstrip('.')} file"
        looks_local = spec.startswith((".", "/", "~")) or Path(spec).suffix.lower() in FILE_BUILDERS
        if looks_local or spec.count("/") > 1:
            raise InputError(f"data not found: {spec}")
        return datasets.load_dataset(spec, split=split, streaming=streaming), "hub dataset"
    except InputError:
        raise
    except Exception as exc:  # noqa: BLE001 - any loader failure is an input error with one line
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise InputError(f"could not read data {spec!r}: {first}") from exc


def _reservoir(iterable: Any, k: int, seed: int) -> list[dict[str, Any]]:
    """Uniform sample of ``k`` items from a stream of unknown length (Algorithm R), memory O(k)."""
    rng = random.Random(seed)
    out: list[dict[str, Any]] = []
    for i, item in enumerate(iterable):
        if i < k:
            out.append(item)
        else:
            j = rng.randint(0, i)
            if j < k:
                out[j] = item
    return out


def load_data(
    spec: str,
    *,
    split: str = "train",
    streaming: bool = False,
    sample: int | None = None,
    seed: int = 0,
) -> LoadedData:
    """Load ``spec`` (a file, a folder, or a hub dataset name) and optionally sample it.

    Raises:
        InputError: missing file, unsupported file type, unreadable data, empty dataset.
    """
    import datasets

    ds, source = _load(spec, split, streaming)
    if sample is not None and sample <= 0:
        raise InputError(f"--sample must be positive, got {sample}")
    if isinstance(ds, datasets.IterableDataset):
        total = None
        sampled = None
        if sample is not None:
            rows = _reservoir(iter(ds), sample, seed)
            total = None
            sampled = len(rows)
            if not rows:
                raise InputError(f"{spec}: the dataset is empty")
            ds = datasets.Dataset.from_list(rows)
            # the sample is small by construction; keep it in memory but still lazily prepared
            ds = ds.to_iterable_dataset()
        else:
            try:
                next(iter(ds))
            except StopIteration:
                raise InputError(f"{spec}: the dataset is empty") from None
        return LoadedData(ds, source, True, total, sampled)
    total = len(ds)
    if total == 0:
        raise InputError(f"{spec}: the dataset is empty")
    sampled = None
    if sample is not None and sample < total:
        rng = random.Random(seed)
        idx = sorted(rng.sample(range(total), sample))
        ds = ds.select(idx)
        sampled = sample
    return LoadedData(ds, source, False, total, sampled)
