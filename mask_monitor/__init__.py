"""mask-monitor: audit every SFT batch for what the loss really sees; stop dead runs early.

Quickstart::

    from mask_monitor import MaskMonitorCallback
    trainer = SFTTrainer(model=..., args=..., train_dataset=..., callbacks=[MaskMonitorCallback()])
    trainer.train()   # raises MaskMonitorAbort on an all-masked / zero-loss / NaN-loss step
"""

from ._version import __version__
from .auditor import MaskAuditor
from .callback import MaskMonitorCallback
from .config import CHECKS, MonitorConfig
from .errors import ABORT_REASONS, MaskMonitorAbort
from .policy import Policy, first_abort
from .reports import RunInfo, StepReport, Totals, WindowReport
from .sinks import Finding, Sink, SinkConfigError
from .stats import FIELDS, batch_stats

__all__ = [
    "__version__",
    "ABORT_REASONS",
    "CHECKS",
    "FIELDS",
    "Finding",
    "MaskAuditor",
    "MaskMonitorAbort",
    "MaskMonitorCallback",
    "MonitorConfig",
    "Policy",
    "RunInfo",
    "Sink",
    "SinkConfigError",
    "StepReport",
    "Totals",
    "WindowReport",
    "batch_stats",
    "first_abort",
]

try:  # template knowledge (mask_monitor.templates)
    from .templates import (  # noqa: F401
        ChatTemplate,
        RoleTagger,
        assistant_token_mask,
        detect_template,
        register_template,
    )

    __all__ += ["ChatTemplate", "RoleTagger", "assistant_token_mask", "detect_template", "register_template"]
except ImportError:  # pragma: no cover - only while the templates package is being written
    pass
