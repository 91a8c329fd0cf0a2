"""Event ids and the time inside them (pure).

``flux.events`` is partitioned by ``flux.event_id_time(event_id)`` (``sql/006``): the 48-bit
Unix millisecond timestamp of a UUIDv7, or no time at all for any other id. :func:`id_time`
is the same function in Python (a test holds the two equal). The ids the agent derives itself
(``checkpoint.saved`` events, OpenLineage RunEvents) are UUIDv7 built by :func:`uuid7_at`
from a time and a digest of their content, so that they are deterministic and still land in
a time partition.
"""

from __future__ import annotations

import re
import uuid
from datetime import UTC, datetime

UUID_TEXT = re.compile(r"[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}")
_MS_LIMIT = 1 << 48


def uuid7_at(at: datetime, digest: bytes) -> str | None:
    """A UUIDv7 (RFC 9562) whose timestamp is ``at`` (to the millisecond) and whose other 74
    bits come from ``digest`` (at least 10 bytes); None when ``at`` cannot be a v7 time
    (before 1970)."""
    ms = (at.astimezone(UTC) - _EPOCH) // _ONE_MS
    if not 0 <= ms < _MS_LIMIT:
        return None
    rand = int.from_bytes(digest[:10], "big")
    value = ms << 80
    value |= 0x7 << 76  # version 7
    value |= ((rand >> 68) & 0xFFF) << 64  # 12 bits
    value |= 0b10 << 62  # RFC 9562 variant
    value |= rand & ((1 << 62) - 1)  # 62 bits
    return str(uuid.UUID(int=value))


def id_ms(event_id: str) -> int | None:
    """The Unix milliseconds of a UUIDv7 (version 7, variant 10); None for every other id."""
    value = uuid.UUID(event_id).int
    if (value >> 76) & 0xF != 7 or (value >> 62) & 0x3 != 0b10:
        return None
    return value >> 80


def id_time(event_id: str) -> datetime | None:
    """The partition key of an event id, as SQL ``flux.event_id_time`` computes it: the time
    of a UUIDv7, None (PostgreSQL's -infinity) for every other id. (A v7 can carry times up
    to the year 10889, past Python's datetime: OverflowError.)"""
    ms = id_ms(event_id)
    return None if ms is None else _EPOCH + ms * _ONE_MS


_EPOCH = datetime(1970, 1, 1, tzinfo=UTC)
_ONE_MS = datetime(1970, 1, 1, 0, 0, 0, 1000, tzinfo=UTC) - _EPOCH
