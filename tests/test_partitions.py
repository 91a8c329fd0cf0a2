"""flux.events partitioned by time (sql/006, sql/007) on a real PostgreSQL: the key, exactly
once across partition boundaries, restarts and replays, the migration of a populated database,
retention by dropping partitions (per agency), the default partition, reads, privileges."""

from __future__ import annotations

import asyncio
import json
import os
import re
import shutil
import uuid
from collections.abc import AsyncIterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import asyncpg
import pytest

from flux_agent import Agent
from flux_agent.core.digest import payload_digest
from flux_agent.core.event import Row
from flux_agent.core.ids import id_ms, id_time, uuid7_at
from flux_agent.flush.batch import Work
from flux_agent.postgres.errors import LockTimeout
from flux_agent.postgres.migrations import migrate, migrations
from flux_agent.postgres.pool import Postgres
from flux_agent.postgres.sink import Sink
from flux_agent.testing import make_event

from .support.agents import agent_config
from .support.http import get, post, put
from .support.paths import short_tempdir
from .support.polling import wait_until
from .support.postgres import LOGIN_PASSWORD, Database, PgServer, create_database, drop_database

SQL_DIR = Path(__file__).resolve().parent.parent / "sql"
DAY = timedelta(days=1)
MS = timedelta(milliseconds=1)


def v7(at: datetime) -> str:
    made = uuid7_at(at, os.urandom(10))
    assert made is not None
    return made


def row(event_id: str, *, agency: str = "nasa", run_id: str = "run-p",
        occurred_at: datetime | None = None, received_at: datetime | None = None,
        retention: timedelta = 30 * DAY, payload: dict[str, Any] | None = None) -> Row:
    """A sealed event as the agent builds it; times default to the id's own."""
    at = id_time(event_id) or datetime.now(UTC)
    occurred_at = occurred_at or at
    received_at = received_at or at
    canonical, digest = payload_digest(payload or {"n": 1})
    return Row(agency, event_id, run_id, "step.completed", "s", occurred_at, received_at, None,
               None, canonical.decode(), digest, "corr", "test", None, None,
               received_at + retention)


@pytest.fixture
async def sink(database: Database) -> AsyncIterator[Sink]:
    """The agent's own write path (flux.write_v1), as its unprivileged login role."""
    pg = Postgres(database.agent_dsn, max_connections=2)
    yield Sink(pg, migrate_on_connect=False)
    await pg.close()


async def execute(database: Database, sql: str) -> None:
    conn = await asyncpg.connect(database.admin_dsn)
    try:
        await conn.execute(sql)
    finally:
        await conn.close()


async def stored(database: Database, event_id: str) -> list[asyncpg.Record]:
    return await database.fetch(
        "SELECT tableoid::regclass::text AS part, occurred_at, received_at, payload "
        "FROM flux.events WHERE event_id = $1::uuid", event_id)


async def backdate(database: Database, days: int, agencies: list[str]) -> datetime:
    """Give a fresh test database daily time ranges for the past ``days`` days, as if it had
    been partitioned that long: the (empty) unkeyed partition is cut back and the ranges are
    made by the migration's own function. Returns the start of the oldest range."""
    conn = await asyncpg.connect(database.admin_dsn)
    try:
        async with conn.transaction():
            first = await conn.fetchval(
                "SELECT min(from_time) FROM flux.event_partitions WHERE kind = 'range'")
            start = first.replace(hour=0, minute=0, second=0, microsecond=0) - days * DAY
            assert await conn.fetchval("SELECT count(*) FROM flux.events_unkeyed") == 0
            await conn.execute("ALTER TABLE flux.events DETACH PARTITION flux.events_unkeyed")
            await conn.execute("ALTER TABLE flux.events ATTACH PARTITION flux.events_unkeyed "
                               f"FOR VALUES FROM (MINVALUE) TO ('{start.isoformat()}')")
            lo = start
            while lo < first:
                hi = min(lo + DAY, first)
                await conn.execute("SELECT flux._create_event_range($1, $2, $3)", lo, hi,
                                   agencies)
                lo = hi
    finally:
        await conn.close()
    return start


# --------------------------------------------------------------------------- the key


async def test_the_sql_key_is_the_python_key(database: Database):
    """flux.event_id_time (what PostgreSQL routes by) and flux_agent.core.ids.id_time agree, on
    every kind of id: v7 at the edges of its range, v7 with a wrong variant, other versions."""
    ids = [str(uuid.uuid4()), str(uuid.uuid1()), str(uuid.uuid5(uuid.NAMESPACE_URL, "x")),
           "00000000-0000-0000-0000-000000000000", "ffffffff-ffff-ffff-ffff-ffffffffffff",
           "00000000-0000-7000-8000-000000000000",  # v7 at the epoch
           "ffffffff-ffff-7fff-bfff-ffffffffffff",  # v7 at the end of 48-bit time
           "01900000-0000-7000-c000-000000000000",  # version 7, variant 110: not v7
           "01900000-0000-8000-8000-000000000000"]  # version 8
    ids += [v7(datetime.now(UTC) + timedelta(milliseconds=i * 7919)) for i in range(200)]
    rows = await database.fetch(
        "SELECT u::text AS id, flux.event_id_time(u) = '-infinity' AS unkeyed, "
        "CASE WHEN flux.event_id_time(u) > '-infinity' "
        "THEN (extract(epoch FROM flux.event_id_time(u)) * 1000)::bigint END AS ms "
        "FROM unnest($1::uuid[]) AS u", ids)
    assert len(rows) == len(ids)
    for r in rows:
        expect = id_ms(r["id"])
        assert (r["unkeyed"], r["ms"]) == (expect is None, expect), r
        if expect is not None and expect < 253402300800000:  # Python's datetime ends at 9999
            assert id_time(r["id"]) == datetime(1970, 1, 1, tzinfo=UTC) + expect * MS, r
    ms = {r["id"]: r["ms"] for r in rows}
    assert ms["00000000-0000-7000-8000-000000000000"] == 0
    assert ms["ffffffff-ffff-7fff-bfff-ffffffffffff"] == 2**48 - 1
    assert sum(1 for r in rows if r["unkeyed"]) == 7


# --------------------------------------------------------------------------- exactly once


async def replay_across_boundary(conn: Any, table: str) -> int:
    """Store an event whose id carries a time just before a partition boundary, then replay
    it the way a client does hours later (other occurred_at, received_at and expiry: all after
    the boundary), and a second time; returns how many rows the table keeps of it."""
    boundary = await conn.fetchval(
        "SELECT min(from_time) FROM flux.event_partitions WHERE kind = 'range' "
        "AND from_time > now() + interval '1 hour'")
    event_id = v7(boundary - timedelta(milliseconds=1))
    first = row(event_id, occurred_at=boundary - timedelta(milliseconds=1))
    later = row(event_id, occurred_at=boundary + timedelta(hours=2),
                received_at=boundary + timedelta(hours=2), payload={"n": 2})
    cols = ", ".join(Row._fields)
    for r in (first, later, later):
        await conn.execute(f"INSERT INTO {table} ({cols}) VALUES "
                           f"({', '.join(f'${i + 1}' for i in range(len(r)))}) "
                           "ON CONFLICT DO NOTHING", *r)
    return int(await conn.fetchval(f"SELECT count(*) FROM {table} WHERE event_id = $1",
                                   event_id))


async def test_a_replay_across_a_partition_boundary_is_stored_once(database: Database):
    conn = await asyncpg.connect(database.admin_dsn)
    try:
        assert await replay_across_boundary(conn, "flux.events") == 1
        # The control: the same layout keyed by occurred_at, which a re-post may change,
        # keeps the replay as a second row (in the next partition). The test can fail.
        boundary = await conn.fetchval(
            "SELECT min(from_time) FROM flux.event_partitions WHERE kind = 'range' "
            "AND from_time > now() + interval '1 hour'")
        await conn.execute(f"""
            CREATE TABLE public.control (LIKE flux.events) PARTITION BY RANGE (occurred_at);
            CREATE TABLE public.control_a PARTITION OF public.control
                FOR VALUES FROM (MINVALUE) TO ('{boundary.isoformat()}');
            CREATE TABLE public.control_b PARTITION OF public.control DEFAULT;
            ALTER TABLE public.control_a ADD PRIMARY KEY (agency_id, event_id);
            ALTER TABLE public.control_b ADD PRIMARY KEY (agency_id, event_id);""")
        assert await replay_across_boundary(conn, "public.control") == 2
    finally:
        await conn.close()


async def test_the_write_path_replays_into_the_partition_of_the_first_write(sink: Sink,
                                                                            database: Database):
    """flux.write_v1 (unchanged, what agents of the previous version call too): a replay
    with everything but the id changed is a duplicate, whichever partition it would have
    gone to by its other times; ids of other UUID versions and far-off times too."""
    boundary = await database.fetchval(  # the end of the range holding now
        "SELECT min(to_time) FROM flux.event_partitions WHERE kind = 'range' "
        "AND to_time > now()")
    ids = {"v7 before a boundary": v7(boundary - timedelta(milliseconds=1)),
           "v7 now": v7(datetime.now(UTC)),
           "uuid4": str(uuid.uuid4()),
           "uuid5": str(uuid.uuid5(uuid.NAMESPACE_DNS, "flux")),
           "v7 a year ahead": v7(datetime.now(UTC) + 365 * DAY),
           "v7 in 2001": v7(datetime(2001, 9, 9, tzinfo=UTC))}
    first = [row(i) for i in ids.values()]
    written = await sink.write(Work(events=first), returning=True)
    inserted, new = written.inserted, written.new_ids
    assert inserted == len(ids) and new == set(ids.values())
    shifted = [row(i, occurred_at=boundary + DAY, received_at=datetime.now(UTC) + DAY,
                   retention=DAY, payload={"n": 2}) for i in ids.values()]
    for _ in range(2):
        written = await sink.write(Work(events=shifted), returning=True)
        assert (written.inserted, written.new_ids) == (0, set())
    where = {}
    for name, event_id in ids.items():
        rows = await stored(database, event_id)
        assert len(rows) == 1, name
        assert json.loads(rows[0]["payload"]) == {"n": 1}, name  # the first write's row
        where[name] = rows[0]["part"]
    assert where["uuid4"] == where["uuid5"] == where["v7 in 2001"] == "flux.events_unkeyed"
    assert where["v7 a year ahead"] == "flux.events_default"
    # The range holding now (made by the migration, before any agency was known): its
    # default partition, until ranges made by the agent's maintenance take over.
    assert where["v7 before a boundary"].startswith("flux.events_2")
    assert where["v7 before a boundary"] == where["v7 now"]


async def test_a_replay_after_a_restart_and_a_spool_replay_store_one_row(
        database: Database):
    """Through the agent: an event whose id is in yesterday's partition, posted today, then
    re-posted by the client (other occurred_at and payload) to a restarted agent that has
    forgotten it, and then replayed from the spool as after a failover: one row."""
    await backdate(database, 2, ["nasa"])
    yesterday = datetime.now(UTC).replace(hour=0, minute=0, second=0, microsecond=0)
    event = make_event(event_id=v7(yesterday - timedelta(milliseconds=1)),
                       occurred_at="2026-01-01T00:00:00Z")
    states = [short_tempdir(), short_tempdir()]
    try:
        async with Agent(agent_config(database, states[0])) as first:
            status, body, _ = await post(first.endpoints.event_url + "/v1/events", event,
                                         headers={"Prefer": "wait=committed"})
            assert (status, body["accepted"]) == (200, 1), body
        again = {**event, "occurred_at": datetime.now(UTC).isoformat(),
                 "payload": {"items_processed": 2, "duration_ms": 1.0}}
        async with Agent(agent_config(database, states[1], spool_keep_committed=60.0)) as agent:
            status, body, _ = await post(agent.endpoints.event_url + "/v1/events", again,
                                         headers={"Prefer": "wait=committed"})
            assert status == 200, body
            assert (body["accepted"], body["duplicates"]) == (0, 1), body
            assert agent.flusher is not None and agent.spool is not None
            agent.flusher.replay(agent.spool.replay_start(60.0))

            async def replayed() -> bool:
                assert agent.flusher is not None
                return agent.flusher.stats.replays == 1 and agent.flusher.backlog == 0

            assert await wait_until(replayed, 10)
            await asyncio.sleep(0.3)
            assert agent.flusher.stats.events_restored == 0
        rows = await stored(database, event["event_id"])
        assert len(rows) == 1
        assert rows[0]["part"].startswith("flux.events_") and rows[0]["part"].endswith("_nasa")
        assert rows[0]["occurred_at"] == datetime(2026, 1, 1, tzinfo=UTC)
    finally:
        for s in states:
            shutil.rmtree(s, ignore_errors=True)


async def test_the_agents_own_ids_land_in_time_partitions(agent: Agent, database: Database):
    """checkpoint.saved events get UUIDv7 ids of the save's time: a time partition, not the
    row-by-row one (OpenLineage ids: tests/test_lineage.py)."""
    status, body, _ = await put(agent.endpoints.event_url + "/v1/runs/own-ids/checkpoint",
                                {"step": "s", "state": {"offset": 1}},
                                headers={"Prefer": "wait=committed"})
    assert status == 201, body
    rows = await database.fetch(
        "SELECT event_id::text, tableoid::regclass::text AS part, received_at FROM flux.events "
        "WHERE kind = 'checkpoint.saved' AND run_id = 'own-ids'")
    assert len(rows) == 1
    at = id_time(rows[0]["event_id"])
    assert at is not None and abs(at - rows[0]["received_at"]) < timedelta(milliseconds=1)
    assert rows[0]["part"].startswith("flux.events_2"), rows[0]["part"]


# --------------------------------------------------------------------------- the migration


async def database_before_partitions(pg_template: PgServer,
                                     tmp_path: Path) -> tuple[Database, Path]:
    """An empty database, and a directory holding the migrations up to 005 (the schema
    before partitioning) for the test to apply."""
    db = await create_database(pg_template, template="template0")
    old_sql = tmp_path / "sql"
    old_sql.mkdir()
    for m in migrations(SQL_DIR):
        if m.version[:3] <= "005":
            shutil.copy(m.path, old_sql)
    return db, old_sql


async def test_the_migration_keeps_every_row_of_a_populated_database(pg_template: PgServer,
                                                                     tmp_path: Path):
    """A database at version 5 holding events of every kind of id (clocks ahead included),
    checkpoints, dead letters and audit entries; migrated in place: every row is still
    there, once, where its key routes it, and a replay of any of them stores nothing."""
    db, old_sql = await database_before_partitions(pg_template, tmp_path)
    conn = await asyncpg.connect(db.admin_dsn)
    try:
        assert await migrate(conn, old_sql) == ["001_events", "002_audit", "003_checkpoints",
                                                "004_exactly_once", "005_write_path"]
        now = datetime.now(UTC)
        ids = ([str(uuid.uuid4()) for _ in range(300)]
               + [str(uuid.uuid5(uuid.NAMESPACE_OID, str(i))) for i in range(50)]
               + [v7(now - timedelta(minutes=i * 37)) for i in range(600)]
               + [v7(now + timedelta(hours=5 + i)) for i in range(30)]  # clocks ahead
               + [v7(now + 400 * DAY)])  # far ahead: no range will be made for it
        rows = [row(e, agency=("nasa", "noaa", "smithsonian")[i % 3], run_id=f"r{i % 7}")
                for i, e in enumerate(ids)]
        cols = ", ".join(Row._fields)
        await conn.copy_records_to_table("events", schema_name="flux", records=rows,
                                         columns=Row._fields)
        await conn.execute("""
            INSERT INTO flux.dead_letters (agency_id, item_id, event_id, reason, event)
                VALUES ('nasa', gen_random_uuid(), gen_random_uuid(), 'test', '\\x00');
            INSERT INTO flux.audit_log (at, agency_id, actor, action, success, source, entry_id)
                VALUES (now(), 'nasa', 'local', 'agent.start', true, 'agent',
                        gen_random_uuid());
            INSERT INTO flux.checkpoint_history (agency_id, run_id, version, step, state,
                checkpoint_hash, saved_at, expires_at, event_id)
                VALUES ('nasa', 'r1', 1, 's', '{}', repeat('a', 64), now(),
                        now() + interval '1 day', gen_random_uuid())""")
        snapshot = (f"SELECT md5(string_agg(t::text, '|' ORDER BY agency_id, event_id)), "
                    f"count(*) FROM (SELECT {cols} FROM flux.events) AS t")
        before = await conn.fetchrow(snapshot)
        others = ("SELECT (SELECT count(*) FROM flux.dead_letters), "
                  "(SELECT count(*) FROM flux.audit_log), "
                  "(SELECT count(*) FROM flux.checkpoint_history)")
        others_before = await conn.fetchrow(others)

        assert await migrate(conn) == ["006_event_id_time", "007_partitions",
                                       "008_payload_hints"]
        assert await conn.fetchrow(snapshot) == before
        assert await conn.fetchrow(others) == others_before
        parts = {r["event_id"]: r["part"] for r in await conn.fetch(
            "SELECT event_id::text, tableoid::regclass::text AS part FROM flux.events")}
        cutoff = await conn.fetchval(
            "SELECT to_time FROM flux.event_partitions WHERE kind = 'unkeyed'")
        for event_id in ids:
            key = id_time(event_id)
            if key is None or key < cutoff:
                assert parts[event_id] == "flux.events_unkeyed", event_id
            elif key > now + 30 * DAY:
                assert parts[event_id] == "flux.events_default", event_id
            else:  # moved out of the old table, into the range made for its time
                assert parts[event_id].startswith("flux.events_2"), (event_id, parts[event_id])
        # Exactly once across the migration: every stored event, replayed, is a duplicate.
        await conn.execute("SET ROLE flux_agent")
        written = await conn.fetchval(
            "SELECT inserted FROM flux.write_v1($1, '{}', '{}', false)", rows)
        assert written == 0
        await conn.execute("RESET ROLE")
        assert await conn.fetchval("SELECT count(*) FROM flux.events") == len(ids)
    finally:
        await conn.close()
        await drop_database(pg_template, db.name)


async def test_a_validated_cutoff_constraint_spares_the_migration_its_scans(
        pg_template: PgServer, tmp_path: Path):
    """The procedure for huge tables (README): the key function applied ahead, a constraint
    validated online; the migration then moves nothing and PostgreSQL proves the ATTACH from
    the constraint instead of reading the table."""
    db, old_sql = await database_before_partitions(pg_template, tmp_path)
    conn = await asyncpg.connect(db.admin_dsn)
    try:
        await migrate(conn, old_sql)
        now = datetime.now(UTC)
        ids = [str(uuid.uuid4()) for _ in range(50)] + [v7(now - i * DAY) for i in range(50)]
        await conn.copy_records_to_table("events", schema_name="flux",
                                         records=[row(e) for e in ids], columns=Row._fields)
        cutoff = (now + 2 * DAY).replace(hour=0, minute=0, second=0, microsecond=0)
        await conn.execute((SQL_DIR / "006_event_id_time.sql").read_text())
        await conn.execute(
            "ALTER TABLE flux.events ADD CONSTRAINT events_partition_cutoff CHECK ("
            "flux.event_id_time(event_id) IS NOT NULL AND flux.event_id_time(event_id) < "
            f"'{cutoff.isoformat()}') NOT VALID")
        await conn.execute("ALTER TABLE flux.events VALIDATE CONSTRAINT events_partition_cutoff")
        said: list[str] = []
        conn.add_log_listener(lambda _c, message: said.append(message.message))
        await conn.execute("SET client_min_messages = debug1")
        assert await migrate(conn) == ["006_event_id_time", "007_partitions",
                                       "008_payload_hints"]
        await conn.execute("RESET client_min_messages")
        assert any('"events_unkeyed" is implied by existing constraints' in m for m in said), said
        assert not any('verifying table "events_unkeyed"' in m for m in said), said
        assert await conn.fetchval("SELECT to_time FROM flux.event_partitions "
                                   "WHERE kind = 'unkeyed'") == cutoff
        assert await conn.fetchval("SELECT count(*) FROM pg_constraint "
                                   "WHERE conname = 'events_partition_cutoff'") == 0
        assert await conn.fetchval(
            "SELECT count(*) FROM flux.events_unkeyed") == len(ids)
    finally:
        await conn.close()
        await drop_database(pg_template, db.name)


async def test_every_partition_is_keyed_forced_and_granted(database: Database, sink: Sink):
    """The invariant exactly-once rests on (each partition has its own primary key on
    (agency_id, event_id)) and isolation (forced row-level security, the parent's grants),
    for the partitions the migration made and those maintenance makes."""
    while await sink.prepare_partition(["nasa", "noaa"], 86400.0, 3 * 86400.0, 2.0):
        pass
    rows = await database.fetch("""
        SELECT p.partition::text, p.kind, c.relkind, c.relrowsecurity, c.relforcerowsecurity,
               has_table_privilege('flux_agent', c.oid, 'SELECT,INSERT') AS granted,
               EXISTS (SELECT 1 FROM pg_index i WHERE i.indrelid = c.oid AND i.indisunique
                        AND i.indkey::int2[] = ARRAY(
                            SELECT attnum FROM pg_attribute WHERE attrelid = c.oid
                               AND attname IN ('agency_id', 'event_id') ORDER BY attnum)
                      ) AS keyed,
               (SELECT array_agg(polname::text ORDER BY polname) FROM pg_policy
                 WHERE polrelid = c.oid) AS policies
          FROM flux.event_partitions p JOIN pg_class c ON c.oid = p.partition""")
    assert {r["kind"] for r in rows} == {"unkeyed", "default", "range", "agency", "others"}
    assert sum(1 for r in rows if r["kind"] == "agency") >= 2
    for r in rows:
        assert r["relrowsecurity"] and r["relforcerowsecurity"], r
        assert r["granted"], r
        assert r["policies"] == ["events_by_agency", "events_maintenance"], r
        assert r["keyed"] == (r["relkind"] == "r"), r
    # Through a partition directly, the agent's role still sees only its own agency.
    await sink.write(Work(events=[row(v7(datetime.now(UTC)), agency="noaa")]), returning=False)
    leaf = await database.fetchval(
        "SELECT tableoid::regclass::text FROM flux.events WHERE agency_id = 'noaa'")
    conn = await asyncpg.connect(database.agent_dsn)
    try:
        assert await conn.fetchval(f"SELECT count(*) FROM {leaf}") == 0
        async with conn.transaction():
            await conn.execute("SELECT set_config('flux.current_agency_id', 'nasa', true)")
            assert await conn.fetchval(f"SELECT count(*) FROM {leaf}") == 0
        # ... and cannot create or drop partitions itself.
        with pytest.raises(asyncpg.InsufficientPrivilegeError):
            await conn.execute(f"DROP TABLE {leaf}")
        with pytest.raises(asyncpg.InsufficientPrivilegeError):
            await conn.execute("SELECT flux._create_event_range(now(), now(), '{}')")
    finally:
        await conn.close()


# --------------------------------------------------------------------------- retention


MANIFEST = {"version": 1, "default_retention_days": 30, "agencies": [
    {"slug": "nasa", "name": "NASA", "retention_days": 30},
    {"slug": "noaa", "name": "NOAA", "retention_days": 1}]}


async def test_a_shorter_retention_agency_is_dropped_after_its_time_while_others_stay(
        database: Database, sink: Sink, tmp_path: Path):
    start = await backdate(database, 6, ["nasa", "noaa"])
    old = start + timedelta(hours=12)  # five days and more ago
    nasa = [v7(old + timedelta(seconds=i)) for i in range(20)]
    noaa = [v7(old + timedelta(seconds=i)) for i in range(20)]
    late = v7(old + timedelta(seconds=30))  # noaa, received now: not expired for a day
    rows = [row(e) for e in nasa] + [row(e, agency="noaa", retention=DAY) for e in noaa]
    rows.append(row(late, agency="noaa", received_at=datetime.now(UTC), retention=DAY))
    await sink.write(Work(events=rows), returning=False)
    noaa_leaf = (await stored(database, noaa[0]))[0]["part"]
    assert noaa_leaf == (await stored(database, late))[0]["part"]
    manifest = tmp_path / "agencies.json"
    manifest.write_text(json.dumps(MANIFEST))
    config = agent_config(database, short_tempdir(), retention_interval=0.2,
                          agency_manifest=str(manifest))
    try:
        async with Agent(config) as agent:
            await asyncio.sleep(1.5)  # several rounds
            # The late row keeps its partition: nothing of noaa's is gone yet (noaa's empty
            # partitions of those days are).
            assert await database.fetchval("SELECT count(*) FROM flux.events") == 41
            assert await database.fetchval(f"SELECT to_regclass('{noaa_leaf}')") is not None
            await database.fetch("UPDATE flux.events SET expires_at = now() - interval '1 s' "
                                 "WHERE event_id = $1::uuid", late)

            async def noaa_gone() -> bool:
                return await database.fetchval(
                    "SELECT count(*) FROM flux.events WHERE agency_id = 'noaa'") == 0

            assert await wait_until(noaa_gone, 15)
            assert agent.retention.counts["dropped"] >= 2
            _, metrics, _ = await get(agent.endpoints.admin_url + "/metrics")
            assert "flux_event_partitions_dropped_total" in metrics
            assert "flux_event_partitions_ahead_seconds" in metrics
        # Gone by dropping noaa's partitions, not by deleting rows; nasa's are all there.
        assert agent.retention.purged.get("events", 0) == 0
        kept = {str(r[0]) for r in await database.fetch(
            "SELECT event_id FROM flux.events WHERE agency_id = 'nasa'")}
        assert kept == set(nasa)
        assert await database.fetchval(f"SELECT to_regclass('{noaa_leaf}')") is None
        nasa_leaf = (await stored(database, nasa[0]))[0]["part"]
        assert nasa_leaf.endswith("_nasa")
    finally:
        shutil.rmtree(config.state_path, ignore_errors=True)


async def test_a_partition_with_an_unexpired_row_is_never_dropped(database: Database,
                                                                  sink: Sink):
    """Safety does not rest on what the agent says: told every retention is one day, the
    database still keeps a partition while one row in it has not expired; a whole range goes
    once every partition of it has only expired rows, and its time then routes to the
    default partition (a replay after expiry is stored again, as before partitioning)."""
    start = await backdate(database, 4, ["nasa", "noaa"])
    old = start + timedelta(hours=1)
    expired = v7(old)
    alive = v7(old + timedelta(seconds=1))
    await sink.write(Work(events=[row(expired, agency="noaa", retention=DAY),
                                  row(alive, received_at=datetime.now(UTC))]), returning=False)
    dropped = []
    while (gone := await sink.drop_expired_partition({"nasa": 1, "noaa": 1}, 2.0)) is not None:
        dropped.append(gone)
    assert len(await stored(database, alive)) == 1
    assert not await stored(database, expired)
    levels = {level for _, level in dropped}
    assert levels == {"agency", "range"}  # empty old ranges went whole; the oldest in part
    range_of_alive = (await stored(database, alive))[0]["part"].rsplit("_", 1)[0]
    assert await database.fetchval(f"SELECT to_regclass('{range_of_alive}')") is not None
    await database.fetch("UPDATE flux.events SET expires_at = now() - interval '1 s'")
    while (gone := await sink.drop_expired_partition({"nasa": 1, "noaa": 1}, 2.0)) is not None:
        pass
    assert await database.fetchval(f"SELECT to_regclass('{range_of_alive}')") is None
    inserted = (await sink.write(Work(events=[row(alive)]), returning=False)).inserted
    assert inserted == 1
    assert (await stored(database, alive))[0]["part"] == "flux.events_default"


async def test_the_default_partition_keeps_events_ahead_until_their_range_exists(
        database: Database, sink: Sink):
    ahead = v7(datetime.now(UTC) + 10 * DAY)
    await sink.write(Work(events=[row(ahead)]), returning=False)
    assert (await stored(database, ahead))[0]["part"] == "flux.events_default"
    assert (await sink.partition_stats()).default_rows == 1
    made = []
    while (step := await sink.prepare_partition(["nasa"], 86400.0, 12 * 86400.0, 2.0)):
        made.append(step)
    assert sum(moved for _, moved in made) == 1
    part = (await stored(database, ahead))[0]["part"]
    assert part.endswith("_nasa") and part != "flux.events_default"
    written = await sink.write(Work(events=[row(ahead, payload={"n": 3})]), returning=False)
    inserted = written.inserted
    assert inserted == 0
    assert len(await stored(database, ahead)) == 1
    stats = await sink.partition_stats()
    assert stats.default_rows == 0
    assert stats.newest is not None and stats.newest >= datetime.now(UTC) + 12 * DAY


async def test_maintenance_gives_up_on_its_lock_and_writes_go_on(database: Database,
                                                                 sink: Sink):
    """A writer holding flux.events (a long flush) makes the partition change wait at most
    its lock timeout, then fail as 55P03 (transient: next round), changing nothing."""
    writer = await asyncpg.connect(database.admin_dsn)
    try:
        tx = writer.transaction()
        await tx.start()
        await writer.execute("LOCK TABLE ONLY flux.events IN ROW EXCLUSIVE MODE")
        before = await database.fetchval("SELECT count(*) FROM flux.event_partitions")
        with pytest.raises(LockTimeout):
            await sink.prepare_partition(["nasa"], 3600.0, 5 * 86400.0, 0.2)
        assert await database.fetchval("SELECT count(*) FROM flux.event_partitions") == before
        await tx.rollback()
    finally:
        await writer.close()
    assert await sink.prepare_partition(["nasa"], 3600.0, 5 * 86400.0, 0.2) is not None


# --------------------------------------------------------------------------- reads


async def test_reads_stay_index_scans_on_one_agencys_partitions(database: Database,
                                                                sink: Sink):
    """The store's two reads, as the agent's role: an event by id probes one partition's
    primary key; a page of a run merges index scans of that agency's partitions only."""
    await backdate(database, 3, ["nasa", "noaa"])
    now = datetime.now(UTC)
    events = [row(v7(now - timedelta(seconds=i * 13)) if i % 10 else str(uuid.uuid4()),
                  agency=("nasa", "noaa")[i % 2], run_id=f"run-{i % 400}")
              for i in range(20_000)]
    events += [row(v7(now + (100 + i) * DAY), run_id=f"run-{i}") for i in range(400)]
    conn = await asyncpg.connect(database.admin_dsn)
    try:
        await conn.copy_records_to_table("events", schema_name="flux", records=events,
                                         columns=Row._fields)
        await conn.execute("ANALYZE flux.events")
    finally:
        await conn.close()
    conn = await asyncpg.connect(database.agent_dsn)
    try:
        async with conn.transaction(readonly=True):
            await conn.execute("SELECT set_config('flux.current_agency_id', 'nasa', true)")
            by_id = "\n".join(r[0] for r in await conn.fetch(
                "EXPLAIN SELECT * FROM flux.events WHERE agency_id = $1 "
                "AND event_id = $2::uuid AND flux.event_id_time(event_id) = "
                "flux.event_id_time($2::uuid)", "nasa", events[6652].event_id))  # a day ago
            page = "\n".join(r[0] for r in await conn.fetch(
                "EXPLAIN SELECT * FROM flux.events WHERE agency_id = $1 AND run_id = $2 "
                "ORDER BY occurred_at, event_id LIMIT 101", "nasa", "run-0"))
    finally:
        await conn.close()
    # A sequential scan only of a small partition, where the planner rightly prefers it: how
    # many rows the oldest range holds depends on the time of day the test runs.
    for plan in (by_id, page):
        for part in re.findall(r"Seq Scan on (\w+)", plan):
            assert await database.fetchval(
                f"SELECT pg_relation_size('flux.{part}')") <= 32 * 8192, plan
    scanned = re.findall(r"(?:Index Scan using \w+|Index Scan on \w+|Seq Scan) on (\w+)",
                         by_id)
    assert len(scanned) == 1 and scanned[0].endswith("_nasa"), by_id
    assert "_nasa_pkey" in by_id, by_id
    leaves = re.findall(r"(?:Scan using \w+|Seq Scan|Bitmap Heap Scan) on (\w+)", page)
    assert leaves and "Limit" in page, page
    ranges = await database.fetchval(
        "SELECT count(*) FROM flux.event_partitions WHERE kind = 'range'")
    assert len(leaves) == ranges + 2, page  # one per range, the unkeyed and default ones
    for leaf in leaves:
        assert leaf.endswith(("_nasa", "_default", "_unkeyed")), page


# --------------------------------------------------------------------------- other tables


async def test_dead_letters_and_the_audit_trail_have_their_own_retention(database: Database,
                                                                         sink: Sink):
    await execute(database, """
        INSERT INTO flux.dead_letters (agency_id, item_id, reason, event, dead_at)
        SELECT 'nasa', gen_random_uuid(), 'test', '\\x00', now() - make_interval(days => d)
          FROM generate_series(0, 9) AS d;
        INSERT INTO flux.audit_log (at, agency_id, actor, action, success, source, entry_id,
                                    recorded_at)
        SELECT now(), 'nasa', 'local', 'test', true, 'agent', gen_random_uuid(),
               now() - make_interval(days => d)
          FROM generate_series(0, 9) AS d""")
    # Dead letters: kept as long as the agent asks, and never less than a day.
    assert await sink.purge_dead_letters("nasa", 4.5 * 86400, 100) == 5
    assert await sink.purge_dead_letters("nasa", 0.0, 100) == 4
    assert await database.fetchval("SELECT count(*) FROM flux.dead_letters") == 1
    # The audit trail: kept forever unless the database's own policy says otherwise, which
    # the agent's role cannot change.
    assert await sink.purge_audit_log(100) == 0
    conn = await asyncpg.connect(database.agent_dsn)
    try:
        with pytest.raises(asyncpg.InsufficientPrivilegeError):
            await conn.execute("UPDATE flux.retention_policies SET keep = '1 day'")
    finally:
        await conn.close()
    await database.fetch("UPDATE flux.retention_policies SET keep = '3 days 12 hours' "
                         "WHERE name = 'audit_log'")
    assert await sink.purge_audit_log(2) == 2
    assert await sink.purge_audit_log(100) == 4
    assert await database.fetchval("SELECT count(*) FROM flux.audit_log") == 4


# --------------------------------------------------------------------------- a schema owner


async def test_maintenance_under_a_schema_owner_that_is_not_a_superuser(pg_template: PgServer):
    """Forced row-level security binds the owner too: the maintenance functions (which run
    as the owner) must see every row they check, move or count, through their own policy,
    or they would take an unexpired partition for an empty one."""
    admin = await asyncpg.connect(pg_template.admin_dsn)
    owner = "flux_test_owner"
    try:
        await admin.execute(f"""
            DO $$ BEGIN CREATE ROLE {owner} LOGIN PASSWORD '{LOGIN_PASSWORD}' CREATEROLE;
            EXCEPTION WHEN duplicate_object THEN NULL; END $$""")
    finally:
        await admin.close()
    db = await create_database(pg_template, template="template0")
    admin = await asyncpg.connect(db.admin_dsn)
    try:
        await admin.execute(f"ALTER DATABASE {db.name} OWNER TO {owner}")
    finally:
        await admin.close()
    try:
        conn = await asyncpg.connect(pg_template.dsn(db.name, owner, LOGIN_PASSWORD))
        try:
            await migrate(conn)
            assert not await conn.fetchval("SELECT rolsuper FROM pg_roles "
                                           "WHERE rolname = current_user")
        finally:
            await conn.close()
        as_owner = Database(db.name, pg_template.dsn(db.name, owner, LOGIN_PASSWORD),
                            db.agent_dsn)
        await backdate(as_owner, 3, ["nasa"])
        pg = Postgres(db.agent_dsn, max_connections=2)
        sink = Sink(pg, migrate_on_connect=False)
        try:
            start = await db.fetchval("SELECT min(from_time) FROM flux.event_partitions "
                                      "WHERE kind = 'range'")
            alive = v7(start + timedelta(hours=1))
            ahead = v7(datetime.now(UTC) + 20 * DAY)
            await sink.write(Work(events=[row(alive, received_at=datetime.now(UTC)),
                                          row(ahead)]), returning=False)
            while await sink.drop_expired_partition({"nasa": 1}, 2.0) is not None:
                pass
            assert len(await stored(db, alive)) == 1  # not taken for expired
            stats = await sink.partition_stats()
            assert stats.default_rows == 1  # counted, though forced RLS hides it by default
            while await sink.prepare_partition(["nasa"], 86400.0, 22 * 86400.0, 2.0):
                pass
            assert (await stored(db, ahead))[0]["part"].endswith("_nasa")
            await db.fetch("UPDATE flux.events SET expires_at = now() - interval '1 s'")
            while await sink.drop_expired_partition({"nasa": 1}, 2.0) is not None:
                pass
            assert not await stored(db, alive)
            # The audit trail's purge sees (only) what it may delete.
            await execute(db, """
                INSERT INTO flux.audit_log (at, agency_id, actor, action, success, source,
                                            entry_id, recorded_at)
                SELECT now(), 'nasa', 'local', 'test', true, 'agent', gen_random_uuid(),
                       now() - make_interval(days => d) FROM generate_series(0, 3) AS d;
                UPDATE flux.retention_policies SET keep = '36 hours'
                 WHERE name = 'audit_log'""")
            assert await sink.purge_audit_log(100) == 2
            assert await db.fetchval("SELECT count(*) FROM flux.audit_log") == 2
        finally:
            await pg.close()
    finally:
        await drop_database(pg_template, db.name)

