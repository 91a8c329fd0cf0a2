"""An upstream's state from what its last calls did (pure): the same rule for PostgreSQL's
pool and for the aggregators a sidecar forwards to."""

from __future__ import annotations

import time
from collections.abc import Iterable


def path_state(last_ok: float | None, last_failure: float | None, inflight: Iterable[float],
               *, connect_timeout: float, window: float, now: float | None = None) -> str:
    """``up`` when a call worked within ``window`` seconds and no call begun since failed;
    ``down`` when the last call begun failed (``last_failure`` is when the failed call began,
    see :func:`failed_at`), or when one has waited longer than a connection may
    take with nothing succeeding since it began (a black-holed path is down before the
    call's deadline says so); ``unknown`` otherwise (idle). Times are monotonic."""
    now = time.monotonic() if now is None else now
    if last_failure is not None and (last_ok is None or last_failure > last_ok):
        return "down"
    oldest = min(inflight, default=None)
    if oldest is not None and now - oldest > connect_timeout and (last_ok is None
                                                                  or last_ok < oldest):
        return "down"
    if last_ok is not None and now - last_ok <= window:
        return "up"
    return "unknown"


def failed_at(last_failure: float | None, started: float | None) -> float:
    """What ``last_failure`` becomes when a call fails: the time the call *began* (now when
    unknown). A call stuck on a black-holed path fails only at its deadline, perhaps after
    the path healed and later calls succeeded; its failure says the path was bad when it
    began, not that it is bad now, so it must not outweigh a success that came after."""
    at = time.monotonic() if started is None else started
    return at if last_failure is None else max(last_failure, at)
