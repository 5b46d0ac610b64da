"""Central error handling for the CLI: known errors become one line on stderr and an exit code.

Exit codes: 0 healthy, 1 a blocking finding (the subcommand returns it), 2 usage or input error, 3 an
internal error of mask-monitor (a bug: the one-line message asks for a report), 130 interrupted.
Set ``MASK_MONITOR_DEBUG=1`` to see full tracebacks.
"""

from __future__ import annotations

import os
import sys
import traceback

from ..errors import InputError

__all__ = ["UsageError", "EXIT_OK", "EXIT_FINDING", "EXIT_USAGE", "EXIT_INTERNAL", "EXIT_INTERRUPTED", "report_error"]

EXIT_OK = 0
EXIT_FINDING = 1
EXIT_USAGE = 2
EXIT_INTERNAL = 3
EXIT_INTERRUPTED = 130

#: Bad arguments or unreadable input (the library's :class:`~mask_monitor.errors.InputError`): exit 2.
UsageError = InputError


def report_error(exc: BaseException) -> int:
    """Print ``exc`` as one line (a traceback too with ``MASK_MONITOR_DEBUG=1``); return the exit code."""
    debug = os.environ.get("MASK_MONITOR_DEBUG", "").lower() in ("1", "true", "yes")
    if debug:
        traceback.print_exception(exc)
    if isinstance(exc, KeyboardInterrupt):
        print("mask-monitor: interrupted", file=sys.stderr)
        return EXIT_INTERRUPTED
    if isinstance(exc, InputError):
        print(f"mask-monitor: error: {exc}", file=sys.stderr)
        return EXIT_USAGE
    if isinstance(exc, FileNotFoundError):
        print(f"mask-monitor: error: file not found: {exc.filename or exc}", file=sys.stderr)
        return EXIT_USAGE
    print(f"mask-monitor: internal error: {type(exc).__name__}: {exc}", file=sys.stderr)
    if not debug:
        print("(this is a bug in mask-monitor: set MASK_MONITOR_DEBUG=1 for the full traceback and report it)",
              file=sys.stderr)
    return EXIT_INTERNAL
