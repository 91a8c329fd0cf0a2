"""The flusher through its seams, without PostgreSQL: an in-memory Writer with PostgreSQL's
contract, a real Spool in a temporary directory, and a virtual clock (the event loop's, which
jumps to its next timer when nothing else can happen: windows by age and backoff cost no real
time, and when things happen is exact).

What it proves: windows close by count, bytes and age; a refused row is isolated by
bisection and becomes the only dead letter while the rest of its window lands, in order;
transient failures are retried with backoff and lose nothing; after a new primary the
recently committed records are replayed and what it lacked is restored; ``wait_committed``
and ``drain`` flush at once and say what they should.
"""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest

from flux_agent.core.errors import BadParameter, PermissionDenied, StoreUnavailable
from flux_agent.core.event import AuditRecord, AuditRow, EventsRecord, Row, record_encoder
from flux_agent.flush.batch import Limits, Work, lane_of
from flux_agent.flush.flusher import CommitPending, Flusher
from flux_agent.flush.writer import Written
from flux_agent.spool import Spool

from .support.virtual_time import run

T0 = datetime(2026, 11, 23, 7, 0, tzinfo=UTC)
HOUR = 3600.0


def row(n: int, *, run_id: str = "run-1", payload_bytes: int = 0) -> Row:
    """Event number ``n`` (its id is the UUID of ``n``); a payload of about
    ``payload_bytes``."""
    payload = '{"pad":"' + "x" * payload_bytes + '"}'
    return Row("nasa", str(uuid.UUID(int=n)), run_id, "step.completed", "extract",
               T0, T0, None, None, payload, "0" * 64, f"c-{n}", "agent-1", None, None,
               T0 + timedelta(days=30))


def n_of(event_id: str) -> int:
    return uuid.UUID(event_id).int


@dataclass
class MemoryWriter:
    """PostgreSQL's contract, in memory: a lane's write is one transaction (all or nothing);
    an event already stored is not stored again (ON CONFLICT DO NOTHING); a refused row fails
    its whole write as poison (BadParameter); an outage fails writes as transient
    (StoreUnavailable). A failover swaps the primary for one that lost the last commits."""

    clock: Any
    stored: dict[str, Row] = field(default_factory=dict)  # insertion order = commit order
    audits: list[str] = field(default_factory=list)
    writes: list[tuple[float, list[int]]] = field(default_factory=list)  # (when, events)
    attempts: list[float] = field(default_factory=list)
    dead: list[tuple[list[int], list[str], str, str | None]] = field(default_factory=list)
    poison: set[int] = field(default_factory=set)
    failures: list[Exception] = field(default_factory=list)  # the next writes raise these
    new_primary: bool = False  # the next write lands on a new primary
    pending: bool = False  # an aggregator: durable there, not yet in PostgreSQL
    returning: list[bool] = field(default_factory=list)  # asked for the new ids, per write
    prepared: int = 0

    async def prepare(self) -> None:
        self.prepared += 1

    async def write(self, work: Work, *, returning: bool) -> Written:
        await asyncio.sleep(0)  # a write yields to the loop, as a real one does
        self.attempts.append(self.clock())
        if self.failures:
            raise self.failures.pop(0)
        refused = [r.event_id for r in work.events if n_of(r.event_id) in self.poison]
        if refused:
            raise BadParameter(f"new row violates check constraint: {refused[0]}",
                               code="23514")
        new = [r for r in work.events if r.event_id not in self.stored]
        for r in new:
            self.stored[r.event_id] = r
        self.audits.extend(a.entry_id for a in work.audits if a.entry_id not in self.audits)
        self.writes.append((self.clock(), [n_of(r.event_id) for r in work.events]))
        self.returning.append(returning)
        primary, self.new_primary = self.new_primary, False
        return Written(len(new), {r.event_id for r in new} if returning else set(), primary,
                       self.pending)

    async def write_dead_letter(self, work: Work, reason: str, code: str | None) -> None:
        self.dead.append(([n_of(r.event_id) for r in work.events],
                          [a.entry_id for a in work.audits], reason, code))

    def fail_over(self, lost: int) -> None:
        """A new primary that never got the last ``lost`` committed events (asynchronous
        replication); the next write finds out."""
        for event_id in list(self.stored)[len(self.stored) - lost:]:
            del self.stored[event_id]
        self.new_primary = True

    @property
    def stored_numbers(self) -> list[int]:
        return [n_of(e) for e in self.stored]


@asynccontextmanager
async def pipeline(directory: Path, writer: MemoryWriter | None = None, *,
                   start: bool = True, keep_committed: float = 0.0,
                   **settings: Any) -> AsyncIterator[tuple[Spool, Flusher, MemoryWriter]]:
    """A spool in ``directory`` and a flusher over it into ``writer`` (a new MemoryWriter by
    default), on the loop's (virtual) clock. ``settings``: the flusher's limits and knobs."""
    loop = asyncio.get_running_loop()
    writer = writer if writer is not None else MemoryWriter(loop.time)
    spool = Spool(directory, max_bytes=64 * 1024 * 1024, segment_bytes=64 * 1024,
                  fsync=False, keep_committed=keep_committed)
    limits = Limits(settings.pop("max_events", 1000), settings.pop("max_bytes", 1 << 30),
                    settings.pop("max_age", HOUR))
    flusher = Flusher(spool, writer, limits=limits, lanes=settings.pop("lanes", 1),
                      retry_max=settings.pop("retry_max", 5.0),
                      memory_bytes=settings.pop("memory_bytes", 1 << 30),
                      replay_window=keep_committed, clock=loop.time, **settings)
    await spool.open(on_durable=flusher.offer)
    if start:
        flusher.start()
    try:
        yield spool, flusher, writer
    finally:
        await flusher.stop()
        await spool.close()


async def settle() -> None:
    """Let everything that can happen without the clock moving happen: the loop's clock
    jumps only once nothing else can run (and no thread is at work)."""
    await asyncio.sleep(0.001)


async def append(spool: Spool, *rows_per_record: list[Row]) -> list[int]:
    """One spool record per list of rows; their seqs, once written."""
    seqs = []
    for rows in rows_per_record:
        record = EventsRecord(list(rows))
        seq, done = spool.append(record_encoder.encode(record), record)
        seqs.append(seq)
        await done
    await spool.written()
    return seqs


# --------------------------------------------------------------------------- windows


def test_windows_close_by_count_at_once_and_the_rest_by_age(tmp_path: Path):
    async def main() -> None:
        async with pipeline(tmp_path, start=False, max_events=3) as (spool, flusher, writer):
            await append(spool, *([row(n)] for n in range(1, 8)))
            started = asyncio.get_running_loop().time()
            flusher.start()
            await settle()
            # Full windows are written at once; the last one waits for its age.
            assert writer.writes == [(started, [1, 2, 3]), (started, [4, 5, 6])]
            assert spool.cursor == 6
            await asyncio.sleep(HOUR)
            assert writer.writes[2] == (pytest.approx(started + HOUR), [7])
            assert spool.cursor == 7

    run(main())


def test_a_window_closes_by_bytes_before_its_count(tmp_path: Path):
    big = 80 * 1024  # one such event alone outweighs the window's 64 KiB

    async def main() -> None:
        async with pipeline(tmp_path, start=False, max_bytes=64 * 1024) as (
                spool, flusher, writer):
            await append(spool, [row(1)], [row(2, payload_bytes=big)], [row(3)], [row(4)],
                         [row(5, payload_bytes=big)], [row(6)])
            started = asyncio.get_running_loop().time()
            flusher.start()
            await asyncio.sleep(HOUR + 1)
            assert writer.writes == [(started, [1, 2]), (started, [3, 4, 5]),
                                     (pytest.approx(started + HOUR), [6])]

    run(main())


def test_a_window_closes_at_its_age_counted_from_its_first_record(tmp_path: Path):
    async def main() -> None:
        loop = asyncio.get_running_loop()
        async with pipeline(tmp_path, max_age=2.0) as (spool, _, writer):
            first = loop.time()
            await append(spool, [row(1)])
            await asyncio.sleep(1.5)
            await append(spool, [row(2)])  # joins the open window: no new age
            await asyncio.sleep(0.4)
            assert writer.writes == []  # 1.9 s: not yet
            await asyncio.sleep(0.2)
            assert writer.writes == [(pytest.approx(first + 2.0), [1, 2])]
            await append(spool, [row(3)])  # a new window, a new age
            await asyncio.sleep(2.5)
            assert writer.writes[1] == (pytest.approx(first + 2.1 + 2.0), [3])
            assert [n_of(e) for e in writer.stored] == [1, 2, 3]

    run(main())


# --------------------------------------------------------------------------- poison


def test_a_refused_row_is_isolated_by_bisection_and_the_rest_lands_in_order(tmp_path: Path):
    async def main() -> None:
        async with pipeline(tmp_path, start=False) as (spool, flusher, writer):
            writer.poison = {6}
            seqs = await append(spool, [row(n) for n in range(1, 5)],
                                [row(n) for n in range(5, 9)], [row(9)])
            flusher.start()
            assert await flusher.drain(60)
            assert writer.dead == [([6], [], "new row violates check constraint: "
                                    + str(uuid.UUID(int=6)), "23514")]
            assert writer.stored_numbers == [1, 2, 3, 4, 5, 7, 8, 9]
            # The whole window was tried once, then halves: no row written twice.
            written = [n for _, batch in writer.writes for n in batch]
            assert sorted(written) == [1, 2, 3, 4, 5, 7, 8, 9]
            assert flusher.stats.events_dead == 1
            assert flusher.stats.events_inserted == 8
            assert flusher.stats.events_duplicate == 0
            assert flusher.stats.retries == 0  # poison is not retried
            assert flusher.committed_seq == spool.cursor == seqs[-1]

    run(main())


def test_every_refused_row_and_audit_entry_becomes_its_own_dead_letter(tmp_path: Path):
    class AuditRefusingWriter(MemoryWriter):
        async def write(self, work: Work, *, returning: bool) -> Written:
            if any(a.action == "refused" for a in work.audits):
                raise BadParameter("audit entry refused", code="22P02")
            return await MemoryWriter.write(self, work, returning=returning)

    async def main() -> None:
        writer = AuditRefusingWriter(asyncio.get_running_loop().time, poison={1, 16})
        async with pipeline(tmp_path, writer, start=False) as (spool, flusher, _):
            await append(spool, [row(n) for n in range(1, 17)])
            audit = AuditRecord([AuditRow("nasa", T0, "local", action, None, True, None,
                                          None, None, "tcp", "{}", str(uuid.UUID(int=i)))
                                 for i, action in ((100, "ok"), (101, "refused"))])
            seq, done = spool.append(record_encoder.encode(audit), audit)
            await done
            flusher.start()
            assert await flusher.drain(60)
            assert [d[:2] for d in writer.dead] == [([1], []), ([16], []),
                                                    ([], [str(uuid.UUID(int=101))])]
            assert writer.stored_numbers == list(range(2, 16))
            assert writer.audits == [str(uuid.UUID(int=100))]
            assert flusher.stats.events_dead == 2  # audit entries are not events
            assert spool.cursor == seq

    run(main())


# --------------------------------------------------------------------------- outages


@pytest.mark.parametrize("failure", [StoreUnavailable("connection refused"),
                                     PermissionDenied("permission denied for table events")],
                         ids=["transient", "error"])
def test_failures_are_retried_with_backoff_and_nothing_is_lost(tmp_path: Path,
                                                              failure: Exception):
    retry_max = 1.0

    async def main() -> None:
        writer = MemoryWriter(asyncio.get_running_loop().time, failures=[failure] * 6)
        async with pipeline(tmp_path, writer, retry_max=retry_max) as (spool, flusher, _):
            seqs = await append(spool, [row(1), row(2)], [row(3)])
            waiting = asyncio.ensure_future(flusher.wait_committed(seqs[-1],
                                                                    in_database=True))
            while len(writer.attempts) < 6:
                await asyncio.sleep(0.01)
                # Meanwhile nothing is committed and the spool keeps every record.
                assert not waiting.done()
                assert spool.cursor == 0 and spool.pending_records == 2
            assert await waiting == {str(uuid.UUID(int=n)) for n in (1, 2, 3)}
            assert writer.stored_numbers == [1, 2, 3]
            assert spool.cursor == seqs[-1]
            assert flusher.stats.retries == 6
            # Exponential backoff from 0.1 s, capped at retry_max, each delay a random
            # point in the upper half of its step.
            gaps = [b - a for a, b in zip(writer.attempts, writer.attempts[1:], strict=False)]
            for attempt, gap in enumerate(gaps, start=1):
                step = min(retry_max, 0.1 * 2 ** (attempt - 1))
                assert step / 2 <= gap <= step + 1e-9, (attempt, gaps)
            assert max(gaps) >= retry_max / 2  # the cap was reached...
            assert max(gaps) <= retry_max  # ...and held

    run(main())


def test_lanes_that_fail_are_retried_alone(tmp_path: Path):
    """A window split over lanes: a lane that failed is retried; one that landed is not
    written again."""
    async def main() -> None:
        async with pipeline(tmp_path, start=False, lanes=4) as (spool, flusher, writer):
            rows = [row(n, run_id=f"run-{n % 16}") for n in range(1, 601)]  # >= 512: split
            lanes = len({lane_of("nasa", r.run_id, 4) for r in rows})
            assert lanes > 1
            await append(spool, rows[:300], rows[300:])
            writer.failures = [StoreUnavailable("connection reset")]
            flusher.start()
            assert await flusher.drain(60)
            assert sorted(writer.stored_numbers) == list(range(1, 601))
            assert len(writer.writes) == lanes  # one write per lane...
            assert len(writer.attempts) == lanes + 1  # ...and the failed one tried again
            written = sorted(n for _, batch in writer.writes for n in batch)
            assert written == list(range(1, 601))  # nothing written twice
            for _, batch in writer.writes:  # each run in one lane, in order
                assert batch == sorted(batch)

    run(main())


# --------------------------------------------------------------------------- failover


def test_a_new_primary_gets_the_recent_commits_replayed(tmp_path: Path):
    async def main() -> None:
        async with pipeline(tmp_path, keep_committed=300.0, max_events=4) as (
                spool, flusher, writer):
            first = await append(spool, *([row(n)] for n in range(1, 9)))
            assert await flusher.drain(60)
            assert writer.stored_numbers == list(range(1, 9))
            writer.fail_over(lost=3)  # 6, 7, 8 never reached the standby
            assert writer.stored_numbers == [1, 2, 3, 4, 5]
            later = await append(spool, [row(9)])
            assert await flusher.drain(60)  # 9 is committed, to the new primary...
            await settle()  # ...which then gets the failover window again
            assert sorted(writer.stored_numbers) == list(range(1, 10))
            assert flusher.stats.replays == 1
            assert flusher.stats.events_restored == 3
            assert flusher.stats.events_inserted == 9  # the restored ones counted apart
            assert flusher.stats.events_duplicate == 0
            assert spool.cursor == later[-1] > first[-1]

    run(main())


def test_without_a_failover_window_a_new_primary_replays_nothing(tmp_path: Path):
    async def main() -> None:
        async with pipeline(tmp_path, keep_committed=0.0) as (spool, flusher, writer):
            await append(spool, [row(1)], [row(2)])
            assert await flusher.drain(60)
            writer.fail_over(lost=1)
            await append(spool, [row(3)])
            assert await flusher.drain(60)
            assert writer.stored_numbers == [1, 3]  # said in the log, not restored
            assert flusher.stats.replays == 0

    run(main())


# --------------------------------------------------------------------------- waiting


def test_wait_committed_flushes_now_and_names_the_new_ids(tmp_path: Path):
    async def main() -> None:
        loop = asyncio.get_running_loop()
        async with pipeline(tmp_path) as (spool, flusher, writer):
            writer.stored[str(uuid.UUID(int=2))] = row(2)  # already in PostgreSQL
            asked = loop.time()
            (seq,) = await append(spool, [row(1), row(2), row(3)])
            new = await flusher.wait_committed(seq, in_database=True)  # wait=committed
            assert new == {str(uuid.UUID(int=1)), str(uuid.UUID(int=3))}
            assert loop.time() == pytest.approx(asked)  # not an hour later, at its age
            assert flusher.stats.events_duplicate == 1
            assert await flusher.wait_committed(seq) is None  # committed before asking
            # A drain or a read needs the upstream's durability only: no ids asked for.
            (seq,) = await append(spool, [row(4)])
            assert await flusher.wait_committed(seq) is None
            assert writer.returning == [True, False]
            assert loop.time() == pytest.approx(asked)

    run(main())


def test_an_aggregator_holding_a_window_uncommitted_is_said_to_commit_waiters(
        tmp_path: Path):
    """The upstream is an aggregator that has the window durably but not yet in
    PostgreSQL: a caller who asked for PostgreSQL (wait=committed) is told so; a drain, which
    needs only the upstream's durability, is done; nothing is written again."""
    async def main() -> None:
        async with pipeline(tmp_path) as (spool, flusher, writer):
            writer.pending = True
            (seq,) = await append(spool, [row(1)])
            with pytest.raises(CommitPending):
                await flusher.wait_committed(seq, in_database=True)
            assert spool.cursor == seq  # delivered: the aggregator keeps it
            await append(spool, [row(2)])
            assert await flusher.drain(10)
            assert writer.stored_numbers == [1, 2] and len(writer.writes) == 2

    run(main())


def test_drain_flushes_now_or_says_it_could_not_within_its_time(tmp_path: Path):
    async def main() -> None:
        loop = asyncio.get_running_loop()
        async with pipeline(tmp_path) as (spool, flusher, writer):
            await append(spool, [row(1)])
            asked = loop.time()
            assert await flusher.drain(10)
            assert loop.time() == pytest.approx(asked)  # not at the window's age
            assert writer.stored_numbers == [1]
            assert await flusher.drain(10)  # nothing left: at once

            writer.failures = [StoreUnavailable("the database is away")] * 1000
            await append(spool, [row(2)], [row(3)])
            asked = loop.time()
            assert not await flusher.drain(10)
            assert loop.time() == pytest.approx(asked + 10)
            assert spool.pending_records == 2 and writer.stored_numbers == [1]
            writer.failures.clear()  # the database is back: nothing was lost
            assert await flusher.drain(60)
            assert writer.stored_numbers == [1, 2, 3]
            assert spool.pending_records == 0

    run(main())


def test_a_restarted_flusher_resumes_from_the_spool_cursor(tmp_path: Path):
    """What was committed is not written again after a restart; what was not, is."""
    async def main() -> None:
        async with pipeline(tmp_path) as (spool, flusher, writer):
            await append(spool, [row(1)], [row(2)])
            assert await flusher.drain(10)
            writer.failures = [StoreUnavailable("away")] * 1000
            await append(spool, [row(3)])
            assert not await flusher.drain(1)
        async with pipeline(tmp_path) as (spool, flusher, writer):
            assert await flusher.drain(10)
            assert writer.stored_numbers == [3]
            assert writer.prepared >= 1

    run(main())
