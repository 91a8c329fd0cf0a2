"""Timestamps as the agent writes them: RFC 3339, UTC, with a ``Z``."""

from __future__ import annotations

from datetime import UTC, datetime


def rfc3339(value: datetime | None) -> str | None:
    """``2026-12-07T15:40:18.123456Z`` (microseconds when the value has them)."""
    return value.isoformat().replace("+00:00", "Z") if value is not None else None


def rfc3339_ms(epoch: float | None) -> str | None:
    """A Unix time as ``2026-12-07T15:40:18.123Z``."""
    if epoch is None:
        return None
    return datetime.fromtimestamp(epoch, UTC).isoformat(timespec="milliseconds").replace(
        "+00:00", "Z")


def utc_now_text() -> str:
    """Now, as ``2026-12-07T15:40:18.123Z``."""
    return datetime.now(UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")
