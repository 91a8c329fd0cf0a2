"""Baselines (a) and (b): PostgreSQL's speed without the agent, same events, same server.

(a) raw asyncpg binary COPY of pre-encoded rows into flux.events, batches of 500, one
    connection (a superuser: COPY FROM refuses tables under row-level security otherwise);
(b) the agent's idempotent path without the agent: COPY into a temporary staging table, then
    INSERT ... ON CONFLICT DO NOTHING, as the agent's login role with the agency declared,
    batches of 500, one connection.
"""

from __future__ import annotations

import time
import uuid
from datetime import UTC, datetime, timedelta

import asyncpg

from flux_agent.core.digest import payload_digest
from flux_agent.core.event import COLUMNS, Row

# The staging table of the write path the agent used before sql/005 (baseline b keeps it).
STAGE_TABLE = "flux_stage_events_v1"

BATCH = 500


def rows(n: int, agency: str = "nasa") -> list[Row]:
    """Sealed rows exactly as the agent builds them."""
    now = datetime.now(UTC)
    out: list[Row] = []
    for i in range(n):
        payload = {"items_processed": i, "duration_ms": 12.5, "content_type": "images",
                   "use_case": "research", "note": "benchmark payload of about two hundred "
                   "bytes, typical of a step event with a few counters and labels"}
        canonical, digest = payload_digest(payload)
        out.append(Row(agency, str(uuid.uuid4()), f"bench-{i % 64}", "step.completed", "load",
                       now, now, None, None, canonical.decode(), digest, "bench", "bench",
                       uuid.uuid4().hex, uuid.uuid4().hex[:16], now + timedelta(days=30)))
    return out


async def raw_copy(admin_dsn: str, n: int) -> float:
    data = rows(n)
    conn = await asyncpg.connect(admin_dsn)
    try:
        start = time.perf_counter()
        for i in range(0, n, BATCH):
            await conn.copy_records_to_table("events", schema_name="flux",
                                             records=data[i:i + BATCH], columns=COLUMNS)
        return n / (time.perf_counter() - start)
    finally:
        await conn.close()


async def idempotent_path(agent_dsn: str, n: int) -> float:
    data = rows(n)
    cols = ", ".join(COLUMNS)
    conn = await asyncpg.connect(agent_dsn)
    try:
        start = time.perf_counter()
        for i in range(0, n, BATCH):
            async with conn.transaction():
                await conn.execute(f"CREATE TEMPORARY TABLE IF NOT EXISTS {STAGE_TABLE} "
                                   "(LIKE flux.events INCLUDING DEFAULTS) ON COMMIT DELETE ROWS")
                await conn.copy_records_to_table(STAGE_TABLE, records=data[i:i + BATCH],
                                                 columns=COLUMNS)
                await conn.execute("SELECT set_config('flux.current_agency_id', 'nasa', true)")
                await conn.execute(f"INSERT INTO flux.events ({cols}) SELECT {cols} FROM "
                                   f"{STAGE_TABLE} ON CONFLICT DO NOTHING")
        return n / (time.perf_counter() - start)
    finally:
        await conn.close()


async def unnest_path(agent_dsn: str, n: int) -> float:
    """The alternative the sink does not use: one INSERT ... SELECT FROM unnest(arrays)."""
    data = rows(n)
    cols = ", ".join(COLUMNS)
    types = ["text", "uuid", "text", "text", "text", "timestamptz", "timestamptz", "text",
             "text", "jsonb", "text", "text", "text", "text", "text", "timestamptz"]
    args = ", ".join(f"${i + 1}::{t}[]" for i, t in enumerate(types))
    conn = await asyncpg.connect(agent_dsn)
    try:
        stmt = await conn.prepare(f"INSERT INTO flux.events ({cols}) SELECT * FROM "
                                  f"unnest({args}) ON CONFLICT DO NOTHING")
        start = time.perf_counter()
        for i in range(0, n, BATCH):
            async with conn.transaction():
                await conn.execute("SELECT set_config('flux.current_agency_id', 'nasa', true)")
                await stmt.fetch(*[list(col) for col in zip(*data[i:i + BATCH], strict=True)])
        return n / (time.perf_counter() - start)
    finally:
        await conn.close()
