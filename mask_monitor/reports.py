"""Host-side views of the audit: totals with derived ratios, one optimizer step, one logging window.

These are plain Python values, read back from the device once per optimizer step. Sinks (logging,
Prometheus, W&B) and the policy read them; nothing here touches a tensor.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field, fields

from .stats import FIELDS, REDUCTIONS

__all__ = ["Totals", "StepReport", "WindowReport", "RunInfo", "HISTOGRAM_BUCKETS"]

#: Upper bounds of the per-micro-batch masked-ratio histogram: dense near 1, where SFT batches live.
HISTOGRAM_BUCKETS: tuple[float, ...] = (0.1, 0.25, 0.5, 0.75, 0.9, 0.95, 0.98, 0.99, 0.995, 0.999, 1.0)


def _ratio(num: float, den: float) -> float | None:
    return num / den if den > 0 else None


@dataclass(frozen=True)
class Totals:
    """Counts over any set of micro-batches (one, a step, a window, a run; one rank or all)."""

    micro_batches: float = 0
    sequences: float = 0
    target_tokens: float = 0
    supervised_tokens: float = 0
    masked_tokens: float = 0
    supervised_padding_tokens: float = 0
    fully_masked_sequences: float = 0
    unmasked_sequences: float = 0
    all_masked_batches: float = 0
    unmasked_batches: float = 0
    loss_batches: float = 0
    loss_sum: float = 0.0
    zero_loss_batches: float = 0
    non_finite_loss_batches: float = 0
    audited_supervised_tokens: float = 0
    prompt_leakage_tokens: float = 0
    supervised_header_tokens: float = 0
    assistant_content_tokens: float = 0
    supervised_assistant_content_tokens: float = 0
    assistant_turns: float = 0
    supervised_eot_turns: float = 0
    max_masked_ratio: float = 0.0

    @classmethod
    def from_values(cls, values: Iterable[float]) -> Totals:
        return cls(*(float(v) for v in values))

    @classmethod
    def from_mapping(cls, values: Mapping[str, float]) -> Totals:
        return cls(**{k: float(values.get(k, 0)) for k in FIELDS})

    def values(self) -> list[float]:
        return [getattr(self, f) for f in FIELDS]

    def __add__(self, other: Totals) -> Totals:
        out = []
        for a, b, how in zip(self.values(), other.values(), REDUCTIONS, strict=True):
            out.append(max(a, b) if how == "max" else a + b)
        return Totals.from_values(out)

    @staticmethod
    def total(items: Iterable[Totals]) -> Totals:
        acc = Totals()
        for t in items:
            acc = acc + t
        return acc

    # Derived ratios: None where the denominator is empty (no data is not a 0% or 100% reading).
    @property
    def masked_ratio(self) -> float | None:
        return _ratio(self.masked_tokens, self.target_tokens)

    @property
    def supervised_ratio(self) -> float | None:
        return _ratio(self.supervised_tokens, self.target_tokens)

    @property
    def fully_masked_sequence_ratio(self) -> float | None:
        return _ratio(self.fully_masked_sequences, self.sequences)

    @property
    def mean_loss(self) -> float | None:
        return _ratio(self.loss_sum, self.loss_batches)

    @property
    def template_audited(self) -> bool:
        return self.audited_supervised_tokens > 0 or self.assistant_content_tokens > 0

    @property
    def prompt_leakage_ratio(self) -> float | None:
        return _ratio(self.prompt_leakage_tokens, self.audited_supervised_tokens)

    @property
    def response_coverage_ratio(self) -> float | None:
        return _ratio(self.supervised_assistant_content_tokens, self.assistant_content_tokens)

    @property
    def eot_supervised_ratio(self) -> float | None:
        return _ratio(self.supervised_eot_turns, self.assistant_turns)

    def as_dict(self) -> dict[str, float | int | None]:
        """Counts as ints (max ratio and loss as floats) plus the derived ratios."""
        d: dict[str, float | int | None] = {}
        for f in FIELDS:
            v = getattr(self, f)
            d[f] = v if f in ("loss_sum", "max_masked_ratio") else int(v)
        d["masked_ratio"] = self.masked_ratio
        d["supervised_ratio"] = self.supervised_ratio
        d["fully_masked_sequence_ratio"] = self.fully_masked_sequence_ratio
        d["mean_loss"] = self.mean_loss
        d["prompt_leakage_ratio"] = self.prompt_leakage_ratio
        d["response_coverage_ratio"] = self.response_coverage_ratio
        d["eot_supervised_ratio"] = self.eot_supervised_ratio
        return d


@dataclass(frozen=True)
class StepReport:
    """One optimizer step, after the cross-rank exchange.

    ``step`` is the optimizer step being audited, numbered as the Trainer numbers it once applied
    (``state.global_step`` after the update), so it lines up with the Trainer's own logs.
    """

    step: int
    rank: int
    world_size: int
    total: Totals  # all ranks
    per_rank: tuple[Totals, ...]  # index = rank
    micro_batches: tuple[Totals, ...]  # this rank's micro-batches, in order

    @property
    def local(self) -> Totals:
        return self.per_rank[self.rank]


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

    def as_dict(self) -> dict[str, object]:
        return {f.name: getattr(self, f.name) for f in fields(self)}
