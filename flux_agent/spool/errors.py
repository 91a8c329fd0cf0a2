"""What the spool answers when it cannot take a request (503, retryable)."""

from __future__ import annotations

from ..core.errors import TransientError

PROBE_INTERVAL_S = 1  # while the disk refuses writes, try again this often


class SpoolFull(TransientError):
    def __init__(self, used: int, limit: int) -> None:
        super().__init__(
            "SPOOL_FULL",
            "the agent's spool is full while PostgreSQL catches up; retry later",
            retry_after=2,
            context={"spool_bytes": used, "spool_max_bytes": limit},
        )


class SpoolUnavailable(TransientError):
    def __init__(self, reason: str) -> None:
        super().__init__(
            "SPOOL_UNAVAILABLE",
            f"the event could not be written durably ({reason}); nothing was accepted",
            retry_after=PROBE_INTERVAL_S,
        )
