"""Failover to a promoted standby: a real primary, a real streaming standby (pg_basebackup),
the agent on a multi-host URL with target_session_attrs=read-write.

- Synchronous replication: nothing acknowledged is lost, replay or not.
- Asynchronous replication with a lagging standby: the new primary lacks what the old one
  committed last; the agent notices it reached another primary (its timeline changed),
  replays the committed window it keeps, and nothing acknowledged within the window is
  lost. Without the window (FLUX_AGENT_SPOOL_KEEP_COMMITTED=0) the same scenario loses
  exactly the events the standby never received: the test can tell the difference.
"""

from __future__ import annotations

import asyncio
import os
import pwd
import shutil
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path

import asyncpg
import pytest

from flux_agent import Agent
from flux_agent.core.settings import Secret
from flux_agent.postgres.embedded import LocalPostgres, find_bin_dir, free_port
from flux_agent.postgres.migrations import bootstrap_database
from flux_agent.testing import make_events

from .support.faults import TcpProxy
from .support.http import post
from .support.paths import short_tempdir
from .support.polling import wait_until
from .support.postgres import FAST_SETTINGS, LOGIN_PASSWORD, LOGIN_ROLE, Database

# Primaries and standbys of their own, the primary stopped.
pytestmark = [pytest.mark.slow, pytest.mark.fault, pytest.mark.db]

REPLICATION = {**FAST_SETTINGS, "fsync": "on", "synchronous_commit": "on",
               "wal_level": "replica", "max_wal_senders": "5", "hot_standby": "on",
               "wal_keep_size": "64MB"}


@dataclass
class Pair:
    primary: LocalPostgres
    standby: LocalPostgres
    replication: TcpProxy  # the standby's line to the primary
    url: str  # both hosts, read-write target

    async def count(self, server: LocalPostgres, ids: list[str]) -> int:
        conn = await asyncpg.connect(server.dsn(database="flux"))
        try:
            return int(await conn.fetchval(
                "SELECT count(*) FROM flux.events WHERE event_id = ANY($1::uuid[])", ids))
        finally:
            await conn.close()


def _run_as_postgres(bin_dir: Path, *args: str) -> None:
    user = pwd.getpwnam("postgres") if os.geteuid() == 0 else None
    kwargs: dict[str, object] = {}
    if user is not None:
        kwargs = {"user": user.pw_uid, "group": user.pw_gid, "extra_groups": []}
    import subprocess

    subprocess.run([str(bin_dir / args[0]), *args[1:]], check=True, capture_output=True,
                   timeout=120, cwd="/", **kwargs)  # type: ignore[call-overload]


@pytest.fixture
async def pair(request: pytest.FixtureRequest) -> AsyncIterator[Pair]:
    synchronous = request.param == "sync"
    root = short_tempdir("fa-ha-")
    bin_dir = find_bin_dir(prefer="system")
    settings = dict(REPLICATION)
    primary = LocalPostgres(root / "primary", bin_dir=bin_dir, port=free_port(),
                            settings=settings)
    await asyncio.to_thread(primary.start)
    await bootstrap_database(primary.dsn(), primary.dsn(database="flux"), "flux", LOGIN_ROLE)
    conn = await asyncpg.connect(primary.dsn(database="flux"))
    await conn.execute(f"ALTER ROLE {LOGIN_ROLE} PASSWORD '{LOGIN_PASSWORD}'")
    await conn.close()
    replication = TcpProxy("127.0.0.1", primary.port or 0)
    await replication.start()
    standby_dir = root / "standby"
    standby_dir.mkdir(mode=0o700)
    if os.geteuid() == 0:
        pg = pwd.getpwnam("postgres")
        os.chown(standby_dir, pg.pw_uid, pg.pw_gid)
    await asyncio.to_thread(_run_as_postgres, bin_dir, "pg_basebackup", "-D", str(standby_dir),
                            "-h", "127.0.0.1", "-p", str(replication.port), "-U", "postgres",
                            "-X", "stream", "-R", "-c", "fast")
    standby = LocalPostgres(standby_dir, bin_dir=bin_dir, port=free_port(), settings=settings)
    await asyncio.to_thread(standby.start)
    if synchronous:  # only now: with no standby yet, every commit would wait forever
        conn = await asyncpg.connect(primary.dsn())
        await conn.execute("ALTER SYSTEM SET synchronous_standby_names = '*'")
        await conn.execute("SELECT pg_reload_conf()")
        await conn.close()
    hosts = f"127.0.0.1:{primary.port},127.0.0.1:{standby.port}"
    url = (f"postgresql://{LOGIN_ROLE}:{LOGIN_PASSWORD}@{hosts}/flux"
           "?target_session_attrs=read-write")
    try:
        yield Pair(primary, standby, replication, url)
    finally:
        await replication.stop()
        await asyncio.to_thread(standby.destroy)
        await asyncio.to_thread(primary.destroy)
        shutil.rmtree(root, ignore_errors=True)


async def post_committed(agent: Agent, n: int) -> list[str]:
    events = make_events(n)
    status, body, _ = await post(agent.endpoints.event_url + "/v1/events", events,
                                 headers={"Prefer": "wait=committed"})
    assert status == 200 and body["committed"], body
    return [e["event_id"] for e in events]


async def fail_over(pair: Pair) -> None:
    """The primary crashes; the standby is promoted."""
    await asyncio.to_thread(pair.primary.stop, "immediate")
    await asyncio.to_thread(_run_as_postgres, pair.standby.bin_dir, "pg_ctl", "-D",
                            str(pair.standby.data_dir), "-w", "promote")

    async def promoted() -> bool:
        conn = await asyncpg.connect(pair.standby.dsn(database="flux"))
        try:
            return not await conn.fetchval("SELECT pg_is_in_recovery()")
        finally:
            await conn.close()

    assert await wait_until(promoted, 30)


def config_for(pair: Pair, state_dir: Path, keep: float) -> object:
    from .support.agents import agent_config

    db = Database("flux", pair.primary.dsn(database="flux"), pair.url)
    return agent_config(db, state_dir, database_url=Secret(pair.url),
                        spool_keep_committed=keep, flush_retry_max=0.5,
                        database_connect_timeout=2.0, database_ping_interval=1.0)


@pytest.mark.parametrize("pair", ["sync"], indirect=True)
async def test_synchronous_failover_loses_nothing_even_without_a_replay(pair: Pair,
                                                                        state_dir: Path):
    async with Agent(config_for(pair, state_dir, keep=0.0)) as agent:  # type: ignore[arg-type]
        before = await post_committed(agent, 20)
        await fail_over(pair)
        after = await post_committed(agent, 20)  # reaches the new primary
        assert await pair.count(pair.standby, before + after) == 40
        assert agent.flusher is not None and agent.flusher.stats.replays == 0


@pytest.mark.parametrize("pair", ["async"], indirect=True)
@pytest.mark.parametrize("keep", [300.0, 0.0], ids=["window", "no-window"])
async def test_asynchronous_failover_replays_the_committed_window(pair: Pair, state_dir: Path,
                                                                  keep: float):
    async with Agent(config_for(pair, state_dir, keep=keep)) as agent:  # type: ignore[arg-type]
        replicated = await post_committed(agent, 20)

        async def on_standby() -> bool:
            return await pair.count(pair.standby, replicated) == 20

        assert await wait_until(on_standby, 20)
        pair.replication.cut()  # the standby falls behind from here
        lagging = await post_committed(agent, 25)  # committed on the old primary only
        assert await pair.count(pair.primary, lagging) == 25
        await fail_over(pair)
        promoted_at = time.monotonic()
        after = await post_committed(agent, 10)
        everything = replicated + lagging + after
        assert agent.flusher is not None
        if keep:
            async def restored() -> bool:
                return await pair.count(pair.standby, everything) == len(everything)

            assert await wait_until(restored, 30), await pair.count(pair.standby, everything)
            print(f"async failover: everything acknowledged on the new primary "
                  f"{time.monotonic() - promoted_at:.2f} s after its promotion")
            assert agent.flusher.stats.replays >= 1
            assert agent.flusher.stats.events_restored == 25
        else:
            # The control: no window, no replay; the standby never had these 25.
            await asyncio.sleep(3.0)
            assert await pair.count(pair.standby, replicated + after) == 30
            assert await pair.count(pair.standby, lagging) == 0
            assert agent.flusher.stats.replays == 0
