"""Recovery at start: scan every segment, cut a torn tail, set damaged segments aside.

The Spool runs :func:`recover` on its I/O thread and takes over the segments it returns;
the records not yet committed reach ``on_record`` on the event loop on the way.
"""

from __future__ import annotations

import asyncio
import errno
import logging
import os
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from ..core.files import is_resource_error, write_atomic
from .format import (
    HEADER,
    Scan,
    Segment,
    _fsync_dir,
    frame,
    iter_records,
    list_segments,
    path_mtime,
    read_cursor,
    scan_file,
    segment_header,
    segment_name,
)

log = logging.getLogger("flux_agent.spool")


@dataclass(slots=True)
class Recovery:
    """What recovery found; logged at start and exported as metrics."""

    segments: int = 0
    records: int = 0
    pending_records: int = 0
    torn_tails: int = 0
    quarantined: list[str] = field(default_factory=list)
    cursor: int = 0
    next_seq: int = 1


def recover(
    directory: Path,
    loop: asyncio.AbstractEventLoop,
    *,
    keep_committed: float,
    on_record: Callable[[int, bytes], None] | None,
) -> tuple[Recovery, list[Segment]]:
    """Scan every segment, cut torn tails, set damaged segments aside; returns what was
    found and the segments kept, oldest first. Re-runnable: a resource error anywhere
    leaves the directory as it was, to be tried again."""
    (directory / "quarantine").mkdir(exist_ok=True, mode=0o700)
    rec = Recovery(cursor=read_cursor(directory))
    segments: list[Segment] = []
    last_seq = 0
    paths = list_segments(directory)
    for path in unrelated(directory, paths):
        log.warning("spool: a file that is not the spool's is ignored", extra={"fields": {
            "path": str(path), "bytes": _size(path)}})
    for path in paths:
        rec.segments += 1
        try:
            scan, data = scan_file(path, after_seq=last_seq)
        except OSError as exc:
            if is_resource_error(exc) and exc.errno != errno.EIO:
                raise  # no descriptor to read it with: try again later
            log.error("spool: unreadable segment quarantined",
                      extra={"fields": {"path": str(path), "error": exc.strerror}})
            rec.quarantined.append(_quarantine(directory, path))
            continue
        newest = path == paths[-1]
        if newest and not scan.records and (scan.size <= HEADER.size or scan.header_ok):
            # A crash between creating the newest segment and its first record (or in
            # the middle of its header): nothing was ever acknowledged from it.
            path.unlink(missing_ok=True)
            if scan.size:
                rec.torn_tails += 1
            log.warning("spool: the newest segment holds no record; removed (a crash between "
                        "creating it and its first append)", extra={"fields": {
                            "path": str(path), "bytes": scan.size}})
            continue
        # Only the newest segment can end in an interrupted append; damage anywhere else
        # is corruption, and the file is kept aside for forensics.
        if scan.torn_tail_only and newest:
            with path.open("r+b") as fh:
                fh.truncate(scan.valid_end)
                os.fsync(fh.fileno())
            rec.torn_tails += 1
            log.warning("spool: torn tail cut off",
                        extra={"fields": {"path": str(path), "kept_bytes": scan.valid_end,
                                          "cut_bytes": scan.size - scan.valid_end}})
        elif scan.damage:
            rec.quarantined.append(_salvage(directory, path, scan, data))
            path = directory / segment_name(scan.first_seq)
        if not scan.records:
            path.unlink(missing_ok=True)
            log.warning("spool: a segment without any intact record removed",
                        extra={"fields": {"path": str(path), "bytes": scan.size}})
            continue
        pending = [(seq, payload) for seq, payload in iter_records(scan, data)
                   if seq > rec.cursor]
        rec.records += len(scan.records)
        rec.pending_records += len(pending)
        if pending and on_record is not None:
            # The callbacks touch the agent's indexes, which belong to the loop.
            asyncio.run_coroutine_threadsafe(_deliver(on_record, pending), loop).result()
        last_seq = scan.last_seq
        st = path.stat()
        segments.append(Segment(path, scan.first_seq, scan.last_seq, st.st_size,
                                scan.created_ms / 1000 or st.st_mtime))
    now = time.time()
    kept: list[Segment] = []
    delivered: list[str] = []
    for seg in segments:
        if seg.last_seq > rec.cursor:
            kept.append(seg)
        elif keep_committed and now - path_mtime(seg.path) < keep_committed:
            seg.spent_at = path_mtime(seg.path)  # committed, kept for a failover replay
            kept.append(seg)
        else:
            seg.path.unlink(missing_ok=True)
            delivered.append(seg.path.name)
    if delivered:  # the spool's own housekeeping, as at run time: not a warning
        log.info("spool: delivered segments removed", extra={"fields": {
            "directory": str(directory), "segments": delivered[:20],
            "count": len(delivered)}})
    rec.next_seq = max(last_seq, rec.cursor) + 1
    return rec, kept


# What the spool keeps beside its segments: the cursor (and its temporary copy while it is
# rewritten), the quarantine, the lock, the writability probe.
OWN_FILES = frozenset({"cursor", "cursor.tmp", "quarantine", "LOCK", ".probe"})


def unrelated(directory: Path, segments: list[Path]) -> list[Path]:
    """Everything in the spool directory that is neither a segment nor the spool's own."""
    names = {p.name for p in segments} | OWN_FILES
    try:
        entries = sorted(directory.iterdir())
    except OSError:
        return []
    return [p for p in entries if p.name not in names]


def _size(path: Path) -> int | None:
    try:
        return path.lstat().st_size
    except OSError:
        return None


async def _deliver(on_record: Callable[[int, bytes], None],
                   records: list[tuple[int, bytes]]) -> None:
    for seq, payload in records:
        on_record(seq, payload)


def _quarantine(directory: Path, path: Path) -> str:
    target = directory / "quarantine" / f"{path.name}.{int(time.time())}"
    os.replace(path, target)
    return str(target)


def _salvage(directory: Path, path: Path, scan: Scan, data: bytes) -> str:
    """Move a damaged segment aside, keeping its intact records in a clean copy. The copy
    is written first: if the disk refuses it, nothing has moved yet."""
    kept = b"".join(frame(seq, payload) for seq, payload in iter_records(scan, data))
    target = directory / segment_name(scan.first_seq)
    tmp = target.with_suffix(".tmp")
    if scan.records:
        write_atomic(tmp, segment_header(scan.first_seq) + kept)
    moved = _quarantine(directory, path)
    if scan.records:
        os.replace(tmp, target)
    _fsync_dir(directory)
    log.error("spool: damaged segment quarantined",
              extra={"fields": {"path": moved, "intact_records": len(scan.records),
                                "damaged_ranges": scan.damage[:10]}})
    return moved
