"""Spool -> batches -> PostgreSQL: the flusher.

Records arrive in sequence order. When the flusher keeps up, they come from memory (the
spool hands over each record as it becomes durable); when it falls behind, or memory is
full, it reads them back from the spool.
Either way it delivers *windows*: consecutive records whose events are split over a few
lanes (connections) by run, committed in parallel, and only then is the spool cursor moved
past the window. A crash anywhere replays at most the last window, and PostgreSQL absorbs
the replay (``ON CONFLICT DO NOTHING``), so nothing is lost and nothing is doubled.

Visibility is a policy: a window closes when it is full, or ``max_age`` after its first
record, so a trickle of single events costs PostgreSQL one transaction per window, not one
per event. Whoever needs a record in PostgreSQL now (``Prefer: wait=committed``, a drain, a
read of one's own writes) asks for it with :meth:`Flusher.flush_now`, and the open window
closes at once. Small windows use one lane (one connection); only large ones are split.

Transient failures retry forever with exponential backoff and jitter while the spool keeps
the events. Rows PostgreSQL refuses for what they contain are isolated by bisection and
stored as dead letters; the rest of their batch lands. A spool that cannot be read for a
moment (no descriptors) is retried the same way: the flusher never stops by itself.

After a failover (the agent finds a different primary), :meth:`Flusher.replay` goes back over
the recently committed records the spool keeps; PostgreSQL absorbs what it already has.
"""

from __future__ import annotations

import asyncio
import contextlib
import heapq
import logging
import time
from collections import deque
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field

from ..core.errors import Fault, describe, fault_of
from ..core.event import SpoolRecord, decode_record, items
from ..core.files import reason
from ..core.retry import backoff
from ..obs.tracing import Tracing
from ..spool import Spool
from .batch import Batch, Batcher, Limits, Work, split_lanes
from .writer import Writer, Written

log = logging.getLogger("flux_agent.flush")

# Windows smaller than this go to one lane: one connection, one transaction per flush.
LANE_SPLIT_MIN = 512


class CommitPending(Exception):
    """Delivered to an aggregator, which holds it durably, but not yet in PostgreSQL."""


@dataclass(slots=True)
class FlushStats:
    """Counters read by the metrics collector at scrape time."""

    batches: int = 0
    events_inserted: int = 0
    events_duplicate: int = 0
    events_dead: int = 0
    retries: int = 0
    read_errors: int = 0
    replays: int = 0  # failover replays started
    events_restored: int = 0  # replayed events the new primary did not have
    batch_sizes: list[int] = field(default_factory=list)
    durations: list[float] = field(default_factory=list)


class Flusher:
    def __init__(
        self,
        spool: Spool,
        sink: Writer,
        *,
        limits: Limits,
        lanes: int,
        retry_max: float,
        memory_bytes: int,
        replay_window: float = 0.0,
        on_progress: Callable[[], None] | None = None,
        classify: Callable[[BaseException], Fault] = fault_of,
        describe: Callable[[BaseException], str] = describe,
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
        self.replay_window = replay_window  # seconds of committed records a failover replays
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
        self._urgent_until = 0  # a window holding records up to this closes at once
        self._replay_from: int | None = None
        self._replay_until = 0  # windows ending at or below this are a failover replay
        self._delivering = False
        self._offered = 0  # items offered since the gatherer last looked
        self._wake_after = 1  # ...and how many it waits for before it wants to look again
        # (seq, serial, future, wants the ids and PostgreSQL itself)
        self._waiters: list[tuple[int, int, asyncio.Future[set[str] | None], bool]] = []
        self._waiter_serial = 0
        self._task: asyncio.Task[None] | None = None
        self.stats = FlushStats()
        self.last_error: str | None = None
        self.on_progress = on_progress  # the supervisor's ok()
        self.last_progress = clock()
        self.last_flush_at: float | None = None
        self._window_ids: set[str] = set()
        self._window_dead = 0
        self._window_returning = False
        self._window_pending = False  # the upstream holds the window, not yet PostgreSQL

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
        # Wake the gatherer only when it has something to do: a first record (its window's
        # age starts), or enough to fill the window. Waking it for every record would cost
        # a timer and a task switch per request for nothing.
        self._offered += items(record)  # as the window's limit counts them
        if self._offered >= self._wake_after:
            self._data.set()

    def flush_now(self, seq: int | None = None) -> None:
        """Close the window holding ``seq`` (default: everything appended so far) at once
        instead of at its age limit."""
        target = self.spool.next_seq - 1 if seq is None else seq
        if target > self._urgent_until:
            self._urgent_until = target
        self._data.set()

    async def wait_committed(self, seq: int, *, in_database: bool = False) -> set[str] | None:
        """Wait until ``seq`` is delivered upstream, flushing now rather than at the window's
        age. ``in_database`` (``Prefer: wait=committed``): in PostgreSQL itself, also when
        the upstream is an aggregator, and the ids new in its window returned when the
        flusher tracked them for this waiter (None if it was committed earlier); an
        aggregator that holds the window but could not commit it in time raises
        :class:`CommitPending`. Drains and reads need only the upstream's durability."""
        if seq <= self.committed_seq:
            return None
        fut: asyncio.Future[set[str] | None] = asyncio.get_running_loop().create_future()
        self._waiter_serial += 1
        heapq.heappush(self._waiters, (seq, self._waiter_serial, fut, in_database))
        self.flush_now(seq)
        return await fut

    def replay(self, from_seq: int) -> None:
        """Deliver again, from ``from_seq``, records already committed (after a failover)."""
        if from_seq > self.committed_seq:
            return
        self._replay_from = from_seq if self._replay_from is None else min(
            self._replay_from, from_seq)
        self.stats.replays += 1
        log.warning("replaying committed events to the new primary", extra={"fields": {
            "from_seq": from_seq, "to_seq": self.committed_seq,
            "records": self.committed_seq - from_seq + 1}})
        self._data.set()

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
        """Run in a task of its own (embedders and tests; the agent supervises ``run``)."""
        self._task = asyncio.create_task(self.run(), name="flux-flusher")

    async def stop(self) -> None:
        task, self._task = self._task, None
        if task is not None:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
        self.cancel_waiters()

    def cancel_waiters(self) -> None:
        for _, _, fut, _ in self._waiters:
            if not fut.done():
                fut.cancel()
        self._waiters.clear()

    async def drain(self, timeout: float) -> bool:
        """Flush what is spooled now, for at most ``timeout`` seconds. True if all landed."""
        await self.spool.written()  # records appended a moment ago count too
        target = self.spool.written_seq
        if target <= self.committed_seq:
            return True
        self.flush_now()
        try:
            await asyncio.wait_for(self.wait_committed(target), timeout)
        except TimeoutError:
            return False
        return True

    # ---------------------------------------------------------------- the loop

    async def run(self) -> None:
        """The flush loop; restartable: a new run starts from the committed position."""
        await self.spool.recovered.wait()  # a spool on a full disk may recover late
        self.committed_seq = max(self.committed_seq, self.spool.cursor)
        self.flush_pos = self.committed_seq + 1
        self.last_progress = self.clock()
        self._delivering = False
        gather = asyncio.create_task(self._gather())
        try:
            while True:
                batch = await gather
                # Gather the next window while this one is written: overlaps spool reads and
                # decoding with PostgreSQL's work. Order is kept: windows commit one by one.
                gather = asyncio.create_task(self._gather())
                started = self.clock()
                self._delivering = True
                try:
                    if self.tracing.enabled:
                        with self.tracing.flush(batch.event_rows, _span_ids(batch)):
                            inserted = await self._deliver(batch)
                    else:
                        inserted = await self._deliver(batch)
                finally:
                    self._delivering = False
                await self._committed(batch, inserted, self.clock() - started)
                if self._replay_from is not None:
                    # Start over from the replay point: the window gathered meanwhile is
                    # dropped (its records are on the spool and come round again).
                    gather.cancel()
                    try:
                        await gather
                    except asyncio.CancelledError:
                        # The window's, as asked; unless the flusher itself is being
                        # stopped meanwhile: that one must not be swallowed here.
                        me = asyncio.current_task()
                        if me is not None and me.cancelling():
                            raise
                    self._start_replay()
                    gather = asyncio.create_task(self._gather())
        finally:
            gather.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await gather

    def _start_replay(self) -> None:
        assert self._replay_from is not None
        self.flush_pos = self._replay_from
        self._replay_until = max(self._replay_until, self.committed_seq)
        self._urgent_until = max(self._urgent_until, self._replay_until)  # no age wait
        self._replay_from = None

    async def _gather(self) -> Batch:
        batcher = Batcher(self.limits, self.clock)
        while True:
            self._data.clear()
            if self._replay_from is not None and batcher.empty and not self._delivering:
                self._start_replay()  # idle: start now (else run() does, after the window)
            self._offered = 0
            await self._pull(batcher)
            if batcher.full:
                break
            if batcher.empty:
                self._wake_after = 1
                await self._data.wait()
                continue
            urgent = self._urgent_until >= batcher.batch.first_seq
            wait = 0.0 if urgent else batcher.due_in()
            if wait <= 0:
                break
            # Until the window is due, wake for nothing but enough records to fill it (or
            # someone asking for a flush, or a replay: those set the event themselves).
            self._wake_after = max(1, self.limits.max_events - batcher.batch.events)
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._data.wait(), wait)
        self._wake_after = 1 << 62  # while the window is written, the next gather decides
        return batcher.take()

    async def _pull(self, batcher: Batcher) -> None:
        """Move available records into the batch, from memory when possible. A replay's
        windows end at the replayed range, so what they restore is counted as such."""
        ring = self.ring
        replaying = self.flush_pos <= self._replay_until
        while not batcher.full:
            if replaying and self.flush_pos > self._replay_until:
                return
            while ring and ring[0][0] < self.flush_pos:  # already read from the spool
                self.ring_bytes -= ring.popleft()[2]
            if ring and (ring[0][0] == self.flush_pos or self.flush_pos > self.spool.written_seq):
                if replaying and ring[0][0] > self._replay_until:
                    return
                seq, record, nbytes = ring.popleft()
                self.ring_bytes -= nbytes
                batcher.add(seq, record, nbytes)
                self.flush_pos = seq + 1
            elif self.flush_pos <= self.spool.written_seq:
                room = max(64 * 1024, self.limits.max_bytes - batcher.batch.nbytes)
                try:
                    records = await self.spool.read(self.flush_pos, room)
                except OSError as exc:
                    # No descriptor to open a segment with (EMFILE), a failing device: the
                    # records are still there; try again shortly, and say so.
                    self.stats.read_errors += 1
                    self.last_error = f"spool read: {reason(exc)}"
                    if self.stats.read_errors & (self.stats.read_errors - 1) == 0:
                        log.warning("spool read failed; retrying", extra={"fields": {
                            "error": reason(exc), "failures": self.stats.read_errors}})
                    await asyncio.sleep(0.5)
                    return
                if not records:
                    # Cannot happen while segments are only removed behind the cursor; if it
                    # does, stall loudly (readiness fails) rather than skip acknowledged data.
                    log.error("spool: records %d..%d could not be read; retrying",
                              self.flush_pos, self.spool.written_seq)
                    await asyncio.sleep(1.0)
                    return
                for seq, payload in records:
                    if replaying and seq > self._replay_until:
                        return
                    batcher.add(seq, decode_record(payload), len(payload))
                    self.flush_pos = seq + 1
            else:
                return

    async def _deliver(self, batch: Batch) -> int:
        n_lanes = self.lanes if batch.events >= LANE_SPLIT_MIN else 1
        lanes = [work for work in split_lanes(batch, n_lanes) if len(work)]
        returning = any(w[3] and w[0] <= batch.last_seq for w in self._waiters)
        inserted = 0
        self._window_ids = set()
        self._window_dead = 0
        self._window_returning = returning
        self._window_pending = False
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
                self.last_error = self.describe(error)
                # Log the first failure, then sparsely: an outage must not flood the log. A
                # failure that is not the database being away (a missing privilege, a bug)
                # is an error, with its traceback the first time.
                if attempt == 1 or attempt & (attempt - 1) == 0:
                    fields = {"attempt": attempt, "error": self.last_error,
                              "backlog_records": self.backlog}
                    if self.classify(error) is Fault.TRANSIENT:
                        log.warning("flush failed; retrying with backoff",
                                    extra={"fields": fields})
                    else:
                        log.error("flush failed (not a database outage); retrying",
                                  exc_info=error if attempt == 1 else None,
                                  extra={"fields": fields})
                await asyncio.sleep(self._backoff(attempt))
        if attempt:
            log.info("flush recovered", extra={"fields": {"attempts": attempt}})
        return inserted

    def _backoff(self, attempt: int) -> float:
        return backoff(attempt, self.retry_max)

    async def _write_lane(self, work: Work, returning: bool) -> int:
        await self.sink.prepare()  # a no-op once done
        try:
            written = await self.sink.write(work, returning=returning)
        except Exception as exc:
            if self.classify(exc) is not Fault.POISON:
                raise
            return await self._isolate(work, exc, returning)
        return self._wrote(written)

    def _wrote(self, written: Written) -> int:
        self._window_ids |= written.new_ids
        self._window_pending |= written.pending
        if written.new_primary:
            self._new_primary()
        return written.inserted

    def _new_primary(self) -> None:
        """Committed to another primary than before: replay what it may lack."""
        if self.replay_window <= 0:
            log.warning("new PostgreSQL primary, and no failover window is kept "
                        "(FLUX_AGENT_SPOOL_KEEP_COMMITTED=0): nothing is replayed")
            return
        self.replay(self.spool.replay_start(self.replay_window))

    async def _isolate(self, work: Work, exc: BaseException, returning: bool) -> int:
        """Bisect refused work until each refused item stands alone; dead-letter those."""
        if len(work) == 1:
            reason = self.describe(exc)
            await self.sink.write_dead_letter(work, reason, getattr(exc, "code", None))
            if work.events:
                self.stats.events_dead += 1
                self._window_dead += 1
            what = work.events[0].event_id if work.events else (
                "checkpoint" if work.checkpoints else "audit entry")
            log.error("PostgreSQL refused an item; stored as a dead letter",
                      extra={"fields": {"event_id": what, "reason": reason}})
            return 0
        inserted = 0
        for half in work.halves():
            if not len(half):
                continue
            try:
                written = await self.sink.write(half, returning=returning)
            except Exception as sub:
                if self.classify(sub) is not Fault.POISON:
                    raise
                n = await self._isolate(half, sub, returning)
            else:
                n = self._wrote(written)
            inserted += n
        return inserted

    async def _committed(self, batch: Batch, inserted: int, elapsed: float) -> None:
        self.stats.batches += 1
        if batch.last_seq <= self._replay_until:
            # A failover replay: what was inserted had been lost by the new primary.
            self.stats.events_restored += inserted
            if inserted:
                log.warning("the new primary lacked committed events; restored them",
                            extra={"fields": {"events": inserted}})
        else:
            self.stats.events_inserted += inserted
            duplicates = max(0, batch.event_rows - inserted - self._window_dead)
            self.stats.events_duplicate += duplicates
            if self.observe is not None:
                self.observe(batch.event_rows, elapsed, duplicates)
        self.committed_seq = max(self.committed_seq, batch.last_seq)
        self.last_progress = self.clock()
        self.last_flush_at = time.time()
        if self.on_progress is not None:
            self.on_progress()
        await self.spool.commit(self.committed_seq)
        # Waiters of this window learn which ids were new, if the insert reported them.
        ids = self._window_ids if self._window_returning else None
        first = batch.first_seq
        while self._waiters and self._waiters[0][0] <= batch.last_seq:
            seq, _, fut, in_database = heapq.heappop(self._waiters)
            if fut.done():
                continue
            if in_database and self._window_pending and seq >= first:
                fut.set_exception(CommitPending())
            else:
                fut.set_result(ids if seq >= first else None)


def _span_ids(batch: Batch) -> Iterator[tuple[str | None, str | None]]:
    """The (trace, span) of every request whose events a window carries (for span links)."""
    for _, record in batch.records:
        for row in record.events():
            yield row.trace_id, row.span_id
