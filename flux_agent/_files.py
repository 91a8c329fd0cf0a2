"""Small file helpers shared by the parts that keep state on disk."""

from __future__ import annotations

import fcntl
import os
from pathlib import Path


def write_atomic(path: Path, data: bytes) -> None:
    """Replace ``path`` with ``data``, all or nothing: a crash leaves the old or the new file,
    never half of one."""
    tmp = path.with_suffix(path.suffix + ".tmp")
    with tmp.open("wb") as fh:
        fh.write(data)
        fh.flush()
        os.fsync(fh.fileno())
    os.replace(tmp, path)


def lock_exclusive(path: Path, what: str) -> int:
    """flock ``path`` (created if missing) for this process; returns the fd that holds it.

    The kernel drops the lock when the process dies, so a SIGKILLed agent never leaves a
    stale lock behind. Raises RuntimeError naming ``what`` when another process holds it.
    """
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        os.close(fd)
        raise RuntimeError(f"another agent is using {what}") from None
    return fd
