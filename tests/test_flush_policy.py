"""The flush policy made for trickles: windows close at their age (not per event), whoever
needs PostgreSQL now gets it now, and an idle agent holds no connection."""

from __future__ import annotations

import asyncio
import time
from pathlib import Path
from urllib.parse import urlsplit

import asyncpg
import psutil

from flux_agent import Agent
from flux_agent.testing import make_event

from .support.agents import agent_config
from .support.http import get, post
from .support.polling import wait_until
from .support.postgres import LOGIN_ROLE, VIA_PGBOUNCER, Database


async def visible(database: Database, event_id: str) -> bool:
    return bool(await database.fetchval(
        "SELECT count(*) FROM flux.events WHERE event_id = $1::uuid", event_id))


async def test_a_trickle_is_flushed_in_windows_within_the_delay(database: Database,
                                                                state_dir: Path):
    delay = 1.0
    async with Agent(agent_config(database, state_dir, batch_max_age=delay)) as agent:
        assert agent.flusher is not None
        url = agent.endpoints.event_url + "/v1/events"
        batches0 = agent.flusher.stats.batches
        acked_at: dict[str, float] = {}
        seen_at: dict[str, float] = {}
        done = asyncio.Event()

        async def watch() -> None:  # when each event shows up in PostgreSQL
            conn = await asyncpg.connect(database.admin_dsn)
            try:
                while not done.is_set():
                    rows = await conn.fetch("SELECT event_id::text FROM flux.events")
                    now = time.monotonic()
                    for r in rows:
                        seen_at.setdefault(r[0], now)
                    await asyncio.sleep(0.02)
            finally:
                await conn.close()

        watcher = asyncio.create_task(watch())
        for _ in range(20):  # 20 single events over about two seconds
            event = make_event()
            status, body, _ = await post(url, event)
            assert status == 202, body
            acked_at[event["event_id"]] = time.monotonic()
            await asyncio.sleep(0.1)

        async def all_visible() -> bool:
            return set(acked_at) <= set(seen_at)

        assert await wait_until(all_visible, 10, interval=0.02)
        done.set()
        await watcher
        late = {i: seen_at[i] - acked_at[i] for i in acked_at}
        # Each within the delay (plus scheduling and the commit itself)...
        assert max(late.values()) < delay + 0.5, sorted(late.values())[-3:]
        # ...and not one transaction per event: a few windows for twenty events.
        windows = agent.flusher.stats.batches - batches0
        assert 1 <= windows <= 6, windows


async def test_wait_committed_and_reads_do_not_wait_for_the_window(database: Database,
                                                                   state_dir: Path):
    # A window that would stay open for 30 s: only "flush now" can explain quick answers.
    async with Agent(agent_config(database, state_dir, batch_max_age=30.0)) as agent:
        url = agent.endpoints.event_url
        started = time.monotonic()
        status, body, _ = await post(url + "/v1/events", make_event(),
                                     headers={"Prefer": "wait=committed"})
        assert status == 200 and body["committed"], body
        assert time.monotonic() - started < 2.0
        # Read your writes: an acknowledged event is found by a read at once.
        event = make_event(run_id="ryw-1")
        status, body, _ = await post(url + "/v1/events", event)
        assert status == 202, body
        assert not await visible(database, event["event_id"])  # still in the open window
        started = time.monotonic()
        status, body, _ = await get(url + f"/v1/events/{event['event_id']}")
        assert status == 200, body
        status, body, _ = await get(url + "/v1/runs/ryw-1")
        assert status == 200 and body["events"] == 1, body
        assert time.monotonic() - started < 2.0
        # A drain flushes too.
        event = make_event()
        status, body, _ = await post(url + "/v1/events", event)
        assert status == 202
        assert agent.flusher is not None and await agent.flusher.drain(5)
        assert await visible(database, event["event_id"])


async def agent_connections(database: Database) -> int:
    """The agent's connections to its database: the server's sessions of the agent's role,
    or, behind PgBouncer (whose server connections outlive its clients by design), this
    process's open connections to PgBouncer (the agent runs in this process)."""
    if VIA_PGBOUNCER:
        port = urlsplit(database.agent_dsn).port
        return sum(1 for c in psutil.Process().net_connections(kind="tcp")
                   if c.raddr and c.raddr.port == port and c.status == psutil.CONN_ESTABLISHED)
    conn = await asyncpg.connect(database.admin_dsn)
    try:
        return int(await conn.fetchval(
            "SELECT count(*) FROM pg_stat_activity WHERE usename = $1 AND datname = $2",
            LOGIN_ROLE, database.name))
    finally:
        await conn.close()


async def test_an_idle_agent_holds_at_most_one_connection_then_none(database: Database,
                                                                   state_dir: Path):
    config = agent_config(database, state_dir, database_idle_timeout=1.0,
                          database_ping_interval=60.0)
    async with Agent(config) as agent:
        url = agent.endpoints.event_url + "/v1/events"
        for _ in range(10):  # a trickle: one window at a time, one connection
            status, _, _ = await post(url, make_event(), headers={"Prefer": "wait=committed"})
            assert status == 200
        assert await agent_connections(database) <= 1
        assert agent.pg is not None

        async def none_left() -> bool:
            return await agent_connections(database) == 0

        assert await wait_until(none_left, 10)
        # Idle: no query, hence no new connection, for a while (the ping is once a minute).
        opened = agent.pg.connections_opened
        await asyncio.sleep(3.0)
        assert agent.pg.connections_opened == opened
        assert await agent_connections(database) == 0
