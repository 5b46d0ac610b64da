"""mask-monitor: audit every SFT batch for what the loss really sees; stop dead runs early.

Quickstart::

    from mask_monitor import MaskMonitorCallback
    trainer = SFTTrainer(model=..., args=..., train_dataset=..., callbacks=[MaskMonitorCallback()])
    trainer.train()   # raises MaskMonitorAbort on an all-masked / zero-loss / NaN-loss step

The cure for prompt leakage, any chat template (one line before the trainer)::

    train_dataset = mask_monitor.assistant_only(train_dataset, tokenizer)

The core (:class:`MaskAuditor`, :func:`batch_stats`, :class:`Policy`, :class:`MonitorConfig`) needs only
torch; the transformers callback, the sinks and the chat-template tools are imported on first use.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

from . import logging
from ._version import __version__
from .auditor import MaskAuditor
from .checks import CHECKS, Check, Finding
from .config import ConfigError, MonitorConfig
from .counters import COUNTERS, FIELDS, RATIOS, Counter, Ratio
from .errors import ABORT_REASONS, InputError, MaskMonitorAbort, RankFailure
from .policy import Policy, first_abort
from .reports import RunInfo, StepReport, Totals, WindowReport
from .stats import batch_stats

if TYPE_CHECKING:  # pragma: no cover - names resolved lazily by __getattr__ below
    from .callback import MaskMonitorCallback
    from .cure import AssistantOnly, assistant_only, assistant_only_collator
    from .sinks import Sink, SinkConfigError
    from .templates import ChatTemplate, RoleTagger, assistant_token_mask, detect_template, register_template

#: name -> module that defines it, imported on first access (they need transformers or a sink's deps).
_LAZY: dict[str, str] = {
    "MaskMonitorCallback": ".callback",
    "Sink": ".sinks",
    "SinkConfigError": ".sinks",
    "ChatTemplate": ".templates",
    "RoleTagger": ".templates",
    "assistant_token_mask": ".templates",
    "detect_template": ".templates",
    "register_template": ".templates",
    "assistant_only": ".cure",
    "AssistantOnly": ".cure",
    "assistant_only_collator": ".cure",
}

__all__ = [
    "__version__",
    "ABORT_REASONS",
    "CHECKS",
    "COUNTERS",
    "Check",
    "ConfigError",
    "Counter",
    "FIELDS",
    "Finding",
    "InputError",
    "MaskAuditor",
    "MaskMonitorAbort",
    "MonitorConfig",
    "Policy",
    "RATIOS",
    "RankFailure",
    "Ratio",
    "RunInfo",
    "StepReport",
    "Totals",
    "WindowReport",
    "batch_stats",
    "first_abort",
    "logging",
    # lazy (see _LAZY)
    "MaskMonitorCallback",
    "Sink",
    "SinkConfigError",
    "ChatTemplate",
    "RoleTagger",
    "assistant_token_mask",
    "detect_template",
    "register_template",
    "assistant_only",
    "AssistantOnly",
    "assistant_only_collator",
]


def __getattr__(name: str) -> Any:
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module 'mask_monitor' has no attribute {name!r}")
    value = getattr(importlib.import_module(module, __name__), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_LAZY))
