"""The audit from end to end: load, prepare with TRL, collate, count, judge.

:func:`run_audit` returns an :class:`AuditResult`: the same totals the training callback would report
for one epoch over the data (a :class:`~mask_monitor.reports.Totals`), the per-example distribution,
why examples are fully masked or were dropped, the worst examples, and the verdict (blocking findings
and warnings, judged with :class:`~mask_monitor.config.MonitorConfig` thresholds).

Example (see ``tests/test_audit_cli.py`` for runs on real tokenizers)::

    result = run_audit(AuditOptions(tokenizer="path/to/tokenizer", data="train.jsonl",
                                    sft={"assistant_only_loss": True, "max_length": 2048}))
    result.exit_code, result.totals.supervised_ratio
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from ..checks import Finding
from ..config import MonitorConfig
from ..counters import COUNTERS
from ..errors import InputError
from ..policy import Policy
from ..reports import Totals
from .counting import AuditCounter, SequenceRecord
from .data import describe_format, load_data
from .prepare import build_sft_config, label_settings, prepare

__all__ = ["AuditOptions", "AuditResult", "run_audit", "load_tokenizer", "HIST_EDGES"]

#: bin edges of the per-example supervised-ratio histogram
HIST_EDGES: tuple[float, ...] = tuple(round(i / 20, 2) for i in range(21))


@dataclass
class AuditOptions:
    """What to audit and how (the CLI fills it from its arguments)."""

    tokenizer: str
    data: str
    split: str = "train"
    sft: dict[str, Any] = field(default_factory=dict)  # SFTConfig fields (config file + options)
    sample: int | None = None
    seed: int = 0
    num_proc: int | None = None
    streaming: bool = False
    batch_size: int = 256
    template: Any = "auto"  # "auto", "none", a family name, a ChatTemplate file, or a ChatTemplate
    show: int = 0
    keep_worst: int = 10
    monitor: MonitorConfig = field(default_factory=MonitorConfig)
    fail_on: str = "abort"  # "abort": exit 1 on abort-level findings; "warn": on any finding


@dataclass
class AuditResult:
    """Everything the report shows."""

    tokenizer: str
    data: str
    data_source: str
    data_format: str
    settings: dict[str, Any]
    completion_only_loss: bool
    training_chat_template: bool
    padding_free: bool
    template_family: str | None
    template_note: str | None
    role_audit: bool
    totals: Totals
    examples_in: int
    examples_total: int | None
    sampled: int | None
    rows_after_preparation: int
    dropped: int
    dropped_reasons: dict[str, int]
    fully_masked_reasons: dict[str, int]
    truncated_examples: int
    supervised_before_truncation: int
    ratios: np.ndarray
    worst: list[SequenceRecord]
    shown: list[SequenceRecord]
    findings: list[Finding]
    trl_messages: list[str]
    seconds: dict[str, float]
    thresholds: dict[str, float]
    fail_on: str
    decode: Callable[[list[int]], list[str]] | None = None
    template_setting: Any = "auto"
    split: str = "train"

    @property
    def fix(self) -> list[str]:
        """The exact line(s) that fix the run, when its masks train on the prompt or miss the answer."""
        if not any(f.check in ("prompt_leakage", "response_coverage") for f in self.findings):
            return []
        if not self.data_format.startswith(("conversational", "prompt-completion (conv")):
            return ["rebuild input_ids and assistant_masks from the conversations with "
                    "mask_monitor.assistant_only(conversations, tokenizer) (the data here is already tokenized)"]
        import shlex
        from pathlib import Path

        out = Path(self.data.rstrip("/")).stem + "_answers"
        cmd = f"mask-monitor prepare --tokenizer {shlex.quote(self.tokenizer)} --data {shlex.quote(self.data)}"
        if self.split != "train":
            cmd += f" --split {shlex.quote(self.split)}"
        if isinstance(self.template_setting, str) and self.template_setting != "auto":
            cmd += f" --template {shlex.quote(self.template_setting)}"
        return [
            "train_dataset = mask_monitor.assistant_only(train_dataset, tokenizer)  # before SFTTrainer(...)",
            f"{cmd} --out {shlex.quote(out)}  # offline; then train on datasets.load_from_disk({out!r})",
        ]

    @property
    def blocking(self) -> list[Finding]:
        """Findings whose configured action is ``abort`` (they make the exit code 1)."""
        return [f for f in self.findings if f.action == "abort"]

    @property
    def warnings(self) -> list[Finding]:
        return [f for f in self.findings if f.action == "warn"]

    @property
    def exit_code(self) -> int:
        failing = self.findings if self.fail_on == "warn" else self.blocking
        return 1 if failing else 0

    @property
    def verdict(self) -> str:
        return "blocked" if self.exit_code else "healthy"

    @property
    def leakage_ratio(self) -> float | None:
        return self.totals.prompt_leakage_ratio if self.role_audit else None

    @property
    def lost_share(self) -> float | None:
        """Share of examples that reach training fully masked or were dropped as fully masked."""
        den = self.totals.sequences + self.dropped
        return (self.totals.fully_masked_sequences + self.dropped) / den if den else None

    def distribution(self) -> dict[str, Any]:
        r = self.ratios
        if r.size == 0:
            return {"count": 0}
        counts, _ = np.histogram(r, bins=np.array(HIST_EDGES))
        q = np.quantile(r, [0.0, 0.05, 0.25, 0.5, 0.75, 0.95, 1.0])
        return {
            "count": int(r.size),
            "mean": float(r.mean()),
            "min": float(q[0]),
            "p5": float(q[1]),
            "p25": float(q[2]),
            "median": float(q[3]),
            "p75": float(q[4]),
            "p95": float(q[5]),
            "max": float(q[6]),
            "exactly_0": int((r == 0).sum()),
            "exactly_1": int((r == 1).sum()),
            "histogram": {"edges": list(HIST_EDGES), "counts": [int(c) for c in counts]},
        }

    def as_dict(self) -> dict[str, Any]:
        """The machine-readable report (``--json``)."""
        totals = self.totals.as_dict()
        # loss columns need a forward; batch columns describe the audit's own batches, not training's
        for k in ("loss_batches", "loss_sum", "zero_loss_batches", "non_finite_loss_batches", "mean_loss",
                  "micro_batches", "all_masked_batches", "unmasked_batches", "max_masked_ratio"):
            totals.pop(k, None)
        if not self.role_audit:
            for k in ("prompt_leakage_ratio", "response_coverage_ratio", "eot_supervised_ratio"):
                totals[k] = None
        return {
            "verdict": self.verdict,
            "exit_code": self.exit_code,
            "blocking": [_finding_dict(f) for f in self.blocking],
            "warnings": [_finding_dict(f) for f in self.warnings],
            "tokenizer": self.tokenizer,
            "data": self.data,
            "data_source": self.data_source,
            "format": self.data_format,
            "template_family": self.template_family,
            "template_note": self.template_note,
            "role_audit": self.role_audit,
            "settings": self.settings,
            "completion_only_loss": self.completion_only_loss,
            "training_chat_template": self.training_chat_template,
            "padding_free": self.padding_free,
            "thresholds": self.thresholds,
            "fail_on": self.fail_on,
            "examples_total": self.examples_total,
            "examples_in": self.examples_in,
            "sampled": self.sampled,
            "rows_after_preparation": self.rows_after_preparation,
            "dropped_examples": self.dropped,
            "dropped_reasons": dict(self.dropped_reasons),
            "fully_masked_reasons": dict(self.fully_masked_reasons),
            "lost_share": self.lost_share,
            "truncated_examples": self.truncated_examples,
            "supervised_tokens_before_truncation": self.supervised_before_truncation,
            "totals": totals,
            "supervised_ratio_distribution": self.distribution(),
            "worst_examples": [r.as_dict() for r in self.worst],
            "trl_messages": list(self.trl_messages),
            "fix": self.fix,
            "seconds": {k: round(v, 3) for k, v in self.seconds.items()},
        }


def _finding_dict(f: Finding) -> dict[str, Any]:
    return {"check": f.check, "action": f.action, "severity": "blocking" if f.action == "abort" else "warning",
            "message": f.message}


def load_tokenizer(spec: str) -> Any:
    """``AutoTokenizer.from_pretrained(spec)``; failures are input errors (exit 2)."""
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(spec)
    except Exception as exc:  # noqa: BLE001
        text = str(exc).strip()
        first = text.splitlines()[0] if text else type(exc).__name__
        raise InputError(f"could not load tokenizer {spec!r}: {first}") from exc


def _role_tagger(tokenizer: Any, mode: Any) -> tuple[Any, str | None, str | None]:
    """The tagger of ``--template`` (auto, none, a family name, a description file, a ChatTemplate)."""
    try:
        from ..templates import RoleTagger, TemplateSpecError, detect_template, resolve_template, why_unreadable
    except ImportError:
        return None, None, "template knowledge not available in this build"
    try:
        template = resolve_template(mode)
    except TemplateSpecError as exc:
        raise InputError(f"--template: {exc}") from None
    if template is None:
        return None, None, "template audit off (--template none)"
    if template == "auto":
        try:
            template = detect_template(tokenizer)
        except Exception as exc:  # noqa: BLE001 - the leakage audit is optional
            return None, None, f"template audit off ({type(exc).__name__}: {exc})"
        if template is None:
            return None, None, f"prompt-leakage audit off: {why_unreadable(tokenizer)}"
    try:
        return RoleTagger.from_tokenizer(tokenizer, template), template.family, None
    except Exception as exc:  # noqa: BLE001 - the leakage audit is optional
        return None, None, f"template audit off ({type(exc).__name__}: {exc})"


def _pct(x: float | None) -> str:
    return "n/a" if x is None else f"{100 * x:.1f}%"


def run_audit(
    options: AuditOptions,
    *,
    progress: Callable[[int, int | None], None] | None = None,
    tokenizer: Any = None,
) -> AuditResult:
    """Audit ``options.data`` for ``options.tokenizer`` and SFT settings; see :class:`AuditResult`.

    Args:
        progress: ``progress(rows_done, rows_total_or_None)`` called after each batch.
        tokenizer: an already loaded tokenizer (skips loading ``options.tokenizer``).

    Raises:
        InputError: unreadable inputs or settings (the CLI turns it into exit code 2).
    """
    seconds: dict[str, float] = {}
    t0 = time.perf_counter()
    tok = tokenizer if tokenizer is not None else load_tokenizer(options.tokenizer)
    data = load_data(options.data, split=options.split, streaming=options.streaming,
                     sample=options.sample, seed=options.seed)
    first = next(iter(data.dataset))
    fmt = describe_format(first)
    seconds["load"] = time.perf_counter() - t0

    t1 = time.perf_counter()
    args = build_sft_config(options.sft)
    prepared = prepare(tok, data, args, num_proc=options.num_proc, ignore_index=options.monitor.ignore_index)
    seconds["trl_preparation"] = time.perf_counter() - t1
    seconds.update(prepared.seconds)

    t2 = time.perf_counter()
    # plain text too: text formatted by hand with the template's markup is audited like conversations
    # (and whatever carries no marker is left out below)
    tagger, family, note = _role_tagger(tok, options.template)
    seconds["template"] = time.perf_counter() - t2

    t3 = time.perf_counter()
    counter = AuditCounter(ignore_index=options.monitor.ignore_index, max_length=args.max_length,
                           keep_worst=max(options.keep_worst, options.show), keep_first=max(options.show, 0))
    pre_sup = prepared.pre.supervised
    total_rows = None if prepared.streaming else len(prepared.dataset)
    done = 0
    for batch, idx in prepared.batches(options.batch_size):
        roles = tagger(batch["input_ids"], batch.get("position_ids")) if tagger is not None else None
        counter.add(batch, idx, roles=roles, pre_supervised=pre_sup, packed=prepared.packing)
        done += len(idx)
        if progress is not None:
            progress(done, total_rows)
    totals = counter.totals()
    seconds["audit"] = time.perf_counter() - t3

    pre = prepared.pre
    n_in = len(pre)
    pre_sup_np = np.frombuffer(pre.supervised, dtype=np.int64) if n_in else np.zeros(0, dtype=np.int64)
    dropped_reasons: dict[str, int] = {}
    dropped = 0
    fully_reasons = dict(counter.fully_masked_reasons)
    if prepared.packing:
        n_noresp = int((pre_sup_np == 0).sum())
        fm = int(totals.fully_masked_sequences)
        if fm:
            fully_reasons = {"no_response": min(n_noresp, fm), "truncated_away": fm - min(n_noresp, fm)}
            fully_reasons = {k: v for k, v in fully_reasons.items() if v}
    else:
        seen = np.frombuffer(bytes(counter.seen).ljust(n_in, b"\0")[:n_in], dtype=np.uint8)
        missing = np.nonzero(seen == 0)[0]
        dropped = int(missing.size)
        if dropped:
            noresp = int((pre_sup_np[missing] == 0).sum())
            dropped_reasons = {"no_response": noresp, "truncated_away": dropped - noresp}
            dropped_reasons = {k: v for k, v in dropped_reasons.items() if v}
    max_length = args.max_length
    pre_len = np.frombuffer(pre.length, dtype=np.int64) if n_in else np.zeros(0, dtype=np.int64)
    truncated = int((pre_len > max_length).sum()) if max_length is not None else 0

    role_audit = tagger is not None and (
        totals.assistant_content_tokens > 0 or totals.assistant_turns > 0 or totals.assistant_responses > 0
    )
    if dropped and not counter.rows:
        note = (f"TRL dropped all {dropped} examples as fully masked while preparing the dataset: nothing reaches "
                "training, so there is nothing to audit for prompt leakage")
    elif tagger is not None and not role_audit:
        plain_text = not fmt.startswith(("pre-tokenized", "conversational", "prompt-completion (conv"))
        note = ("plain-text data without chat markup: prompt-leakage audit off" if plain_text
                else f"{family} template markers not found in the data: prompt-leakage audit off")
    # the dataset as the policy sees it: what reaches training, plus what preparation dropped or cut
    counts = totals.as_dict()
    if not role_audit:
        counts.update({c.name: 0 for c in COUNTERS if c.template})
    supervised_before = int(pre_sup_np.sum())
    counts.update(
        dropped_sequences=dropped,
        truncated_sequences=truncated,
        truncated_supervised_tokens=max(supervised_before - int(totals.supervised_tokens), 0) if truncated else 0,
    )
    totals = Totals.from_mapping(counts)

    def decode(ids: list[int]) -> list[str]:
        return tok.convert_ids_to_tokens(ids)

    shown = list(counter.first)
    result = AuditResult(
        tokenizer=options.tokenizer,
        data=options.data,
        data_source=data.source,
        data_format=fmt,
        settings=label_settings(args),
        completion_only_loss=prepared.completion_only_loss,
        training_chat_template=prepared.training_chat_template,
        padding_free=prepared.padding_free,
        template_family=family,
        template_note=note,
        role_audit=role_audit,
        totals=totals,
        examples_in=n_in,
        examples_total=data.examples_total,
        sampled=data.sampled,
        rows_after_preparation=counter.rows,
        dropped=dropped,
        dropped_reasons=dropped_reasons,
        fully_masked_reasons=fully_reasons,
        truncated_examples=truncated,
        supervised_before_truncation=supervised_before,
        ratios=np.frombuffer(counter.ratios, dtype=np.float32).astype(np.float64),
        worst=counter.worst(),
        shown=shown,
        findings=[],
        trl_messages=prepared.trl_messages,
        seconds=seconds,
        thresholds={
            "fully_masked_share_threshold": options.monitor.fully_masked_share_threshold,
            "prompt_leakage_threshold": options.monitor.prompt_leakage_threshold,
            "response_coverage_threshold": options.monitor.response_coverage_threshold,
        },
        fail_on=options.fail_on,
        decode=decode,
        template_setting=options.template,
        split=options.split,
    )
    result.findings = Policy(options.monitor).evaluate(totals, scope="dataset")
    seconds["total"] = time.perf_counter() - t0
    return result
