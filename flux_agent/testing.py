"""Factories for tests, for embedders' tests, and for the benchmarks.

``make_event()`` builds a valid v1 event; override any field, or pass ``payload=...``.
"""

from __future__ import annotations

import itertools
import os
import time
import uuid
from datetime import UTC, datetime
from typing import Any

_counter = itertools.count()


def uuid7() -> str:
    """A UUIDv7 (RFC 9562): 48-bit Unix milliseconds, then random bits. Time-ordered, so
    consecutive ids land next to each other in PostgreSQL's primary-key index."""
    ms = time.time_ns() // 1_000_000
    rand = int.from_bytes(os.urandom(10), "big")
    value = (ms & ((1 << 48) - 1)) << 80
    value |= 0x7 << 76  # version 7
    value |= ((rand >> 64) & 0xFFF) << 64
    value |= 0b10 << 62  # RFC 4122 variant
    value |= rand & ((1 << 62) - 1)
    return str(uuid.UUID(int=value))


def make_event(kind: str = "step.completed", **fields: Any) -> dict[str, Any]:
    n = next(_counter)
    event: dict[str, Any] = {
        "event_id": uuid7(),
        "run_id": f"run-{n % 50}",
        "kind": kind,
        "occurred_at": datetime.now(UTC).isoformat().replace("+00:00", "Z"),
        "payload": {"items_processed": n, "duration_ms": 12.5},
    }
    if kind.startswith("step.") or kind == "checkpoint.saved":
        event["step"] = "extract"
    if kind == "run.started":
        event["payload"] = {"content_type": "images", "use_case": "research"}
    event.update(fields)
    return event


def make_events(count: int, **fields: Any) -> list[dict[str, Any]]:
    return [make_event(**fields) for _ in range(count)]
