"""Host-side views of the audit: totals with derived ratios, one optimizer step, one logging window.

These are plain Python values, read back from the device once per optimizer step. Sinks (logging,
Prometheus, W&B) and the policy read them; nothing here touches a tensor.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field, fields
from typing import Any

from .config import SETTINGS
from .counters import COUNTERS, FIELDS, RATIO, RATIOS, REDUCTIONS

__all__ = ["Totals", "StepReport", "WindowReport", "RunInfo", "HISTOGRAM_BUCKETS"]

#: Upper bounds of the per-micro-batch masked-ratio histogram: dense near 1, where SFT batches live.
HISTOGRAM_BUCKETS: tuple[float, ...] = (0.1, 0.25, 0.5, 0.75, 0.9, 0.95, 0.98, 0.99, 0.995, 0.999, 1.0)


def _ratio(num: float, den: float) -> float | None:
    return num / den if den > 0 else None


class Totals:
    """Counts over any set of micro-batches (one, a step, a window, a run; one rank or all).

    One value per :data:`~mask_monitor.counters.COUNTERS` entry, read as attributes
    (``t.supervised_tokens``); every :data:`~mask_monitor.counters.RATIOS` entry is a derived attribute
    (``t.masked_ratio``, None where its denominator is 0: no data is not a 0% or 100% reading).
    ``a + b`` combines two totals with each counter's declared reduction.

    Example:
        >>> t = Totals(target_tokens=8, supervised_tokens=2, masked_tokens=6)
        >>> t.masked_ratio, (t + t).supervised_tokens, Totals().masked_ratio is None
        (0.75, 4.0, True)
    """

    __slots__ = ("_v",)

    def __init__(self, **counts: float) -> None:
        unknown = set(counts) - _INDEX.keys()
        if unknown:
            raise TypeError(f"Totals() got unknown counter(s): {', '.join(sorted(unknown))}")
        self._v: tuple[float, ...] = tuple(float(counts.get(f, 0.0)) for f in FIELDS)

    def __getattr__(self, name: str) -> Any:
        if name.startswith("_"):  # pickling and copying look up dunder/private names first
            raise AttributeError(name)
        i = _INDEX.get(name)
        if i is not None:
            return self._v[i]
        r = RATIO.get(name)
        if r is not None:
            return _ratio(self._v[_INDEX[r.numerator]], self._v[_INDEX[r.denominator]])
        raise AttributeError(f"Totals has no counter or ratio {name!r}")

    def __setattr__(self, name: str, value: Any) -> None:
        if name != "_v" or hasattr(self, "_v"):
            raise AttributeError("Totals is immutable")
        object.__setattr__(self, name, value)

    def __getstate__(self) -> tuple[float, ...]:
        return self._v

    def __setstate__(self, state: tuple[float, ...]) -> None:
        object.__setattr__(self, "_v", tuple(state))

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Totals) and self._v == other._v

    def __hash__(self) -> int:
        return hash(self._v)

    def __repr__(self) -> str:
        nonzero = ", ".join(f"{f}={v:g}" for f, v in zip(FIELDS, self._v, strict=True) if v)
        return f"Totals({nonzero})"

    @classmethod
    def from_values(cls, values: Iterable[float]) -> Totals:
        """From one value per :data:`~mask_monitor.counters.FIELDS` entry, in order."""
        v = tuple(float(x) for x in values)
        if len(v) != len(FIELDS):
            raise ValueError(f"expected {len(FIELDS)} values (one per counter), got {len(v)}")
        out = cls.__new__(cls)
        object.__setattr__(out, "_v", v)
        return out

    @classmethod
    def from_mapping(cls, values: Mapping[str, float]) -> Totals:
        """From named counts (missing counters are 0; names that are not counters are ignored)."""
        return cls.from_values(float(values.get(f, 0) or 0) for f in FIELDS)

    def values(self) -> list[float]:
        return list(self._v)

    def __add__(self, other: Totals) -> Totals:
        return Totals.from_values(
            max(a, b) if how == "max" else a + b
            for a, b, how in zip(self._v, other._v, REDUCTIONS, strict=True)
        )

    @staticmethod
    def total(items: Iterable[Totals]) -> Totals:
        acc = Totals()
        for t in items:
            acc = acc + t
        return acc

    @property
    def template_audited(self) -> bool:
        """Whether a chat template's roles were read in these micro-batches."""
        return self.audited_supervised_tokens > 0 or self.assistant_content_tokens > 0

    def as_dict(self) -> dict[str, float | int | None]:
        """Counts (whole counts as ints) plus every derived ratio."""
        d: dict[str, float | int | None] = {}
        for c, v in zip(COUNTERS, self._v, strict=True):
            d[c.name] = int(v) if c.integral else v
        for r in RATIOS:
            d[r.name] = getattr(self, r.name)
        return d


_INDEX: dict[str, int] = {f: i for i, f in enumerate(FIELDS)}


@dataclass(frozen=True)
class StepReport:
    """One optimizer step, after the cross-rank exchange.

    ``step`` is the optimizer step being audited, numbered as the Trainer numbers it once applied
    (``state.global_step`` after the update), so it lines up with the Trainer's own logs.
    """

    step: int
    rank: int  # index of this rank in ``per_rank`` (its rank in the data-parallel group)
    world_size: int  # ranks in ``per_rank`` (the data-parallel group)
    total: Totals  # all ranks
    per_rank: tuple[Totals, ...]  # index = rank in the data-parallel group
    micro_batches: tuple[Totals, ...]  # this rank's micro-batches, in order
    #: the global rank of each ``per_rank`` entry (empty: the same as the index)
    ranks: tuple[int, ...] = ()
    #: per ``per_rank`` entry, per counter (FIELDS order): the index of that rank's first micro-batch of
    #: the step where the counter is positive, -1 where none is (empty: not exchanged)
    first_positive: tuple[tuple[int, ...], ...] = ()
    #: this rank's data-parallel group repeats another's counts (tensor- / context-parallel peers hold the
    #: same data): exporters that sum per-rank counts over all ranks should leave this rank's out
    duplicate: bool = False

    @property
    def local(self) -> Totals:
        return self.per_rank[self.rank]

    def global_rank(self, index: int) -> int:
        """The global rank of ``per_rank[index]``."""
        return self.ranks[index] if index < len(self.ranks) else index


@dataclass(frozen=True)
class WindowReport:
    """Steps ``first_step..last_step`` (a Trainer logging window, or the whole run)."""

    first_step: int
    last_step: int
    steps: int
    rank: int
    world_size: int
    total: Totals
    per_rank: tuple[Totals, ...]
    worst_batch: dict[str, float | int] = field(default_factory=dict)

    @property
    def local(self) -> Totals:
        return self.per_rank[self.rank]


@dataclass
class RunInfo:
    """What sinks need to know about the run, resolved once at train begin."""

    run_name: str = ""
    output_dir: str | None = None
    rank: int = 0
    local_rank: int = 0
    world_size: int = 1
    is_main_process: bool = True
    template_family: str | None = None
    wandb_run_id: str | None = None
    version: str = ""
    #: Where decoded training text may go (``MonitorConfig.decoded_text``, set by the callback):
    #: ``"local"`` only the evidence files on this machine, ``"all"`` also remote sinks, ``"none"`` nowhere.
    decoded_text: str = SETTINGS["decoded_text"].default

    @property
    def remote_text(self) -> bool:
        """Whether a sink that sends data off this machine (W&B) may send training text (token pieces,
        decoded rows). Only ``decoded_text="all"`` allows it.

        >>> RunInfo().remote_text, RunInfo(decoded_text="all").remote_text
        (False, True)
        """
        return self.decoded_text == "all"

    def as_dict(self) -> dict[str, object]:
        return {f.name: getattr(self, f.name) for f in fields(self)}
