"""Spool -> batches -> PostgreSQL: the flusher.

Records arrive in sequence order. When the flusher keeps up, they come from memory (the
spool hands over each record as it becomes durable); when it falls behind, or memory is
full, it reads them back from the spool.
Either way it delivers *windows*: consecutive records whose events are split over a few
lanes (connections) by run, committed in parallel, and only then is the spool cursor moved
past the window. A crash anywhere replays at most the last window, and PostgreSQL absorbs
the replay (``ON CONFLICT DO NOTHING``), so nothing is lost and nothing is doubled.

Transient failures retry forever with exponential backoff and jitter while the spool keeps
the events. Rows PostgreSQL refuses for what they contain are isolated by bisection and
stored as dead letters; the rest of their batch lands.
"""

from __future__ import annotations

import asyncio
import contextlib
import heapq
import logging
import random
import time
from collections import deque
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Protocol

from .batch import Batch, Batcher, Limits, Work, split_lanes
from .event import (
    SPAN_ID,
    TRACE_ID,
    CheckpointRecord,
    EventsRecord,
    SpoolRecord,
    record_decoder,
)
from .spool import Spool
from .tracing import Tracing

log = logging.getLogger("flux_agent.flush")


class Sink(Protocol):
    async def ensure_schema(self) -> list[str]: ...
    async def write(self, work: Work, *, returning: bool) -> tuple[int, set[str]]: ...
    async def write_dead_letter(self, work: Work, reason: str, sqlstate: str | None) -> None: ...


class Classifier(Protocol):
    def __call__(self, exc: BaseException) -> str: ...


@dataclass(slots=True)
class FlushStats:
    """Counters read by the metrics collector at scrape time."""

    batches: int = 0
    events_inserted: int = 0
    events_duplicate: int = 0
    events_dead: int = 0
    retries: int = 0
    batch_sizes: list[int] = field(default_factory=list)
    durations: list[float] = field(default_factory=list)


class Flusher:
    def __init__(
        self,
        spool: Spool,
        sink: Sink,
        *,
        limits: Limits,
        lanes: int,
        retry_max: float,
        memory_bytes: int,
        classify: Classifier,
        describe: Callable[[BaseException], str],
        observe: Callable[[int, float, int], None] | None = None,
        tracing: Tracing | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.spool = spool
        self.sink = sink
        self.limits = limits
        self.lanes = lanes
        self.retry_max = retry_max
        self.memory_bytes = memory_bytes
        self.classify = classify
        self.describe = describe
        self.observe = observe
        self.tracing = tracing or Tracing()
        self.clock = clock
        self.ring: deque[tuple[int, SpoolRecord, int]] = deque()
        self.ring_bytes = 0
        self.flush_pos = spool.cursor + 1  # next sequence number to gather
        self.committed_seq = spool.cursor
        self._data = asyncio.Event()
        self._waiters: list[tuple[int, int, asyncio.Future[set[str] | None]]] = []
        self._waiter_serial = 0
        self._task: asyncio.Task[None] | None = None
        self.stats = FlushStats()
        self.db_up: bool | None = None
        self.last_error: str | None = None
        self.last_progress = clock()
        self.last_flush_at: float | None = None
        self._window_ids: set[str] = set()
        self._window_dead = 0
        self._window_returning = False
        spool.on_durable = self.offer  # type: ignore[assignment]

    # ---------------------------------------------------------------- intake side

    def offer(self, seq: int, record: SpoolRecord, nbytes: int) -> None:
        """A record that just became durable (the spool calls this in sequence order).

        Kept in memory if it extends the ring and fits; otherwise the flusher will read it
        from the spool when it gets there.
        """
        if self.spool.written_seq <= self.committed_seq:
            # Nothing was waiting: the stall clock starts now, not at the last commit.
            self.last_progress = self.clock()
        ring = self.ring
        expected = ring[-1][0] + 1 if ring else self.flush_pos
        # Decoded rows (tuples, strings, datetimes) take about 2.5 times their msgpack size.
        cost = nbytes * 5 // 2
        if seq == expected and self.ring_bytes + cost <= self.memory_bytes:
            ring.append((seq, record, cost))
            self.ring_bytes += cost
        self._data.set()

    def notify(self) -> None:
        self._data.set()

    async def wait_committed(self, seq: int) -> set[str] | None:
        """Wait until ``seq`` is in PostgreSQL. Returns the ids that were new in its window,
        when the flusher tracked them for this waiter; None if it was committed earlier."""
        if seq <= self.committed_seq:
            return None
        fut: asyncio.Future[set[str] | None] = asyncio.get_running_loop().create_future()
        self._waiter_serial += 1
        heapq.heappush(self._waiters, (seq, self._waiter_serial, fut))
        return await fut

    @property
    def backlog(self) -> int:
        """Records written to the spool and not yet committed."""
        return max(0, self.spool.written_seq - self.committed_seq)

    def stalled_for(self) -> float:
        """Seconds without progress while records wait (0 when nothing waits)."""
        if self.backlog == 0:
            return 0.0
        return self.clock() - self.last_progress

    # ---------------------------------------------------------------- lifecycle

    def start(self) -> None:
        self.last_progress = self.clock()
        self._task = asyncio.create_task(self._run(), name="flux-flusher")

    async def stop(self) -> None:
        task, self._task = self._task, None
        if task is not None:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
        for _, _, fut in self._waiters:
            if not fut.done():
                fut.cancel()
        self._waiters.clear()

    async def drain(self, timeout: float) -> bool:
        """Flush what is spooled now, for at most ``timeout`` seconds. True if all landed."""
        await self.spool.written()  # records appended a moment ago count too
        target = self.spool.written_seq
        if target <= self.committed_seq:
            return True
        try:
            await asyncio.wait_for(self.wait_committed(target), timeout)
        except TimeoutError:
            return False
        return True

    # ---------------------------------------------------------------- the loop

    async def _run(self) -> None:
        gather = asyncio.create_task(self._gather())
        try:
            while True:
                batch = await gather
                # Gather the next window while this one is written: overlaps spool reads and
                # decoding with PostgreSQL's work. Order is kept: windows commit one by one.
                gather = asyncio.create_task(self._gather())
                started = self.clock()
                if self.tracing.enabled:
                    with self.tracing.flush(batch.event_rows, _span_ids(batch)):
                        inserted = await self._deliver(batch)
                else:
                    inserted = await self._deliver(batch)
                await self._committed(batch, inserted, self.clock() - started)
        finally:
            gather.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await gather

    async def _gather(self) -> Batch:
        batcher = Batcher(self.limits, self.clock)
        while True:
            self._data.clear()
            await self._pull(batcher)
            if batcher.full:
                break
            if batcher.empty:
                await self._data.wait()
                continue
            wait = batcher.due_in()
            if wait <= 0:
                break
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._data.wait(), wait)
        return batcher.take()

    async def _pull(self, batcher: Batcher) -> None:
        """Move available records into the batch, from memory when possible."""
        ring = self.ring
        while not batcher.full:
            while ring and ring[0][0] < self.flush_pos:  # already read from the spool
                self.ring_bytes -= ring.popleft()[2]
            if ring and (ring[0][0] == self.flush_pos or self.flush_pos > self.spool.written_seq):
                seq, record, nbytes = ring.popleft()
                self.ring_bytes -= nbytes
                batcher.add(seq, record, nbytes)
                self.flush_pos = seq + 1
            elif self.flush_pos <= self.spool.written_seq:
                room = max(64 * 1024, self.limits.max_bytes - batcher.batch.nbytes)
                records = await self.spool.read(self.flush_pos, room)
                if not records:
                    # Cannot happen while segments are only removed behind the cursor; if it
                    # does, stall loudly (readiness fails) rather than skip acknowledged data.
                    log.error("spool: records %d..%d could not be read; retrying",
                              self.flush_pos, self.spool.written_seq)
                    await asyncio.sleep(1.0)
                    return
                for seq, payload in records:
                    batcher.add(seq, record_decoder.decode(payload), len(payload))
                    self.flush_pos = seq + 1
            else:
                return

    async def _deliver(self, batch: Batch) -> int:
        lanes = [work for work in split_lanes(batch, self.lanes) if len(work)]
        returning = bool(self._waiters) and self._waiters[0][0] <= batch.last_seq
        inserted = 0
        self._window_ids = set()
        self._window_dead = 0
        self._window_returning = returning
        attempt = 0
        while lanes:
            results = await asyncio.gather(
                *(self._write_lane(work, returning) for work in lanes), return_exceptions=True
            )
            failed: list[Work] = []
            error: BaseException | None = None
            for work, result in zip(lanes, results, strict=True):
                if isinstance(result, BaseException):
                    if not isinstance(result, Exception):
                        raise result  # cancellation and the like
                    failed.append(work)
                    error = result
                else:
                    inserted += result
            lanes = failed
            if error is not None:
                attempt += 1
                self.stats.retries += 1
                self.db_up = False
                self.last_error = self.describe(error)
                # Log the first failure, then sparsely: an outage must not flood the log.
                if attempt == 1 or attempt & (attempt - 1) == 0:
                    log.warning("flush failed; retrying with backoff",
                                extra={"fields": {"attempt": attempt, "error": self.last_error,
                                                  "backlog_records": self.backlog}})
                await asyncio.sleep(self._backoff(attempt))
        if attempt:
            log.info("flush recovered", extra={"fields": {"attempts": attempt}})
        self.db_up = True
        return inserted

    def _backoff(self, attempt: int) -> float:
        delay = min(self.retry_max, 0.1 * 2 ** min(attempt - 1, 20))
        return float(delay / 2 + random.uniform(0, delay / 2))

    async def _write_lane(self, work: Work, returning: bool) -> int:
        await self.sink.ensure_schema()
        try:
            inserted, ids = await self.sink.write(work, returning=returning)
        except Exception as exc:
            if self.classify(exc) != "poison":
                raise
            return await self._isolate(work, exc, returning)
        self._window_ids |= ids
        return inserted

    async def _isolate(self, work: Work, exc: BaseException, returning: bool) -> int:
        """Bisect refused work until each refused item stands alone; dead-letter those."""
        if len(work) == 1:
            reason = self.describe(exc)
            await self.sink.write_dead_letter(work, reason, getattr(exc, "sqlstate", None))
            if work.events:
                self.stats.events_dead += 1
                self._window_dead += 1
            what = work.events[0][1] if work.events else "audit entry"
            log.error("PostgreSQL refused an item; stored as a dead letter",
                      extra={"fields": {"event_id": what, "reason": reason}})
            return 0
        inserted = 0
        for half in work.halves():
            if not len(half):
                continue
            try:
                n, ids = await self.sink.write(half, returning=returning)
            except Exception as sub:
                if self.classify(sub) != "poison":
                    raise
                n = await self._isolate(half, sub, returning)
            else:
                self._window_ids |= ids
            inserted += n
        return inserted

    async def _committed(self, batch: Batch, inserted: int, elapsed: float) -> None:
        self.stats.batches += 1
        self.stats.events_inserted += inserted
        duplicates = max(0, batch.event_rows - inserted - self._window_dead)
        self.stats.events_duplicate += duplicates
        if self.observe is not None:
            self.observe(batch.event_rows, elapsed, duplicates)
        self.committed_seq = batch.last_seq
        self.last_progress = self.clock()
        self.last_flush_at = time.time()
        await self.spool.commit(batch.last_seq)
        # Waiters of this window learn which ids were new, if the insert reported them.
        ids = self._window_ids if self._window_returning else None
        first = batch.first_seq
        while self._waiters and self._waiters[0][0] <= batch.last_seq:
            seq, _, fut = heapq.heappop(self._waiters)
            if not fut.done():
                fut.set_result(ids if seq >= first else None)


def _span_ids(batch: Batch) -> Iterator[tuple[str | None, str | None]]:
    """The (trace, span) of every request whose events a window carries (for span links)."""
    for _, record in batch.records:
        if isinstance(record, EventsRecord | CheckpointRecord):
            for row in record.rows:
                yield row[TRACE_ID], row[SPAN_ID]
