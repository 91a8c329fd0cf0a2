"""Versioned SQL files (``sql/NNN_*.sql``) applied in order, once per database, under an
advisory lock: a hundred agents starting together migrate once."""

from __future__ import annotations

import functools
import hashlib
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import asyncpg

from ..core.resources import data_dir
from .pool import connect_once

MIGRATION_LOCK_KEY = 0x666C_7578_0001  # "flux" + 1: one lock for all agents of a database
# Migrations may rewrite large tables: they get hours, not a statement's deadline.
MIGRATION_TIMEOUT = 6 * 3600.0


@dataclass(frozen=True, slots=True)
class Migration:
    version: str
    path: Path
    sql: str
    checksum: str


@functools.cache
def bundled() -> tuple[Migration, ...]:
    return tuple(migrations())


def migrations(sql_dir: Path | None = None) -> list[Migration]:
    out = []
    for path in sorted((sql_dir or data_dir("sql")).glob("[0-9][0-9][0-9]_*.sql")):
        sql = path.read_text()
        out.append(Migration(path.stem, path, sql, hashlib.sha256(sql.encode()).hexdigest()))
    return out


class MigrationError(RuntimeError):
    pass


async def applied_migrations(conn: Any) -> dict[str, str]:
    exists = await conn.fetchval("SELECT to_regclass('flux.schema_migrations') IS NOT NULL")
    if not exists:
        return {}
    rows = await conn.fetch("SELECT version, checksum FROM flux.schema_migrations")
    return {r["version"]: r["checksum"] for r in rows}


async def migrate(conn: Any, sql_dir: Path | None = None) -> list[str]:
    """Apply pending migrations in order, all in one transaction, under an advisory lock.

    A hundred agents starting together serialise on the lock; all but the first find nothing
    to do. Refuses to run if an applied file was edited afterwards.
    """
    pending = list(bundled()) if sql_dir is None else migrations(sql_dir)
    applied: list[str] = []
    async with conn.transaction():
        await conn.execute("SELECT pg_advisory_xact_lock($1)", MIGRATION_LOCK_KEY,
                           timeout=MIGRATION_TIMEOUT)
        await conn.execute(
            "CREATE SCHEMA IF NOT EXISTS flux;"
            "CREATE TABLE IF NOT EXISTS flux.schema_migrations ("
            " version text PRIMARY KEY, checksum text NOT NULL,"
            " applied_at timestamptz NOT NULL DEFAULT now())"
        )
        done = await applied_migrations(conn)
        for m in pending:
            if m.version in done:
                if done[m.version] != m.checksum:
                    raise MigrationError(
                        f"migration {m.version} was changed after it was applied; "
                        "add a new migration instead"
                    )
                continue
            await conn.execute(m.sql, timeout=MIGRATION_TIMEOUT)
            await conn.execute(
                "INSERT INTO flux.schema_migrations (version, checksum) VALUES ($1, $2)",
                m.version, m.checksum,
            )
            applied.append(m.version)
    return applied


async def migrate_dsn(dsn: str, sql_dir: Path | None = None, *,
                      pgbouncer: bool = False) -> list[str]:
    conn = await connect_once(dsn, pgbouncer=pgbouncer)
    try:
        return await migrate(conn, sql_dir)
    finally:
        await conn.close()


async def bootstrap_database(server_dsn: str, database_dsn: str, database: str,
                             login_role: str) -> list[str]:
    """For a database this agent owns (the embedded default): create it, migrate it, and
    create an unprivileged login role for the agent, so row-level security applies."""
    conn = await asyncpg.connect(server_dsn, timeout=30)
    try:
        if not await conn.fetchval("SELECT 1 FROM pg_database WHERE datname = $1", database):
            await conn.execute(f'CREATE DATABASE "{database}"')
    finally:
        await conn.close()
    conn = await asyncpg.connect(database_dsn, timeout=30)
    try:
        applied = await migrate(conn)
        await conn.execute(f"""
            DO $$ BEGIN
                CREATE ROLE "{login_role}" LOGIN IN ROLE flux_agent;
            EXCEPTION WHEN duplicate_object THEN NULL; END $$""")
    finally:
        await conn.close()
    return applied
