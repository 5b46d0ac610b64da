"""``mask-monitor``: wires the subcommands together; each lives in its own module of this package.

A subcommand module exposes ``register(subparsers)`` (adds its parser, ``set_defaults(func=run)``)
and ``run(args) -> int`` (the exit code).
"""

from __future__ import annotations

import argparse
import importlib
import sys
from collections.abc import Sequence

from .._version import __version__
from ._errors import EXIT_USAGE, report_error

__all__ = ["main", "build_parser"]

SUBCOMMANDS = ("demo", "audit", "prepare", "wandb_report")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="mask-monitor",
        description="Audit SFT label masking: a training callback, a pre-flight dataset audit, dashboards.",
    )
    parser.add_argument("--version", action="version", version=f"mask-monitor {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name in SUBCOMMANDS:
        try:
            module = importlib.import_module(f".{name}", __package__)
        except ImportError as exc:
            if exc.name and exc.name.startswith(f"{__package__}.{name}"):
                continue  # subcommand not shipped in this build
            raise
        module.register(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "func", None):
        parser.print_help(sys.stderr)
        return EXIT_USAGE
    try:
        return int(args.func(args) or 0)
    except (Exception, KeyboardInterrupt) as exc:  # noqa: BLE001 - one line and an exit code, not a traceback
        return report_error(exc)


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
