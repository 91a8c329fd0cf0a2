"""What every command module shares: the exit codes, and the event loop a command runs."""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Coroutine
from typing import Any, TypeVar

T = TypeVar("T")

EXIT_OK = 0
EXIT_FAILURE = 1
# sysexits.h, so shell scripts can tell what went wrong.
EXIT_DATAERR = 65  # the agent refused the event (4xx): fix the event, do not retry
EXIT_UNAVAILABLE = 69  # the agent could not be reached or stayed unavailable: retry later
# EX_TEMPFAIL: acknowledged, durable on the spool, not (yet) upstream: `run` after a drain
# that left events on the spool; `emit --wait-committed` when PostgreSQL did not take the
# event within the agent's wait.
EXIT_UNDELIVERED = 75
EXIT_NOT_COMMITTED = 75
EXIT_NOPERM = 77  # authentication or authorisation refused
EXIT_CONFIG = 78  # EX_CONFIG: a bad setting


def _runner() -> asyncio.Runner:
    try:
        import uvloop
    except ImportError:
        return asyncio.Runner()
    return asyncio.Runner(loop_factory=uvloop.new_event_loop)


def _run_async(main: Callable[[], Coroutine[Any, Any, T]]) -> T:
    with _runner() as runner:
        return runner.run(main())

