"""Write-ahead spool: framed, checksummed segment files; group-commit fdatasync; recovery.

Layout of ``<state dir>/spool``::

    00000000000000000001.seg   segments, named by the first sequence number they hold
    cursor                     last sequence number known to be in PostgreSQL
    quarantine/                damaged segments moved aside by recovery (kept for forensics)
    LOCK                       flock'ed by the running agent: one agent per spool

A segment starts with a 32-byte header (magic, version, first sequence, creation time, CRC)
followed by records, each framed as ``length u32 | crc32c u32 | seq u64 | payload`` where the
CRC covers the sequence number and the payload. A request's events form one record, so a
torn write can never leave half a request behind.

Writes and fdatasyncs run on one I/O thread. While one group is being synced, new appends
collect into the next group, so concurrent requests share one fdatasync (group commit). The
thread only touches descriptors and files; the bookkeeping (segment list, sizes, sequence
numbers) changes on the event loop, from what the thread reports back.

The disk is allowed to fail. A write refused for lack of space, quota or descriptors leaves
no partial record and no partial file; the spool then answers 503 (``SPOOL_UNAVAILABLE``)
and probes the disk every second until a write can succeed again. A start on a full disk
recovers what it can read and opens the next segment only when it first needs one.

After a failover to an asynchronously replicated standby, PostgreSQL may have forgotten
what it committed: segments whose records are all committed are kept for
``keep_committed`` seconds (unless the capacity or the disk needs them back), so that the
flusher can replay that window idempotently.

Modules, low to high (each imports only those above it):

- ``format``: the on-disk format (framing, CRC-32C, segment headers, the cursor file),
  scanning a segment for its intact records, and reading records back;
- ``recovery``: the scan at start: torn tails cut off, damaged segments set aside;
- ``core``: :class:`~flux_agent.spool.core.Spool` itself: group commit on its I/O thread,
  the cursor, reads for the flusher, the disk probe while writes are refused;
- ``tools``: ``flux-agent spool inspect|verify``, a stopped agent's spool read offline.

Every module logs as ``flux_agent.spool``.
"""

# What the agent and the tests import from flux_agent.spool; the rest from its module.
from .core import Spool
from .errors import SpoolFull, SpoolUnavailable
from .format import FRAME, HEADER, _crc, crc32c, list_segments, scan_file
from .recovery import Recovery
from .tools import inspect, verify

__all__ = [
    "FRAME",
    "HEADER",
    "Recovery",
    "Spool",
    "SpoolFull",
    "SpoolUnavailable",
    "_crc",
    "crc32c",
    "inspect",
    "list_segments",
    "scan_file",
    "verify",
]
