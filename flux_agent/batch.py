"""Batching by count, bytes and age, and the split of a batch into lanes (pure).

The clock is injected, so the rules are tested without sleeping.
"""

from __future__ import annotations

import zlib
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

from .event import AGENCY, RUN_ID, Row


@dataclass(frozen=True, slots=True)
class Limits:
    max_events: int
    max_bytes: int
    max_age: float  # seconds


@dataclass(slots=True)
class Batch:
    """Spool records (seq, rows) in sequence order, with running totals."""

    records: list[tuple[int, list[Row]]] = field(default_factory=list)
    events: int = 0
    nbytes: int = 0
    opened_at: float = 0.0

    @property
    def last_seq(self) -> int:
        return self.records[-1][0]

    def rows(self) -> list[Row]:
        return [row for _, rows in self.records for row in rows]


class Batcher:
    """Accumulates records; a batch closes when full (count or bytes) or due (age)."""

    def __init__(self, limits: Limits, clock: Callable[[], float]) -> None:
        self.limits = limits
        self.clock = clock
        self.batch = Batch()

    def add(self, seq: int, rows: list[Row], nbytes: int) -> None:
        if not self.batch.records:
            self.batch.opened_at = self.clock()
        self.batch.records.append((seq, rows))
        self.batch.events += len(rows)
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


def lane_of(row: Row, lanes: int) -> int:
    """Every event of one run goes to the same lane, so a run's events stay in order."""
    if lanes == 1:
        return 0
    return zlib.crc32(f"{row[AGENCY]}\x00{row[RUN_ID]}".encode()) % lanes


def split_lanes(rows: Sequence[Row], lanes: int) -> list[list[Row]]:
    out: list[list[Row]] = [[] for _ in range(lanes)]
    if lanes == 1:
        out[0].extend(rows)
        return out
    for row in rows:
        out[lane_of(row, lanes)].append(row)
    return out
