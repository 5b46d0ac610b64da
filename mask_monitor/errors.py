"""The one error mask-monitor raises to stop training, and the words it uses.

:class:`MaskMonitorAbort` carries structured fields (reason, step, rank, numbers, evidence path) and
builds an actionable message from them: what was seen, the likely causes, what to check. It pickles
(``__reduce__``), so it survives process boundaries (torchrun, multiprocessing).
"""

from __future__ import annotations

from collections.abc import Mapping

__all__ = ["MaskMonitorAbort", "ABORT_REASONS", "explain"]

#: Every reason an abort can carry.
ABORT_REASONS: tuple[str, ...] = (
    "all_masked",
    "all_masked_micro_batch",
    "zero_loss",
    "non_finite_loss",
    "fully_masked_share",
    "prompt_leakage",
    "fully_masked_sequences",
    "unmasked",
    "supervised_padding",
    "response_coverage",
    "eot_unsupervised",
)

_CAUSES: dict[str, tuple[str, list[str], list[str]]] = {
    "all_masked": (
        "no label in optimizer step {step} is supervised: {target_tokens} target tokens across "
        "{micro_batches} micro-batch(es) on {ranks} rank(s), every one of them -100. The gradient of this "
        "step is exactly zero (the reported loss is 0.0 under TRL, NaN hidden by the Trainer's "
        "logging_nan_inf_filter otherwise), so the run would spend compute learning nothing.",
        [
            "the response/assistant template was not found in the tokenized sequence, so every label "
            "became -100 (the marker tokenizes differently in context, or the chat template changed)",
            "truncation (max_length) cut the response off, leaving only prompt tokens",
            "the dataset's labels or completion_mask / assistant_masks are all zero for these examples",
        ],
        [
            "run `mask-monitor audit` on the dataset with the same tokenizer and trainer settings",
            "decode one batch: print tokenizer.decode(input_ids) next to its labels",
            "check max_length against the length of prompt + response",
        ],
    ),
    "all_masked_micro_batch": (
        "{all_masked_batches} micro-batch(es) of optimizer step {step} have no supervised label "
        "(strict micro-batch policy); the step as a whole has {supervised_tokens} supervised tokens.",
        [
            "some examples lost their response to truncation or to a marker that was not found",
            "with batch size 1 a single bad example empties a whole micro-batch",
        ],
        [
            "run `mask-monitor audit` to list the fully masked examples",
            "filter examples without supervised tokens before training, or relax the policy "
            "(all_masked_micro_batch='warn')",
        ],
    ),
    "zero_loss": (
        "the loss is exactly 0.0 in optimizer step {step} although {supervised_tokens} target tokens are "
        "supervised ({zero_loss_batches} micro-batch(es) with loss 0). A language model never reaches an "
        "exact zero on real targets; a broken loss or label pipeline does.",
        [
            "a custom compute_loss / loss function that returns 0 for these labels, or clamps an empty "
            "count to 0",
            "labels that the loss silently ignores (a wrong ignore_index, labels on the wrong device or dtype)",
            "a model head that is detached or replaced by a constant",
        ],
        [
            "compute the loss of one batch by hand and compare with the trainer's",
            "check ignore_index and the dtype of labels",
        ],
    ),
    "non_finite_loss": (
        "the loss is NaN or infinite in {non_finite_loss_batches} micro-batch(es) of optimizer step {step}; "
        "its gradient would poison this update on every rank (the Trainer's logging_nan_inf_filter hides "
        "it from the logs).",
        [
            "numerical overflow: learning rate too high, fp16 without loss scaling, exploding activations",
            "weights that are already NaN (a previous bad update, a bad checkpoint)",
            "a division by a zero token count in a custom loss",
        ],
        [
            "lower the learning rate or enable gradient clipping (max_grad_norm)",
            "use bf16 instead of fp16, or check the loss scaler",
            "resume from the last good checkpoint",
        ],
    ),
    "fully_masked_share": (
        "{fully_masked_sequences} of {sequences} sequences over the last {window_steps} optimizer steps "
        "(up to step {step}) have no supervised target ({share:.1%}, threshold {threshold:.1%}).",
        [
            "max_length truncates most responses away",
            "the response marker is missing from many examples",
        ],
        [
            "raise max_length or truncate the prompt instead of the response",
            "run `mask-monitor audit` to see which examples are fully masked and why",
        ],
    ),
    "prompt_leakage": (
        "{prompt_leakage_tokens} of {audited_supervised_tokens} supervised targets ({share:.1%}) in step "
        "{step} are prompt tokens (system and user turns), above the threshold {threshold:.1%}: the model "
        "is being trained to write the prompts.",
        [
            "masking is disabled: labels == input_ids (TRL's default for conversational data trains on the "
            "whole conversation)",
            "assistant_only_loss / completion_only_loss is off",
            "a wrong response marker, so the mask starts in the wrong place",
        ],
        [
            "set assistant_only_loss=True (SFTConfig) with a template that has {{% generation %}} spans, or "
            "completion_only_loss=True with a prompt/completion dataset",
            "run `mask-monitor audit --show 3` to see the tokens coloured by label",
        ],
    ),
}


def explain(reason: str, numbers: Mapping[str, object]) -> str:
    """The message for an abort (or warning) of ``reason``: what was seen, likely causes, what to check."""
    if reason not in _CAUSES:
        return f"mask-monitor: {reason}: {dict(numbers)}"
    seen, causes, checks = _CAUSES[reason]
    safe = _Defaulting(numbers)
    lines = [f"mask-monitor [{reason}]: " + seen.format_map(safe)]
    lines.append("Likely causes:")
    lines += [f"  - {c}" for c in causes]
    lines.append("What to check:")
    lines += [f"  - {c}" for c in checks]
    return "\n".join(lines)


class _Defaulting(dict):
    """Numbers for message templates: whole counts as ints, ratios kept as floats, unknown keys as '?'."""

    def __init__(self, numbers: Mapping[str, object]):
        super().__init__()
        for k, v in numbers.items():
            whole = isinstance(v, float) and v.is_integer() and k not in ("share", "threshold")
            self[k] = int(v) if whole else v

    def __missing__(self, key: str) -> str:
        return "?"


class MaskMonitorAbort(RuntimeError):
    """Training was stopped by mask-monitor because of a pathology in the labels or the loss.

    Attributes:
        reason: one of :data:`ABORT_REASONS`.
        step: the optimizer step that was stopped (numbered as the Trainer would once applied).
        rank: the rank that raised (every rank raises in the same step).
        evidence_path: the JSON file written before raising, or None if it could not be written.
        numbers: the counts behind the decision.

    Example:
        >>> err = MaskMonitorAbort("all_masked", step=1, rank=0, numbers={"target_tokens": 12})
        >>> err.reason, err.step
        ('all_masked', 1)
    """

    def __init__(
        self,
        reason: str,
        *,
        step: int,
        rank: int = 0,
        numbers: Mapping[str, object] | None = None,
        evidence_path: str | None = None,
        message: str | None = None,
    ) -> None:
        self.reason = reason
        self.step = step
        self.rank = rank
        self.numbers = dict(numbers or {})
        self.evidence_path = evidence_path
        self.message = message or explain(reason, {"step": step, **self.numbers})
        text = self.message
        if evidence_path:
            text += f"\nEvidence: {evidence_path}"
        super().__init__(text)

    def __reduce__(self):
        return (_rebuild, (self.reason, self.step, self.rank, self.numbers, self.evidence_path, self.message))


def _rebuild(reason, step, rank, numbers, evidence_path, message) -> MaskMonitorAbort:
    return MaskMonitorAbort(
        reason, step=step, rank=rank, numbers=numbers, evidence_path=evidence_path, message=message
    )
