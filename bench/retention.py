"""Retention at volume: dropping expired partitions (sql/007) against the batched DELETE of the
schema before it (``flux.purge_expired`` of sql/003), in the same run, on the same server.

Two databases, loaded with the same events: ten days of two agencies' events, one million a
day (UUIDv7 ids carrying their time), of which the oldest three days have expired.
``before``: the schema up to sql/005 (one table, BRIN on ``expires_at``); ``partitioned``: the
current schema, its time ranges laid out over those ten days as the agent's maintenance lays
them out (one partition per agency and day). Autovacuum is off on both tables so that the WAL
of each step is its own; vacuum runs as a measured step of its own.

For each: one agency's expired rows are removed with nothing else running (WAL from
``pg_current_wal_lsn()`` differences, after a CHECKPOINT: full-page images count, as they do
in production), then the other agency's while an ingest load writes through
``flux.write_v1`` as the agent's role (events/s and call latency, before and during); then
what vacuum does after the DELETE, and the size of table and indexes before and after.
Finally the ``before`` database is migrated in place (sql/006 and 007): time per million rows.

``python -m bench.retention [--events N] [--database-url URL]`` runs this scenario alone.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import signal
import subprocess
import sys
import tempfile
import time
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import asyncpg

from flux_agent.core.digest import payload_digest
from flux_agent.core.ids import uuid7_at
from flux_agent.postgres.migrations import migrate, migrations

from .harness import Database, machine

ROOT = Path(__file__).resolve().parent.parent
MiB = 1024 * 1024
DAYS = 10
EXPIRED_DAYS = 3
AGENCIES = ("nasa", "noaa")
BATCH = 1000  # FLUX_AGENT_RETENTION_BATCH's default
PAUSE = 0.05  # the agent's pause between two retention transactions
INGEST_BATCH = 100
INGEST_CONNECTIONS = 2
BASELINE_S = 15.0

# The same rows in both databases: ids carry their time t (UUIDv7), expires_at is in the past
# for the oldest EXPIRED_DAYS days and a month ahead for the rest.
_LOAD = """
INSERT INTO flux.events (agency_id, event_id, run_id, kind, step, occurred_at, received_at,
    payload, payload_sha256, correlation_id, agent_id, trace_id, span_id, expires_at)
SELECT CASE WHEN i % 2 = 0 THEN 'nasa' ELSE 'noaa' END,
       (lpad(to_hex((extract(epoch FROM t) * 1000)::bigint), 12, '0') || '7'
        || substr(h, 1, 3) || '8' || substr(h, 4, 15))::uuid,
       'run-' || (i % 5000), 'step.completed', 'load', t, t,
       jsonb_build_object('items_processed', i, 'duration_ms', 12.5, 'content_type', 'images',
                          'use_case', 'research', 'note', 'benchmark payload of about two '
                          'hundred bytes, typical of a step event with a few counters'),
       h || h, 'bench', 'bench', h, substr(h, 1, 16),
       CASE WHEN t < $1::timestamptz + make_interval(days => $3) THEN now() - interval '1 day'
            ELSE now() + interval '30 days' END
  FROM (SELECT i, $1::timestamptz + (i * $2::double precision) * interval '1 ms' AS t,
               md5(i::text) AS h
          FROM generate_series($4::bigint, $5::bigint) AS i) AS s
"""


async def _wal(conn: Any) -> int:
    return int(await conn.fetchval("SELECT pg_current_wal_lsn() - '0/0'::pg_lsn"))


# The tables flux.events is made of: its leaf partitions, or itself before partitioning.
_LEAVES = ("SELECT relid FROM pg_partition_tree('flux.events') WHERE isleaf "
           "UNION ALL SELECT 'flux.events'::regclass "
           "WHERE (SELECT relkind FROM pg_class WHERE oid = 'flux.events'::regclass) = 'r'")


async def _sizes(conn: Any) -> tuple[int, int]:
    """Heap (with TOAST) and index bytes of flux.events, all partitions summed."""
    row = await conn.fetchrow(f"SELECT sum(pg_table_size(relid)), sum(pg_indexes_size(relid)) "
                              f"FROM ({_LEAVES}) AS t")
    return int(row[0]), int(row[1])


async def _leaves(conn: Any) -> list[str]:
    return [str(r[0]) for r in await conn.fetch(f"SELECT relid::regclass::text FROM ({_LEAVES}) t")]


async def _create_db(server_dsn: str, name: str) -> None:
    conn = await asyncpg.connect(server_dsn)
    try:
        await conn.execute(f"DROP DATABASE IF EXISTS {name} WITH (FORCE)")
        await conn.execute(f"CREATE DATABASE {name}")
    finally:
        await conn.close()


async def _backdate(conn: Any, start: datetime) -> None:
    """Daily time ranges from ``start`` to the first range the migration made (whose
    unkeyed partition, empty, is cut back to ``start``): what ten days of maintenance make."""
    async with conn.transaction():
        first = await conn.fetchval(
            "SELECT min(from_time) FROM flux.event_partitions WHERE kind = 'range'")
        await conn.execute("ALTER TABLE flux.events DETACH PARTITION flux.events_unkeyed")
        await conn.execute("ALTER TABLE flux.events ATTACH PARTITION flux.events_unkeyed "
                           f"FOR VALUES FROM (MINVALUE) TO ('{start.isoformat()}')")
        lo = start
        while lo < first:
            hi = min(lo + timedelta(days=1), first)
            await conn.execute("SELECT flux._create_event_range($1, $2, $3)", lo, hi,
                               list(AGENCIES))
            lo = hi


async def _load(conn: Any, start: datetime, events: int) -> float:
    step_ms = DAYS * 86_400_000 / events
    t0 = time.perf_counter()
    chunk = 1_000_000
    for first in range(0, events, chunk):
        await conn.execute(_LOAD, start, step_ms, EXPIRED_DAYS, first,
                           min(events, first + chunk) - 1, timeout=3600)
    for leaf in await _leaves(conn):
        await conn.execute(f"ALTER TABLE {leaf} SET (autovacuum_enabled = false)")
    await conn.execute("VACUUM (ANALYZE) flux.events", timeout=3600)
    return time.perf_counter() - t0


class Ingest:
    """An offered load of ``rate`` events/s written through flux.write_v1 as the agent's role,
    from a process of its own (``python -m bench.retention --ingest DSN RATE``):
    INGEST_CONNECTIONS connections, INGEST_BATCH events per call (one statement, as the agent
    flushes). Each batch is due at a fixed time; its latency counts from then, so a stall
    (a lock) shows as the wait of every batch that queued behind it."""

    def __init__(self, dsn: str, rate: float) -> None:
        self.samples: list[tuple[float, float, int]] = []  # (due, done, events), wall clock
        self._proc = subprocess.Popen(
            [sys.executable, "-m", "bench.retention", "--ingest", dsn, str(rate)], cwd=ROOT,
            stdout=subprocess.PIPE, text=True)

    def stop(self) -> None:
        self._proc.send_signal(signal.SIGTERM)
        out, _ = self._proc.communicate(timeout=120)
        self.samples = [(float(a), float(b), int(n)) for a, b, n in json.loads(out)]

    def window(self, t0: float, t1: float) -> dict[str, float]:
        inside = [s for s in self.samples if t0 <= s[0] < t1]
        lat = sorted((s[1] - s[0]) * 1000 for s in inside)
        if not lat:
            return {"events_per_s": 0.0, "p50_ms": 0.0, "p99_ms": 0.0, "max_ms": 0.0}

        def pct(p: float) -> float:
            return lat[min(len(lat) - 1, round(p / 100 * (len(lat) - 1)))]

        done = [s for s in self.samples if t0 <= s[1] < t1]
        return {"events_per_s": sum(s[2] for s in done) / (t1 - t0), "p50_ms": pct(50),
                "p99_ms": pct(99), "max_ms": lat[-1]}


async def _ingest(dsn: str, rate: float) -> list[tuple[float, float, int]]:
    canonical, digest = payload_digest({"items_processed": 1, "duration_ms": 12.5})
    payload = canonical.decode()
    samples: list[tuple[float, float, int]] = []
    stop = asyncio.Event()
    asyncio.get_running_loop().add_signal_handler(signal.SIGTERM, stop.set)
    period = INGEST_CONNECTIONS * INGEST_BATCH / rate

    async def writer(k: int) -> None:
        conn = await asyncpg.connect(dsn)
        try:
            stmt = await conn.prepare(
                "SELECT inserted FROM flux.write_v1($1, '{}'::flux.checkpoint_v1[], "
                "'{}'::flux.audit_v1[], false)")
            due = time.time() + k * period / INGEST_CONNECTIONS
            while not stop.is_set():
                wait = due - time.time()
                if wait > 0:
                    await asyncio.sleep(wait)
                now = datetime.now(UTC)
                rows = [(AGENCIES[i % 2], uuid7_at(now, os.urandom(10)), f"live-{i % 50}",
                         "step.completed", "s", now, now, None, None, payload, digest, "bench",
                         "bench", None, None, now + timedelta(days=30))
                        for i in range(INGEST_BATCH)]
                await stmt.fetchval(rows, timeout=600)
                samples.append((due, time.time(), len(rows)))
                due += period
        finally:
            await conn.close()

    await asyncio.gather(*(writer(k) for k in range(INGEST_CONNECTIONS)))
    return samples


async def _remove(conn: Any, layout: str, agency: str,
                  retention_days: dict[str, int]) -> tuple[int, float, float, int]:
    """Remove one agency's expired events the way the agent's retention round does: (rows
    removed, wall seconds including the pauses between steps, seconds in statements, steps).
    ``retention_days`` is what the agent passes to the drop: the agencies due now at 1."""
    expired = ("SELECT count(*) FROM flux.events WHERE agency_id = $1 "
               "AND expires_at < now()")
    before = int(await conn.fetchval(expired, agency, timeout=600))
    steps, in_sql = 0, 0.0
    t0 = time.perf_counter()
    while True:
        t = time.perf_counter()
        if layout == "before":
            row = await conn.fetchrow("SELECT * FROM flux.purge_expired($1, $2)", agency, BATCH,
                                      timeout=600)
            more = int(row[0]) >= BATCH
        else:
            row = await conn.fetchrow(
                "SELECT dropped FROM flux.drop_expired_event_partition($1, $2, $3)",
                list(retention_days), list(retention_days.values()), 2.0, timeout=600)
            more = row is not None
        in_sql += time.perf_counter() - t
        steps += 1
        if not more:
            wall = time.perf_counter() - t0
            left = int(await conn.fetchval(expired, agency, timeout=600))
            return before - left, wall, in_sql, steps
        await asyncio.sleep(PAUSE)


async def _layout(ctx_add: Any, server_dsn: str, agent_dsn: str, layout: str, events: int,
                  rate: float, start: datetime, notes: list[str]) -> dict[str, Any]:
    name = f"flux_retention_{layout}"
    await _create_db(server_dsn, name)
    admin_dsn = _with_db(server_dsn, name)
    conn = await asyncpg.connect(admin_dsn)
    out: dict[str, Any] = {"layout": layout}
    try:
        if layout == "before":
            with tempfile.TemporaryDirectory() as old:
                for m in migrations(ROOT / "sql"):
                    if m.version[:3] <= "005":
                        (Path(old) / m.path.name).write_text(m.sql)
                await migrate(conn, Path(old))
        else:
            await migrate(conn)
            await _backdate(conn, start)
        print(f"  {layout}: loading {events:,} events", flush=True)
        out["load_s"] = await _load(conn, start, events)
        expired = int(await conn.fetchval("SELECT count(*) FROM flux.events "
                                          "WHERE expires_at < now()"))
        heap0, index0 = await _sizes(conn)
        # 1. One agency's expired events, nothing else running.
        await conn.execute("CHECKPOINT")
        w0 = await _wal(conn)
        removed, wall, in_sql, steps = await _remove(
            conn, layout, AGENCIES[0], {AGENCIES[0]: 1, AGENCIES[1]: 36500})
        out["quiet"] = {"removed": removed, "wall_s": wall, "sql_s": in_sql, "steps": steps,
                        "wal_bytes": await _wal(conn) - w0}
        heap1, index1 = await _sizes(conn)
        # 2. What vacuum then has to do (the DELETE's dead rows and index entries).
        await conn.execute("CHECKPOINT")
        w0 = await _wal(conn)
        t = time.perf_counter()
        await conn.execute("VACUUM flux.events", timeout=7200)
        out["vacuum"] = {"s": time.perf_counter() - t, "wal_bytes": await _wal(conn) - w0}
        heap2, index2 = await _sizes(conn)
        out["expired"] = expired
        out["sizes"] = {"heap_before": heap0, "index_before": index0, "heap_after": heap1,
                        "index_after": index1, "heap_vacuumed": heap2, "index_vacuumed": index2}
        # 3. The other agency's, while events are written at a steady rate.
        ingest = Ingest(_with_db(agent_dsn, name), rate)
        await asyncio.sleep(BASELINE_S)
        t_start = time.time()
        w0 = await _wal(conn)
        removed, wall, in_sql, steps = await _remove(
            conn, layout, AGENCIES[1], dict.fromkeys(AGENCIES, 1))
        t_end = time.time()
        wal_total = await _wal(conn) - w0
        await asyncio.sleep(max(3.0, t_start + 6.0 - time.time()))  # the window, and a margin
        await asyncio.to_thread(ingest.stop)
        out["loaded"] = {"removed": removed, "wall_s": wall, "sql_s": in_sql, "steps": steps,
                         "wal_bytes_with_ingest": wal_total,
                         "ingest_before": ingest.window(t_start - BASELINE_S + 2, t_start),
                         "ingest_during": ingest.window(t_start, max(t_end, t_start + 5.0))}
        out["rows_left"] = int(await conn.fetchval("SELECT count(*) FROM flux.events"))
        if layout == "partitioned":
            notes.extend(await _plans(conn, events))
        else:
            out["migration"] = await _migrate_in_place(conn)
    finally:
        await conn.close()
        await _drop_db(server_dsn, name)
    _report(ctx_add, out, events)
    return out


async def _migrate_in_place(conn: Any) -> dict[str, Any]:
    rows = int(await conn.fetchval("SELECT count(*) FROM flux.events"))
    size = int(await conn.fetchval("SELECT pg_table_size('flux.events')"))
    await conn.execute("CHECKPOINT")
    w0 = await _wal(conn)
    t = time.perf_counter()
    applied = await migrate(conn)
    seconds = time.perf_counter() - t
    return {"applied": applied, "rows": rows, "table_bytes": size, "s": seconds,
            "s_per_million_rows": seconds / rows * 1e6, "wal_bytes": await _wal(conn) - w0}


async def _plans(conn: Any, events: int) -> list[str]:
    """The store's two reads on the partitioned 10M-row table, as the agent's role."""
    event_id = await conn.fetchval(
        "SELECT event_id::text FROM flux.events WHERE agency_id = 'nasa' "
        "AND received_at > now() - interval '2 days' LIMIT 1")
    queries = {
        "a page of a run (the bench's events-page query: ids only)":
            "SELECT event_id FROM flux.events WHERE agency_id = 'nasa' AND run_id = 'run-8' "
            "ORDER BY occurred_at, event_id LIMIT 101",
        "a page of a run (the store's query: every column)":
            "SELECT * FROM flux.events WHERE agency_id = 'nasa' AND run_id = 'run-8' "
            "ORDER BY occurred_at, event_id LIMIT 101",
        "one event by id (the store's query)":
            f"SELECT * FROM flux.events WHERE agency_id = 'nasa' AND event_id = '{event_id}' "
            f"AND flux.event_id_time(event_id) = flux.event_id_time('{event_id}'::uuid)",
    }
    notes = []
    for title, query in queries.items():
        async with conn.transaction():
            await conn.execute("SET LOCAL ROLE flux_agent")
            await conn.execute("SELECT set_config('flux.current_agency_id', 'nasa', true)")
            await conn.fetch(query)  # warm
            rows = await conn.fetch(f"EXPLAIN (ANALYZE, BUFFERS, COSTS OFF) {query}")
        plan = "\n".join("    " + r[0] for r in rows)
        notes.append(f"Query plan, {title}, partitioned {events:,}-event table (EXPLAIN as "
                     f"the agent's role):\n\n{plan}")
    return notes


def _report(ctx_add: Any, out: dict[str, Any], events: int) -> None:
    how = ("drop expired partitions" if out["layout"] == "partitioned"
           else "batched DELETE (schema before partitioning)")
    q, ld, s = out["quiet"], out["loaded"], out["sizes"]
    before, during = ld["ingest_before"], ld["ingest_during"]
    ctx_add({
        "name": f"retention: {how}, {out['expired']:,} of {events:,} events expired",
        # the table's columns: ingest while the second half is removed
        "events_per_s": during["events_per_s"],
        "ratio": during["events_per_s"] / before["events_per_s"]
        if before["events_per_s"] else None,
        "p50_ms": during["p50_ms"], "p99_ms": during["p99_ms"],
        "removed_alone": q["removed"], "time_alone_s": q["wall_s"],
        "in_statements_s": q["sql_s"], "steps": q["steps"], "wal_mib": q["wal_bytes"] / MiB,
        "vacuum_s": out["vacuum"]["s"], "vacuum_wal_mib": out["vacuum"]["wal_bytes"] / MiB,
        "heap_mib": f"{s['heap_before'] / MiB:,.0f} -> {s['heap_after'] / MiB:,.0f} "
                    f"-> vacuumed {s['heap_vacuumed'] / MiB:,.0f}",
        "index_mib": f"{s['index_before'] / MiB:,.0f} -> {s['index_after'] / MiB:,.0f} "
                     f"-> vacuumed {s['index_vacuumed'] / MiB:,.0f}",
        "removed_under_ingest": ld["removed"], "time_under_ingest_s": ld["wall_s"],
        "ingest_before_events_per_s": before["events_per_s"],
        "ingest_before_p99_ms": before["p99_ms"], "ingest_during_max_ms": during["max_ms"],
        "wal_mib_under_ingest_incl_ingest": ld["wal_bytes_with_ingest"] / MiB,
    })
    if "migration" in out:
        m = out["migration"]
        ctx_add({"name": f"migration to partitions in place (sql/006, 007), "
                         f"{m['rows']:,}-event table",
                 "time_s": m["s"], "s_per_million_rows": m["s_per_million_rows"],
                 "table_mib": m["table_bytes"] / MiB, "wal_mib": m["wal_bytes"] / MiB})


async def retention(db: Database, events: int, add: Any, notes: list[str],
                    rate: float = 10_000.0) -> None:
    """The scenario on the bench's PostgreSQL (``db``): both layouts, then the comparison."""
    server = _with_db(db.admin_dsn, "postgres")
    start = datetime.now(UTC).replace(hour=0, minute=0, second=0, microsecond=0) \
        - timedelta(days=DAYS)
    results = {}
    for layout in ("before", "partitioned"):
        results[layout] = await _layout(add, server, db.agent_dsn, layout, events, rate, start,
                                        notes)
    old, new = results["before"], results["partitioned"]

    def times(a: float, b: float) -> float:
        return a / b if b else float("inf")

    add({"name": "retention: batched DELETE / partition drop, same run (how many times)",
         "wal": times(old["quiet"]["wal_bytes"], new["quiet"]["wal_bytes"]),
         "time_alone": times(old["quiet"]["wall_s"], new["quiet"]["wall_s"]),
         "time_in_statements": times(old["quiet"]["sql_s"], new["quiet"]["sql_s"]),
         "time_under_ingest": times(old["loaded"]["wall_s"], new["loaded"]["wall_s"]),
         "ingest_p99_during": times(old["loaded"]["ingest_during"]["p99_ms"],
                                    new["loaded"]["ingest_during"]["p99_ms"]),
         "ingest_max_during": times(old["loaded"]["ingest_during"]["max_ms"],
                                    new["loaded"]["ingest_during"]["max_ms"]),
         "vacuum_wal": times(old["vacuum"]["wal_bytes"], new["vacuum"]["wal_bytes"])})


def _with_db(dsn: str, name: str) -> str:
    head, _, tail = dsn.rpartition("/")
    query = tail.partition("?")[2]
    return f"{head}/{name}" + (f"?{query}" if query else "")


async def _drop_db(server_dsn: str, name: str) -> None:
    conn = await asyncpg.connect(server_dsn)
    try:
        await conn.execute(f"DROP DATABASE IF EXISTS {name} WITH (FORCE)")
    finally:
        await conn.close()


async def _main(args: argparse.Namespace) -> dict[str, Any]:
    db = Database(args.database_url)
    await db.start()
    rows: list[dict[str, Any]] = []
    notes: list[str] = []
    info = machine()
    info["postgres"] = db.version
    info["command"] = " ".join(["python", "-m", "bench.retention", *sys.argv[1:]])
    started = time.time()

    def add(row: dict[str, Any]) -> None:
        clean = {k: (round(v, 3) if isinstance(v, float) else v) for k, v in row.items()
                 if v is not None}
        rows.append(clean)
        print(f"  {clean['name']}: " + ", ".join(f"{k}={v}" for k, v in clean.items()
                                                  if k != "name"), flush=True)

    try:
        await retention(db, args.events, add, notes, args.rate)
    finally:
        await asyncio.to_thread(db.destroy)
    return {"machine": info, "seconds": round(time.time() - started, 1), "scenarios": rows,
            "notes": notes}


def main() -> int:
    if sys.argv[1:2] == ["--ingest"]:  # the ingest process (Ingest)
        samples = asyncio.run(_ingest(sys.argv[2], float(sys.argv[3])))
        print(json.dumps(samples))
        return 0
    p = argparse.ArgumentParser(prog="python -m bench.retention", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--events", type=int, default=10_000_000)
    p.add_argument("--rate", type=float, default=10_000.0,
                   help="events/s written while the second agency's events are removed")
    p.add_argument("--database-url", default=None,
                   help="an existing PostgreSQL (a superuser) instead of a throwaway one")
    p.add_argument("--json", dest="json_path", default=None, help="write results here")
    p.add_argument("--markdown", default=None, help="write the table here")
    args = p.parse_args()
    from .report import markdown

    results = asyncio.run(_main(args))
    table = markdown(results)
    print(table)
    if args.json_path:
        Path(args.json_path).write_text(json.dumps(results, indent=2, default=str))
    if args.markdown:
        Path(args.markdown).write_text(table)
    return 0


if __name__ == "__main__":
    sys.exit(main())
