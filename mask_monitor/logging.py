"""The ``mask_monitor`` library logger, on transformers' conventions.

Like ``transformers.logging``, the library logs to its own root logger (``mask_monitor``) with its own
verbosity and a default handler, so what a user needs is visible without configuring Python logging: the
chat template detected (or not), every warning, the end-of-run summary, the abort. The defaults:

* verbosity ``INFO`` (the template line, window lines and the summary are INFO records), or the level named
  by ``MASK_MONITOR_VERBOSITY`` (``debug``, ``info``, ``warning``, ``error``, ``critical``), or what
  :func:`set_verbosity` sets (mirrors ``transformers.logging.set_verbosity_*``);
* a default handler writing the bare message to ``sys.stderr``, but only while nobody else listens: as soon
  as the application configures logging (``logging.basicConfig``, a handler on ``mask_monitor`` or on the
  root logger, pytest's capture), records go there instead, once. Records always propagate.

Example:
    >>> import mask_monitor
    >>> mask_monitor.logging.set_verbosity_warning()
    >>> mask_monitor.logging.get_verbosity() == mask_monitor.logging.WARNING
    True
    >>> mask_monitor.logging.set_verbosity_info()
"""

from __future__ import annotations

import logging
import os
import sys
import threading
from logging import CRITICAL, DEBUG, ERROR, INFO, WARNING

__all__ = [
    "CRITICAL",
    "DEBUG",
    "ERROR",
    "INFO",
    "WARNING",
    "get_logger",
    "get_verbosity",
    "set_verbosity",
    "set_verbosity_debug",
    "set_verbosity_info",
    "set_verbosity_warning",
    "set_verbosity_error",
    "enable_default_handler",
    "disable_default_handler",
]

LIBRARY = "mask_monitor"
ENV = "MASK_MONITOR_VERBOSITY"
LEVELS = {"debug": DEBUG, "info": INFO, "warning": WARNING, "error": ERROR, "critical": CRITICAL}
DEFAULT_LEVEL = INFO

_lock = threading.Lock()
_handler: _DefaultHandler | None = None


class _DefaultHandler(logging.StreamHandler):  # type: ignore[type-arg]
    """Writes to the current ``sys.stderr``, unless another handler would get the record too."""

    def __init__(self) -> None:
        super().__init__(sys.stderr)
        self.enabled = True

    def emit(self, record: logging.LogRecord) -> None:
        if not self.enabled or _others_listen(record, self):
            return
        self.setStream(sys.stderr)  # whatever stderr is now (redirected, captured)
        super().emit(record)


def _others_listen(record: logging.LogRecord, own: logging.Handler) -> bool:
    log: logging.Logger | None = logging.getLogger(record.name)
    while log is not None:
        if any(h is not own and record.levelno >= h.level for h in log.handlers):
            return True
        if not log.propagate:
            return False
        log = log.parent  # type: ignore[assignment]
    return False


def _env_level() -> int:
    raw = os.environ.get(ENV)
    if raw is None or not raw.strip():
        return DEFAULT_LEVEL
    level = LEVELS.get(raw.strip().lower())
    if level is None:
        logging.getLogger(LIBRARY).warning(
            "mask-monitor: unknown %s=%r; expected one of %s (using info)", ENV, raw, ", ".join(LEVELS))
        return DEFAULT_LEVEL
    return level


def _configure() -> None:
    global _handler
    with _lock:
        if _handler is not None:
            return
        _handler = _DefaultHandler()
        root = logging.getLogger(LIBRARY)
        root.addHandler(_handler)
        if root.level == logging.NOTSET:
            root.setLevel(_env_level())


def get_logger(name: str | None = None) -> logging.Logger:
    """The library's logger, or one below it (``get_logger(__name__)`` in the package)."""
    _configure()
    return logging.getLogger(name or LIBRARY)


def get_verbosity() -> int:
    """The level of the ``mask_monitor`` logger (``mask_monitor.logging.INFO`` by default)."""
    _configure()
    return logging.getLogger(LIBRARY).getEffectiveLevel()


def set_verbosity(level: int) -> None:
    """Set the level of the ``mask_monitor`` logger (e.g. ``mask_monitor.logging.WARNING``)."""
    _configure()
    logging.getLogger(LIBRARY).setLevel(level)


def set_verbosity_debug() -> None:
    set_verbosity(DEBUG)


def set_verbosity_info() -> None:
    set_verbosity(INFO)


def set_verbosity_warning() -> None:
    set_verbosity(WARNING)


def set_verbosity_error() -> None:
    set_verbosity(ERROR)


def disable_default_handler() -> None:
    """Stop the default handler (records still propagate to the application's handlers)."""
    _configure()
    assert _handler is not None
    _handler.enabled = False


def enable_default_handler() -> None:
    _configure()
    assert _handler is not None
    _handler.enabled = True


_configure()
