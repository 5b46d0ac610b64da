"""Every counter the monitor keeps, declared once: its name, how it combines, what it means.

A stats vector (:func:`mask_monitor.stats.batch_stats`), :class:`~mask_monitor.reports.Totals`, the
Prometheus exporter, the W&B sink, the audit's per-sequence table and the generated Grafana dashboard
all read :data:`COUNTERS`; none of them lists counters of its own. Adding a counter is one entry here
plus its computation in :mod:`mask_monitor.stats` (or, for a dataset-level count, where it is known).

How a counter combines across micro-batches, steps and ranks is part of its declaration (``reduce``:
``"sum"`` for counts, ``"max"`` for the worst-micro-batch column), the way torchmetrics' ``add_state``
declares ``dist_reduce_fx`` beside the state. Ratios are declared once too (:data:`RATIOS`): numerator
and denominator counters, never an average of averages.

Example:
    >>> COUNTER["supervised_tokens"].reduce, COUNTER["max_masked_ratio"].reduce
    ('sum', 'max')
    >>> FIELDS.index("max_masked_ratio") == len(FIELDS) - 1   # max-reduced columns come last
    True
    >>> RATIO["masked_ratio"].numerator, RATIO["masked_ratio"].denominator
    ('masked_tokens', 'target_tokens')
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

__all__ = [
    "Counter",
    "Ratio",
    "COUNTERS",
    "COUNTER",
    "FIELDS",
    "REDUCTIONS",
    "SUM_FIELDS",
    "MAX_FIELDS",
    "SEQUENCE_FIELDS",
    "RATIOS",
    "RATIO",
    "Reduce",
    "Scope",
]

Reduce = Literal["sum", "max"]
#: ``batch``: computed per micro-batch by ``batch_stats``; ``dataset``: known when the training data is
#: prepared (rows TRL dropped, examples truncated), added to the run totals once.
Scope = Literal["batch", "dataset"]


@dataclass(frozen=True)
class Counter:
    """One column of a stats vector.

    Args:
        name: the column name (also the attribute of :class:`~mask_monitor.reports.Totals`); exported to
            Prometheus as ``mask_monitor_<name>_total`` when ``prometheus`` is set.
        help: one sentence: what is counted (Prometheus HELP, docs, W&B).
        unit: what one unit is (``tokens``, ``sequences``, ``micro-batches``, ``turns``, ``loss``, ``ratio``).
        reduce: how values combine across micro-batches, steps and ranks.
        scope: where the value comes from (see :data:`Scope`).
        template: only meaningful when a chat template is known (left out of reports otherwise).
        prometheus: exported as a Prometheus counter (sum-reduced counts only).
        per_sequence: also a column of :func:`mask_monitor.stats.sequence_stats` (per sequence).
        integral: a whole count (reports show it as an int).
    """

    name: str
    help: str
    unit: str
    reduce: Reduce = "sum"
    scope: Scope = "batch"
    template: bool = False
    prometheus: bool = True
    per_sequence: bool = False
    integral: bool = True

    def __post_init__(self) -> None:
        if self.reduce not in ("sum", "max"):
            raise ValueError(f"Counter({self.name!r}, reduce={self.reduce!r}): expected 'sum' or 'max'")
        if self.prometheus and self.reduce != "sum":
            raise ValueError(f"Counter({self.name!r}): only sum-reduced counts can be Prometheus counters")


def _c(name: str, unit: str, help: str, **kw: object) -> Counter:  # noqa: A002 - mirrors Prometheus' HELP
    return Counter(name=name, help=help, unit=unit, **kw)  # type: ignore[arg-type]


_DECLARED: tuple[Counter, ...] = (
    _c("micro_batches", "micro-batches", "Training micro-batches whose labels were audited."),
    _c("unaudited_batches", "micro-batches",
       "Training micro-batches whose labels could not be read (only their loss is checked)."),
    _c("sequences", "sequences", "Sequences (rows or packed documents) with at least one target slot."),
    _c("target_tokens", "tokens",
       "Target slots: positions a causal-LM loss can train on (after the shift, padding excluded).",
       per_sequence=True),
    _c("supervised_tokens", "tokens",
       "Target slots whose label is not ignore_index: the tokens the loss really trains on.", per_sequence=True),
    _c("masked_tokens", "tokens", "Target slots whose label is ignore_index (-100): not trained on."),
    _c("supervised_padding_tokens", "tokens",
       "Supervised targets on padding or across a packed-document boundary.", per_sequence=True),
    _c("fully_masked_sequences", "sequences", "Sequences with no supervised target at all."),
    _c("unmasked_sequences", "sequences", "Sequences in which every target is supervised (no masking)."),
    _c("all_masked_batches", "micro-batches",
       "Micro-batches with no supervised target: every label is -100, the gradient is zero."),
    _c("unmasked_batches", "micro-batches",
       "Micro-batches with no masked target at all (prompt tokens trained on unless pretraining)."),
    _c("loss_batches", "micro-batches", "Micro-batches whose forward returned a loss."),
    _c("loss_sum", "loss", "Sum of the finite micro-batch losses (for the mean loss).", prometheus=False,
       integral=False),
    _c("zero_loss_batches", "micro-batches", "Micro-batches with supervised targets whose loss is exactly 0."),
    _c("non_finite_loss_batches", "micro-batches", "Micro-batches whose loss is NaN or infinite."),
    _c("audited_supervised_tokens", "tokens",
       "Supervised targets whose role the chat template tells, in sequences where its markers occur (plain "
       "text, and fragments cut from a conversation before their first turn marker, excluded): the denominator "
       "of prompt leakage.",
       template=True),
    _c("untemplated_sequences", "sequences",
       "Sequences (rows or packed documents) in which no chat-template marker occurs (plain text, pre-packed "
       "ids): not a chat render, so not audited for prompt leakage.", template=True, prometheus=False),
    _c("prompt_leakage_tokens", "tokens",
       "Supervised targets that are prompt tokens (system, user, other text): the model learns prompts.",
       template=True, per_sequence=True),
    _c("supervised_header_tokens", "tokens",
       "Supervised targets that are assistant-turn headers (e.g. TRL generation spans that include the "
       "header); not counted as prompt leakage.", template=True, per_sequence=True),
    _c("assistant_content_tokens", "tokens",
       "Target slots that are assistant response content (denominator of response coverage).",
       template=True, per_sequence=True),
    _c("supervised_assistant_content_tokens", "tokens", "Assistant response content targets that are supervised.",
       template=True, per_sequence=True),
    _c("assistant_turns", "turns",
       "Assistant turns closed by an end-of-turn token (denominator of end-of-turn supervision).", template=True,
       per_sequence=True),
    _c("supervised_eot_turns", "turns",
       "Assistant turns whose end-of-turn token is supervised (the model learns to stop).", template=True,
       per_sequence=True),
    _c("assistant_responses", "turns",
       "Assistant responses, counted where they start (their header), however they end.", template=True,
       per_sequence=True),
    _c("unterminated_responses", "turns",
       "Assistant responses that end without their end-of-turn token although their sequence was not cut by "
       "the length limit: the model never learns to stop there.", template=True, per_sequence=True),
    _c("truncated_responses", "turns",
       "Assistant responses that run without their end-of-turn token into the end of a sequence that may have "
       "been cut by max_length (truncation, not missing data).", template=True, per_sequence=True),
    _c("dropped_sequences", "sequences",
       "Examples removed as fully masked while the dataset was prepared (TRL drops rows whose labels are all "
       "-100 after truncation): they never reach a batch.", scope="dataset", prometheus=False),
    _c("truncated_sequences", "sequences",
       "Examples longer than max_length, cut by truncation when the dataset was prepared.", scope="dataset",
       prometheus=False),
    _c("truncated_supervised_tokens", "tokens",
       "Supervised targets cut off by truncation when the dataset was prepared.", scope="dataset",
       prometheus=False),
    _c("max_masked_ratio", "ratio", "Masked share of target slots of the worst micro-batch.", reduce="max",
       prometheus=False, integral=False),
)

#: Every counter, sum-reduced first, in stats-vector order (the order is derived, never maintained by hand).
COUNTERS: tuple[Counter, ...] = tuple(c for c in _DECLARED if c.reduce == "sum") + tuple(
    c for c in _DECLARED if c.reduce == "max"
)
COUNTER: dict[str, Counter] = {c.name: c for c in COUNTERS}
if len(COUNTER) != len(COUNTERS):  # pragma: no cover - a declaration mistake, caught at import
    raise ValueError("duplicate counter names in mask_monitor.counters")

#: Column names of a stats vector, in order.
FIELDS: tuple[str, ...] = tuple(c.name for c in COUNTERS)
#: How each column combines (``"sum"`` or ``"max"``), aligned with :data:`FIELDS`.
REDUCTIONS: tuple[Reduce, ...] = tuple(c.reduce for c in COUNTERS)
SUM_FIELDS: tuple[str, ...] = tuple(c.name for c in COUNTERS if c.reduce == "sum")
MAX_FIELDS: tuple[str, ...] = tuple(c.name for c in COUNTERS if c.reduce == "max")
#: Columns :func:`mask_monitor.stats.sequence_stats` splits by sequence (each sums to the same-named field).
SEQUENCE_FIELDS: tuple[str, ...] = tuple(c.name for c in COUNTERS if c.per_sequence)


@dataclass(frozen=True)
class Ratio:
    """A ratio of two counters: ``numerator / denominator`` of summed counts (None when the denominator is 0).

    Args:
        name: attribute of :class:`~mask_monitor.reports.Totals`, W&B key, docs.
        numerator: the counter name of the numerator.
        denominator: the counter name of the denominator.
        help: what it means.
        summary: the run-summary aggregates W&B keeps for it (``define_metric(summary=...)``).
        template: only meaningful when a chat template is known.
    """

    name: str
    numerator: str
    denominator: str
    help: str
    summary: str = "last"
    template: bool = False


RATIOS: tuple[Ratio, ...] = (
    Ratio("masked_ratio", "masked_tokens", "target_tokens",
          "Target tokens whose label is ignore_index, over all target tokens.", "max,mean,last"),
    Ratio("supervised_ratio", "supervised_tokens", "target_tokens",
          "Target tokens the loss trains on, over all target tokens.", "min,mean,last"),
    Ratio("fully_masked_sequence_ratio", "fully_masked_sequences", "sequences",
          "Sequences with no supervised target, over all sequences.", "max,mean,last"),
    Ratio("prompt_leakage_ratio", "prompt_leakage_tokens", "audited_supervised_tokens",
          "Supervised targets that are prompt tokens, over audited supervised targets.", "max,mean,last",
          template=True),
    Ratio("response_coverage_ratio", "supervised_assistant_content_tokens", "assistant_content_tokens",
          "Assistant content targets that are supervised, over all assistant content targets.", "min,mean,last",
          template=True),
    Ratio("eot_supervised_ratio", "supervised_eot_turns", "assistant_turns",
          "Assistant turns whose end-of-turn token is supervised, over all assistant turns.", "min,last",
          template=True),
    Ratio("mean_loss", "loss_sum", "loss_batches", "Mean of the finite micro-batch losses."),
)
RATIO: dict[str, Ratio] = {r.name: r for r in RATIOS}
for _r in RATIOS:  # pragma: no branch - a declaration mistake, caught at import
    if _r.numerator not in COUNTER or _r.denominator not in COUNTER or _r.name in COUNTER:
        raise ValueError(f"ratio {_r.name!r} must divide two declared counters and not shadow one")
del _r
