"""Every setting of the monitor, declared once, and the one path that resolves and validates them.

Each check of :data:`mask_monitor.checks.CHECKS` has one setting of the same name: ``"abort"`` (stop
training with :class:`~mask_monitor.errors.MaskMonitorAbort`; ``mask-monitor audit`` exits 1), ``"warn"``
(logged once with its numbers, then counted) or ``"off"``; :data:`SETTINGS` adds the thresholds and the
mechanics. Values come from, in order of precedence: what the code sets (keyword arguments, or the fields
a :class:`MonitorConfig` was built with), ``MASK_MONITOR_<NAME>`` environment variables (for operators who
cannot edit the training script), the defaults. Code and environment go through the same parser, so a
bad value is always named with what was expected, whatever its source. The same configuration drives the
training callback, the plain-loop API and ``mask-monitor audit``.

Example:
    >>> cfg = MonitorConfig.resolve({"zero_loss": "warn"}, env={"MASK_MONITOR_PROMPT_LEAKAGE_THRESHOLD": "0.1"})
    >>> cfg.zero_loss, cfg.prompt_leakage_threshold, cfg.all_masked
    ('warn', 0.1, 'abort')
    >>> MonitorConfig(enabled="false").enabled
    False
    >>> MonitorConfig(prompt_leakage_threshold="lots")
    Traceback (most recent call last):
    ...
    mask_monitor.config.ConfigError: MonitorConfig(prompt_leakage_threshold='lots'): expected a number between 0 and 1
"""

from __future__ import annotations

import difflib
import logging
import os
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Literal

from .checks import ACTIONS, CHECKS, Action

__all__ = [
    "MonitorConfig",
    "ConfigError",
    "Setting",
    "SETTINGS",
    "ENV_PREFIX",
    "ENVIRONMENT",
    "Action",
    "ACTIONS",
    "env_name",
    "parse_setting",
    "warn_unknown_environment",
]

logger = logging.getLogger("mask_monitor")

ENV_PREFIX = "MASK_MONITOR_"
Kind = Literal["action", "ratio", "int", "bool", "choice"]


class ConfigError(ValueError):
    """A setting has a value the monitor cannot use (named, with what was expected)."""


@dataclass(frozen=True)
class Setting:
    """One setting: its default, what kind of value it takes, and what it means."""

    name: str
    default: Any
    kind: Kind
    doc: str
    choices: tuple[str, ...] = ()
    minimum: int | None = None

    @property
    def env(self) -> str:
        return env_name(self.name)


def env_name(name: str) -> str:
    return ENV_PREFIX + name.upper()


_OTHER_SETTINGS: tuple[Setting, ...] = (
    Setting("fully_masked_share_threshold", 0.5, "ratio",
            "fully_masked_share fires when more than this share of sequences over the window is fully masked"),
    Setting("fully_masked_share_window", 20, "int", "optimizer steps in the fully_masked_share window", minimum=1),
    Setting("prompt_leakage_threshold", 0.05, "ratio",
            "prompt_leakage fires when more than this share of audited supervised targets are prompt tokens"),
    Setting("response_coverage_threshold", 0.9, "ratio",
            "response_coverage fires when less than this share of assistant content targets is supervised"),
    Setting("dropped_share_threshold", 0.01, "ratio",
            "dropped_sequences fires when more than this share of the examples was dropped as fully masked "
            "while the dataset was prepared"),
    Setting("eot_supervised_threshold", 1.0, "ratio",
            "eot_unsupervised fires when less than this share of assistant end-of-turn tokens is supervised"),
    Setting("converged_loss_threshold", 0.1, "ratio",
            "a loss of exactly 0 right after a step whose mean loss was at most this is convergence "
            "(zero_loss_converged: a memorising model underflowing in fp32/bf16), not a broken loss (zero_loss)"),
    Setting("ignore_index", -100, "int", "the label value the loss ignores"),
    Setting("template_audit", True, "bool", "detect the chat template at train begin and audit roles per token"),
    Setting("evidence_rows", 2, "int",
            "rows of each micro-batch kept (on device, one step) for the abort evidence", minimum=0),
    Setting("decoded_text", "local", "choice",
            "where decoded training text may go: 'local' (the evidence files on this machine), 'all' (also "
            "remote sinks: the W&B evidence table), 'none' (token ids and counts only, everywhere)",
            choices=("none", "local", "all")),
    Setting("enabled", True, "bool", "MASK_MONITOR_ENABLED=0 turns the monitor off without touching code"),
)

#: Every setting: one action per check (in check order), then thresholds and mechanics.
SETTINGS: dict[str, Setting] = {
    **{c.name: Setting(c.name, c.default, "action", c.watches, choices=ACTIONS) for c in CHECKS.values()},
    **{s.name: s for s in _OTHER_SETTINGS},
}

#: Every ``MASK_MONITOR_*`` environment variable the project reads, with what it sets.
ENVIRONMENT: dict[str, str] = {
    **{s.env: f"sets `{s.name}`: {s.doc}" for s in SETTINGS.values()},
    "MASK_MONITOR_PROMETHEUS_PORT": "base port of the per-rank Prometheus endpoint (rank r serves base + LOCAL_RANK)",
    "MASK_MONITOR_PROMETHEUS_ADDR": "address the Prometheus endpoint binds (default 0.0.0.0)",
    "MASK_MONITOR_PROMETHEUS_CERTFILE": "serve the Prometheus endpoint over HTTPS with this certificate",
    "MASK_MONITOR_PROMETHEUS_KEYFILE": "the key of that certificate",
    "MASK_MONITOR_PROMETHEUS_CLIENT_CAFILE": "require client certificates signed by this CA (mutual TLS)",
    "MASK_MONITOR_PUSHGATEWAY_URL": "push the metrics to this Pushgateway",
    "MASK_MONITOR_PROMETHEUS_JOB": "the job grouping key of pushed metrics",
    "MASK_MONITOR_PROMETHEUS_LINGER_SECONDS": "how long an aborting run keeps serving its final metrics",
    "MASK_MONITOR_PROMETHEUS_MAX_CONNECTIONS": "connections the Prometheus endpoint keeps open at once (default 8)",
    "MASK_MONITOR_PROMETHEUS_TIMEOUT_SECONDS": "seconds one connection to the endpoint may take in all (default 5)",
    "MASK_MONITOR_PROMETHEUS_CONNECTIONS_PER_SECOND": "connections the endpoint accepts per second (default 20)",
    "MASK_MONITOR_VERBOSITY": "log level of the mask_monitor logger (debug, info, warning, error)",
    "MASK_MONITOR_DEBUG": "the CLI prints full tracebacks",
}

_TRUE = ("1", "true", "yes", "on")
_FALSE = ("0", "false", "no", "off")


def parse_setting(name: str, value: Any, source: str | None = None) -> Any:
    """``value`` for setting ``name`` as the monitor uses it; :class:`ConfigError` naming ``source``
    (default ``MonitorConfig(name=...)``) and what was expected otherwise. Strings are accepted for every
    kind (environment variables are strings)."""
    s = SETTINGS.get(name)
    if s is None:
        raise ConfigError(f"unknown setting {name!r}; known: {', '.join(SETTINGS)}")
    where = source or f"MonitorConfig({name}={value!r})"
    text = value.strip().lower() if isinstance(value, str) else None

    def bad(expected: str) -> ConfigError:
        return ConfigError(f"{where}: expected {expected}")

    if s.kind in ("action", "choice"):
        if text in s.choices:
            return text
        raise bad("one of " + ", ".join(repr(c) for c in s.choices))
    if s.kind == "bool":
        if isinstance(value, bool):
            return value
        if isinstance(value, int) and value in (0, 1):
            return bool(value)
        if text in _TRUE:
            return True
        if text in _FALSE:
            return False
        raise bad("true or false (1/0, yes/no, on/off)")
    if s.kind == "int":
        number: Any = value
        if isinstance(value, str):
            try:
                number = int(value.strip())
            except ValueError:
                raise bad("a whole number") from None
        if isinstance(number, float) and number.is_integer():
            number = int(number)
        if isinstance(number, bool) or not isinstance(number, int):
            raise bad("a whole number")
        if s.minimum is not None and number < s.minimum:
            raise bad(f"a whole number >= {s.minimum}")
        return number
    # ratio
    number = value
    if isinstance(value, str):
        try:
            number = float(value.strip())
        except ValueError:
            raise bad("a number between 0 and 1") from None
    if isinstance(number, bool) or not isinstance(number, int | float) or not 0.0 <= float(number) <= 1.0:
        raise bad("a number between 0 and 1")
    return float(number)


_warned_env: set[str] = set()


def warn_unknown_environment(env: Mapping[str, str] | None = None) -> list[str]:
    """Warn once per process about each ``MASK_MONITOR_*`` variable the project does not read (a typo
    would otherwise be ignored without a word). Returns the unknown names."""
    env = os.environ if env is None else env
    unknown = sorted(k for k in env if k.startswith(ENV_PREFIX) and k not in ENVIRONMENT)
    for k in unknown:
        if k in _warned_env:
            continue
        _warned_env.add(k)
        close = difflib.get_close_matches(k, ENVIRONMENT, n=1, cutoff=0.85)
        hint = f" (did you mean {close[0]}?)" if close else ""
        logger.warning("mask-monitor: ignoring unknown environment variable %s%s", k, hint)
    return unknown


class MonitorConfig:
    """Thresholds and actions: one value per :data:`SETTINGS` entry, read as attributes.

    ``MonitorConfig(**values)`` sets the given settings (validated) and leaves the others at their
    defaults; it remembers which were given, so :meth:`resolve` lets the environment fill only the rest.
    Immutable; :meth:`replace` returns a changed copy.
    """

    __slots__ = ("_values", "_given")

    def __init__(self, **values: Any) -> None:
        unknown = sorted(set(values) - SETTINGS.keys())
        if unknown:
            raise ConfigError(
                f"MonitorConfig() got unknown setting(s): {', '.join(unknown)}; known: {', '.join(SETTINGS)}"
            )
        parsed = {k: parse_setting(k, v) for k, v in values.items()}
        object.__setattr__(self, "_values", {k: parsed.get(k, s.default) for k, s in SETTINGS.items()})
        object.__setattr__(self, "_given", frozenset(parsed))

    def __getattr__(self, name: str) -> Any:
        if name.startswith("_"):
            raise AttributeError(name)
        try:
            return self._values[name]
        except KeyError:
            raise AttributeError(f"MonitorConfig has no setting {name!r}") from None

    def __setattr__(self, name: str, value: Any) -> None:
        raise AttributeError("MonitorConfig is immutable; use .replace(...)")

    def __reduce__(self) -> tuple[Any, ...]:
        return (_rebuild, (self.given(),))

    def __eq__(self, other: object) -> bool:
        return isinstance(other, MonitorConfig) and self._values == other._values

    def __hash__(self) -> int:
        return hash(tuple(sorted(self._values.items())))

    def __repr__(self) -> str:
        changed = ", ".join(f"{k}={v!r}" for k, v in self._values.items() if v != SETTINGS[k].default)
        return f"MonitorConfig({changed})"

    def action(self, check: str) -> Action:
        """The action of ``check``."""
        return self._values[check]  # type: ignore[no-any-return]

    def as_dict(self) -> dict[str, Any]:
        """Every setting and its value."""
        return dict(self._values)

    def given(self) -> dict[str, Any]:
        """The settings this configuration was explicitly given (by code or the environment)."""
        return {k: self._values[k] for k in self._given}

    def replace(self, **changes: Any) -> MonitorConfig:
        """A copy with ``changes`` applied (they count as given)."""
        return MonitorConfig(**{**self.given(), **changes})

    @classmethod
    def field_names(cls) -> list[str]:
        return list(SETTINGS)

    @classmethod
    def resolve(
        cls,
        given: Mapping[str, Any] | None = None,
        env: Mapping[str, str] | None = None,
        base: MonitorConfig | None = None,
    ) -> MonitorConfig:
        """The configuration in force: defaults, then ``MASK_MONITOR_*`` variables, then ``base``'s given
        settings, then ``given`` (``None`` values count as not given). Unknown ``MASK_MONITOR_*`` names are
        warned about once."""
        env = os.environ if env is None else env
        warn_unknown_environment(env)
        values: dict[str, Any] = {}
        for name, s in SETTINGS.items():
            raw = env.get(s.env)
            if raw is not None and raw.strip() != "":
                values[name] = parse_setting(name, raw, source=f"{s.env}={raw!r}")
        if base is not None:
            values.update(base.given())
        for k, v in (given or {}).items():
            if v is None:
                continue
            if k not in SETTINGS:
                raise ConfigError(f"unknown setting {k!r}; known: {', '.join(SETTINGS)}")
            values[k] = parse_setting(k, v)
        return cls(**values)


def _rebuild(given: dict[str, Any]) -> MonitorConfig:
    return MonitorConfig(**given)
