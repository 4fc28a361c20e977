"""How every kdscale command line reports errors: user errors become one message and exit code 2, run failures
(``RunFailed``) one message and exit code 1 (no traceback either way).

kdscale raises user errors (config, data, model paths, checkpoints, conversion) as ValueError subclasses with a
message that names the problem and the fix. KDSCALE_DEBUG=1 shows the traceback as well."""

from __future__ import annotations

import os
import sys
from collections.abc import Callable

USER_ERRORS: tuple[type[BaseException], ...] = (ValueError, FileNotFoundError)


class RunFailed(RuntimeError):
    """A run stopped on a failure that is not the user's (a dead student rank, no teacher replica left); the
    message says what failed and which checkpoint to resume from. Exit code 1, no traceback."""


def run_cli(prog: str, fn: Callable[[], object]) -> int:
    """Run ``fn``; print ``<prog>: error: <message>`` and return 2 on a user error (KDSCALE_DEBUG=1 re-raises)."""
    try:
        fn()
    except USER_ERRORS as exc:
        if os.environ.get("KDSCALE_DEBUG"):
            raise
        print(f"{prog}: error: {exc}", file=sys.stderr)
        return 2
    except RunFailed as exc:
        if os.environ.get("KDSCALE_DEBUG"):
            raise
        print(f"{prog}: failed: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print(f"{prog}: interrupted", file=sys.stderr)
        return 130
    return 0
