"""The agent's connections to PostgreSQL: one small pool, deadlines on everything, and the
health and identity of the server it reaches.

Writes (``sink``) and reads (``store``) share one pool, so an idle sidecar holds at most one
connection, and none once it has been idle for ``idle_timeout``. Every wait has a deadline:
connecting, each statement, and a whole flush. A connection that timed out or broke is
terminated, never handed out again: on a black-holed network path a "connected" socket is
worth nothing. TCP keepalives and ``TCP_USER_TIMEOUT`` find such paths within seconds even on
idle connections.

No reset round trip on release: every transaction declares what it needs locally
(``set_config(..., true)``), so a connection carries nothing from one use to the next.

Every write reports which server committed it (system identifier and timeline). When that
changes, the server is a different primary than before (a failover, a restore), which may lack
what the old one committed: the write says so, and the flusher replays its window. Being part
of the write's own statement, this costs no round trip and works behind PgBouncer too.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import asyncpg

from ..core.errors import Fault, PermissionDenied, UnsafeRole
from ..core.files import write_atomic
from ..core.health import failed_at, path_state
from ..core.net import tune_socket
from .errors import DATABASE_SETTING, describe, translate, unreachable

log = logging.getLogger("flux_agent.postgres")

@dataclass(frozen=True, slots=True)
class Timeouts:
    connect: float = 5.0
    statement: float = 10.0
    flush: float = 15.0
    idle: float = 60.0  # an unused connection is closed after this


@dataclass(slots=True)
class RoleInfo:
    name: str
    superuser: bool
    bypassrls: bool

    @property
    def privileged(self) -> bool:
        return self.superuser or self.bypassrls


class Postgres:
    def __init__(
        self,
        dsn: str,
        *,
        max_connections: int,
        pgbouncer: bool = False,
        timeouts: Timeouts = Timeouts(),
        identity_path: Path | None = None,
        name: str = "flux-agent",
        require_safe_role: bool = True,
        setting: str = DATABASE_SETTING,
    ) -> None:
        self._dsn = dsn
        self._setting = setting  # what says where it is, named when it cannot be reached
        self._max = max_connections
        self._pgbouncer = pgbouncer
        self.timeouts = timeouts
        self._identity_path = identity_path
        self._name = name
        self._require_safe_role = require_safe_role
        self._pool: Any = None
        self._lock = asyncio.Lock()
        self.role: RoleInfo | None = None
        self.identity: tuple[str, str] | None = None
        # Health: the last round trip that worked, and the last failure.
        self.last_ok: float | None = None  # monotonic
        self.last_failure: float | None = None
        self.last_error: str | None = None
        # Why the last failure happened, when an operator must act: a login or a privilege
        # PostgreSQL refuses (None otherwise, and once an operation succeeds again).
        self.refusal: str | None = None
        self.connections_opened = 0
        self._inflight: dict[object, float] = {}  # unit of work -> when it began

    # ---------------------------------------------------------------- pool

    async def _get_pool(self) -> Any:
        if self._pool is None:
            async with self._lock:
                if self._pool is None:
                    self._pool = await asyncpg.create_pool(
                        self._dsn, min_size=0, max_size=self._max,
                        timeout=self.timeouts.connect,
                        command_timeout=self.timeouts.statement,
                        max_inactive_connection_lifetime=self.timeouts.idle,
                        # Behind PgBouncer in transaction pooling mode, a named prepared
                        # statement may be looked for on another server connection.
                        statement_cache_size=0 if self._pgbouncer else 256,
                        server_settings=_server_settings(self._name),
                        init=self._init_connection, reset=_no_reset,
                        connection_class=connection_class(self.timeouts.statement),
                    )
        return self._pool

    @property
    def pgbouncer(self) -> bool:
        return self._pgbouncer

    def single(self, conn: Any) -> contextlib.AbstractAsyncContextManager[Any]:
        """What one statement runs in. Directly: nothing (a statement is its own
        transaction, one round trip). Behind PgBouncer in transaction pooling mode: an
        explicit transaction, because asyncpg prepares a statement and executes it in two
        exchanges, and between them PgBouncer may hand the client another server
        connection, which never saw the statement."""
        return conn.transaction() if self._pgbouncer else contextlib.nullcontext()

    async def _init_connection(self, conn: Any) -> None:
        """Every new connection: tune its socket, check the role once."""
        self.connections_opened += 1
        if self.role is None:
            async with self.single(conn):
                row = await conn.fetchrow(
                    "SELECT current_user AS name, rolsuper, rolbypassrls FROM pg_roles "
                    "WHERE rolname = current_user")
            self.role = RoleInfo(row["name"], row["rolsuper"], row["rolbypassrls"])
        if self.role.privileged and self._require_safe_role:
            raise UnsafeRole(
                f"refusing to use the database as {self.role.name!r}: it bypasses row-level "
                "security; connect as a login role granted flux_agent")
    def committed_on(self, identity: tuple[str, str]) -> bool:
        """A write committed on the server with this (system identifier, timeline): True
        when that is another primary than before (this run's, or the last run's)."""
        if identity == self.identity:
            return False
        previous = self.identity
        if previous is None and self._identity_path is not None:
            with contextlib.suppress(OSError, ValueError):
                sysid, timeline = self._identity_path.read_text().split()
                previous = (sysid, timeline)
        self.identity = identity
        if previous == identity:
            return False
        if self._identity_path is not None:
            try:
                write_atomic(self._identity_path, f"{identity[0]} {identity[1]}\n".encode())
            except OSError as exc:
                log.warning("could not record the PostgreSQL identity",
                            extra={"fields": {"error": exc.strerror}})
        if previous is not None:
            log.warning("connected to a different PostgreSQL primary than before",
                        extra={"fields": {"system_identifier": identity[0],
                                          "timeline": identity[1],
                                          "previous_system_identifier": previous[0],
                                          "previous_timeline": previous[1]}})
        return previous is not None

    @contextlib.asynccontextmanager
    async def connection(self, timeout: float | None = None, *,
                         probe: bool = False) -> AsyncIterator[Any]:
        """A connection for one unit of work, within ``timeout`` (default: a statement's).
        ``probe``: a bare round trip (a ping), which proves the server answers but not that
        a refused privilege is back.

        A failure that may have left the connection unusable (a timeout, a lost line, a
        cancelled task) terminates it, so the pool never hands it out again."""
        budget = self.timeouts.statement if timeout is None else timeout
        token = object()
        self._inflight[token] = started = time.monotonic()
        try:
            try:
                pool = await self._get_pool()
                conn = await pool.acquire(timeout=min(budget, self.timeouts.connect + 1))
            except BaseException as exc:
                err = unreachable(exc, self._dsn, self._setting) \
                    if isinstance(exc, OSError) else translate(exc)
                self.failed(err, started)
                if err is exc:
                    raise
                raise err from exc
            try:
                async with asyncio.timeout(budget):
                    yield conn
            except BaseException as exc:
                err = translate(exc)
                if not isinstance(exc, asyncpg.PostgresError) or \
                        getattr(err, "fault", None) is Fault.TRANSIENT:
                    conn.terminate()  # whatever state it is in, it is not reused
                self.failed(err, started)
                if err is exc:
                    raise
                raise err from exc
            else:
                self.ok(probe)
            finally:
                await pool.release(conn, timeout=1)
        finally:
            del self._inflight[token]

    def ok(self, probe: bool = False) -> None:
        if probe and self.refusal is not None:
            return  # still refused until work that needs the privilege succeeds
        self.last_ok = time.monotonic()
        if self.refusal is not None:
            log.info("PostgreSQL accepts this agent's login and privileges again",
                     extra={"fields": {"was": self.refusal}})
            self.refusal = None

    def failed(self, exc: BaseException, started: float | None = None) -> None:
        """The last operation failed: the probes and ``flux_postgres_up`` say so, whatever
        the cause (unreachable, a refused login or privilege), until one succeeds. A refused
        value is not the database's failure: the server and the login work."""
        if getattr(exc, "fault", None) is Fault.POISON or isinstance(exc, asyncio.CancelledError):
            return
        self.last_failure = failed_at(self.last_failure, started)
        self.last_error = describe(exc)
        if isinstance(exc, PermissionDenied) and not isinstance(exc, UnsafeRole):
            self._refused(exc)

    def _refused(self, exc: PermissionDenied) -> None:
        """A login or a privilege refused: the probes say which (``refusal``), and one ERROR
        line per episode names what PostgreSQL refused and what an operator grants."""
        login = (exc.code or "").startswith("28")
        refusal = "database_login_refused" if login else "database_permission_denied"
        if refusal == self.refusal:
            return
        self.refusal = refusal
        role = self.role.name if self.role is not None else "the login role"
        if login:
            log.error("PostgreSQL refuses this agent's login: %s; check the login role's "
                      "password and LOGIN attribute (FLUX_AGENT_DATABASE_URL)", exc.detail,
                      extra={"fields": {"sqlstate": exc.code, "role": role}})
        else:
            log.error("PostgreSQL refuses this agent a privilege it needs: %s; the login "
                      "role %s needs the role flux_agent (GRANT flux_agent TO %s)",
                      exc.detail, role, role, extra={"fields": {
                          "sqlstate": exc.code, "role": role,
                          "missing_privilege": exc.detail}})

    def state(self, window: float) -> str:
        """``up``, ``down`` or ``unknown`` from the last operations (see
        :func:`~flux_agent.core.health.path_state`)."""
        return path_state(self.last_ok, self.last_failure, self._inflight.values(),
                          connect_timeout=self.timeouts.connect, window=window)

    async def ping(self) -> float:
        """Round-trip latency in seconds."""
        start = time.perf_counter()
        async with self.connection(probe=True) as conn, self.single(conn):
            await conn.fetchval("SELECT 1")
        return time.perf_counter() - start

    async def close(self) -> None:
        if self._pool is not None:
            pool, self._pool = self._pool, None
            try:
                await asyncio.wait_for(pool.close(), 5)
            except (TimeoutError, OSError, asyncpg.PostgresError, asyncpg.InterfaceError):
                pool.terminate()


async def _no_reset(conn: Any) -> None:
    """Nothing to reset: transactions keep their settings local (see the module doc)."""


class TunedConnection(asyncpg.Connection):  # type: ignore[misc]
    """asyncpg's connection with its socket tuned as it is made: keepalives find a dead
    path on an idle connection in ~11 s, and TCP_USER_TIMEOUT fails a write whose bytes go
    unacknowledged for longer than a statement may take. asyncpg has no public way to a
    connection's socket; its documented ``connection_class`` hook hands the transport to the
    constructor. ``user_timeout`` (seconds) is set per pool on a subclass."""

    user_timeout = 10.0

    def __init__(self, protocol: Any, transport: Any, *args: Any, **kwargs: Any) -> None:
        super().__init__(protocol, transport, *args, **kwargs)
        tune_socket(transport.get_extra_info("socket"), self.user_timeout)


def connection_class(user_timeout: float) -> type[TunedConnection]:
    return type("TunedConnection", (TunedConnection,), {"user_timeout": user_timeout})


def _server_settings(name: str) -> dict[str, str]:
    """Startup parameters. asyncpg announces ``client_encoding`` as ``'utf-8'``; the server
    reports it back as ``UTF8``, and PgBouncer, seeing the client's value differ from the
    server connection's, sends ``SET client_encoding`` (a transaction of its own) every time
    it hands this client a server connection: one more transaction per flush. Announcing
    the server's own spelling (the later startup parameter wins) makes them equal."""
    return {"client_encoding": "UTF8", "application_name": name}


async def connect_once(dsn: str, timeout: float = 10.0, *, pgbouncer: bool = False,
                       setting: str = DATABASE_SETTING) -> Any:
    """A connection outside the pool (migrations, CLI tools)."""
    try:
        return await asyncpg.connect(dsn, timeout=timeout,
                                     statement_cache_size=0 if pgbouncer else 100,
                                     server_settings=_server_settings("flux-agent"))
    except OSError as exc:
        raise unreachable(exc, dsn, setting) from exc
