"""Event value types: the sealed row and the spool records that carry rows (no I/O).

A sealed event is a named tuple in ``COLUMNS`` order: the same object is kept in memory for
the flusher, encoded into the spool (as a msgpack array), and handed to PostgreSQL as one
element of a composite array, so the hot path never converts between representations.
"""

from __future__ import annotations

import uuid
from dataclasses import dataclass
from datetime import datetime
from typing import Final, NamedTuple

import msgspec

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


@dataclass(frozen=True, slots=True)
class Seal:
    """What the agent adds to every event of one request."""

    agency: str
    received_at: datetime
    correlation_id: str
    agent_id: str
    trace_id: str | None
    span_id: str | None
    expires_at: datetime


class Row(NamedTuple):
    """One sealed event, in ``COLUMNS`` order (what COPY and the write function take)."""

    agency_id: str
    event_id: str  # lower-case UUID text
    run_id: str
    kind: str
    step: str | None
    occurred_at: datetime
    received_at: datetime
    provider: str | None
    model: str | None
    payload: str  # canonical JSON text
    payload_sha256: str
    correlation_id: str
    agent_id: str
    trace_id: str | None  # 32 hex
    span_id: str | None  # 16 hex
    expires_at: datetime


class AuditRow(NamedTuple):
    """One audit entry. ``entry_id`` is fixed when the entry is spooled: a replay of the
    spool writes the same entry again, and PostgreSQL keeps it once."""

    agency_id: str  # "-" when the caller could not be identified
    at: datetime
    actor: str  # the token's sub, "local" without auth, "-" when unknown
    action: str
    target: str | None
    success: bool
    before_state: str | None  # JSON text
    after_state: str | None  # JSON text
    correlation_id: str | None
    source: str  # tcp | socket | agent
    detail: str  # JSON text
    entry_id: str  # UUID text


COLUMNS: Final = Row._fields


AUDIT_COLUMNS: Final = AuditRow._fields


class CheckpointRow(NamedTuple):
    agency_id: str
    run_id: str
    version: int
    step: str
    state: str  # canonical JSON text (hashed as is)
    checkpoint_hash: str
    provider: str | None
    model: str | None
    status: str | None
    saved_at: datetime
    expires_at: datetime
    event_id: str  # of the checkpoint.saved event
    correlation_id: str | None


CHECKPOINT_COLUMNS: Final = CheckpointRow._fields


class EventsRecord(msgspec.Struct, tag="events", array_like=True, frozen=True):
    """One accepted request: its events are durable together or not at all."""

    rows: list[Row]

    def events(self) -> list[Row]:
        return self.rows

    def checkpoints(self) -> list[CheckpointRow]:
        return []

    def audits(self) -> list[AuditRow]:
        return []


class AuditRecord(msgspec.Struct, tag="audit.2", array_like=True, frozen=True):
    """Audit entries, delivered through the spool like events (durable, retried)."""

    rows: list[AuditRow]

    def events(self) -> list[Row]:
        return []

    def checkpoints(self) -> list[CheckpointRow]:
        return []

    def audits(self) -> list[AuditRow]:
        return self.rows


_LegacyAuditRow = tuple[str, datetime, str, str, str | None, bool, str | None, str | None,
                        str | None, str, str]
_LEGACY_AUDIT = uuid.UUID("0b8f8f3e-8d1c-4a47-9a55-6a1c2f0e7d21")


class LegacyAuditRecord(msgspec.Struct, tag="audit", array_like=True, frozen=True):
    """Audit entries spooled by agents before entries carried their own id (read only)."""

    rows: list[_LegacyAuditRow]

    def upgraded(self) -> AuditRecord:
        """The same entries, each with an id derived from its content: replays of this
        record, by this agent or a newer one, always carry the same ids."""
        out = []
        for row in self.rows:
            digest = msgspec.msgpack.encode(row)
            out.append(AuditRow(*row, str(uuid.uuid5(_LEGACY_AUDIT, digest.hex()))))
        return AuditRecord(out)


class CheckpointRecord(msgspec.Struct, tag="checkpoint", array_like=True, frozen=True):
    """One checkpoint save: the checkpoint and its checkpoint.saved event, durable together."""

    rows: list[Row]  # the checkpoint.saved event (one)
    checkpoint: CheckpointRow

    def events(self) -> list[Row]:
        return self.rows

    def checkpoints(self) -> list[CheckpointRow]:
        return [self.checkpoint]

    def audits(self) -> list[AuditRow]:
        return []


class ForwardedRecord(msgspec.Struct, tag="forwarded", array_like=True, frozen=True):
    """Sealed items a sidecar forwarded to an aggregator in one request (one window of its
    flusher, or part of one): ids, hashes and trace context as the sidecar sealed them.
    The request body and the aggregator's spool record are the same bytes."""

    event_rows: list[Row]
    checkpoint_rows: list[CheckpointRow]
    audit_rows: list[AuditRow]

    def events(self) -> list[Row]:
        return self.event_rows

    def checkpoints(self) -> list[CheckpointRow]:
        return self.checkpoint_rows

    def audits(self) -> list[AuditRow]:
        return self.audit_rows


SpoolRecord = EventsRecord | AuditRecord | CheckpointRecord | ForwardedRecord


def items(record: SpoolRecord) -> int:
    """Events, checkpoints and audit entries a record carries (what batch limits count)."""
    return len(record.events()) + len(record.checkpoints()) + len(record.audits())

record_encoder: Final = msgspec.msgpack.Encoder()
_decoder: Final = msgspec.msgpack.Decoder(SpoolRecord | LegacyAuditRecord)


def decode_record(payload: bytes) -> SpoolRecord:
    """A spool record, upgraded to the current form if an older agent wrote it."""
    record: SpoolRecord | LegacyAuditRecord = _decoder.decode(payload)
    if isinstance(record, LegacyAuditRecord):
        return record.upgraded()
    return record


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
