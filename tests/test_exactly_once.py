"""Exactly once for every table the agent writes, under a full replay of its spool, and
row-level security on every tenant table, checked as the agent's own login role in SQL.

The duplicate checks here count rows per table and per action: a primary key cannot make
them pass by itself (audit entries and dead letters had surrogate keys, and doubled on
every replay before they carried ids of their own)."""

from __future__ import annotations

import asyncio
import json
import struct
from pathlib import Path

import asyncpg
import pytest

from flux_agent import Agent
from flux_agent.spool import crc32c
from flux_agent.testing import make_event, make_events

from .support.agents import AgentProcess, agent_config, agent_env
from .support.http import get, post, put
from .support.polling import wait_until
from .support.postgres import Database

pytestmark = pytest.mark.slow

TENANT_TABLES = ("events", "checkpoints", "checkpoint_history", "dead_letters", "audit_log")


async def counts(db: Database) -> dict[str, object]:
    out: dict[str, object] = {}
    for table in ("events", "checkpoints", "checkpoint_history", "dead_letters"):
        out[table] = await db.fetchval(f"SELECT count(*) FROM flux.{table}")
    rows = await db.fetch("SELECT action, count(*) AS n FROM flux.audit_log GROUP BY action")
    out["audit"] = {r["action"]: r["n"] for r in rows}
    return out


async def settled(proc: AgentProcess) -> bool:
    _, body, _ = await get(proc.admin_url + "/health/ready")
    return body["spool"]["backlog_records"] == 0


def forget_cursor(spool: Path) -> None:
    """What a power loss may do to the cursor (written without fsync): back to zero, so
    the next start replays every record on the spool."""
    (spool / "cursor").write_bytes(struct.pack("<QI", 0, crc32c(struct.pack("<Q", 0))))


@pytest.mark.fault
async def test_a_full_replay_writes_nothing_twice_in_any_table(database: Database,
                                                              state_dir: Path):
    conn = await asyncpg.connect(database.admin_dsn)
    await conn.execute("ALTER TABLE flux.events ADD CONSTRAINT no_poison "
                       "CHECK (payload->>'poison' IS NULL)")
    await conn.close()
    # Keep the committed segments (the default window) and one segment for all of it.
    proc = AgentProcess(agent_env(database, state_dir), state_dir / "agent.log")
    await asyncio.to_thread(proc.start)
    events = make_events(30)
    events[7]["payload"]["poison"] = "yes"
    status, body, _ = await post(proc.url + "/v1/events", events)
    assert status == 202 and body["accepted"] == 30, body
    foreign = make_event(agency="noaa")
    status, body, _ = await post(proc.url + "/v1/events", [foreign])
    assert status == 403, body  # audited as an isolation violation
    for i in range(2):
        status, body, _ = await put(proc.url + "/v1/runs/once-1/checkpoint",
                                    {"step": f"s{i}", "state": {"i": i}})
        assert status == 201, body
    assert await wait_until(lambda: settled(proc), 30)
    first = await counts(database)
    assert first["events"] == 29 + 2  # 29 good events, 2 checkpoint.saved events
    assert first["dead_letters"] == 1
    assert (first["checkpoints"], first["checkpoint_history"]) == (1, 2)
    assert first["audit"] == {"agent.start": 1, "isolation.violation": 1,
                              "checkpoint.saved": 2}, first["audit"]

    proc.kill()
    forget_cursor(state_dir / "spool")
    await asyncio.to_thread(proc.start)
    try:
        assert await wait_until(lambda: settled(proc), 30)
        log = (state_dir / "agent.log").read_text()
        recovered = [json.loads(line) for line in log.splitlines()
                     if '"spool recovered"' in line]
        assert recovered[-1]["fields"]["pending_records"] >= 5, recovered[-1]  # it replayed
        second = await counts(database)
        assert second == {**first, "audit": {**first["audit"], "agent.start": 2}}, second
    finally:
        assert await asyncio.to_thread(proc.terminate) == 0


async def test_a_re_post_is_a_duplicate_and_does_not_grow_the_spool(database: Database,
                                                                   state_dir: Path):
    async with Agent(agent_config(database, state_dir)) as agent:
        url = agent.endpoints.event_url + "/v1/events"
        events = make_events(10)
        status, body, _ = await post(url, events, headers={"Prefer": "wait=committed"})
        assert status == 200 and body["accepted"] == 10, body
        assert agent.spool is not None
        before = agent.spool.appended_bytes
        status, body, _ = await post(url, events, headers={"Prefer": "wait=committed"})
        assert status == 200 and (body["accepted"], body["duplicates"]) == (0, 10), body
        assert agent.spool.appended_bytes == before
        assert await database.fetchval("SELECT count(*) FROM flux.events") == 10


# --------------------------------------------------------------------------- RLS, in SQL


async def as_agent(db: Database) -> asyncpg.Connection:
    conn = await asyncpg.connect(db.login_dsn)
    role = await conn.fetchrow("SELECT rolsuper, rolbypassrls FROM pg_roles "
                               "WHERE rolname = current_user")
    assert (role["rolsuper"], role["rolbypassrls"]) == (False, False)
    return conn


async def test_row_level_security_is_forced_on_every_tenant_table(database: Database):
    rows = await database.fetch(
        "SELECT c.relname, c.relrowsecurity, c.relforcerowsecurity FROM pg_class c "
        "JOIN pg_namespace n ON n.oid = c.relnamespace "
        "WHERE n.nspname = 'flux' AND c.relname = ANY($1::text[])", list(TENANT_TABLES))
    assert {r["relname"]: (r["relrowsecurity"], r["relforcerowsecurity"]) for r in rows} == \
        {t: (True, True) for t in TENANT_TABLES}
    policies = await database.fetch(
        "SELECT tablename, roles::text[] AS roles, qual, with_check FROM pg_policies "
        "WHERE schemaname = 'flux'")
    for table in TENANT_TABLES:
        # Every policy that can apply to the agent's role keys on the declared agency
        # (policies for other roles, such as the owner's maintenance policy, do not reach it).
        mine = [p for p in policies if p["tablename"] == table
                and set(p["roles"]) & {"public", "flux_agent"}]
        assert mine, table
        for p in mine:
            for expr in (p["qual"], p["with_check"]):
                assert expr is None or "flux.current_agency_id" in expr, (table, expr)


async def test_the_agent_role_sees_and_writes_only_the_declared_agency(
        database: Database, state_dir: Path):
    # Rows of two agencies in every tenant table, written by the agent itself.
    for agency in ("nasa", "noaa"):
        config = agent_config(database, state_dir / agency, agency=agency)
        async with Agent(config) as agent:
            status, body, _ = await post(agent.endpoints.event_url + "/v1/events",
                                         make_events(3 if agency == "nasa" else 5))
            assert status == 202, body
            status, body, _ = await put(agent.endpoints.event_url + "/v1/runs/r1/checkpoint",
                                        {"step": "s", "state": {"a": agency}})
            assert status == 201, body
            assert agent.flusher is not None and await agent.flusher.drain(10)
    admin = await asyncpg.connect(database.admin_dsn)
    await admin.execute(
        "INSERT INTO flux.dead_letters (agency_id, item_id, reason, event) VALUES "
        "('nasa', gen_random_uuid(), 'test', ''), ('noaa', gen_random_uuid(), 'test', '')")
    await admin.close()
    conn = await as_agent(database)
    try:
        # No agency declared: nothing is visible, in any table the role may read.
        async with conn.transaction():
            for table in ("events", "checkpoints", "checkpoint_history", "dead_letters"):
                assert await conn.fetchval(f"SELECT count(*) FROM flux.{table}") == 0, table
        # One agency declared: exactly its rows, although the query names no agency. This
        # fails if row-level security were off: every store query also filters by agency,
        # this one does not.
        for agency, events in (("nasa", 3 + 1), ("noaa", 5 + 1)):
            async with conn.transaction():
                await conn.execute("SELECT set_config('flux.current_agency_id', $1, true)",
                                   agency)
                assert await conn.fetchval("SELECT count(*) FROM flux.events") == events
                assert await conn.fetchval(
                    "SELECT count(*) FROM flux.events WHERE agency_id <> $1", agency) == 0
                for table in ("checkpoints", "checkpoint_history", "dead_letters"):
                    assert await conn.fetchval(f"SELECT count(*) FROM flux.{table}") == 1
                # Another agency's checkpoint cannot be changed: it is not there.
                other = "noaa" if agency == "nasa" else "nasa"
                assert await conn.execute(
                    "UPDATE flux.checkpoints SET step = 'x' WHERE agency_id = $1",
                    other) == "UPDATE 0"
        # Writing as another agency than the declared one is refused, table by table.
        forged = {
            "events": "INSERT INTO flux.events (agency_id, event_id, run_id, kind, "
                      "occurred_at, received_at, payload, payload_sha256, expires_at) VALUES "
                      "('noaa', gen_random_uuid(), 'r', 'run.started', now(), now(), '{}', "
                      "repeat('0', 64), now())",
            "checkpoint_history": "INSERT INTO flux.checkpoint_history (agency_id, run_id, "
                      "version, step, state, checkpoint_hash, saved_at, expires_at, event_id) "
                      "VALUES ('noaa', 'r9', 1, 's', '{}', repeat('0', 64), now(), now(), "
                      "gen_random_uuid())",
            "dead_letters": "INSERT INTO flux.dead_letters (agency_id, item_id, reason, "
                            "event) VALUES ('noaa', gen_random_uuid(), 'x', '')",
            "audit_log": "INSERT INTO flux.audit_log (at, agency_id, actor, action, success, "
                         "source, entry_id) VALUES (now(), 'noaa', 'x', 'y', true, 'agent', "
                         "gen_random_uuid())",
        }
        for table, sql in forged.items():
            async with conn.transaction():
                await conn.execute("SELECT set_config('flux.current_agency_id', 'nasa', true)")
                with pytest.raises(asyncpg.InsufficientPrivilegeError,
                                   match="row-level security"):
                    await conn.execute(sql)
            assert table in TENANT_TABLES
        # The audit trail is append-only for the agent: it cannot even read it.
        with pytest.raises(asyncpg.InsufficientPrivilegeError):
            await conn.fetchval("SELECT count(*) FROM flux.audit_log")
    finally:
        await conn.close()
