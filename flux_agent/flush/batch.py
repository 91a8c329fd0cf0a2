"""Batching by count, bytes and age, and the split of a batch into lanes (pure).

The clock is injected, so the rules are tested without sleeping.
"""

from __future__ import annotations

import zlib
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from ..core.event import AuditRow, CheckpointRow, Row, SpoolRecord, items


@dataclass(frozen=True, slots=True)
class Limits:
    max_events: int
    max_bytes: int
    max_age: float  # seconds


@dataclass(slots=True)
class Batch:
    """Spool records (seq, record) in sequence order, with running totals."""

    records: list[tuple[int, SpoolRecord]] = field(default_factory=list)
    events: int = 0  # items of every kind (what the limits count)
    event_rows: int = 0  # step events only
    nbytes: int = 0
    opened_at: float = 0.0

    @property
    def first_seq(self) -> int:
        return self.records[0][0]

    @property
    def last_seq(self) -> int:
        return self.records[-1][0]


class Batcher:
    """Accumulates records; a batch closes when full (count or bytes) or due (age)."""

    def __init__(self, limits: Limits, clock: Callable[[], float]) -> None:
        self.limits = limits
        self.clock = clock
        self.batch = Batch()

    def add(self, seq: int, record: SpoolRecord, nbytes: int) -> None:
        if not self.batch.records:
            self.batch.opened_at = self.clock()
        self.batch.records.append((seq, record))
        self.batch.events += items(record)
        self.batch.event_rows += len(record.events())
        self.batch.nbytes += nbytes

    @property
    def empty(self) -> bool:
        return not self.batch.records

    @property
    def full(self) -> bool:
        b, lim = self.batch, self.limits
        return b.events >= lim.max_events or b.nbytes >= lim.max_bytes

    def due_in(self) -> float:
        """Seconds until the batch must close for age (0 when due; inf when empty)."""
        if not self.batch.records:
            return float("inf")
        return max(0.0, self.batch.opened_at + self.limits.max_age - self.clock())

    def take(self) -> Batch:
        batch, self.batch = self.batch, Batch()
        return batch


@dataclass(slots=True)
class Work:
    """What one lane writes in one transaction."""

    events: list[Row] = field(default_factory=list)
    audits: list[AuditRow] = field(default_factory=list)
    checkpoints: list[CheckpointRow] = field(default_factory=list)

    def __len__(self) -> int:
        return len(self.events) + len(self.audits) + len(self.checkpoints)

    def halves(self) -> tuple[Work, Work]:
        items: list[tuple[str, object]] = [("e", r) for r in self.events]
        items += [("a", r) for r in self.audits]
        items += [("c", r) for r in self.checkpoints]
        mid = len(items) // 2
        return _work(items[:mid]), _work(items[mid:])


def _work(items: list[tuple[str, object]]) -> Work:
    w = Work()
    lists: dict[str, list[Any]] = {"e": w.events, "a": w.audits, "c": w.checkpoints}
    for kind, item in items:
        lists[kind].append(item)
    return w


def lane_of(agency: str, run_id: str, lanes: int) -> int:
    """Every event of one run goes to the same lane, so a run's events stay in order."""
    if lanes == 1:
        return 0
    return zlib.crc32(f"{agency}\x00{run_id}".encode()) % lanes


def split_lanes(batch: Batch, lanes: int) -> list[Work]:
    out = [Work() for _ in range(lanes)]
    for _, record in batch.records:
        events, checkpoints, audits = record.events(), record.checkpoints(), record.audits()
        if lanes == 1:
            work = out[0]
            # A checkpoint and its event stay after the run's earlier events: history in order.
            work.events.extend(events)
            work.checkpoints.extend(checkpoints)
            work.audits.extend(audits)
            continue
        for row in events:
            out[lane_of(row.agency_id, row.run_id, lanes)].events.append(row)
        for cp in checkpoints:
            out[lane_of(cp.agency_id, cp.run_id, lanes)].checkpoints.append(cp)
        out[0].audits.extend(audits)  # few, and unordered among themselves
    return out
