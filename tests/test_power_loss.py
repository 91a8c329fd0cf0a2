"""Power loss, not just process death.

A SIGKILL leaves the kernel's page cache intact: every byte the agent wrote survives it, so
a SIGKILL test passes with fdatasync removed. A power loss keeps only what was synced. Here
the agent records each segment offset it has fdatasync'ed (FLUX_AGENT_SPOOL_SYNC_LOG, a
testing-only setting); the test kills the agent, cuts every segment back to its last synced
offset (what the disk would hold after the power came back), restarts it, and checks that
every acknowledged event is stored.

The control runs the same scenario with FLUX_AGENT_SPOOL_DURABILITY=none (acknowledged
before any fdatasync): there the cut must lose acknowledged events, which shows the
procedure can tell.
"""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest

from .support.agents import AgentProcess, agent_env
from .support.faults import Ledger, LoadGen, TcpProxy, stored_ids
from .support.polling import wait_until
from .support.postgres import Database, proxied

pytestmark = [pytest.mark.slow, pytest.mark.fault]


def lose_power(spool: Path, sync_log: Path) -> tuple[int, int]:
    """Cut segments back to what was synced; drop segments never synced. Returns
    (segments cut, bytes lost)."""
    synced: dict[str, int] = {}
    if sync_log.exists():
        for line in sync_log.read_text().splitlines():
            name, size = line.split()
            synced[name] = max(synced.get(name, 0), int(size))
    cut = lost = 0
    for segment in sorted(spool.glob("*.seg")):
        size = segment.stat().st_size
        keep = synced.get(segment.name, 0)
        if keep >= size:
            continue
        cut += 1
        lost += size - keep
        if keep == 0:
            segment.unlink()
        else:
            with segment.open("r+b") as fh:
                fh.truncate(keep)
    return cut, lost


@pytest.mark.parametrize("durability", ["fsync", "none"])
async def test_power_loss_keeps_every_acknowledged_event(database: Database, proxy: TcpProxy,
                                                         state_dir: Path, durability: str):
    sync_log = state_dir / "synced.log"
    env = agent_env(proxied(database, proxy), state_dir,
                    FLUX_AGENT_SPOOL_DURABILITY=durability,
                    FLUX_AGENT_SPOOL_SYNC_LOG=str(sync_log),
                    FLUX_AGENT_SPOOL_SEGMENT_BYTES="1MiB",
                    FLUX_AGENT_REQUEST_MAX_BYTES="256KiB",
                    FLUX_AGENT_FLUSH_RETRY_MAX="0.3s")
    proc = AgentProcess(env, state_dir / "agent.log")
    ledger = Ledger()
    proxy.cut()  # nothing reaches PostgreSQL: every acknowledged event is only on the spool
    await asyncio.to_thread(proc.start)
    load = LoadGen(proc.url + "/v1/events", ledger, batch=20, concurrency=4)
    load.start()
    assert await wait_until(lambda: _acked(ledger, 2000), 30)
    proc.kill()  # the power goes: the process and, below, the unsynced bytes
    await load.stop()
    cut, lost_bytes = lose_power(state_dir / "spool", sync_log)
    proxy.restore()
    await asyncio.to_thread(proc.start)
    try:
        async def settled() -> bool:
            from .support.http import get

            _, body, _ = await get(proc.admin_url + "/health/ready")
            return body["spool"]["backlog_records"] == 0

        assert await wait_until(settled, 60)
        stored = set(await stored_ids(database))
        lost = ledger.acked - stored
        if durability == "fsync":
            assert not lost, f"{len(lost)} acknowledged events lost (cut {cut} segments, " \
                             f"{lost_bytes} bytes)"
        else:
            # Acknowledged before the disk had them: a power loss takes them.
            assert cut > 0 and lost, (cut, lost_bytes, len(ledger.acked))
        assert stored <= ledger.attempted
    finally:
        assert await asyncio.to_thread(proc.terminate) == 0


async def _acked(ledger: Ledger, n: int) -> bool:
    return len(ledger.acked) >= n
