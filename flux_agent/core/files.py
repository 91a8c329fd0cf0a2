"""Small file helpers shared by the parts that keep state on disk."""

from __future__ import annotations

import contextlib
import errno
import fcntl
import os
from pathlib import Path

# What a full disk, a quota, descriptor exhaustion or a failing device look like. These are
# faults of the machine, not of the agent: retried when the resource returns, never fatal.
RESOURCE_ERRNOS = frozenset({errno.ENOSPC, errno.EDQUOT, errno.EMFILE, errno.ENFILE,
                             errno.EIO, errno.ENOMEM, errno.EROFS})


def is_resource_error(exc: BaseException) -> bool:
    return isinstance(exc, OSError) and exc.errno in RESOURCE_ERRNOS


def reason(exc: BaseException) -> str:
    """``No space left on device`` rather than ``[Errno 28] ... '/path'`` (no paths)."""
    code = getattr(exc, "errno", None)
    return os.strerror(code) if isinstance(code, int) and code else str(exc)


def write_atomic(path: Path, data: bytes, *, mode: int = 0o600) -> None:
    """Replace ``path`` with ``data``, all or nothing: a crash leaves the old or the new file,
    never half of one; a failed write (a full disk) leaves no temporary file behind."""
    tmp = path.with_suffix(path.suffix + ".tmp")
    try:
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, mode)
        try:
            view = memoryview(data)
            while view:
                view = view[os.write(fd, view):]
            os.fsync(fd)
        finally:
            os.close(fd)
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            tmp.unlink()
        raise


def lock_exclusive(path: Path, what: str) -> int:
    """flock ``path`` (created if missing) for this process; returns the fd that holds it.

    The kernel drops the lock when the process dies, so a SIGKILLed agent never leaves a
    stale lock behind. The holder's pid is written into the file, so that a refusal can name
    it. Raises RuntimeError naming ``what`` (and the holder) when another process holds it.
    """
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        holder = ""
        with contextlib.suppress(OSError, ValueError):
            pid = int(os.pread(fd, 32, 0).decode().strip() or "0")
            holder = f" (pid {pid})" if pid > 0 else ""
        os.close(fd)
        raise RuntimeError(f"another agent{holder} is using {what}") from None
    with contextlib.suppress(OSError):  # the pid is a courtesy: a full disk must not stop us
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
    return fd


def lock_holder(path: Path) -> int | None:
    """The pid holding :func:`lock_exclusive` on ``path``, else None. Read from
    ``/proc/locks`` (Linux) rather than by trying the lock: a probe could make an agent that
    starts at that moment fail to take its own lock."""
    try:
        st = path.stat()
        table = Path("/proc/locks").read_text()
    except OSError:
        return None
    wanted = f"{os.major(st.st_dev):02x}:{os.minor(st.st_dev):02x}:{st.st_ino}"
    for line in table.splitlines():
        parts = line.split()
        if len(parts) >= 6 and parts[1] == "FLOCK" and parts[5] == wanted:
            return int(parts[4])
    return None
