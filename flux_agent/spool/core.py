"""The Spool: appends with group commit on one I/O thread, the cursor, reads for the
flusher, and the disk probe while writes are refused."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import time
from collections import deque
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

from ..core.files import is_resource_error, lock_exclusive, reason
from ..obs.supervise import Supervisor, Task
from .errors import PROBE_INTERVAL_S, SpoolFull, SpoolUnavailable
from .format import (
    ReadHint,
    Segment,
    _fsync_dir,
    _read_records,
    _remove_segments,
    frame,
)
from .io import Group, SegmentWriter, Written
from .recovery import Recovery, recover

log = logging.getLogger("flux_agent.spool")

UNSYNCED_QUEUE_BYTES = 8 * 1024 * 1024  # durability "none": most bytes acknowledged unwritten




class Spool:
    """The durable write-ahead log between intake and the flusher."""

    def __init__(
        self,
        directory: Path,
        *,
        max_bytes: int,
        segment_bytes: int,
        fsync: bool = True,
        keep_committed: float = 0.0,
        supervisor: Supervisor | None = None,
        sync_log: Path | None = None,
    ) -> None:
        self.directory = directory
        self.max_bytes = max_bytes
        self.segment_bytes = segment_bytes
        self.fsync = fsync
        self.keep_committed = keep_committed
        self._on_recover_record: Callable[[int, bytes], None] | None = None
        self._sup = supervisor or Supervisor()
        self.segments: list[Segment] = []
        self.next_seq = 1
        self.written_seq = 0  # highest seq written to a segment file (maybe not yet synced)
        self.durable_seq = 0  # highest seq known synced (== written_seq without fsync)
        self.cursor = 0  # highest seq committed downstream
        self.recovery: Recovery | None = None  # set once recovery has run
        self.recovered = asyncio.Event()
        self._groups: deque[Group] = deque()  # waiting for or under write, oldest first
        self._pending: Group | None = None
        self._wake = asyncio.Event()
        self._io = ThreadPoolExecutor(1, thread_name_prefix="flux-spool-io")
        self._disk = SegmentWriter(directory, segment_bytes=segment_bytes, fsync=fsync)
        self._reader_pool = ThreadPoolExecutor(1, thread_name_prefix="flux-spool-read")
        self._lock_fd = -1
        self._closed = False
        self._opened = False
        self.broken: str | None = None  # why the disk refuses writes; cleared by a probe
        self.appended_bytes = 0
        self.write_errors = 0
        self.cursor_errors = 0
        self.corrupt_records = 0
        self.evicted_retained = 0  # committed segments dropped before their window ended
        self._disk_bytes = 0  # sum of segment sizes, kept current instead of summed per request
        self._retained_bytes = 0  # of those: committed, kept for the failover window
        self._queued_bytes = 0
        self._cursor_written_at = 0.0
        self._cursor_behind = False  # the last cursor write failed: retry at the next commit
        # (first seq, wall time) of writes, at most one per 100 ms: what the age of the
        # oldest unflushed record is computed from.
        self._marks: deque[tuple[int, float]] = deque()
        # (last committed seq, first and last wall time) of commits, one per second at
        # most: where a replay after a failover starts.
        self._commit_marks: deque[tuple[int, float, float]] = deque()
        self._read_hint: ReadHint | None = None
        self._sync_log = sync_log
        self._on_durable: Callable[[int, Any, int], None] | None = None

    # ---------------------------------------------------------------- lifecycle

    async def open(self, *, on_record: Callable[[int, bytes], None] | None = None,
                   on_durable: Callable[[int, Any, int], None] | None = None
                   ) -> Recovery | None:
        """Lock the directory and recover it; ``on_record`` sees each record recovery
        finds. From then on, ``on_durable`` is called in sequence order, on the event loop,
        for each record once it is written (and synced, with fsync): how the flusher gets
        records without reading them back. A full disk (or no descriptors) does not fail
        the start: the spool then refuses appends and keeps retrying in the background."""
        self._on_recover_record = on_record
        self._on_durable = on_durable
        loop = asyncio.get_running_loop()
        await loop.run_in_executor(self._io, self._lock)
        if self._sync_log is not None:
            self._disk.sync_log_fd = os.open(self._sync_log, os.O_WRONLY | os.O_CREAT | os.O_APPEND,
                                        0o600)
        try:
            await self._run_recovery()
            # Room for the first appends? A start on a full disk is unready at once, not at
            # its first refused request.
            await loop.run_in_executor(self._io, self._disk.probe_room)
        except OSError as exc:
            if not is_resource_error(exc):
                raise
            self.broken = (reason(exc) if self.recovery is not None
                           else f"recovery deferred: {reason(exc)}")
            log.error("the spool cannot be written; the agent answers 503 until it can",
                      extra={"fields": {"directory": str(self.directory),
                                        "error": reason(exc)}})
        self._opened = True
        self._sup.start(Task.SPOOL_COMMIT, self._commit_loop)
        return self.recovery

    async def close(self) -> None:
        """Write and sync what is queued, persist the cursor, release the directory."""
        if self._closed:
            return
        self._closed = True
        self._wake.set()
        if self._opened:
            await self._sup.wait(Task.SPOOL_COMMIT, timeout=30)
        loop = asyncio.get_running_loop()
        await loop.run_in_executor(self._io, self._close_files)
        for pool in (self._io, self._reader_pool):  # joining threads blocks: not on the loop
            await loop.run_in_executor(None, pool.shutdown, True)

    def _lock(self) -> None:
        d = self.directory
        d.mkdir(parents=True, exist_ok=True, mode=0o700)
        self._lock_fd = lock_exclusive(d / "LOCK", f"the spool at {d}")

    def _close_files(self) -> None:
        for seg in self.segments:
            if seg.fd >= 0:
                with contextlib.suppress(OSError):
                    if self.fsync:
                        os.fdatasync(seg.fd)
                os.close(seg.fd)
                seg.fd = -1
        if self.recovery is not None:
            try:
                self._disk.write_cursor(self.cursor, sync=True)
            except OSError as exc:  # replays a little more on the next start; loses nothing
                log.warning("spool cursor not saved at close",
                            extra={"fields": {"error": reason(exc)}})
        for fd in (self._lock_fd, self._disk.sync_log_fd):
            if fd >= 0:
                os.close(fd)
        self._lock_fd = self._disk.sync_log_fd = -1

    # ---------------------------------------------------------------- recovery (I/O thread)

    async def _run_recovery(self) -> None:
        loop = asyncio.get_running_loop()
        recovery, kept = await loop.run_in_executor(self._io, self._recover, loop)
        # The bookkeeping changes here, on the loop (a deferred recovery runs while the
        # agent serves, and its probes and metrics read it).
        self.segments = kept
        self.cursor = recovery.cursor
        self.next_seq = recovery.next_seq
        self.written_seq = self.durable_seq = recovery.next_seq - 1
        self._disk_bytes = sum(seg.size for seg in kept)
        self._retained_bytes = sum(seg.size for seg in kept if seg.spent_at is not None)
        self._marks.clear()
        for seg in kept:
            if seg.last_seq > self.cursor:  # recovered records: their segment's age
                self._marks.append((max(seg.first_seq, self.cursor + 1), seg.created))
        self.recovery = recovery
        self.recovered.set()

    def _recover(self, loop: asyncio.AbstractEventLoop) -> tuple[Recovery, list[Segment]]:
        """I/O thread: recover the directory (see :func:`recover`). Re-runnable: a resource
        error anywhere leaves the directory as it was."""
        rec, kept = recover(self.directory, loop, keep_committed=self.keep_committed,
                            on_record=self._on_recover_record)
        # The next append opens a fresh segment (appends never extend a recovered one), and
        # only then: a full disk must not stop the agent from flushing what it holds.
        _fsync_dir(self.directory)
        return rec, kept

    # ---------------------------------------------------------------- appending (event loop)

    @property
    def bytes_used(self) -> int:
        """Bytes that count against the capacity: records not yet committed (on disk or
        queued). Committed segments kept for the failover window give way when needed."""
        return self._disk_bytes - self._retained_bytes + self._queued_bytes

    def check_room(self, nbytes: int) -> None:
        """Raise SpoolFull / SpoolUnavailable unless ``nbytes`` more can be accepted."""
        if self._closed:
            raise SpoolUnavailable("the agent is shutting down")
        if self.broken:
            raise SpoolUnavailable(self.broken)
        used = self.bytes_used
        if used + nbytes > self.max_bytes:
            raise SpoolFull(used, self.max_bytes)

    def append(self, payload: bytes, record: object = None) -> tuple[int, asyncio.Future[int]]:
        """Queue one record; returns its seq and a future resolved once it is durable.

        ``record`` (the decoded form of ``payload``) is handed to ``on_durable`` then.
        """
        seq = self.next_seq
        self.next_seq += 1
        data = frame(seq, payload)
        group = self._pending
        if group is None:
            fut: asyncio.Future[int] = asyncio.get_running_loop().create_future()
            group = self._pending = Group([], 0, seq, seq, fut, [])
        group.frames.append(data)
        group.nbytes += len(data)
        self._queued_bytes += len(data)
        group.last_seq = seq
        if record is not None:
            group.items.append((seq, record, len(payload)))
        self.appended_bytes += len(data)
        self._wake.set()
        # Without fsync the answer does not wait for the disk, unless writing falls behind by
        # more than a few MiB: then it waits like fsync would, so memory stays bounded.
        if not self.fsync and self._queued_bytes <= UNSYNCED_QUEUE_BYTES:
            done: asyncio.Future[int] = asyncio.get_running_loop().create_future()
            done.set_result(seq)
            return seq, done
        return seq, group.future

    async def _commit_loop(self) -> None:
        """Writes queued groups one at a time; while the disk refuses writes, probes it."""
        loop = asyncio.get_running_loop()
        while True:
            if self._pending is None:
                if self._closed:
                    return
                if self.broken is not None:
                    await self._probe()
                    if self.broken is not None:
                        with contextlib.suppress(TimeoutError):
                            await asyncio.wait_for(self._wake.wait(), PROBE_INTERVAL_S)
                        self._wake.clear()
                    continue
                await self._wake.wait()
                self._wake.clear()
                continue
            group, self._pending = self._pending, None
            self._groups.append(group)
            try:
                written = await loop.run_in_executor(self._io, self._disk.write_group, group,
                                                     self._active())
            except OSError as exc:
                self.write_errors += 1
                why = reason(exc)
                if self.broken is None:
                    log.error("spool write failed; requests answered 503 until the disk "
                              "recovers", extra={"fields": {"error": why}})
                    self.broken = why
                if not group.future.done():
                    group.future.set_exception(SpoolUnavailable(why))
                    group.future.exception()  # a failure nobody awaits is still handled
            else:
                self._apply(written, group)
                if self.broken is not None and self.recovery is not None:
                    log.info("spool writable again; intake reopened")
                    self.broken = None
            finally:
                self._queued_bytes -= group.nbytes
                self._groups.popleft()

    def _active(self) -> Segment | None:
        seg = self.segments[-1] if self.segments else None
        return seg if seg is not None and seg.fd >= 0 else None

    def _apply(self, written: Written, group: Group) -> None:
        if written.opened is not None:
            self.segments.append(written.opened)
        seg = self.segments[-1]
        seg.size = written.size
        seg.last_seq = group.last_seq
        self._disk_bytes += written.grown
        if self._on_durable is not None:
            for seq, record, nbytes in group.items:
                try:
                    self._on_durable(seq, record, nbytes)
                except Exception:
                    log.exception("spool: on_durable callback failed")
                    break
        self.written_seq = self.durable_seq = group.last_seq
        now = time.time()
        if not self._marks or now - self._marks[-1][1] >= 0.1:
            self._marks.append((group.first_seq, now))
        if not group.future.done():
            group.future.set_result(group.last_seq)

    async def _probe(self) -> None:
        """While broken: retry a deferred recovery, or check that the disk has room and a
        descriptor to spare; clear the broken state when it does."""
        loop = asyncio.get_running_loop()
        try:
            if self.recovery is None:
                await self._run_recovery()
            else:
                # A full disk takes back the committed segments kept for failover first.
                spent = self._evict_retained(all_of_them=True)
                if spent:
                    await loop.run_in_executor(self._io, _remove_segments, spent)
                await loop.run_in_executor(self._io, self._disk.probe_room)
        except OSError as exc:
            self.broken = (f"recovery deferred: {reason(exc)}" if self.recovery is None
                           else reason(exc))
            return
        log.info("spool writable again; intake reopened",
                 extra={"fields": {"directory": str(self.directory)}})
        self.broken = None

    # ---------------------------------------------------------------- reading (flusher)

    async def read(self, from_seq: int, max_bytes: int) -> list[tuple[int, bytes]]:
        """Records with seq >= ``from_seq`` (in order, about ``max_bytes`` at most)."""
        targets = [(s.path, s.size) for s in self.segments
                   if s.last_seq >= from_seq and s.last_seq >= s.first_seq]
        if not targets:
            return []
        hint = self._read_hint if self._read_hint and self._read_hint[1] == from_seq else None
        loop = asyncio.get_running_loop()
        records, self._read_hint, corrupt = await loop.run_in_executor(
            self._reader_pool, _read_records, targets, from_seq, max_bytes,
            self.written_seq, hint,
        )
        self.corrupt_records += corrupt
        return records

    # ---------------------------------------------------------------- cursor and cleanup

    async def commit(self, seq: int) -> None:
        """Everything up to ``seq`` is in PostgreSQL: move the cursor, drop spent segments.

        Never raises for the disk: the cursor only saves replay work, so a cursor that
        cannot be written (a full disk, no descriptors) is retried at the next commit."""
        if seq <= self.cursor:
            return
        self.cursor = seq
        now = time.time()
        marks = self._commit_marks
        if marks and now - marks[-1][1] < 1.0:
            marks[-1] = (seq, marks[-1][1], now)
        else:
            marks.append((seq, now, now))
        while len(marks) > 1 and now - marks[1][2] > self.keep_committed + 60:
            marks.popleft()
        for seg in self.segments[:-1]:
            if seg.spent_at is None and seg.last_seq <= seq:
                seg.spent_at = now
                self._retained_bytes += seg.size
        spent = self._evict_retained()
        # The cursor is written at most every 200 ms (and whenever segments go): commits
        # of small windows stay cheap.
        mono = time.monotonic()
        if not spent and not self._cursor_behind and mono - self._cursor_written_at < 0.2:
            return
        self._cursor_written_at = mono
        loop = asyncio.get_running_loop()
        try:
            await loop.run_in_executor(self._io, self._apply_commit, seq, spent)
        except OSError as exc:
            self.cursor_errors += 1
            if not self._cursor_behind:
                log.warning("spool cursor not saved (a restart replays a little more)",
                            extra={"fields": {"error": reason(exc)}})
            self._cursor_behind = True
        else:
            if self._cursor_behind:
                log.info("spool cursor saved again")
            self._cursor_behind = False

    def _evict_retained(self, *, all_of_them: bool = False) -> list[Segment]:
        """Drop committed segments whose failover window has passed, or that the capacity
        (or a full disk, ``all_of_them``) needs back, oldest first."""
        now = time.time()
        spent: list[Segment] = []
        for seg in list(self.segments[:-1]):
            if seg.spent_at is None:
                continue
            expired = now - seg.spent_at >= self.keep_committed
            crowded = all_of_them or self._disk_bytes + self._queued_bytes > self.max_bytes
            if not (expired or crowded):
                continue
            if not expired:
                self.evicted_retained += 1
            self.segments.remove(seg)
            self._disk_bytes -= seg.size
            self._retained_bytes -= seg.size
            spent.append(seg)
        return spent

    def _apply_commit(self, seq: int, spent: list[Segment]) -> None:
        # Segments are removed only after their records are committed, so a lost cursor
        # never loses data: it only means a replay that PostgreSQL absorbs idempotently.
        _remove_segments(spent)
        self._disk.write_cursor(seq, sync=False)

    def replay_start(self, window: float) -> int:
        """The first seq committed within the last ``window`` seconds that is still on
        disk: where a replay starts after the agent finds itself on a new primary."""
        now = time.time()
        start = self.cursor + 1
        previous = 0
        for seq, _, last_at in self._commit_marks:
            if now - last_at <= window:
                start = previous + 1
                break
            previous = seq
        if not self._commit_marks:  # restarted since: every committed record kept
            start = 1
        oldest = next((s.first_seq for s in self.segments if s.last_seq >= s.first_seq),
                      self.cursor + 1)
        return min(max(start, oldest), self.cursor + 1)

    # ---------------------------------------------------------------- state for metrics

    @property
    def syncs(self) -> int:
        """fdatasync calls for appended data (group commit shares them)."""
        return self._disk.syncs

    @property
    def retained_bytes(self) -> int:
        return self._retained_bytes

    @property
    def pending_records(self) -> int:
        return max(0, self.written_seq - self.cursor)

    def oldest_unflushed_age(self, now: float | None = None) -> float:
        """Seconds since the oldest record not yet in PostgreSQL was written (0 if none)."""
        oldest = self.cursor + 1
        if oldest > self.written_seq:
            return 0.0
        marks = self._marks
        while len(marks) > 1 and marks[1][0] <= oldest:
            marks.popleft()
        if not marks:
            return 0.0
        now = time.time() if now is None else now
        return max(0.0, now - marks[0][1])

    async def written(self) -> None:
        """Wait until every record appended so far has been written (or failed to be)."""
        pending = [g.future for g in self._groups]
        if self._pending is not None:
            pending.append(self._pending.future)
        for fut in pending:
            with contextlib.suppress(Exception):
                await asyncio.shield(fut)

