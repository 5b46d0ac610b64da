"""Where the audit goes: logging, Prometheus, W&B. Each optional, each its own module."""

from .base import Finding, Sink, SinkConfigError, SinkGroup

__all__ = ["Finding", "Sink", "SinkConfigError", "SinkGroup"]
