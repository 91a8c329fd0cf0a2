"""``flux-agent spool inspect|verify``: a stopped agent's spool, read offline."""

from __future__ import annotations

import time
from pathlib import Path

from .format import list_segments, read_cursor, scan_file


def inspect(directory: Path) -> dict[str, object]:
    """``flux-agent spool inspect``: segments, records, bytes, oldest age (stopped agent)."""
    cursor = read_cursor(directory)
    segs = []
    now = time.time()
    oldest: float | None = None
    records = pending = total = 0
    for path in list_segments(directory):
        scan, _ = scan_file(path)
        n_pending = sum(1 for seq, _, _ in scan.records if seq > cursor)
        records += len(scan.records)
        pending += n_pending
        total += scan.size
        if n_pending and scan.created_ms:
            age = now - scan.created_ms / 1000
            oldest = age if oldest is None else max(oldest, age)
        segs.append({
            "path": str(path), "bytes": scan.size, "records": len(scan.records),
            "pending_records": n_pending, "first_seq": scan.first_seq,
            "last_seq": scan.last_seq, "damaged": bool(scan.damage),
        })
    quarantine = directory / "quarantine"
    return {
        "directory": str(directory), "cursor": cursor, "segments": segs,
        "records": records, "pending_records": pending, "bytes": total,
        "oldest_pending_age_s": round(oldest, 3) if oldest is not None else None,
        "quarantined": sorted(p.name for p in quarantine.iterdir()) if quarantine.is_dir() else [],
    }


def verify(directory: Path) -> list[str]:
    """``flux-agent spool verify``: every checksum; returns the problems found."""
    problems = []
    for path in list_segments(directory):
        scan, _ = scan_file(path)
        if not scan.header_ok:
            problems.append(f"{path}: bad segment header")
        for start, end in scan.damage:
            if start == 0 and not scan.header_ok:
                continue
            kind = "torn tail" if scan.torn_tail_only else "corrupt bytes"
            problems.append(f"{path}: {kind} at bytes {start}..{end}")
    return problems

