"""PostgreSQL writes: migrations, idempotent batch inserts, dead letters, error classes.

The only module (with ``store``) that imports asyncpg. Every write runs in one transaction
that first declares its agency (``set_config('flux.current_agency_id', ..., true)``), so
row-level security holds even if the code above had a bug, and nothing outlives the
transaction (safe behind PgBouncer in transaction pooling mode).

Idempotent insert path, measured on this project's machines (``python -m bench.insert_paths``):
binary COPY into a temporary staging table, then ``INSERT ... SELECT ... ON CONFLICT DO
NOTHING``. It beat a single ``INSERT ... SELECT FROM unnest($1::uuid[], ...)`` statement by
about 25% at 500 rows, because COPY's binary encoding is cheaper on both sides than array
parameters.
"""

from __future__ import annotations

import asyncio
import hashlib
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import asyncpg
import msgspec

from ._resources import data_dir
from .batch import Work
from .event import (
    AGENCY,
    AUDIT_COLUMNS,
    CHECKPOINT_COLUMNS,
    COLUMNS,
    EVENT_ID,
    KIND,
    RECEIVED_AT,
    RUN_ID,
    AuditRow,
    CheckpointRow,
    row_as_json,
)

MIGRATION_LOCK_KEY = 0x666C_7578_0001  # "flux" + 1: one lock for all agents of a database
STAGE_TABLE = "flux_stage_events_v1"

_COLS = ", ".join(COLUMNS)
_CREATE_STAGE = (
    f"CREATE TEMPORARY TABLE IF NOT EXISTS {STAGE_TABLE} "
    "(LIKE flux.events INCLUDING DEFAULTS) ON COMMIT DELETE ROWS"
)
_SET_AGENCY = "SELECT set_config('flux.current_agency_id', $1, true)"
# The spool forgets what PostgreSQL said it committed, so a commit must survive a crash of
# PostgreSQL: a server (or role) running synchronous_commit=off answers COMMIT before the
# commit record is on disk. Raise it to `on` for our own transactions only; any stricter
# setting (remote_write, remote_apply) is kept.
_DURABLE_COMMIT = ("SELECT set_config('synchronous_commit', 'on', true) "
                   "WHERE current_setting('synchronous_commit') = 'off'")
_INSERT = (
    f"INSERT INTO flux.events ({_COLS}) SELECT {_COLS} FROM {STAGE_TABLE} "
    "WHERE agency_id = $1 ON CONFLICT DO NOTHING"
)
_INSERT_RETURNING = _INSERT + " RETURNING event_id::text"
_INSERT_AUDIT = (
    f"INSERT INTO flux.audit_log ({', '.join(AUDIT_COLUMNS)}) "
    "VALUES ($1, $2, $3, $4, $5, $6, $7::jsonb, $8::jsonb, $9, $10, $11::jsonb)"
)
_CP_COLS = ", ".join(CHECKPOINT_COLUMNS)
_CP_ARGS = "$1, $2, $3, $4, $5::json, $6, $7, $8, $9, $10, $11, $12::uuid, $13"
_INSERT_HISTORY = (
    f"INSERT INTO flux.checkpoint_history ({_CP_COLS}) VALUES ({_CP_ARGS}) "
    "ON CONFLICT (agency_id, run_id, version) DO NOTHING"
)
_CHECK_HISTORY = (
    "SELECT checkpoint_hash FROM flux.checkpoint_history "
    "WHERE agency_id = $1 AND run_id = $2 AND version = $3"
)
_UPSERT_LATEST = (
    f"INSERT INTO flux.checkpoints ({_CP_COLS}) VALUES ({_CP_ARGS}) "
    "ON CONFLICT (agency_id, run_id) DO UPDATE SET "
    + ", ".join(f"{c} = EXCLUDED.{c}" for c in CHECKPOINT_COLUMNS[2:])
    + " WHERE flux.checkpoints.version < EXCLUDED.version"
)
_INSERT_DEAD = (
    "INSERT INTO flux.dead_letters (agency_id, event_id, run_id, kind, reason, sqlstate, "
    "event, received_at) VALUES ($1, $2::uuid, $3, $4, $5, $6, $7, $8)"
)

# SQLSTATE classes whose errors belong to the data of a row: retrying cannot help, so the
# offending events are isolated into dead letters. Everything else (connection loss,
# shutdowns, lock timeouts, missing privileges or tables that an operator will fix) is
# transient and retried while the spool holds the events.
POISON_CLASSES = {
    "22": "data exception",
    "23": "integrity constraint violation",
    "54": "program limit exceeded",
}


class CheckpointConflict(Exception):
    """Another save already holds this run's version number with different content.

    A data fault of the row (integrity class 23): isolated and kept as a dead letter, never
    silently dropped."""

    sqlstate = "23505"


def classify(exc: BaseException) -> str:
    """``"poison"`` when the rows themselves are refused, else ``"transient"``."""
    sqlstate = getattr(exc, "sqlstate", None)
    if isinstance(sqlstate, str) and sqlstate[:2] in POISON_CLASSES:
        return "poison"
    return "transient"


def describe(exc: BaseException) -> str:
    """One line, no secrets: asyncpg's messages do not carry passwords, DSNs are not echoed."""
    sqlstate = getattr(exc, "sqlstate", None)
    text = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
    return f"{sqlstate}: {text}" if sqlstate else f"{type(exc).__name__}: {text}"


# --------------------------------------------------------------------------- pools


async def open_pool(dsn: str, *, max_size: int, pgbouncer: bool, name: str,
                    command_timeout: float) -> Any:
    """A lazily connecting pool (PostgreSQL being down at start is not fatal)."""
    return await asyncpg.create_pool(
        dsn, min_size=0, max_size=max_size, timeout=5, command_timeout=command_timeout,
        max_inactive_connection_lifetime=60,
        # Behind PgBouncer in transaction pooling mode, a named prepared statement may be
        # looked for on another server connection: do without the statement cache.
        statement_cache_size=0 if pgbouncer else 256,
        server_settings={"application_name": name},
    )


async def close_pool(pool: Any) -> None:
    try:
        await asyncio.wait_for(pool.close(), 5)
    except (TimeoutError, OSError, asyncpg.PostgresError, asyncpg.InterfaceError):
        pool.terminate()


# --------------------------------------------------------------------------- migrations


@dataclass(frozen=True, slots=True)
class Migration:
    version: str
    path: Path
    sql: str
    checksum: str


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
    pending = migrations(sql_dir)
    applied: list[str] = []
    async with conn.transaction():
        await conn.execute("SELECT pg_advisory_xact_lock($1)", MIGRATION_LOCK_KEY)
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
            await conn.execute(m.sql)
            await conn.execute(
                "INSERT INTO flux.schema_migrations (version, checksum) VALUES ($1, $2)",
                m.version, m.checksum,
            )
            applied.append(m.version)
    return applied


async def migrate_dsn(dsn: str, sql_dir: Path | None = None) -> list[str]:
    conn = await asyncpg.connect(dsn, timeout=10)
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


# --------------------------------------------------------------------------- the sink


@dataclass(slots=True)
class RoleInfo:
    name: str
    superuser: bool
    bypassrls: bool


class SchemaNotReady(RuntimeError):
    """The flux schema is missing or behind and this agent may not (or could not) migrate."""


class UnsafeRole(SchemaNotReady):
    """The login role is a superuser or has BYPASSRLS: isolation would not be enforced."""


class Sink:
    """A small pool of connections and the statements the flusher needs."""

    def __init__(
        self,
        dsn: str,
        *,
        max_connections: int,
        pgbouncer: bool = False,
        migrate_on_connect: bool = True,
        refuse_privileged: bool = False,
        command_timeout: float = 60.0,
    ) -> None:
        self._dsn = dsn
        self._max = max_connections
        self._pgbouncer = pgbouncer
        self._migrate = migrate_on_connect
        self._refuse_privileged = refuse_privileged
        self._command_timeout = command_timeout
        self._pool: Any = None
        self._pool_lock = asyncio.Lock()
        self.schema_ready = False
        self.role: RoleInfo | None = None
        self.last_ok = 0.0

    async def _get_pool(self) -> Any:
        if self._pool is None:
            async with self._pool_lock:
                if self._pool is None:
                    self._pool = await open_pool(
                        self._dsn, max_size=self._max, pgbouncer=self._pgbouncer,
                        name="flux-agent", command_timeout=self._command_timeout)
        return self._pool

    async def close(self) -> None:
        if self._pool is not None:
            pool, self._pool = self._pool, None
            await close_pool(pool)

    async def ensure_schema(self) -> list[str]:
        """Check (and if allowed, apply) migrations; learn who we are. Idempotent."""
        if self.schema_ready:
            return []
        pool = await self._get_pool()
        # Every statement runs inside a transaction, also reads: behind PgBouncer in
        # transaction pooling mode, that is what keeps a statement on one server connection.
        async with pool.acquire() as conn, conn.transaction():
            row = await conn.fetchrow(
                "SELECT current_user AS name, rolsuper, rolbypassrls FROM pg_roles "
                "WHERE rolname = current_user"
            )
            self.role = RoleInfo(row["name"], row["rolsuper"], row["rolbypassrls"])
            if self._refuse_privileged and (self.role.superuser or self.role.bypassrls):
                raise UnsafeRole(
                    f"refusing to write as {self.role.name!r}: it bypasses row-level security; "
                    "connect as a login role granted flux_agent")
            done = await applied_migrations(conn)
            wanted = migrations()
            missing = [m.version for m in wanted if m.version not in done]
            applied: list[str] = []
            if missing:
                if not self._migrate:
                    raise SchemaNotReady(
                        f"schema flux lacks migrations {', '.join(missing)}; "
                        "run `flux-agent migrate`"
                    )
                try:
                    applied = await migrate(conn)  # nested: runs in a savepoint
                except asyncpg.InsufficientPrivilegeError as exc:
                    raise SchemaNotReady(
                        f"cannot apply migrations {', '.join(missing)} as {self.role.name} "
                        f"({describe(exc)}); run `flux-agent migrate` as the schema owner"
                    ) from None
        self.schema_ready = True
        return applied

    async def ping(self) -> float:
        """Round-trip latency in seconds."""
        pool = await self._get_pool()
        start = time.perf_counter()
        async with pool.acquire() as conn, conn.transaction():
            await conn.fetchval("SELECT 1")
        return time.perf_counter() - start

    async def schema_version(self) -> str | None:
        pool = await self._get_pool()
        async with pool.acquire() as conn, conn.transaction():
            done = await applied_migrations(conn)
        return max(done) if done else None

    async def write(self, work: Work, *, returning: bool) -> tuple[int, set[str]]:
        """Insert one lane's events (idempotently) and audit entries in one transaction.

        Returns how many events were new and, when ``returning``, their ids (the others were
        already stored: duplicates).
        """
        pool = await self._get_pool()
        agencies = list(dict.fromkeys(row[AGENCY] for row in work.events))
        inserted = 0
        ids: set[str] = set()
        async with pool.acquire() as conn, conn.transaction():
            if work.events:  # one round trip for both (simple query protocol)
                await conn.execute(f"{_DURABLE_COMMIT}; {_CREATE_STAGE}")
                await conn.copy_records_to_table(STAGE_TABLE, records=work.events,
                                                 columns=COLUMNS)
            else:
                await conn.execute(_DURABLE_COMMIT)
            for agency in agencies:
                await conn.execute(_SET_AGENCY, agency)
                if returning:
                    result = await conn.fetch(_INSERT_RETURNING, agency)
                    ids.update(r[0] for r in result)
                    inserted += len(result)
                else:
                    status = await conn.execute(_INSERT, agency)
                    inserted += int(status.rsplit(" ", 1)[-1])
            if work.checkpoints:
                await self._insert_checkpoints(conn, work.checkpoints)
            if work.audits:
                await self._insert_audits(conn, work.audits)
        self.last_ok = time.time()
        return inserted, ids

    @staticmethod
    async def _insert_checkpoints(conn: Any, rows: list[CheckpointRow]) -> None:
        for row in rows:
            await conn.execute(_SET_AGENCY, row[0])
            await conn.execute(_INSERT_HISTORY, *row)
            stored = await conn.fetchval(_CHECK_HISTORY, row[0], row[1], row[2])
            if stored != row[5]:
                raise CheckpointConflict(
                    f"checkpoint version {row[2]} of run {row[1]} already exists with "
                    "other content")
            await conn.execute(_UPSERT_LATEST, *row)

    @staticmethod
    async def _insert_audits(conn: Any, rows: list[AuditRow]) -> None:
        by_agency: dict[str, list[AuditRow]] = {}
        for row in rows:
            by_agency.setdefault(row[0], []).append(row)
        for agency, group in by_agency.items():
            await conn.execute(_SET_AGENCY, agency)
            await conn.executemany(_INSERT_AUDIT, group)

    async def write_dead_letter(self, work: Work, reason: str, sqlstate: str | None) -> None:
        """Store one refused item with the reason, under its own agency."""
        pool = await self._get_pool()
        reason = reason.replace("\x00", "")
        async with pool.acquire() as conn, conn.transaction():
            await conn.execute(_DURABLE_COMMIT)
            for row in work.events:
                await conn.execute(_SET_AGENCY, row[AGENCY])
                await conn.execute(
                    _INSERT_DEAD, row[AGENCY], row[EVENT_ID], row[RUN_ID], row[KIND], reason,
                    sqlstate, msgspec.json.encode(row_as_json(row)), row[RECEIVED_AT],
                )
            for cp in work.checkpoints:
                await conn.execute(_SET_AGENCY, cp[0])
                await conn.execute(
                    _INSERT_DEAD, cp[0], cp[11], cp[1], "checkpoint", reason, sqlstate,
                    msgspec.json.encode(dict(zip(CHECKPOINT_COLUMNS, cp, strict=True))), cp[9],
                )
            for audit in work.audits:
                await conn.execute(_SET_AGENCY, audit[0])
                await conn.execute(
                    _INSERT_DEAD, audit[0], None, None, "audit", reason, sqlstate,
                    msgspec.json.encode(dict(zip(AUDIT_COLUMNS, audit, strict=True))), audit[1],
                )
        self.last_ok = time.time()

    # ---------------------------------------------------------------- retention

    async def claim_lease(self, name: str, holder: str, seconds: float) -> bool:
        """True if this agent holds the named maintenance lease for ``seconds`` now."""
        pool = await self._get_pool()
        async with pool.acquire() as conn, conn.transaction():
            return bool(await conn.fetchval("SELECT flux.claim_lease($1, $2, $3)",
                                            name, holder, seconds))

    async def purge(self, agency: str, batch: int) -> tuple[int, int, int]:
        """Delete one small batch of expired rows of one agency: (events, history, latest)."""
        pool = await self._get_pool()
        async with pool.acquire() as conn, conn.transaction():
            row = await conn.fetchrow("SELECT * FROM flux.purge_expired($1, $2)", agency, batch)
        self.last_ok = time.time()
        return int(row[0]), int(row[1]), int(row[2])
