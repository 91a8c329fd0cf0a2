"""Batch boundaries by count, bytes and age, with an injected clock; lanes keep runs whole."""

from __future__ import annotations

from datetime import UTC, datetime

from flux_agent.core.event import AuditRecord, AuditRow, EventsRecord, Row
from flux_agent.flush.batch import Batch, Batcher, Limits, Work, lane_of, split_lanes

NOW = datetime(2026, 1, 1, tzinfo=UTC)


def row(run: str, agency: str = "nasa") -> Row:
    return Row(agency, "0190f0b2-2f6c-7c3e-9d4a-1234567890ab", run, "step.completed", "s",
               NOW, NOW, None, None, "{}", "0" * 64, "c", "a", None, None, NOW)


class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def test_closes_on_count():
    b = Batcher(Limits(max_events=3, max_bytes=10**9, max_age=1.0), Clock())
    b.add(1, EventsRecord([row("a"), row("a")]), 10)
    assert not b.full
    b.add(2, EventsRecord([row("a")]), 10)
    assert b.full
    batch = b.take()
    assert (batch.events, batch.event_rows, batch.first_seq, batch.last_seq) == (3, 3, 1, 2)
    assert b.empty


def test_closes_on_bytes():
    b = Batcher(Limits(max_events=10**6, max_bytes=100, max_age=1.0), Clock())
    b.add(1, EventsRecord([row("a")]), 60)
    assert not b.full
    b.add(2, EventsRecord([row("a")]), 40)
    assert b.full


def test_closes_on_age_of_the_oldest_record():
    clock = Clock()
    b = Batcher(Limits(max_events=100, max_bytes=10**9, max_age=0.5), clock)
    assert b.due_in() == float("inf")
    b.add(1, EventsRecord([row("a")]), 1)
    assert b.due_in() == 0.5
    clock.now += 0.3
    b.add(2, EventsRecord([row("a")]), 1)
    assert abs(b.due_in() - 0.2) < 1e-9  # the age counts from the first record
    clock.now += 0.25
    assert b.due_in() == 0.0


def batch_of(rows: list[Row], audits: int = 0) -> Batch:
    b = Batcher(Limits(10**6, 10**9, 1.0), Clock())
    for i in range(0, len(rows), 7):
        b.add(i, EventsRecord(rows[i:i + 7]), 1)
    for j in range(audits):
        b.add(10**5 + j, AuditRecord([AuditRow(
            "nasa", NOW, "x", "auth.failed", None, False, None, None, None, "tcp", "{}",
            f"00000000-0000-4000-8000-{j:012d}")]), 1)
    return b.take()


def test_lanes_keep_each_run_in_one_lane_in_order():
    rows = [row(f"run-{i % 7}") for i in range(200)]
    lanes = split_lanes(batch_of(rows, audits=3), 3)
    assert sum(len(w.events) for w in lanes) == 200
    assert len(lanes[0].audits) == 3
    for work in lanes:
        others = {r[2] for w in lanes if w is not work for r in w.events}
        assert not {r[2] for r in work.events} & others
    for run in {r[2] for r in rows}:
        in_lane = [r for r in lanes[lane_of("nasa", run, 3)].events if r[2] == run]
        assert in_lane == [r for r in rows if r[2] == run]
    assert split_lanes(batch_of(rows), 1)[0].events == rows


def test_same_run_name_in_two_agencies_may_use_different_lanes():
    lanes = {lane_of(agency, "r", 64) for agency in ("nasa", "noaa", "smithsonian")}
    assert len(lanes) > 1  # the agency is part of the key


def test_work_halves_cover_everything_once():
    work = Work(events=[row("a"), row("b"), row("c")], audits=[("nasa",) * 11])  # type: ignore
    left, right = work.halves()
    assert len(left) + len(right) == 4
    assert left.events + right.events == work.events
    assert left.audits + right.audits == work.audits
