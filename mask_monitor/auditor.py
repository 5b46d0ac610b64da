"""MaskAuditor: the framework-agnostic core. Feed it micro-batches, close steps, read reports.

Per micro-batch, :meth:`MaskAuditor.update` computes :func:`~mask_monitor.stats.batch_stats` on the
batch's device and keeps the vector there: no host sync. At the optimizer-step boundary,
:meth:`MaskAuditor.step` exchanges the step's vector with the other ranks of the data-parallel group (one
``all_gather`` when ``torch.distributed`` is initialised) and reads everything back in a single
device-to-host copy: one synchronisation per optimizer step, none per micro-batch. Every rank enters that
exchange even when its own part of the step failed, carrying a status: then every rank raises
:class:`~mask_monitor.errors.RankFailure` in the same step (no rank waits in a collective the others
skipped). Windows (e.g. the Trainer's logging interval) and run totals are running sums on the host:
memory does not grow with the number of steps.

Groups (tensor / context / sequence parallelism, plain loops): ``process_group`` is the data-parallel
group (ranks that hold different batches; tensor-parallel peers hold the same batch and must not be
counted twice), ``sequence_group`` the ranks holding shards of the same sequences (their per-row counts
are summed first, one more ``all_reduce`` and one more read-back per step; see :mod:`mask_monitor.parts`).

Works in a plain PyTorch loop:

    >>> import torch
    >>> from mask_monitor import MaskAuditor, Policy
    >>> auditor, policy = MaskAuditor(), Policy()
    >>> labels = torch.tensor([[-100, -100, 7, 8, 9]])
    >>> auditor.update(labels=labels, loss=torch.tensor(2.5))
    >>> report = auditor.step()
    >>> report.total.supervised_tokens, report.total.masked_tokens
    (3.0, 1.0)
    >>> [f.check for f in policy.evaluate(report)]
    []
    >>> auditor.update(labels=torch.full((1, 5), -100), loss=torch.tensor(0.0))
    >>> [f.check for f in policy.evaluate(auditor.step())]
    ['all_masked']
"""

from __future__ import annotations

import threading
import zlib
from collections.abc import Callable, Hashable
from typing import Any

import torch

from .distributed import (
    FAILED,
    OK,
    PEER_FAILED,
    collective_device,
    exchange_failures,
    gather_rows,
    global_ranks,
    group_rank_and_size,
    is_distributed,
    rank_and_world,
    sum_across,
)
from .errors import RankFailure
from .parts import first_positive, from_shards, merge_row_parts, shard_rows
from .reports import StepReport, Totals, WindowReport
from .stats import FIELDS, batch_stats, combine, stats_dtype

__all__ = ["MaskAuditor"]

RoleTagger = Callable[[torch.Tensor, torch.Tensor | None], torch.Tensor]
_HEAD = 3  # status, fingerprint, micro-batches: the head of every rank's exchanged vector


def _filled(values: tuple[float, ...], dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """A small vector of host numbers written on the device by fills (``torch.tensor(list, device=cuda)``
    copies from pageable host memory and synchronises)."""
    out = torch.empty(len(values), dtype=dtype, device=device)
    for i, v in enumerate(values):
        out[i] = v
    return out


def fingerprint(settings: Any) -> int:
    """A 20-bit digest of ``settings`` (exact in float32 too): ranks that must agree exchange it each step."""
    return zlib.crc32(repr(settings).encode()) & 0xFFFFF


class MaskAuditor:
    """Accumulates per-micro-batch statistics on the device; reports per step, window and run.

    Args:
        ignore_index: the label value the loss ignores.
        role_tagger: optional ``tagger(input_ids, position_ids) -> roles`` (see
            :class:`mask_monitor.templates.RoleTagger`) enabling the prompt-leakage audit.
        evidence_rows: how many leading rows of each micro-batch to keep (on device, until the next
            step closes) for an abort's evidence file.
        sync: exchange with the other ranks at each step when ``torch.distributed`` is initialised.
        process_group: the data-parallel group the counts are exchanged over (None: the default group).
            Under tensor parallelism pass the data-parallel group: tensor-parallel peers see the same batch.
            Every member must call :meth:`step` once per optimizer step.
        sequence_group: the context/sequence-parallel group whose members hold shards of the same
            sequences (``shift_labels`` made before the split); their per-row counts are summed before
            sequences are counted. Needs ``process_group`` (the default group holds each sequence's shards
            more than once).

    Raises:
        ValueError: ``sequence_group`` without ``process_group``.
    """

    def __init__(
        self,
        *,
        ignore_index: int = -100,
        role_tagger: RoleTagger | None = None,
        evidence_rows: int = 2,
        sync: bool = True,
        process_group: Any = None,
        sequence_group: Any = None,
    ) -> None:
        self.ignore_index = ignore_index
        self.role_tagger = role_tagger
        self.evidence_rows = evidence_rows
        #: the length sequences were truncated to, when known (tells a response cut by truncation from one
        #: that ends without its end-of-turn token; see :func:`~mask_monitor.stats.batch_stats`)
        self.max_length: int | None = None
        self.sync = sync
        self.set_groups(process_group, sequence_group)
        #: an integer every rank of the exchange must share (the callback: a digest of its settings)
        self.fingerprint = 0
        self._lock = threading.Lock()
        self._pending: list[torch.Tensor] = []
        self._pending_rows: list[dict[str, torch.Tensor]] = []
        self._pending_parts: list[Hashable | None] = []
        self._pending_shards: list[torch.Tensor] = []
        self._device: torch.device | None = None
        self._last_rows: list[dict[str, torch.Tensor]] = []
        self.reset()

    def set_groups(self, process_group: Any = None, sequence_group: Any = None) -> None:
        """Set the data-parallel and sequence groups (see the class arguments)."""
        if sequence_group is not None and process_group is None:
            raise ValueError(
                "MaskAuditor(sequence_group=...) needs process_group= too: the data-parallel group (the default "
                "group holds the shards of each sequence more than once)")
        self.process_group = process_group
        self.sequence_group = sequence_group

    # ---------------------------------------------------------------- per micro-batch (hot path)
    def update(
        self,
        labels: torch.Tensor | None,
        *,
        input_ids: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.Tensor | None = None,
        shift_labels: torch.Tensor | None = None,
        loss: torch.Tensor | float | None = None,
        causal: bool = True,
        part_of: Hashable | None = None,
    ) -> None:
        """Audit one micro-batch. Tensors stay on their device; nothing is read back. Thread-safe.

        ``causal=False`` for encoder-decoder models (``labels`` are decoder targets, not shifted;
        ``attention_mask`` is the decoder's); see :func:`~mask_monitor.stats.batch_stats`.
        ``part_of``: updates sharing a key are row chunks of one micro-batch (``nn.DataParallel``
        replicas) and count as one micro-batch (:func:`~mask_monitor.parts.merge_row_parts`).
        """
        sharded = self.sequence_group is not None
        block = None
        if sharded and (labels is not None or shift_labels is not None):
            block = shard_rows(shift_labels, attention_mask, labels=labels, ignore_index=self.ignore_index,
                               causal=causal)
        roles = None
        if self.role_tagger is not None and input_ids is not None and causal and not sharded:
            roles = self.role_tagger(input_ids, position_ids)
        vec = batch_stats(
            labels,
            attention_mask=attention_mask,
            position_ids=position_ids,
            shift_labels=shift_labels,
            loss=loss,
            roles=roles,
            ignore_index=self.ignore_index,
            causal=causal,
            max_length=self.max_length,
        )
        if sharded and block is None:  # labels unreadable: the micro-batch has no rows to combine
            block = torch.zeros((0, 3), dtype=torch.int64, device=vec.device)
        rows: dict[str, torch.Tensor] = {}
        if self.evidence_rows > 0:  # one entry per micro-batch (empty when nothing is readable), aligned
            for key, t in (("labels", labels), ("input_ids", input_ids), ("shift_labels", shift_labels),
                           ("attention_mask", attention_mask), ("position_ids", position_ids), ("roles", roles)):
                if isinstance(t, torch.Tensor) and t.dim() == 2:
                    rows[key] = t.detach()[: self.evidence_rows].clone()
        with self._lock:  # DataParallel replicas call from one thread per device: keep the lists aligned
            self._device = vec.device
            self._pending.append(vec)
            self._pending_parts.append(part_of)
            if self.evidence_rows > 0:
                self._pending_rows.append(rows)
            if block is not None:
                self._pending_shards.append(block)

    def reset(self) -> None:
        """Forget everything: pending micro-batches, windows, run totals (a new run)."""
        with getattr(self, "_lock", threading.Lock()):
            self._pending, self._pending_rows, self._pending_parts, self._pending_shards = [], [], [], []
        self._last_rows = []
        self.steps = 0
        self.last_step = 0
        self.run_total = Totals()
        self.run_per_rank: list[Totals] = []
        self._worst: dict[str, float | int] = {}
        self._reset_window()

    def _reset_window(self) -> None:
        self._win_steps = 0
        self._win_first = self._win_last = 0
        self._win_rank = 0
        self._win_per_rank: list[Totals] = []
        self._win_worst: list[tuple[float, int]] = []  # per rank: highest max_masked_ratio, first step with it

    def add_totals(self, totals: Totals) -> None:
        """Add counts known outside any batch (e.g. rows the dataset preparation dropped) to the run totals."""
        self.run_total = self.run_total + totals

    @property
    def pending_micro_batches(self) -> int:
        return len(self._pending)

    # ---------------------------------------------------------------- step boundary (one sync)
    def _exchanging(self) -> bool:
        return self.sync and is_distributed() and group_rank_and_size(self.process_group)[1] > 1

    def _sharded(self) -> bool:
        return (self.sequence_group is not None and self.sync and is_distributed()
                and group_rank_and_size(self.sequence_group)[1] > 1)

    def _duplicate(self) -> bool:
        """Whether another data-parallel group holds the same data and this one is not the first (rank 0's)."""
        if self.process_group is None or not is_distributed():
            return False
        return 0 not in global_ranks(self.process_group)

    @property
    def exchanges(self) -> bool:
        """Whether :meth:`step` exchanges with other ranks (every member must then call it each step)."""
        return self._exchanging() or self._sharded()

    def step(self, step: int | None = None) -> StepReport:
        """Close the optimizer step: exchange with the other ranks, read back once, return the report.

        Every rank of the groups must call this once per step (it issues collectives when distributed).

        Raises:
            RankFailure: distributed, and some rank could not build its part of the step (every rank raises
                it, in the same step), or the ranks' fingerprints differ. In one process, the error itself.
        """
        with self._lock:
            pending, parts, rows = self._pending, self._pending_parts, self._pending_rows
            shards = self._pending_shards
            self._pending, self._pending_parts, self._pending_rows, self._pending_shards = [], [], [], []
        exchanging = self._exchanging()
        sharded = self._sharded()
        me, _ = rank_and_world()
        step_no = self.steps + 1 if step is None else int(step)
        device = collective_device(self._device, self.process_group)
        dtype = stats_dtype(device)
        k = len(FIELDS)
        status, failures = OK, []
        block, sizes = None, []
        try:
            mb, rows = self._local(pending, parts, rows, device, dtype)
            if sharded:
                sizes = [int(b.shape[0]) for b in shards]
                block = (torch.cat([b.to(device) for b in shards]) if shards
                         else torch.zeros((0, 3), dtype=torch.int64, device=device))
                if len(sizes) != mb.shape[0]:
                    raise RuntimeError(f"{mb.shape[0]} micro-batches but {len(sizes)} shard row blocks")
        except Exception as exc:
            if not (exchanging or sharded):
                raise  # one process: nobody waits; the caller decides (the callback warns and trains on)
            status, failures = FAILED, [(me, f"{type(exc).__name__}: {exc}")]
            mb, rows, block, sizes = torch.zeros((0, k), dtype=dtype, device=device), [], None, []
        if sharded:
            mb, status, failures = self._combine_shards(mb, block, sizes, status, failures, step_no)
        head = _filled((float(status), float(self.fingerprint), float(mb.shape[0])), dtype, device)
        vec = torch.cat([head, combine(mb), first_positive(mb)])
        gathered = gather_rows(vec, self.process_group) if exchanging else vec.unsqueeze(0)
        payload = torch.cat([gathered.reshape(-1), mb.reshape(-1)]).tolist()  # the one host sync
        width = _HEAD + 2 * k
        n_ranks = gathered.shape[0]
        heads = [payload[i * width: i * width + _HEAD] for i in range(n_ranks)]
        ranks = global_ranks(self.process_group) if exchanging else (me if is_distributed() else 0,)
        if any(h[0] != OK for h in heads):
            failures = exchange_failures(failures, self.process_group) if exchanging else failures
            raise RankFailure(step_no, failures, rank=me)
        prints = {int(h[1]) for h in heads}
        if len(prints) > 1:
            described = ", ".join(f"rank {ranks[i]}: {int(h[1]):05x}" for i, h in enumerate(heads))
            raise RankFailure(step_no, [(-1, f"the ranks run different monitor settings (digests {described}); "
                                             "give every rank the same MaskMonitorCallback arguments and "
                                             "MASK_MONITOR_* environment")], rank=me)
        per_rank = tuple(Totals.from_values(payload[i * width + _HEAD: i * width + _HEAD + k]) for i in range(n_ranks))
        first = tuple(tuple(int(x) for x in payload[i * width + _HEAD + k: (i + 1) * width]) for i in range(n_ranks))
        base = n_ranks * width
        micro = tuple(Totals.from_values(payload[base + i * k: base + (i + 1) * k]) for i in range(mb.shape[0]))
        my_index = group_rank_and_size(self.process_group)[0] if exchanging else 0
        self.steps += 1
        self.last_step = step_no
        report = StepReport(
            step=self.last_step,
            rank=my_index,
            world_size=n_ranks,
            total=Totals.total(per_rank),
            per_rank=per_rank,
            micro_batches=micro,
            ranks=tuple(ranks),
            first_positive=first,
            duplicate=self._duplicate(),
        )
        self._last_rows = rows
        self._accumulate(report)
        return report

    def _local(
        self,
        pending: list[torch.Tensor],
        parts: list[Hashable | None],
        rows: list[dict[str, torch.Tensor]],
        device: torch.device,
        dtype: torch.dtype,
    ) -> tuple[torch.Tensor, list[dict[str, torch.Tensor]]]:
        """This rank's micro-batch vectors ``(n, len(FIELDS))`` on one device (row chunks merged)."""
        vectors = [v.to(device=device, dtype=dtype) for v in pending]  # DataParallel: vectors on N devices
        if any(p is not None for p in parts):
            order: list[tuple[str, Hashable]] = []
            groups: dict[tuple[str, Hashable], list[int]] = {}
            for i, p in enumerate(parts):
                key: tuple[str, Hashable] = ("solo", i) if p is None else ("part", p)
                if key not in groups:
                    order.append(key)
                    groups[key] = []
                groups[key].append(i)
            merged = []
            for key in order:
                idx = groups[key]
                one = vectors[idx[0]] if len(idx) == 1 else merge_row_parts(torch.stack([vectors[i] for i in idx]))
                merged.append(one)
            if len(rows) == len(vectors):
                rows = [rows[groups[key][0]] for key in order]  # evidence: the first chunk's rows
            vectors = merged
        if not vectors:
            return torch.zeros((0, len(FIELDS)), dtype=dtype, device=device), rows
        return torch.stack(vectors), rows

    def _combine_shards(
        self,
        mb: torch.Tensor,
        block: torch.Tensor | None,
        sizes: list[int],
        status: int,
        failures: list[tuple[int, str]],
        step_no: int,
    ) -> tuple[torch.Tensor, int, list[tuple[int, str]]]:
        """Sum the shards of each micro-batch over the sequence group; rebuild the counts from the sums."""
        group = self.sequence_group
        me, _ = rank_and_world()
        n = mb.shape[0]
        n_rows = sum(sizes)
        header = _filled((float(status), float(n), float(n_rows)), mb.dtype, collective_device(mb.device, group))
        heads = gather_rows(header, group).tolist()  # a second read-back: the shards' shapes must agree
        ok = all(h[0] == OK for h in heads)
        if ok and len({(h[1], h[2]) for h in heads}) > 1:
            ranks = global_ranks(group)
            shapes = ", ".join(f"rank {ranks[i]}: {int(h[1])} micro-batch(es), {int(h[2])} rows"
                               for i, h in enumerate(heads))
            failures = failures + [(me, f"the shards of one step differ across the sequence group ({shapes})")]
            ok = False
        if not ok or block is None:  # block is None only on a rank whose own step already failed
            failures = exchange_failures(failures, group)
            empty = torch.zeros((0, mb.shape[1]), dtype=mb.dtype, device=mb.device)
            return empty, (FAILED if status == FAILED else PEER_FAILED), failures
        k = mb.shape[1]
        flat = torch.cat([mb.reshape(-1), block.to(device=mb.device, dtype=mb.dtype).reshape(-1)])
        summed = sum_across(flat, group)
        return from_shards(summed[: n * k].reshape(n, k), summed[n * k:].reshape(-1, 3).round().long(), sizes), \
            status, failures

    def _accumulate(self, report: StepReport) -> None:
        self.run_total = self.run_total + report.total
        if len(self.run_per_rank) != len(report.per_rank):
            self.run_per_rank = [Totals() for _ in report.per_rank]
        self.run_per_rank = [a + b for a, b in zip(self.run_per_rank, report.per_rank, strict=True)]
        ratios = [t.max_masked_ratio for t in report.per_rank]
        worst = max(ratios) if ratios else 0.0
        if not self._worst or worst > float(self._worst["masked_ratio"]):
            self._worst = {"masked_ratio": worst, "step": report.step, "rank": ratios.index(worst)}
        # the logging window: running sums, nothing kept per step
        if self._win_steps == 0:
            self._win_first = report.step
        if len(self._win_per_rank) != len(report.per_rank):  # the group changed size: restart the per-rank sums
            self._win_per_rank = [Totals() for _ in report.per_rank]
            self._win_worst = [(float("-inf"), report.step) for _ in report.per_rank]
        self._win_per_rank = [a + b for a, b in zip(self._win_per_rank, report.per_rank, strict=True)]
        self._win_worst = [(r, report.step) if r > w else (w, s)
                           for (w, s), r in zip(self._win_worst, ratios, strict=True)]
        self._win_steps += 1
        self._win_last = report.step
        self._win_rank = report.rank

    def evidence_rows_of_last_step(self) -> list[dict[str, list[list[int]]]]:
        """The kept leading rows of each micro-batch of the last closed step (reads them back)."""
        return [{k: v.tolist() for k, v in rows.items()} for rows in self._last_rows]

    # ---------------------------------------------------------------- windows and totals (host)
    def window(self) -> WindowReport | None:
        """Aggregate of the steps since the previous call (None if no step closed since)."""
        if self._win_steps == 0:
            return None
        per_rank = tuple(self._win_per_rank)
        n = len(per_rank)
        ratios = [t.max_masked_ratio for t in per_rank]
        worst_idx = max(range(n), key=lambda i: ratios[i])
        out = WindowReport(
            first_step=self._win_first,
            last_step=self._win_last,
            steps=self._win_steps,
            rank=self._win_rank,
            world_size=n,
            total=Totals.total(per_rank),
            per_rank=per_rank,
            worst_batch={"masked_ratio": ratios[worst_idx], "step": self._win_worst[worst_idx][1], "rank": worst_idx},
        )
        self._reset_window()
        return out

    def summary(self) -> dict[str, Any]:
        """Run totals so far (all ranks), with derived ratios."""
        d: dict[str, Any] = {"steps": self.steps, "last_step": self.last_step}
        d.update(self.run_total.as_dict())
        d["batches"] = d["micro_batches"]
        d["worst_batch"] = dict(self._worst)
        return d

    # ---------------------------------------------------------------- resume
    def state_dict(self) -> dict[str, Any]:
        return {
            "steps": self.steps,
            "last_step": self.last_step,
            "run_total": self.run_total.values(),
            "run_per_rank": [t.values() for t in self.run_per_rank],
            "worst": dict(self._worst),
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.steps = int(state["steps"])
        self.last_step = int(state["last_step"])
        self.run_total = Totals.from_values(state["run_total"])
        self.run_per_rank = [Totals.from_values(v) for v in state["run_per_rank"]]
        self._worst = dict(state.get("worst", {}))
