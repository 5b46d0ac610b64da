"""Every threshold and action of the monitor, in one validated dataclass.

Each check has one switch: ``"abort"`` (stop training with :class:`MaskMonitorAbort`), ``"warn"``
(log once with counts, then count) or ``"off"``. Values come from, in order of precedence: the
arguments given in code, ``MASK_MONITOR_<FIELD>`` environment variables (for operators who cannot
edit the training script), the defaults below. The same definition is used by the training callback
and by ``mask-monitor audit``.

Example:
    >>> cfg = MonitorConfig.resolve({"zero_loss": "warn"}, env={"MASK_MONITOR_PROMPT_LEAKAGE_THRESHOLD": "0.1"})
    >>> cfg.zero_loss, cfg.prompt_leakage_threshold, cfg.all_masked
    ('warn', 0.1, 'abort')
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass, fields, replace
from typing import Any, Literal

__all__ = ["MonitorConfig", "Action", "ACTIONS", "CHECKS"]

Action = Literal["abort", "warn", "off"]
ACTIONS: tuple[str, ...] = ("abort", "warn", "off")

#: name -> what it watches (for docs, the CLI and error messages).
CHECKS: dict[str, str] = {
    "all_masked": "an optimizer step in which no micro-batch on any rank has a supervised target",
    "all_masked_micro_batch": "a single micro-batch with no supervised target ('abort' = strict policy)",
    "zero_loss": "a micro-batch or step with supervised targets whose loss is exactly 0",
    "non_finite_loss": "a micro-batch whose loss is NaN or inf",
    "fully_masked_sequences": "sequences (rows or packed documents) with no supervised target",
    "fully_masked_share": "share of fully masked sequences over the last N steps above a threshold",
    "unmasked": "micro-batches with no masking at all (prompt tokens trained on)",
    "supervised_padding": "supervised targets on padding or across a packed-document boundary",
    "prompt_leakage": "supervised prompt tokens (needs a known chat template) above a threshold",
    "response_coverage": "assistant tokens left unsupervised (needs a known chat template)",
    "eot_unsupervised": "assistant end-of-turn tokens never supervised (the model never learns to stop)",
}


@dataclass(frozen=True)
class MonitorConfig:
    """Thresholds and actions. See :data:`CHECKS` for what each check watches."""

    # checks and their actions
    all_masked: Action = "abort"
    all_masked_micro_batch: Action = "warn"
    zero_loss: Action = "abort"
    non_finite_loss: Action = "abort"
    fully_masked_sequences: Action = "warn"
    fully_masked_share: Action = "warn"
    unmasked: Action = "warn"
    supervised_padding: Action = "warn"
    prompt_leakage: Action = "warn"
    response_coverage: Action = "warn"
    eot_unsupervised: Action = "warn"
    # thresholds
    fully_masked_share_threshold: float = 0.5
    fully_masked_share_window: int = 20
    prompt_leakage_threshold: float = 0.05
    response_coverage_threshold: float = 0.9
    # mechanics
    ignore_index: int = -100
    template_audit: bool = True
    evidence_rows: int = 2
    enabled: bool = True

    def __post_init__(self) -> None:
        for f in fields(self):
            v = getattr(self, f.name)
            if f.name in CHECKS and v not in ACTIONS:
                raise ValueError(
                    f"Unsupported value MonitorConfig({f.name}={v!r}). Possible choices are: {', '.join(ACTIONS)}"
                )
        for name in ("fully_masked_share_threshold", "prompt_leakage_threshold", "response_coverage_threshold"):
            v = getattr(self, name)
            if not 0.0 <= v <= 1.0:
                raise ValueError(f"MonitorConfig({name}={v!r}) must be a ratio between 0 and 1")
        if self.fully_masked_share_window < 1:
            raise ValueError(f"MonitorConfig(fully_masked_share_window={self.fully_masked_share_window}) must be >= 1")
        if self.evidence_rows < 0:
            raise ValueError(f"MonitorConfig(evidence_rows={self.evidence_rows}) must be >= 0")

    @classmethod
    def field_names(cls) -> list[str]:
        return [f.name for f in fields(cls)]

    @classmethod
    def resolve(cls, given: Mapping[str, Any] | None = None, env: Mapping[str, str] | None = None) -> MonitorConfig:
        """Defaults, overridden by ``MASK_MONITOR_*`` variables, overridden by ``given`` (None = not given)."""
        env = os.environ if env is None else env
        given = {k: v for k, v in (given or {}).items() if v is not None}
        unknown = sorted(set(given) - set(cls.field_names()))
        if unknown:
            raise TypeError(f"Unexpected keyword arguments: {', '.join(unknown)}")
        values: dict[str, Any] = {}
        for f in fields(cls):
            key = f"MASK_MONITOR_{f.name.upper()}"
            if key in env:
                values[f.name] = _parse(key, env[key], f.default)
        values.update(given)
        return replace(cls(), **values) if values else cls()


def _parse(key: str, raw: str, default: Any) -> Any:
    raw = raw.strip()
    if isinstance(default, bool):
        if raw.lower() in ("1", "true", "yes", "on"):
            return True
        if raw.lower() in ("0", "false", "no", "off"):
            return False
        raise ValueError(f"{key}={raw!r}: expected true/false")
    try:
        if isinstance(default, int):
            return int(raw)
        if isinstance(default, float):
            return float(raw)
    except ValueError:
        raise ValueError(f"{key}={raw!r}: expected a {type(default).__name__}") from None
    return raw.lower()
