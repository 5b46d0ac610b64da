"""Every check the monitor runs, declared once: its rule, its default action and every word it says.

A :class:`Check` holds what a reader of a finding needs (what was seen, the likely causes, what to check,
the line that fixes it) next to the rule that decides whether it fires. :class:`~mask_monitor.policy.Policy`
evaluates :data:`CHECKS` in order for the training callback, the plain-loop API and ``mask-monitor audit``
alike; :class:`~mask_monitor.config.MonitorConfig` derives one ``"abort" | "warn" | "off"`` setting per
check from the declarations; the Prometheus, W&B and logging sinks list checks from here. Adding a check
is one entry in :data:`CHECKS` plus its rule.

A rule reads :class:`~mask_monitor.reports.Totals` (one optimizer step on every rank, or a whole dataset)
and a :class:`RuleContext`, and returns ``None`` (quiet) or the numbers the message needs (``{}`` when the
totals say it all). :class:`Finding` is one check firing; :func:`explain` turns a check and its numbers
into the message.

Example:
    >>> from mask_monitor.reports import Totals
    >>> t = Totals(micro_batches=1, sequences=1, target_tokens=9, supervised_tokens=0, masked_tokens=9,
    ...            fully_masked_sequences=1, all_masked_batches=1)
    >>> CHECKS["all_masked"].rule(t, RuleContext()) is not None
    True
    >>> explain("all_masked", {"step": 3, "target_tokens": 9}).splitlines()[0][:60]
    'mask-monitor [all_masked]: no label in optimizer step 3 is s'
"""

from __future__ import annotations

import string
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Literal

if TYPE_CHECKING:
    from .reports import Totals

__all__ = [
    "Action",
    "ACTIONS",
    "Scope",
    "Check",
    "CHECKS",
    "RuleContext",
    "Finding",
    "explain",
    "format_numbers",
    "HISTORY",
]

Action = Literal["abort", "warn", "off"]
ACTIONS: tuple[str, ...] = ("abort", "warn", "off")
#: ``step``: one optimizer step during training (every rank's micro-batches); ``dataset``: a whole
#: prepared dataset (``mask-monitor audit``, and what the callback reads at trainer init).
Scope = Literal["step", "dataset"]

Numbers = dict[str, Any]


@dataclass
class RuleContext:
    """What a rule may read besides the totals: the thresholds, the scope, and recent steps.

    Attributes:
        config: the :class:`~mask_monitor.config.MonitorConfig` in force (None: defaults).
        scope: ``"step"`` or ``"dataset"``.
        step: the optimizer step audited (0 for a dataset).
        world_size: ranks whose counts the totals hold.
        window: totals of the last ``fully_masked_share_window`` steps, this one included, once that many
            steps were seen (None before; for a dataset, the dataset itself).
        previous: the totals of the steps before this one, most recent last (bounded).
    """

    config: Any = None
    scope: Scope = "step"
    step: int = 0
    world_size: int = 1
    window: Totals | None = None
    previous: tuple[Totals, ...] = ()

    def setting(self, name: str) -> Any:
        if self.config is None:
            from .config import MonitorConfig

            self.config = MonitorConfig()
        return getattr(self.config, name)


Rule = Callable[["Totals", RuleContext], "Numbers | None"]


@dataclass(frozen=True)
class Check:
    """One check: a rule over totals, its default action, and its words.

    Args:
        name: the check's name (setting name of its action, ``reason`` label, finding key).
        default: the action unless configured (``"abort"``, ``"warn"`` or ``"off"``).
        watches: one line: what the check watches (docs, CLI help, configuration reference).
        seen: what was seen, a ``str.format`` template over the numbers (totals, the rule's extras,
            ``step``, ``ranks``), or a function of the numbers.
        causes: likely causes, most likely first.
        to_check: what to check or run.
        fix: the change that cures the usual cause (code or a setting), when there is one.
        rule: returns None (quiet) or the numbers the message needs.
        scopes: where the rule applies (a micro-batch or loss check means nothing for a dataset).
        offending: which micro-batch of a step is at fault (for evidence), by its totals.
    """

    name: str
    default: Action
    watches: str
    seen: str | Callable[[Mapping[str, Any]], str]
    rule: Rule
    causes: tuple[str, ...] = ()
    to_check: tuple[str, ...] = ()
    fix: tuple[str, ...] = ()
    scopes: frozenset[str] = frozenset({"step", "dataset"})
    offending: Callable[[Totals], bool] | None = field(default=None, compare=False)

    def __post_init__(self) -> None:
        if self.default not in ACTIONS:
            raise ValueError(f"Check({self.name!r}, default={self.default!r}): expected one of {ACTIONS}")


class Finding:
    """One verdict about one step (or dataset): a check fired, with an action, a message and the numbers."""

    __slots__ = ("check", "action", "step", "message", "numbers")

    def __init__(self, check: str, action: str, step: int, message: str, numbers: Mapping[str, Any]):
        self.check = check
        self.action = action
        self.step = step
        self.message = message
        self.numbers = dict(numbers)

    def __repr__(self) -> str:
        return f"Finding({self.check!r}, {self.action!r}, step={self.step})"

    @property
    def severity(self) -> str:
        """``"blocking"`` for an abort (``mask-monitor audit`` exits 1), ``"warning"`` otherwise."""
        return "blocking" if self.action == "abort" else "warning"

    @property
    def headline(self) -> str:
        """The first line of the message (what was seen)."""
        return self.message.splitlines()[0] if self.message else self.check


# ---------------------------------------------------------------------------------------------- rules
def _dead(t: Totals) -> bool:
    """No supervised target although labels were read: ``all_masked`` says it; implied checks stay quiet."""
    return t.supervised_tokens == 0


def _all_masked(t: Totals, ctx: RuleContext) -> Numbers | None:
    if t.supervised_tokens > 0 or t.unaudited_batches > 0:  # unread labels may hold targets: cannot prove it
        return None
    if t.micro_batches == 0 and t.sequences == 0 and t.dropped_sequences == 0:
        return None
    return {}


def _all_masked_seen(n: Mapping[str, Any]) -> str:
    if not n.get("sequences") and n.get("dropped_sequences"):
        return format_numbers(
            "no example reaches training: all {dropped_sequences} examples were dropped as fully masked"
            + (" ({reasons})" if n.get("reasons") else "")
            + " when the dataset was prepared (TRL removes examples whose labels are all -100 after truncation "
            "when max_length is set), so training would learn nothing (with TRL's defaults train() then fails in "
            "the sampler with 'num_samples=0').", n)
    if n.get("scope") == "dataset":
        return format_numbers(
            "every example is fully masked: 0 of {target_tokens} target tokens are supervised; the loss is 0 "
            "and the model learns nothing.", n)
    return format_numbers(
        "no label in optimizer step {step} is supervised: {target_tokens} target tokens across "
        "{micro_batches} micro-batch(es) on {ranks} rank(s), every one of them -100. The gradient of this "
        "step is exactly zero (the reported loss is 0.0 under TRL, NaN hidden by the Trainer's "
        "logging_nan_inf_filter otherwise), so the run would spend compute learning nothing.", n)


def _all_masked_micro_batch(t: Totals, ctx: RuleContext) -> Numbers | None:
    return {} if t.supervised_tokens > 0 and t.all_masked_batches > 0 else None


#: Steps of history a rule may look back on (``RuleContext.previous``); the Policy keeps this many.
HISTORY = 8


def _zero_loss_history(ctx: RuleContext) -> Numbers:
    """How the loss came to be exactly 0: ``converged`` (the last step with a non-zero loss was already at or
    below ``converged_loss_threshold``: a memorising model whose loss underflowed in fp32/bf16; or the loss
    has been exactly 0 for longer than the history, a plateau judged when it began) or not (0 from the first
    step audited, or a jump from a normal value straight to 0: a broken loss)."""
    threshold = ctx.setting("converged_loss_threshold")
    previous = ctx.previous
    for back, p in enumerate(reversed(previous), start=1):
        mean = p.mean_loss
        if p.loss_batches <= 0 or p.non_finite_loss_batches > 0 or mean is None or mean == 0:
            continue
        how = (f"straight after a mean loss of {mean:.3g} in step {ctx.step - back}" if mean > threshold else
               f"after a mean loss of {mean:.3g} in step {ctx.step - back}")
        return {"converged": mean <= threshold, "previous_loss": mean, "how": how,
                "converged_threshold": threshold}
    plateau = len(previous) >= HISTORY and any(p.loss_batches > 0 for p in previous)
    how = (f"exactly 0 in each of the last {len(previous)} steps" if plateau else
           "from the first step audited" if not previous else "in every step audited so far")
    return {"converged": plateau, "previous_loss": None, "how": how, "converged_threshold": threshold}


def _zero_loss(t: Totals, ctx: RuleContext) -> Numbers | None:
    if t.zero_loss_batches <= 0:
        return None
    h = _zero_loss_history(ctx)
    return None if h["converged"] else h


def _zero_loss_converged(t: Totals, ctx: RuleContext) -> Numbers | None:
    if t.zero_loss_batches <= 0:
        return None
    h = _zero_loss_history(ctx)
    return h if h["converged"] else None


def _non_finite_loss(t: Totals, ctx: RuleContext) -> Numbers | None:
    return {} if t.non_finite_loss_batches > 0 else None


def _fully_masked_share(t: Totals, ctx: RuleContext) -> Numbers | None:
    w = ctx.window
    if w is None:
        return None
    lost, seen = w.fully_masked_sequences + w.dropped_sequences, w.sequences + w.dropped_sequences
    if seen <= 0 or w.supervised_tokens == 0:  # nothing supervised at all: all_masked says it
        return None
    share = lost / seen
    threshold = ctx.setting("fully_masked_share_threshold")
    if share <= threshold:
        return None
    return {
        "lost": lost,
        "seen": seen,
        "share": share,
        "threshold": threshold,
        "window": "the dataset" if ctx.scope == "dataset" else f"the last {ctx.setting('fully_masked_share_window')} "
        "optimizer steps",
    }


def _fully_masked_sequences(t: Totals, ctx: RuleContext) -> Numbers | None:
    return {} if t.fully_masked_sequences > 0 and not _dead(t) else None


def _unmasked(t: Totals, ctx: RuleContext) -> Numbers | None:
    return {} if t.unmasked_sequences > 0 and not _dead(t) else None


def _supervised_padding(t: Totals, ctx: RuleContext) -> Numbers | None:
    return {} if t.supervised_padding_tokens > 0 else None


def _prompt_leakage(t: Totals, ctx: RuleContext) -> Numbers | None:
    leak = t.prompt_leakage_ratio
    threshold = ctx.setting("prompt_leakage_threshold")
    if leak is None or leak <= threshold:
        return None
    return {"share": leak, "threshold": threshold}


def _response_coverage(t: Totals, ctx: RuleContext) -> Numbers | None:
    cov = t.response_coverage_ratio
    threshold = ctx.setting("response_coverage_threshold")
    if cov is None or cov >= threshold or _dead(t):
        return None
    return {"share": cov, "threshold": threshold,
            "missed": t.assistant_content_tokens - t.supervised_assistant_content_tokens}


def _dropped_sequences(t: Totals, ctx: RuleContext) -> Numbers | None:
    prepared = t.sequences + t.dropped_sequences
    if t.dropped_sequences <= 0 or t.sequences <= 0:  # all dropped: all_masked says it
        return None
    share = t.dropped_sequences / prepared
    threshold = ctx.setting("dropped_share_threshold")
    return {"prepared": prepared, "share": share, "threshold": threshold} if share > threshold else None


def _dropped_seen(n: Mapping[str, Any]) -> str:
    reasons = n.get("reasons")
    why = f" ({reasons})" if reasons else ""
    return format_numbers(
        "{dropped_sequences} of {prepared} examples ({share:.1%}, threshold {threshold:.1%}) were dropped as fully "
        "masked when the dataset was prepared" + why + ": TRL removes examples whose labels are all -100 after "
        "truncation, silently. They never reach training.", n)


def _truncation(t: Totals, ctx: RuleContext) -> Numbers | None:
    return {} if t.truncated_sequences > 0 else None


def _eot_unsupervised(t: Totals, ctx: RuleContext) -> Numbers | None:
    ratio = t.eot_supervised_ratio
    threshold = ctx.setting("eot_supervised_threshold")
    if ratio is None or ratio >= threshold or _dead(t):
        return None
    return {"share": ratio, "threshold": threshold, "missed": t.assistant_turns - t.supervised_eot_turns}


def _unterminated(t: Totals, ctx: RuleContext) -> Numbers | None:
    if t.unterminated_responses <= 0 or _dead(t):
        return None
    return {"share": t.unterminated_responses / max(t.assistant_responses, 1)}


def _unterminated_seen(n: Mapping[str, Any]) -> str:
    return format_numbers(
        "{unterminated_responses} of {assistant_responses} assistant responses {where} ({share:.1%}) "
        "end without their end-of-turn token although their sequence was not cut by max_length ({truncated_responses} "
        "more run into a sequence end that may be truncation, not counted): the model never learns to stop there.",
        n)


# ------------------------------------------------------------------------------------------ the checks
_AUDIT = "run `mask-monitor audit` on the dataset with the same tokenizer and trainer settings"
#: The line that cures masks that train on the prompt (or miss the answer), for any chat template.
CURE_LINE = (
    "train_dataset = mask_monitor.assistant_only(train_dataset, tokenizer)  # before SFTTrainer(...): exact "
    "assistant-only labels for any chat template (keep assistant_only_loss off)"
)
CURE_OFFLINE = (
    "offline: mask-monitor prepare --tokenizer TOKENIZER --data DATA --out DIR, then train on "
    "datasets.load_from_disk(DIR)"
)

_DECLARED: tuple[Check, ...] = (
    Check(
        "all_masked",
        "abort",
        "an optimizer step (or a dataset) in which no sequence has a supervised target",
        _all_masked_seen,
        _all_masked,
        causes=(
            "the response/assistant template was not found in the tokenized sequence, so every label "
            "became -100 (the marker tokenizes differently in context, or the chat template changed)",
            "truncation (max_length) cut the response off, leaving only prompt tokens",
            "the dataset's labels or completion_mask / assistant_masks are all zero for these examples",
        ),
        to_check=(
            _AUDIT,
            "decode one batch: print tokenizer.decode(input_ids) next to its labels",
            "check max_length against the length of prompt + response",
        ),
        offending=lambda t: t.all_masked_batches > 0,
    ),
    Check(
        "all_masked_micro_batch",
        "warn",
        "a single micro-batch with no supervised target ('abort' = strict policy)",
        "{all_masked_batches} of {micro_batches} micro-batch(es) {where} have no supervised target; "
        "the step still has {supervised_tokens} supervised tokens elsewhere, so it trains (use "
        "all_masked_micro_batch='abort' for the strict policy).",
        _all_masked_micro_batch,
        causes=(
            "some examples lost their response to truncation or to a marker that was not found",
            "with batch size 1 a single bad example empties a whole micro-batch",
        ),
        to_check=(
            "run `mask-monitor audit` to list the fully masked examples",
            "filter examples without supervised tokens before training, or relax the policy "
            "(all_masked_micro_batch='warn')",
        ),
        scopes=frozenset({"step"}),
        offending=lambda t: t.all_masked_batches > 0,
    ),
    Check(
        "zero_loss",
        "abort",
        "a loss of exactly 0 on supervised targets that did not converge there (0 from the start, or a jump)",
        lambda n: format_numbers(
            "the loss is exactly 0.0 in optimizer step {step} ({how}) although {supervised_tokens} target tokens "
            "are supervised ({zero_loss_batches} micro-batch(es) with loss 0). This is a broken loss, not "
            "convergence: a loss that converges gets tiny first (at most {converged_threshold}, "
            "converged_loss_threshold) before it underflows to 0.",
            {"how": "without a tiny loss before it", "converged_threshold": "converged_loss_threshold", **n}),
        _zero_loss,
        causes=(
            "a custom compute_loss / loss function that returns 0 for these labels, or clamps an empty "
            "count to 0",
            "labels that the loss silently ignores (a wrong ignore_index, labels on the wrong device or dtype)",
            "a model head that is detached or replaced by a constant",
        ),
        to_check=(
            "compute the loss of one batch by hand and compare with the trainer's",
            "check ignore_index and the dtype of labels",
        ),
        scopes=frozenset({"step"}),
        offending=lambda t: t.zero_loss_batches > 0,
    ),
    Check(
        "zero_loss_converged",
        "warn",
        "a loss that converged and underflowed to exactly 0 (a memorising model): convergence, not a fault",
        lambda n: format_numbers(
            "the loss reached exactly 0.0 in optimizer step {step} ({how}): the model has memorised these "
            "targets and the loss underflowed to 0 in floating point. This is convergence, not a broken loss; "
            "but the gradient of these micro-batches is now 0, so further steps on them learn nothing.",
            {"how": "after a tiny loss", **n}),
        _zero_loss_converged,
        causes=(
            "many epochs over a small or repeated dataset, or a high learning rate: the model memorises it",
        ),
        to_check=(
            "compare the evaluation loss: a training loss of 0 with a rising evaluation loss is overfitting",
            "stop earlier (fewer epochs, max_steps, early stopping) or add data",
        ),
        scopes=frozenset({"step"}),
        offending=lambda t: t.zero_loss_batches > 0,
    ),
    Check(
        "non_finite_loss",
        "abort",
        "a micro-batch whose loss is NaN or inf",
        "the loss is NaN or infinite in {non_finite_loss_batches} micro-batch(es) of optimizer step {step}; "
        "its gradient would poison this update on every rank (the Trainer's logging_nan_inf_filter hides "
        "it from the logs).",
        _non_finite_loss,
        causes=(
            "numerical overflow: learning rate too high, fp16 without loss scaling, exploding activations",
            "weights that are already NaN (a previous bad update, a bad checkpoint)",
            "a division by a zero token count in a custom loss",
        ),
        to_check=(
            "lower the learning rate or enable gradient clipping (max_grad_norm)",
            "use bf16 instead of fp16, or check the loss scaler",
            "resume from the last good checkpoint",
        ),
        scopes=frozenset({"step"}),
        offending=lambda t: t.non_finite_loss_batches > 0,
    ),
    Check(
        "fully_masked_share",
        "warn",
        "share of fully masked sequences over the last N steps (or the dataset) above a threshold",
        "{lost} of {seen} sequences over {window} have no supervised target or were dropped as fully "
        "masked ({share:.1%}, threshold {threshold:.1%}).",
        _fully_masked_share,
        causes=(
            "max_length truncates most responses away",
            "the response marker is missing from many examples",
        ),
        to_check=(
            "raise max_length or truncate the prompt instead of the response",
            "run `mask-monitor audit` to see which examples are fully masked and why",
        ),
        offending=lambda t: t.fully_masked_sequences > 0,
    ),
    Check(
        "prompt_leakage",
        "warn",
        "supervised prompt tokens (needs a known chat template) above a threshold",
        "{prompt_leakage_tokens} of {audited_supervised_tokens} supervised targets ({share:.1%}) {where} "
        "are prompt tokens (system and user turns), above the threshold {threshold:.1%}: the model "
        "is being trained to write the prompts.",
        _prompt_leakage,
        causes=(
            "masking is disabled: labels == input_ids (TRL's default for conversational data trains on the "
            "whole conversation)",
            "assistant_only_loss / completion_only_loss is off",
            "a wrong response marker, so the mask starts in the wrong place",
        ),
        to_check=(
            "assistant_only_loss=True (SFTConfig) works only with a template that has {% generation %} spans; "
            "completion_only_loss=True only with a prompt/completion dataset",
            "run `mask-monitor audit --show 3` to see the tokens coloured by label",
        ),
        fix=(CURE_LINE, CURE_OFFLINE),
        offending=lambda t: t.prompt_leakage_tokens > 0,
    ),
    Check(
        "fully_masked_sequences",
        "warn",
        "sequences (rows or packed documents) with no supervised target",
        "{fully_masked_sequences} of {sequences} sequences {where} have no supervised target (their "
        "response was truncated away or never found); they cost compute and teach nothing.",
        _fully_masked_sequences,
        to_check=("run `mask-monitor audit` to see which examples are fully masked and why",),
        offending=lambda t: t.fully_masked_sequences > 0,
    ),
    Check(
        "unmasked",
        "warn",
        "sequences with no masking at all (prompt tokens trained on)",
        "{unmasked_sequences} of {sequences} sequences {where} have no masking at all: every target "
        "token is trained on, prompt included. Expected for pre-training style data; for chat SFT it usually "
        "means masking is disabled (labels == input_ids, assistant_only_loss/completion_only_loss off).",
        _unmasked,
        offending=lambda t: t.unmasked_sequences > 0,
    ),
    Check(
        "supervised_padding",
        "warn",
        "supervised targets on padding or across a packed-document boundary",
        "{supervised_padding_tokens} supervised targets {where} are padding or cross a packed-document "
        "boundary: the loss trains on them (labels of pad tokens should be -100).",
        _supervised_padding,
        offending=lambda t: t.supervised_padding_tokens > 0,
    ),
    Check(
        "response_coverage",
        "warn",
        "assistant tokens left unsupervised (needs a known chat template)",
        "only {supervised_assistant_content_tokens} of {assistant_content_tokens} assistant tokens {where} "
        "are supervised ({share:.1%}, threshold {threshold:.1%}): parts of the responses are masked "
        "(truncation, or a response marker that matches too late).",
        _response_coverage,
        causes=(
            "a response template (DataCollatorForCompletionOnlyLM, a hand-written marker) that matches late or "
            "not at all in some turns (it tokenizes differently in context)",
            "completion_only_loss on a conversation whose earlier assistant turns are in the prompt",
            "truncation (max_length) cutting responses",
        ),
        fix=(CURE_LINE, CURE_OFFLINE),
    ),
    Check(
        "eot_unsupervised",
        "warn",
        "assistant end-of-turn tokens not supervised (the model never learns to stop)",
        "{missed} of the {assistant_turns} assistant end-of-turn tokens {where} are not supervised "
        "({share:.1%} supervised, threshold {threshold:.1%}): the model does not learn to stop there "
        "(include the end-of-turn token in the assistant mask).",
        _eot_unsupervised,
        fix=(CURE_LINE, CURE_OFFLINE),
    ),
    Check(
        "unterminated_responses",
        "warn",
        "assistant responses that end without their end-of-turn token (needs a known chat template)",
        _unterminated_seen,
        _unterminated,
        causes=(
            "text formatted without the end-of-turn / eos token (a formatting_func or text column built by "
            "hand): the model never learns to stop",
            "a chat template that writes nothing after the last answer (GLM-4, Falcon-style templates): the last "
            "turn of every conversation stays open",
            "the data's end-of-turn token is not the one the template uses (another model's template)",
        ),
        to_check=(
            "decode one example: does each answer end with the template's end-of-turn token (<|im_end|>, </s>, "
            "<|eot_id|>...)?",
            "run `mask-monitor audit` to list the examples",
        ),
        fix=(
            "end each response with the end-of-turn token: format conversations with tokenizer.apply_chat_template "
            "(or append tokenizer.eos_token to each completion/text)",
        ),
        offending=lambda t: t.unterminated_responses > 0,
    ),
    Check(
        "dropped_sequences",
        "warn",
        "examples dropped as fully masked when the dataset was prepared (TRL), above a share",
        _dropped_seen,
        _dropped_sequences,
        causes=(
            "the response/assistant template was not found in these examples, so every label became -100",
            "max_length truncated their response away (the prompt alone fills max_length)",
        ),
        to_check=(
            _AUDIT,
            "raise max_length, or truncate the prompt side (truncation_mode='keep_end')",
        ),
        scopes=frozenset({"dataset"}),
    ),
    Check(
        "truncation",
        "warn",
        "examples longer than max_length (supervised tokens cut off when the dataset is prepared)",
        "{truncated_sequences} examples are longer than max_length; {truncated_supervised_tokens} supervised "
        "tokens are cut off by truncation.",
        _truncation,
        to_check=("raise max_length, or truncate the prompt side (truncation_mode='keep_end')",),
    ),
)

#: Every check, by name, in priority order (the first abort in this order is the one raised).
CHECKS: dict[str, Check] = {c.name: c for c in _DECLARED}
if len(CHECKS) != len(_DECLARED):  # pragma: no cover - a declaration mistake, caught at import
    raise ValueError("duplicate check names in mask_monitor.checks")


# ---------------------------------------------------------------------------------------------- words
class _Formatter(string.Formatter):
    """``str.format`` for messages: counts shown as ints, unknown names (and values that do not fit the
    format spec) shown as they are or as ``?``: a message never fails because a number is missing."""

    _MISSING = object()

    def get_value(self, key: int | str, args: Sequence[Any], kwargs: Mapping[str, Any]) -> Any:
        value = kwargs.get(str(key), self._MISSING)
        if isinstance(value, float) and value.is_integer() and key not in ("share", "threshold"):
            return int(value)
        return value

    def format_field(self, value: Any, format_spec: str) -> str:
        if value is self._MISSING:
            return "?"
        try:
            return format(value, format_spec)
        except (TypeError, ValueError):
            return str(value)


_FORMATTER = _Formatter()


def format_numbers(template: str, numbers: Mapping[str, object]) -> str:
    """``template`` filled from ``numbers``: counts shown as ints, unknown names as ``?``."""
    return _FORMATTER.vformat(template, (), numbers)


def explain(check: str, numbers: Mapping[str, object], *, details: bool = True) -> str:
    """The message of ``check`` with ``numbers``: what was seen; then (``details``) likely causes, what to
    check and the fix, each a bulleted list."""
    c = CHECKS.get(check)
    if c is None:
        return f"mask-monitor [{check}]: {dict(numbers)}"
    if "where" not in numbers and "step" in numbers:
        numbers = {**numbers, "where": f"in step {numbers['step']}"}
    seen = c.seen(numbers) if callable(c.seen) else format_numbers(c.seen, numbers)
    lines = [f"mask-monitor [{check}]: {seen}"]
    if details:
        for title, items in (("Likely causes:", c.causes), ("What to check:", c.to_check), ("Fix:", c.fix)):
            if items:
                lines.append(title)
                lines += [f"  - {i}" for i in items]
    return "\n".join(lines)
