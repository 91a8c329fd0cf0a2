"""Through a real PgBouncer in transaction pooling mode: two agents of two agencies share one
server connection, and nothing of one transaction (the agency setting above all) leaks into
the next."""

from __future__ import annotations

import asyncio
import shutil
from collections.abc import AsyncIterator
from urllib.parse import urlsplit

import asyncpg
import pytest

from flux_agent import Agent
from flux_agent.core.settings import Secret
from flux_agent.testing import make_events

from .support.agents import agent_config
from .support.http import post
from .support.paths import short_tempdir
from .support.pgbouncer import PgBouncer
from .support.polling import wait_until
from .support.postgres import LOGIN_PASSWORD, LOGIN_ROLE, Database


@pytest.fixture
async def pgbouncer(database: Database) -> AsyncIterator[str]:
    """A PgBouncer of this test's own, one server connection for every client: two agents
    of two agencies take turns on it."""
    target = urlsplit(database.admin_dsn)
    front = PgBouncer(short_tempdir("fa-pgb-"), host=target.hostname or "127.0.0.1",
                      port=target.port or 5432, users={LOGIN_ROLE: LOGIN_PASSWORD},
                      databases=database.name, pool_size=1)
    await asyncio.to_thread(front.start)
    yield front.url(LOGIN_ROLE, LOGIN_PASSWORD, database.name)
    await asyncio.to_thread(front.stop)


async def test_two_agencies_through_transaction_pooling(database: Database, pgbouncer: str):
    states = [short_tempdir(), short_tempdir()]
    configs = [
        agent_config(database, states[0], database_url=Secret(pgbouncer), agency="nasa",
                     database_pgbouncer=True, flush_lanes=2),
        agent_config(database, states[1], database_url=Secret(pgbouncer), agency="noaa",
                     database_pgbouncer=True, flush_lanes=2),
    ]
    sent: dict[str, set[str]] = {"nasa": set(), "noaa": set()}
    try:
        async with Agent(configs[0]) as nasa, Agent(configs[1]) as noaa:
            async def pump(agent: Agent, agency: str) -> None:
                for _ in range(30):
                    events = make_events(20)
                    status, body, _ = await post(agent.endpoints.event_url + "/v1/events",
                                                 events)
                    assert status == 202, body
                    sent[agency].update(e["event_id"] for e in events)

            await asyncio.gather(pump(nasa, "nasa"), pump(noaa, "noaa"), pump(nasa, "nasa"))
            status, body, _ = await post(noaa.endpoints.event_url + "/v1/events",
                                         make_events(5), headers={"Prefer": "wait=committed"})
            assert status == 200, body
            sent["noaa"].update(body["event_ids"])

            async def landed() -> bool:
                n = await database.fetchval("SELECT count(*) FROM flux.events")
                return n == len(sent["nasa"]) + len(sent["noaa"])

            assert await wait_until(landed, 20)
    finally:
        for s in states:
            shutil.rmtree(s, ignore_errors=True)
    for agency, ids in sent.items():
        stored = {str(r[0]) for r in await database.fetch(
            "SELECT event_id FROM flux.events WHERE agency_id = $1", agency)}
        assert stored == ids


async def test_partition_maintenance_through_transaction_pooling(database: Database,
                                                                 pgbouncer: str):
    """The retention round (lease, partition steps, purges) through PgBouncer, as the
    unprivileged role: each step is one statement with its settings local to it."""
    state = short_tempdir()
    config = agent_config(database, state, database_url=Secret(pgbouncer),
                          database_pgbouncer=True, retention_interval=0.2,
                          schema_profile="flux")  # its manifest: nasa and noaa
    try:
        async with Agent(config) as agent:
            async def maintained() -> bool:
                return agent.retention.stats is not None and agent.retention.rounds >= 2

            assert await wait_until(maintained, 20)
            assert agent.retention.counts["created"] >= 1  # agency partitions ahead
            events = make_events(10)
            for _ in range(2):  # the second time: duplicates, found in their partitions
                status, body, _ = await post(agent.endpoints.event_url + "/v1/events", events,
                                             headers={"Prefer": "wait=committed"})
                assert status == 200, body
    finally:
        shutil.rmtree(state, ignore_errors=True)
    assert await database.fetchval("SELECT count(*) FROM flux.events") == 10
    agencies = await database.fetch(
        "SELECT DISTINCT agency_id FROM flux.event_partitions WHERE kind = 'agency'")
    assert {r[0] for r in agencies} >= {"nasa", "noaa"}


async def test_no_statement_of_pgbouncer_per_transaction(database: Database, pgbouncer: str):
    """Two agents taking turns on one server connection cost the server one transaction per
    statement. asyncpg once announced ``client_encoding`` as ``'utf-8'``, the server reports
    ``UTF8``, and PgBouncer then sent its own ``SET client_encoding`` (one transaction more)
    every time it handed the server connection to the other agent: one per flush."""
    from flux_agent.postgres.pool import Postgres

    maintenance = await asyncpg.connect(database.admin_dsn.rsplit("/", 1)[0] + "/postgres")

    async def transactions() -> int:
        return int(await maintenance.fetchval(
            "SELECT xact_commit + xact_rollback FROM pg_stat_database WHERE datname = $1",
            database.name))

    pools = [Postgres(pgbouncer, max_connections=1, pgbouncer=True) for _ in range(2)]
    turns = 40
    try:
        for pg in pools:  # connected (and the role checked) before counting
            async with pg.connection() as conn, pg.single(conn):
                await conn.fetchval("SELECT 1")
        before = await transactions()
        for i in range(turns):
            pg = pools[i % 2]
            async with pg.connection() as conn, pg.single(conn):
                await conn.fetchval("SELECT 1")
        async with pools[0].connection() as conn, pools[0].single(conn):
            # The server connection's statistics now, not within its next idle interval.
            await conn.fetchval("SELECT pg_stat_force_next_flush()")

        async def counted() -> bool:
            return await transactions() - before >= turns + 1

        assert await wait_until(counted, 15)
        await asyncio.sleep(0.5)
        spent = await transactions() - before
        # turns + the flush request, with room for the server's own work in a database just
        # created (5-12 more measured, autovacuum among it); one SET per turn doubled it.
        assert spent < turns + 1 + turns // 2, (
            f"{spent} server transactions for {turns + 1} statements")
    finally:
        for pg in pools:
            await pg.close()
        await maintenance.close()
