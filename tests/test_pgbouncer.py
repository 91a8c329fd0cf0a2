"""Through a real PgBouncer in transaction pooling mode: two agents of two agencies share one
server connection, and nothing of one transaction (the agency setting above all) leaks into
the next."""

from __future__ import annotations

import asyncio
import contextlib
import os
import pwd
import shutil
import signal
import subprocess
from collections.abc import AsyncIterator
from urllib.parse import urlsplit

import pytest

from flux_agent import Agent
from flux_agent.config import Secret
from flux_agent.embedded import free_port
from flux_agent.testing import make_events

from .conftest import LOGIN_PASSWORD, LOGIN_ROLE, Database, agent_config, short_tempdir
from .faults import wait_until
from .helpers import post
from .tools import require_tool


@pytest.fixture
async def pgbouncer(database: Database) -> AsyncIterator[str]:
    binary = require_tool("pgbouncer")
    target = urlsplit(database.admin_dsn)
    root = short_tempdir("fa-pgb-")
    port = free_port()
    (root / "userlist.txt").write_text(f'"{LOGIN_ROLE}" "{LOGIN_PASSWORD}"\n')
    (root / "pgbouncer.ini").write_text(f"""
[databases]
{database.name} = host={target.hostname} port={target.port} dbname={database.name}

[pgbouncer]
listen_addr = 127.0.0.1
listen_port = {port}
unix_socket_dir =
auth_type = plain
auth_file = {root}/userlist.txt
pool_mode = transaction
default_pool_size = 1
max_client_conn = 50
server_reset_query =
ignore_startup_parameters = extra_float_digits
logfile = {root}/pgbouncer.log
pidfile = {root}/pgbouncer.pid
""")
    kwargs = {}
    if os.geteuid() == 0:  # PgBouncer refuses to run as root
        user = pwd.getpwnam("postgres") if _has_user("postgres") else pwd.getpwnam("nobody")
        for p in root.iterdir():
            os.chown(p, user.pw_uid, user.pw_gid)
        os.chown(root, user.pw_uid, user.pw_gid)
        kwargs = {"user": user.pw_uid, "group": user.pw_gid}
    proc = subprocess.Popen([str(binary), str(root / "pgbouncer.ini")], **kwargs)

    async def listening() -> bool:
        with contextlib.suppress(OSError):
            _, w = await asyncio.open_connection("127.0.0.1", port)
            w.close()
            return True
        return False

    assert await wait_until(listening, 15), (root / "pgbouncer.log").read_text()
    yield f"postgresql://{LOGIN_ROLE}:{LOGIN_PASSWORD}@127.0.0.1:{port}/{database.name}"
    proc.send_signal(signal.SIGTERM)
    proc.wait(10)
    shutil.rmtree(root, ignore_errors=True)


def _has_user(name: str) -> bool:
    try:
        pwd.getpwnam(name)
    except KeyError:
        return False
    return True


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
                          database_pgbouncer=True, retention_interval=0.2)
    try:
        async with Agent(config) as agent:
            async def maintained() -> bool:
                return agent.partition_stats is not None and agent.retention_rounds >= 2

            assert await wait_until(maintained, 20)
            assert agent.partition_counts["created"] >= 1  # agency partitions ahead
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
