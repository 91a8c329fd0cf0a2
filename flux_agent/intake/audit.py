"""The audit trail: who did what, for which agency, with what outcome (AU-2, AU-12).

Entries travel through the spool like events, so they are durable and survive outages. They
are rate-limited per (agency, action): a flood of bad tokens cannot fill the disk. Suppressed
entries are counted, and the next entry that passes carries the count.
"""

from __future__ import annotations

import os
import time
import uuid
from collections.abc import Callable, Mapping
from datetime import UTC, datetime
from typing import Any

import msgspec

from ..core.errors import TransientError
from ..core.event import AuditRecord, AuditRow, record_encoder
from ..spool import Spool

UNKNOWN = "-"


class _Bucket:
    __slots__ = ("suppressed", "tokens", "updated")

    def __init__(self, burst: float, now: float) -> None:
        self.tokens = burst
        self.updated = now
        self.suppressed = 0


class Auditor:
    def __init__(
        self,
        spool: Spool,
        *,
        rate: float = 5.0,
        burst: float = 20.0,
        on_drop: Callable[[str], None] | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.spool = spool
        self.rate = rate
        self.burst = burst
        self.on_drop = on_drop
        self.clock = clock
        self._buckets: dict[tuple[str, str], _Bucket] = {}
        self.written = 0

    def record(
        self,
        action: str,
        *,
        agency: str = UNKNOWN,
        actor: str = UNKNOWN,
        target: str | None = None,
        success: bool,
        correlation_id: str | None = None,
        source: str = "agent",
        before: Any = None,
        after: Any = None,
        detail: Mapping[str, Any] | None = None,
    ) -> bool:
        """Queue one entry; False when it was rate-limited or could not be spooled."""
        now = self.clock()
        key = (agency, action)
        bucket = self._buckets.get(key)
        if bucket is None:
            if len(self._buckets) > 10_000:
                self._buckets.clear()
            bucket = self._buckets[key] = _Bucket(self.burst, now)
        bucket.tokens = min(self.burst, bucket.tokens + (now - bucket.updated) * self.rate)
        bucket.updated = now
        if bucket.tokens < 1:
            bucket.suppressed += 1
            self._dropped("rate_limited")
            return False
        bucket.tokens -= 1
        info = dict(detail or {})
        if bucket.suppressed:
            info["suppressed_before"] = bucket.suppressed
            bucket.suppressed = 0
        row = AuditRow(
            agency, datetime.now(UTC), actor, action, target, success,
            _json(before), _json(after), correlation_id, source,
            msgspec.json.encode(info).decode(), _uuid4(),
        )
        record = AuditRecord([row])
        payload = record_encoder.encode(record)
        try:
            self.spool.check_room(len(payload))
        except TransientError:  # a full or broken spool refuses audits like events
            self._dropped("spool_unavailable")
            return False
        self.spool.append(payload, record)
        self.written += 1
        return True

    def _dropped(self, reason: str) -> None:
        if self.on_drop is not None:
            self.on_drop(reason)


def _uuid4() -> str:
    """A random id fixed when the entry is spooled: its idempotency key downstream."""
    return str(uuid.UUID(bytes=os.urandom(16), version=4))


def _json(value: Any) -> str | None:
    return None if value is None else msgspec.json.encode(value).decode()
