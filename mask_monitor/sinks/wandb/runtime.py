"""Finding wandb and its run, and the guard around every W&B call.

The sink never starts a run and never makes wandb a requirement: wandb is imported only when the
process already did (no run can be active otherwise) or the user asked for W&B explicitly. A W&B call
that fails is logged once per operation (later failures at debug level) and never raised: wandb must
not stop the training it reports on.
"""

from __future__ import annotations

import logging
import os
import sys
from collections.abc import Callable, Mapping
from typing import Any

__all__ = ["wandb_disabled", "import_wandb", "load_wandb", "Guard"]

logger = logging.getLogger("mask_monitor")

_TRUE = ("1", "true", "yes", "on")


def wandb_disabled(env: Mapping[str, str] | None = None) -> bool:
    """True when the environment turns W&B off (``WANDB_DISABLED`` truthy or ``WANDB_MODE=disabled``).

    >>> wandb_disabled({"WANDB_MODE": "disabled"}), wandb_disabled({"WANDB_MODE": "offline"})
    (True, False)
    """
    env = os.environ if env is None else env
    if env.get("WANDB_DISABLED", "").strip().lower() in _TRUE:
        return True
    return env.get("WANDB_MODE", "").strip().lower() == "disabled"


def import_wandb() -> Any:
    import wandb  # noqa: PLC0415 - optional dependency, imported only when a run may exist

    return wandb


def load_wandb(*, explicit: bool) -> Any | None:
    """The ``wandb`` module when W&B logging can happen in this process, else None.

    ``explicit`` (the user asked for W&B: ``WandbSink(...)`` in ``sinks=``, or ``wandb=True``): wandb is
    imported if needed, and a disabled or missing wandb is one warning. Otherwise (auto): wandb is used
    only if already imported, and every reason to stay off is one debug line.
    """
    log = logger.warning if explicit else logger.debug
    if wandb_disabled():
        log("mask-monitor: W&B logging off (WANDB_DISABLED / WANDB_MODE=disabled)")
        return None
    if "wandb" not in sys.modules and not explicit:
        logger.debug("mask-monitor: wandb not imported, so no run is active: W&B logging off")
        return None
    try:
        return import_wandb()
    except ImportError:
        log("mask-monitor: wandb is not installed (pip install 'mask-monitor[wandb]'): W&B logging off")
        return None


class Guard:
    """Runs W&B operations; each operation's first failure is one warning, later ones debug lines."""

    def __init__(self) -> None:
        self.failed: set[str] = set()

    def __call__(self, what: str, fn: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
        try:
            return fn(*args, **kwargs)
        except Exception as exc:  # noqa: BLE001 - wandb must never stop training
            if what not in self.failed:
                self.failed.add(what)
                logger.warning(
                    "mask-monitor: W&B %s failed (%s: %s); training goes on", what, type(exc).__name__, exc
                )
            else:
                logger.debug("mask-monitor: W&B %s failed again: %r", what, exc)
            return None
