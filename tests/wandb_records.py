"""Read the records of an offline W&B run (``run-<id>.wandb``) back, for tests.

wandb 0.31 no longer ships a reader for its own transaction log. The format is LevelDB-log style:
a 7-byte file header (``:W&B``, magic ``0xBEE1`` little-endian, version 0), then 32 KiB blocks of
chunks, each chunk a 7-byte header (CRC-32 of type byte + data, little-endian; length, 2 bytes
little-endian; type: 1 FULL, 2 FIRST, 3 MIDDLE, 4 LAST) and its data. A block with fewer than 7 bytes
left is padded with zeros. Chunks join into records, each a serialized
``wandb.proto.wandb_internal_pb2.Record``. Every CRC is checked, so a reader bug cannot pass silently.

Example (given a finished offline run directory ``run_dir``)::

    run = read_run(run_dir)
    run.history_rows("mask_monitor/masked_ratio")   # [{..., "train/global_step": 2}, ...]
    run.summary["mask_monitor/aborted"]
"""

from __future__ import annotations

import glob
import json
import os
import struct
import time
import zlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from wandb.proto import wandb_internal_pb2 as pb

__all__ = ["read_records", "read_run", "OfflineRun", "find_run_dir"]

BLOCK = 32 * 1024
HEADER = 7
FULL, FIRST, MIDDLE, LAST = 1, 2, 3, 4


def _chunks(data: bytes):
    if data[:4] != b":W&B" or struct.unpack("<H", data[4:6])[0] != 0xBEE1:
        raise ValueError("not a W&B transaction log (bad file header)")
    pos = HEADER
    while pos < len(data):
        left_in_block = BLOCK - pos % BLOCK
        if left_in_block < HEADER:
            pos += left_in_block
            continue
        if pos + HEADER > len(data):
            break
        crc, length, kind = struct.unpack("<IHB", data[pos : pos + HEADER])
        if crc == 0 and length == 0 and kind == 0:  # zero padding at the end of a block
            pos += left_in_block
            continue
        body = data[pos + HEADER : pos + HEADER + length]
        if len(body) < length:
            raise ValueError(f"truncated chunk at byte {pos}")
        if zlib.crc32(body, zlib.crc32(bytes([kind]))) & 0xFFFFFFFF != crc:
            raise ValueError(f"CRC mismatch at byte {pos}")
        yield kind, body
        pos += HEADER + length


def read_records(path: str | os.PathLike[str]) -> list[pb.Record]:
    """Every record of a ``.wandb`` file, in order."""
    data = Path(path).read_bytes()
    out: list[pb.Record] = []
    parts: list[bytes] = []
    for kind, body in _chunks(data):
        if kind == FULL:
            parts = [body]
        elif kind == FIRST:
            parts = [body]
            continue
        elif kind == MIDDLE:
            parts.append(body)
            continue
        elif kind == LAST:
            parts.append(body)
        else:
            raise ValueError(f"unknown chunk type {kind}")
        rec = pb.Record()
        rec.ParseFromString(b"".join(parts))
        out.append(rec)
        parts = []
    return out


def _items(items) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for it in items:
        key = it.key or "/".join(it.nested_key)
        out[key] = json.loads(it.value_json)
    return out


@dataclass
class OfflineRun:
    """What an offline run recorded: history rows, the final summary, alerts, metric definitions."""

    run_dir: Path
    records: list[pb.Record]
    history: list[dict[str, Any]] = field(default_factory=list)
    summary: dict[str, Any] = field(default_factory=dict)
    alerts: list[pb.AlertRecord] = field(default_factory=list)
    metrics: dict[str, pb.MetricRecord] = field(default_factory=dict)
    exit_code: int | None = None

    def history_rows(self, key: str) -> list[dict[str, Any]]:
        """History rows that contain ``key``."""
        return [row for row in self.history if key in row]

    def series(self, key: str, x: str = "train/global_step") -> list[tuple[Any, Any]]:
        """``(x, value)`` pairs of ``key`` over the history."""
        return [(row.get(x), row[key]) for row in self.history if key in row]

    @property
    def files_dir(self) -> Path:
        return self.run_dir / "files"

    def table_files(self, key: str) -> list[Path]:
        """The table JSON files logged under ``key``, in logging order (W&B names them by history step)."""
        files = glob.glob(str(self.files_dir / "media" / "table" / f"{key}_*.table.json"))

        def order(p: str) -> int:
            return int(Path(p).name[len(Path(key).name) + 1 :].split("_")[0])

        return [Path(p) for p in sorted(files, key=order)]


def find_run_dir(wandb_dir: str | os.PathLike[str]) -> Path:
    """The one run directory under ``<WANDB_DIR>/wandb`` (fails if there is not exactly one)."""
    runs = sorted(Path(wandb_dir).glob("wandb/offline-run-*"))
    if len(runs) != 1:
        raise AssertionError(f"expected one offline run under {wandb_dir}, found {[r.name for r in runs]}")
    return runs[0]


def _finished_records(path: Path, timeout: float) -> list[pb.Record]:
    """The records once the run's exit record is on disk.

    ``wandb.finish()`` can return before wandb-core has flushed the log (seen offline: history and
    artifact records missing when read at once, present 100 ms later), so wait for the exit record,
    which wandb-core writes last.
    """
    deadline = time.monotonic() + timeout
    while True:
        try:
            records = read_records(path)
            if any(r.WhichOneof("record_type") == "exit" for r in records):
                return records
        except ValueError:  # a chunk still being written
            if time.monotonic() > deadline:
                raise
        if time.monotonic() > deadline:
            raise AssertionError(f"{path}: no exit record after {timeout}s: the run did not finish")
        time.sleep(0.05)


def read_run(run_dir: str | os.PathLike[str], timeout: float = 30.0) -> OfflineRun:
    """Parse ``run-<id>.wandb`` in ``run_dir`` once finished: history rows, last summary, alerts, exit code."""
    run_dir = Path(run_dir)
    files = list(run_dir.glob("run-*.wandb"))
    if len(files) != 1:
        raise AssertionError(f"expected one .wandb file in {run_dir}, found {files}")
    records = _finished_records(files[0], timeout)
    run = OfflineRun(run_dir=run_dir, records=records)
    for rec in records:
        kind = rec.WhichOneof("record_type")
        if kind == "history":
            run.history.append(_items(rec.history.item))
        elif kind == "summary":
            run.summary.update(_items(rec.summary.update))
            for it in rec.summary.remove:
                run.summary.pop(it.key or "/".join(it.nested_key), None)
        elif kind == "alert":
            run.alerts.append(rec.alert)
        elif kind == "metric":
            name = rec.metric.name or rec.metric.glob_name
            run.metrics[name] = rec.metric
        elif kind == "exit":
            run.exit_code = rec.exit.exit_code
    return run
