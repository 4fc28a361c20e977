"""Shared CLI plumbing for the converters: user errors become one message and exit code 2 (no traceback)."""

from __future__ import annotations

import os
import sys
from collections.abc import Callable

# The same contract as kdscale.cli: user errors are ValueError / FileNotFoundError subclasses with a clear message.
USER_ERRORS: tuple[type[BaseException], ...] = (ValueError, FileNotFoundError)


def run_cli(prog: str, fn: Callable[[], None]) -> int:
    """Run ``fn``; print ``<prog>: error: <message>`` and return 2 on a user error (KDSCALE_DEBUG=1 re-raises)."""
    try:
        fn()
    except USER_ERRORS as exc:
        if os.environ.get("KDSCALE_DEBUG"):
            raise
        print(f"{prog}: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"{prog}: interrupted", file=sys.stderr)
        return 130
    return 0
