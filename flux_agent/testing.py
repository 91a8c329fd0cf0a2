"""Factories for tests, for embedders' tests, and for the benchmarks.

``make_event()`` builds a valid v1 event; override any field, or pass ``payload=...``.
"""

from __future__ import annotations

import itertools
from datetime import UTC, datetime
from typing import Any

from .client.core import uuid7

_counter = itertools.count()


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
