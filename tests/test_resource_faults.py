"""Resource faults, made for real: the state dir on a small tmpfs that fills up and frees
again, a start on a disk that is already full, and descriptor exhaustion in the spool.

Each asserts that every acknowledged event reaches PostgreSQL exactly once after the fault,
that the probes tell the truth while it lasts, and that no background task died."""

from __future__ import annotations

import asyncio
import contextlib
import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from flux_agent import Agent
from flux_agent.testing import make_events

from .support.agents import agent_config
from .support.faults import TcpProxy, stored_ids
from .support.http import get, post
from .support.polling import wait_until
from .support.postgres import Database, proxied
from .support.tools import require_root

pytestmark = [pytest.mark.slow, pytest.mark.fault]

MiB = 1024 * 1024


@pytest.fixture
def small_disk(state_dir: Path) -> Iterator[Path]:
    """A 12 MiB tmpfs mounted for this test: ENOSPC is the kernel's, not a simulation."""
    require_root("mounts a tmpfs to fill it")
    mount = state_dir / "disk"
    mount.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=12m,mode=0755", "tmpfs", str(mount)],
                   check=True)
    try:
        yield mount
    finally:
        subprocess.run(["umount", "-l", str(mount)], check=False)


def fill(directory: Path, name: str = "ballast") -> Path:
    """Take every free byte of the filesystem."""
    path = directory / name
    fd = os.open(path, os.O_WRONLY | os.O_CREAT, 0o600)
    try:
        for chunk in (MiB, 4096, 1):
            with contextlib.suppress(OSError):
                while True:
                    os.write(fd, b"\0" * chunk)
    finally:
        os.close(fd)
    return path


def task_failures(agent: Agent) -> dict[str, int]:
    return {name: int(info["failures"])  # type: ignore[call-overload]
            for name, info in agent.supervisor.describe().items() if info["failures"]}


async def post_until_refused(url: str, acked: set[str], limit: int = 400) -> dict[str, object]:
    for _ in range(limit):
        events = make_events(20, payload={"pad": "x" * 4000})
        status, body, headers = await post(url, events)
        if status == 503:
            assert headers["Retry-After"], headers
            return body
        assert status == 202, body
        acked.update(e["event_id"] for e in events)
    pytest.fail("the disk never filled")


async def test_a_full_disk_answers_503_and_intake_recovers_when_space_returns(
        database: Database, proxy: TcpProxy, small_disk: Path):
    # PostgreSQL unreachable: nothing drains, the spool grows until the filesystem is full.
    config = agent_config(proxied(database, proxy), small_disk, spool_max_bytes=1024 * MiB,
                          spool_segment_bytes=MiB, request_max_bytes=256 * 1024,
                          request_memory_bytes=MiB, flush_retry_max=0.3,
                          spool_keep_committed=300.0)
    acked: set[str] = set()
    async with Agent(config) as agent:
        url = agent.endpoints.event_url + "/v1/events"
        proxy.cut()
        body = await post_until_refused(url, acked)
        assert body["code"] == "SPOOL_UNAVAILABLE", body
        assert "No space left on device" in body["detail"]
        status, ready, _ = await get(agent.endpoints.admin_url + "/health/ready")
        assert status == 503 and "spool_unwritable" in ready["reasons"], ready
        assert ready["spool"]["writable"] is False
        status, live, _ = await get(agent.endpoints.admin_url + "/health/live")
        assert status == 200, live  # a full disk is not fixed by a restart
        # A snapshot attempted now fails and leaves no partial file taking the last pages.
        with pytest.raises(OSError, match="No space left"):
            await agent.snapshots.save()
        assert not list(small_disk.glob("*.tmp")), list(small_disk.iterdir())
        # Still refused a few probes later: the probe does not pretend.
        await asyncio.sleep(2.5)
        status, body, _ = await post(url, make_events(1))
        assert status == 503 and body["code"] == "SPOOL_UNAVAILABLE", body

        # PostgreSQL returns: the backlog is flushed (cursor writes fail meanwhile and are
        # retried), segments are freed, and intake reopens by itself.
        proxy.restore()

        async def writable() -> bool:
            s, b, _ = await get(agent.endpoints.admin_url + "/health/ready")
            return s == 200 and b["spool"]["writable"] is True

        assert await wait_until(writable, 60), (await get(agent.endpoints.admin_url +
                                                          "/health/ready"))[1]
        events = make_events(5)
        status, body, _ = await post(url, events)
        assert status == 202, body
        acked.update(e["event_id"] for e in events)
        assert await wait_until(lambda: _landed(database, acked), 30)
        assert task_failures(agent) == {}, agent.supervisor.describe()
        assert agent.spool is not None and agent.spool.write_errors > 0
    stored = await stored_ids(database)
    assert acked <= set(stored), len(acked - set(stored))
    assert len(stored) == len(acked)  # nothing refused was stored, nothing twice


async def _landed(database: Database, acked: set[str]) -> bool:
    return acked <= set(await stored_ids(database))


async def test_start_on_a_full_disk_is_unready_not_an_exit_and_recovers(
        database: Database, small_disk: Path):
    config = agent_config(database, small_disk, spool_max_bytes=1024 * MiB,
                          spool_segment_bytes=MiB, request_max_bytes=256 * 1024,
                          request_memory_bytes=MiB)
    ballast = fill(small_disk)
    async with Agent(config) as agent:
        status, ready, _ = await get(agent.endpoints.admin_url + "/health/ready")
        assert status == 503 and "spool_unwritable" in ready["reasons"], ready
        status, body, _ = await post(agent.endpoints.event_url + "/v1/events", make_events(1))
        assert status == 503 and body["code"] == "SPOOL_UNAVAILABLE", body
        ballast.unlink()

        async def ready_now() -> bool:
            return (await get(agent.endpoints.admin_url + "/health/ready"))[0] == 200

        assert await wait_until(ready_now, 10)
        events = make_events(3)
        status, body, _ = await post(agent.endpoints.event_url + "/v1/events", events,
                                     headers={"Prefer": "wait=committed"})
        assert status == 200 and body["accepted"] == 3 and body["committed"], body
        assert task_failures(agent) == {}, agent.supervisor.describe()
    assert {e["event_id"] for e in events} <= set(await stored_ids(database))


DESCRIPTORS = r"""
import asyncio, os, resource, sys
from pathlib import Path
from flux_agent.spool import Spool, SpoolUnavailable

async def main():
    s = Spool(Path(sys.argv[1]), max_bytes=10**9, segment_bytes=4096)
    await s.open()
    seqs = []
    for i in range(10):
        seq, fut = s.append(b"r" * 100)
        await fut
        seqs.append(seq)
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (64, hard))
    held = []
    try:
        while True:
            held.append(os.open("/dev/null", os.O_RDONLY))
    except OSError:
        pass
    # No descriptor left: committing (a cursor write) must not raise...
    await s.commit(seqs[4])
    assert s.cursor_errors >= 1, s.cursor_errors
    # ...a read says so with an OSError the flusher retries...
    try:
        await s.read(1, 1 << 20)
        raise AssertionError("the read should have needed a descriptor")
    except OSError:
        pass
    # ...and appends that need a new segment are refused with 503 until descriptors return.
    failed = 0
    for i in range(60):
        seq, fut = s.append(b"s" * 400)
        try:
            await fut
        except SpoolUnavailable:
            failed += 1
            break
    assert failed == 1 and s.broken, s.broken
    for fd in held:
        os.close(fd)
    for _ in range(50):
        if s.broken is None:
            break
        await asyncio.sleep(0.1)
    assert s.broken is None, s.broken
    seq, fut = s.append(b"t" * 100)
    await fut
    await s.commit(seq)
    assert s.cursor == seq
    await s.close()
    print("ok")

asyncio.run(main())
"""


def test_descriptor_exhaustion_never_kills_commit_or_wedges_appends(tmp_path: Path):
    result = subprocess.run([sys.executable, "-c", DESCRIPTORS, str(tmp_path / "spool")],
                            capture_output=True, text=True, timeout=120,
                            env={**os.environ,
                                 "PYTHONPATH": str(Path(__file__).parent.parent)})
    assert result.returncode == 0, result.stdout + result.stderr
    assert result.stdout.strip().endswith("ok")
