"""Central error handling for the CLI: known errors become one line on stderr and an exit code.

Exit codes: 0 healthy, 1 a blocking finding (the subcommand returns it), 2 usage or input error.
Set ``MASK_MONITOR_DEBUG=1`` to see full tracebacks.
"""

from __future__ import annotations

import os
import sys
import traceback

__all__ = ["UsageError", "EXIT_OK", "EXIT_FINDING", "EXIT_USAGE", "report_error"]

EXIT_OK = 0
EXIT_FINDING = 1
EXIT_USAGE = 2


class UsageError(Exception):
    """Bad arguments or unreadable input: printed as one line, exit code 2."""


def report_error(exc: BaseException) -> int:
    debug = os.environ.get("MASK_MONITOR_DEBUG", "").lower() in ("1", "true", "yes")
    if debug:
        traceback.print_exception(exc)
    if isinstance(exc, UsageError):
        print(f"mask-monitor: error: {exc}", file=sys.stderr)
        return EXIT_USAGE
    if isinstance(exc, FileNotFoundError):
        print(f"mask-monitor: error: file not found: {exc.filename or exc}", file=sys.stderr)
        return EXIT_USAGE
    if isinstance(exc, KeyboardInterrupt):
        print("mask-monitor: interrupted", file=sys.stderr)
        return 130
    print(f"mask-monitor: error: {type(exc).__name__}: {exc}", file=sys.stderr)
    if not debug:
        print("(set MASK_MONITOR_DEBUG=1 for the full traceback)", file=sys.stderr)
    return EXIT_USAGE
