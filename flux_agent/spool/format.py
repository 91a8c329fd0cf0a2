"""The spool's on-disk format, and what reads and writes it without a Spool.

Framing and CRC-32C, segment headers and names, scanning a segment for its intact records,
the cursor file, reading records back (the reader thread), directory fsync. Imports nothing
else of the spool package.
"""

from __future__ import annotations

import errno
import logging
import os
import struct
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import google_crc32c

log = logging.getLogger("flux_agent.spool")

MAGIC = b"FLUXSPL1"
VERSION = 1
HEADER = struct.Struct("<8sHHQQI")  # magic, version, header length, first seq, created ms, crc
FRAME = struct.Struct("<IIQ")  # payload length, crc32c(seq + payload), seq
SEQ = struct.Struct("<Q")
CURSOR = struct.Struct("<QI")  # committed seq, crc32c
MAX_RECORD = 256 * 1024 * 1024  # sanity bound when scanning for frames
SUFFIX = ".seg"


def crc32c(data: bytes) -> int:
    """CRC-32C (Castagnoli), in hardware where the CPU has it."""
    return int(google_crc32c.value(data))


def _crc(seq: int, payload: bytes | memoryview) -> int:
    if isinstance(payload, memoryview):
        payload = payload.tobytes()
    return int(google_crc32c.extend(google_crc32c.value(SEQ.pack(seq)), payload))


def frame(seq: int, payload: bytes) -> bytes:
    return FRAME.pack(len(payload), _crc(seq, payload), seq) + payload


def segment_header(first_seq: int) -> bytes:
    body = struct.pack("<8sHHQQ", MAGIC, VERSION, HEADER.size, first_seq, int(time.time() * 1000))
    return body + struct.pack("<I", crc32c(body))


def segment_name(first_seq: int) -> str:
    return f"{first_seq:020d}{SUFFIX}"


# --------------------------------------------------------------------------- scanning


@dataclass(slots=True)
class Scan:
    """What a segment file holds: its intact records and where it is damaged."""

    path: Path
    header_ok: bool
    header_seq: int
    created_ms: int
    records: list[tuple[int, int, int]] = field(default_factory=list)  # (seq, offset, length)
    damage: list[tuple[int, int]] = field(default_factory=list)  # [start, end) byte ranges
    size: int = 0

    @property
    def valid_end(self) -> int:
        if not self.records:
            return HEADER.size if self.header_ok else 0
        _, offset, length = self.records[-1]
        return offset + FRAME.size + length

    @property
    def torn_tail_only(self) -> bool:
        """Damage exists, but only after the last intact record: an interrupted append."""
        return bool(self.damage) and self.header_ok and all(
            start >= self.valid_end for start, _ in self.damage
        )

    @property
    def first_seq(self) -> int:
        return self.records[0][0] if self.records else self.header_seq

    @property
    def last_seq(self) -> int:
        return self.records[-1][0] if self.records else self.header_seq - 1


def _frame_at(data: memoryview, pos: int, after_seq: int) -> tuple[int, int] | None:
    """(seq, length) of an intact frame at ``pos`` whose seq follows ``after_seq``."""
    if pos < 0 or pos + FRAME.size > len(data):
        return None
    length, crc, seq = FRAME.unpack_from(data, pos)
    if length > MAX_RECORD or pos + FRAME.size + length > len(data) or seq <= after_seq:
        return None
    if _crc(seq, data[pos + FRAME.size : pos + FRAME.size + length]) != crc:
        return None
    return seq, length


RESYNC_WINDOW = 64  # how many sequence numbers past the last good record to search for


def _resync(data: bytes, view: memoryview, pos: int, last: int) -> int | None:
    """Offset of the next intact frame after damage at ``pos``, or None.

    Sequence numbers are dense (gaps come only from failed writes, which are truncated), so
    the next good frame carries one of the next few numbers: search for their bytes with
    ``bytes.find`` instead of trying every offset.
    """
    best: int | None = None
    seq_at = FRAME.size - SEQ.size
    for seq in range(last + 1, last + 1 + RESYNC_WINDOW):
        needle = SEQ.pack(seq)
        i = data.find(needle, pos + seq_at)
        while i != -1 and (best is None or i - seq_at < best):
            if _frame_at(view, i - seq_at, last):
                best = i - seq_at
                break
            i = data.find(needle, i + 1)
    return best


def scan_bytes(path: Path, data: bytes, after_seq: int = 0, name_seq: int = 0) -> Scan:
    """Find every intact record, resynchronising past damage.

    A frame is accepted only if its CRC matches and its sequence number is above the last
    accepted one (``after_seq`` carries that across segments), so stale or random bytes are
    never mistaken for records. ``name_seq`` (from the file name) stands in for a damaged
    header's first sequence number.
    """
    view = memoryview(data)
    header_ok = False
    header_seq = created = 0
    if len(data) >= HEADER.size:
        magic, version, hlen, header_seq, created, crc = HEADER.unpack_from(data, 0)
        header_ok = (
            magic == MAGIC
            and version == VERSION
            and hlen == HEADER.size
            and crc32c(data[: HEADER.size - 4]) == crc
        )
    first = header_seq if header_ok else name_seq
    scan = Scan(path, header_ok, first, created if header_ok else 0, size=len(data))
    if not header_ok:
        scan.damage.append((0, min(len(data), HEADER.size)))
    pos = HEADER.size
    last = max(after_seq, first - 1)
    while pos < len(data):
        found = _frame_at(view, pos, last)
        if found is None:
            nxt = _resync(data, view, pos, last)
            scan.damage.append((pos, len(data) if nxt is None else nxt))
            if nxt is None:
                break
            pos = nxt
            continue
        seq, length = found
        scan.records.append((seq, pos, length))
        last = seq
        pos += FRAME.size + length
    return scan


def _name_seq(path: Path) -> int:
    stem = path.name[: -len(SUFFIX)]
    return int(stem) if stem.isdigit() else 0


def scan_file(path: Path, after_seq: int = 0) -> tuple[Scan, bytes]:
    data = path.read_bytes()
    return scan_bytes(path, data, after_seq, _name_seq(path)), data


def iter_records(scan: Scan, data: bytes) -> Iterator[tuple[int, bytes]]:
    for seq, offset, length in scan.records:
        yield seq, data[offset + FRAME.size : offset + FRAME.size + length]


def list_segments(directory: Path) -> list[Path]:
    out = []
    for p in directory.glob("*" + SUFFIX):
        stem = p.name[: -len(SUFFIX)]
        if stem.isdigit():
            out.append(p)
    return sorted(out, key=lambda p: int(p.name[: -len(SUFFIX)]))


def read_cursor(directory: Path) -> int:
    try:
        raw = (directory / "cursor").read_bytes()
    except FileNotFoundError:
        return 0
    if len(raw) != CURSOR.size:
        return 0
    seq, crc = CURSOR.unpack(raw)
    return seq if crc32c(SEQ.pack(seq)) == crc else 0


# --------------------------------------------------------------------------- segment files


@dataclass(slots=True)
class Segment:
    """A segment file as the Spool keeps track of it."""

    path: Path
    first_seq: int
    last_seq: int  # first_seq - 1 while empty
    size: int
    created: float
    fd: int = -1
    spent_at: float | None = None  # wall time when every record in it was committed


def path_mtime(path: Path) -> float:
    try:
        return path.stat().st_mtime
    except OSError:
        return 0.0


def _remove_segments(segments: list[Segment]) -> None:
    for seg in segments:
        if seg.fd >= 0:
            os.close(seg.fd)
            seg.fd = -1
        seg.path.unlink(missing_ok=True)


# --------------------------------------------------------------------------- reading


_READ_CHUNK = 4 * 1024 * 1024
ReadHint = tuple[Path, int, int]  # segment, next seq, its offset


def _read_records(
    targets: list[tuple[Path, int]],
    from_seq: int,
    max_bytes: int,
    upto: int,
    hint: ReadHint | None,
) -> tuple[list[tuple[int, bytes]], ReadHint | None, int]:
    """Reader thread: frames from the given segments, starting at a hinted offset if any.

    Returns the records, a hint for the next call, and how many corrupt records were
    skipped (checksums were verified at start; a mismatch now means the disk rotted).
    """
    out: list[tuple[int, bytes]] = []
    total = corrupt = 0
    for path, size in targets:
        offset = hint[2] if hint is not None and hint[0] == path else HEADER.size
        try:
            fh = path.open("rb")
        except FileNotFoundError:
            continue  # removed after commit while we were about to read it
        with fh:
            while offset + FRAME.size <= size:
                fh.seek(offset)
                head = fh.read(FRAME.size)
                if len(head) < FRAME.size:
                    break
                length, _, _ = FRAME.unpack(head)
                want = min(size - offset, max(_READ_CHUNK, FRAME.size + length))
                fh.seek(offset)
                data = fh.read(want)
                view = memoryview(data)
                pos = 0
                while pos + FRAME.size <= len(data):
                    length, crc, seq = FRAME.unpack_from(view, pos)
                    end = pos + FRAME.size + length
                    if length > MAX_RECORD or end > len(data):
                        break
                    if seq > upto:
                        return out, (path, seq, offset + pos), corrupt
                    if seq >= from_seq:
                        payload = bytes(view[pos + FRAME.size : end])
                        if _crc(seq, payload) != crc:
                            corrupt += 1
                            log.error("spool: corrupt record skipped while reading",
                                      extra={"fields": {"path": str(path), "seq": seq}})
                        else:
                            out.append((seq, payload))
                            total += len(payload)
                    pos = end
                    if total >= max_bytes:
                        return out, (path, seq + 1, offset + pos), corrupt
                if pos == 0:
                    corrupt += 1  # an impossible length: the rest of this file is unreadable
                    break
                offset += pos
    return out, None, corrupt


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    except OSError as exc:  # some filesystems refuse directory fsync; nothing to do there
        if exc.errno not in (errno.EINVAL, errno.ENOTSUP):
            raise
    finally:
        os.close(fd)

