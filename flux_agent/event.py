"""Event value types: the sealed row and the spool records that carry rows (no I/O).

A sealed event is a plain tuple in ``COLUMNS`` order: the same object is kept in memory for
the flusher, encoded into the spool, and handed to PostgreSQL's binary COPY, so the hot path
never converts between representations.
"""

from __future__ import annotations

from datetime import datetime
from typing import Final

import msgspec

COLUMNS: Final = (
    "agency_id",
    "event_id",
    "run_id",
    "kind",
    "step",
    "occurred_at",
    "received_at",
    "provider",
    "model",
    "payload",
    "payload_sha256",
    "correlation_id",
    "agent_id",
    "trace_id",
    "span_id",
    "expires_at",
)

# Positions used outside this module.
AGENCY: Final = 0
EVENT_ID: Final = 1
RUN_ID: Final = 2
KIND: Final = 3
STEP: Final = 4
OCCURRED_AT: Final = 5
RECEIVED_AT: Final = 6
PAYLOAD: Final = 9
PAYLOAD_SHA256: Final = 10
CORRELATION_ID: Final = 11
TRACE_ID: Final = 13
SPAN_ID: Final = 14

KINDS: Final = (
    "run.started",
    "step.started",
    "step.completed",
    "step.failed",
    "checkpoint.saved",
    "run.completed",
    "run.failed",
    "run.aborted",
)

Row = tuple[
    str,  # agency_id
    str,  # event_id (lower-case UUID text)
    str,  # run_id
    str,  # kind
    str | None,  # step
    datetime,  # occurred_at
    datetime,  # received_at
    str | None,  # provider
    str | None,  # model
    str,  # payload: canonical JSON text
    str,  # payload_sha256
    str,  # correlation_id
    str,  # agent_id
    str | None,  # trace_id (32 hex)
    str | None,  # span_id (16 hex)
    datetime,  # expires_at
]


AuditRow = tuple[
    str,  # agency_id ("-" when the caller could not be identified)
    datetime,  # at
    str,  # actor: the token's sub, "local" without auth, "-" when unknown
    str,  # action
    str | None,  # target
    bool,  # success
    str | None,  # before (JSON text)
    str | None,  # after (JSON text)
    str | None,  # correlation_id
    str,  # source: tcp | socket | agent
    str,  # detail (JSON text)
]
AUDIT_COLUMNS: Final = ("agency_id", "at", "actor", "action", "target", "success",
                        "before_state", "after_state", "correlation_id", "source", "detail")


CheckpointRow = tuple[
    str,  # agency_id
    str,  # run_id
    int,  # version
    str,  # step
    str,  # state: canonical JSON text (hashed as is)
    str,  # checkpoint_hash
    str | None,  # provider
    str | None,  # model
    str | None,  # status
    datetime,  # saved_at
    datetime,  # expires_at
    str,  # event_id of the checkpoint.saved event
    str | None,  # correlation_id
]
CHECKPOINT_COLUMNS: Final = ("agency_id", "run_id", "version", "step", "state",
                             "checkpoint_hash", "provider", "model", "status", "saved_at",
                             "expires_at", "event_id", "correlation_id")


class EventsRecord(msgspec.Struct, tag="events", array_like=True, frozen=True):
    """One accepted request: its events are durable together or not at all."""

    rows: list[Row]


class AuditRecord(msgspec.Struct, tag="audit", array_like=True, frozen=True):
    """Audit entries, delivered through the spool like events (durable, retried)."""

    rows: list[AuditRow]


class CheckpointRecord(msgspec.Struct, tag="checkpoint", array_like=True, frozen=True):
    """One checkpoint save: the checkpoint and its checkpoint.saved event, durable together."""

    rows: list[Row]  # the checkpoint.saved event (one)
    checkpoint: CheckpointRow


SpoolRecord = EventsRecord | AuditRecord | CheckpointRecord

record_encoder: Final = msgspec.msgpack.Encoder()
record_decoder: Final = msgspec.msgpack.Decoder(SpoolRecord)


def row_size(row: Row) -> int:
    """Approximate bytes a row costs downstream (batch byte limits, memory accounting)."""
    return len(row[PAYLOAD]) + 256


def row_as_json(row: Row) -> dict[str, object]:
    """A row as a JSON-friendly mapping (dead letters, spool inspection)."""
    out: dict[str, object] = {}
    for name, value in zip(COLUMNS, row, strict=True):
        if isinstance(value, datetime):
            out[name] = value.isoformat()
        elif name == "payload" and isinstance(value, str):
            out[name] = msgspec.json.decode(value)
        else:
            out[name] = value
    return out
