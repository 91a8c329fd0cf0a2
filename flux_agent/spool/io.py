"""The spool's writes on its I/O thread: segments opened with their header synced, groups
appended and made durable with nothing partial left behind, the cursor file, the disk probe.
Touches descriptors and files only; the event loop applies the bookkeeping it returns."""

from __future__ import annotations

import asyncio
import contextlib
import errno
import os
import time
from dataclasses import dataclass
from pathlib import Path

from ..core.files import write_atomic
from .format import CURSOR, SEQ, Segment, _fsync_dir, crc32c, segment_header, segment_name

PROBE_BYTES = 1024 * 1024  # room a probe must find before intake reopens


@dataclass(slots=True)
class Group:
    frames: list[bytes]
    nbytes: int
    first_seq: int
    last_seq: int
    future: asyncio.Future[int]
    items: list[tuple[int, object, int]]  # (seq, decoded record, bytes) for on_durable


@dataclass(slots=True)
class Written:
    """What the I/O thread did for one group, applied to the bookkeeping on the loop."""

    opened: Segment | None  # a new active segment
    size: int  # the active segment's size afterwards
    grown: int  # bytes the spool grew by


class SegmentWriter:
    def __init__(self, directory: Path, *, segment_bytes: int, fsync: bool) -> None:
        self.directory = directory
        self.segment_bytes = segment_bytes
        self.fsync = fsync
        self.syncs = 0  # fdatasync calls for appended data (group commit shares them)
        self.sync_log_fd = -1  # testing: what a power loss would keep

    def open_segment(self, first_seq: int) -> Segment:
        """A new segment with its header synced; no partial file is left if that fails."""
        path = self.directory / segment_name(first_seq)
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_APPEND, 0o600)
        header = segment_header(first_seq)
        try:
            os.write(fd, header)
            if self.fsync:
                self.datasync(fd, path, len(header))
            _fsync_dir(self.directory)
        except BaseException:
            os.close(fd)
            path.unlink(missing_ok=True)
            raise
        return Segment(path, first_seq, first_seq - 1, len(header), time.time(), fd)

    def datasync(self, fd: int, path: Path, size: int) -> None:
        """fdatasync, and (testing only) record what is now really on disk: what a power
        loss would keep. One call does both, so the record cannot outlive the sync."""
        os.fdatasync(fd)
        if self.sync_log_fd >= 0:
            os.write(self.sync_log_fd, f"{path.name} {size}\n".encode())

    def write_group(self, group: Group, seg: Segment | None) -> Written:
        """I/O thread: append the group to the active segment and make it durable. Touches
        descriptors and files only; the loop applies the returned bookkeeping."""
        opened = None
        grown = 0
        if seg is not None and seg.size + group.nbytes > self.segment_bytes \
                and seg.last_seq >= seg.first_seq:
            if self.fsync:
                os.fdatasync(seg.fd)
            os.close(seg.fd)
            seg.fd = -1
            seg = None
        if seg is None:
            seg = opened = self.open_segment(group.first_seq)
            grown += seg.size
        data = b"".join(group.frames)
        before = seg.size
        try:
            view = memoryview(data)
            while view:
                view = view[os.write(seg.fd, view):]
            if self.fsync:
                self.datasync(seg.fd, seg.path, before + len(data))
                self.syncs += 1
        except OSError:
            # Never leave a partial group behind: it was not acknowledged and must not be
            # mistaken for records on replay. If even that fails, start a fresh segment.
            try:
                os.ftruncate(seg.fd, before)
                if self.fsync:
                    os.fdatasync(seg.fd)
            except OSError:
                os.close(seg.fd)
                seg.fd = -1
            if opened is not None:
                # A segment created for this group holds nothing acknowledged: remove it.
                if opened.fd >= 0:
                    os.close(opened.fd)
                    opened.fd = -1
                opened.path.unlink(missing_ok=True)
            raise
        return Written(opened, before + len(data), grown + len(data))

    def probe_room(self) -> None:
        path = self.directory / ".probe"
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        try:
            try:
                os.posix_fallocate(fd, 0, PROBE_BYTES)
            except OSError as exc:
                if exc.errno not in (errno.EOPNOTSUPP, errno.EINVAL):
                    raise
                os.write(fd, bytes(PROBE_BYTES))
            os.fsync(fd)
        finally:
            os.close(fd)
            path.unlink(missing_ok=True)

    def write_cursor(self, seq: int, *, sync: bool) -> None:
        data = CURSOR.pack(seq, crc32c(SEQ.pack(seq)))
        if sync:
            write_atomic(self.directory / "cursor", data)
            return
        tmp = self.directory / "cursor.tmp"
        try:
            fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
            try:
                os.write(fd, data)
            finally:
                os.close(fd)
            os.replace(tmp, self.directory / "cursor")
        except BaseException:
            with contextlib.suppress(OSError):
                tmp.unlink()
            raise
