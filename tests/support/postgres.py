"""The tests' PostgreSQL: one throwaway cluster per session (or ``FLUX_TEST_DATABASE_URL``),
a migrated template database, and a fresh database per test made from it.

The cluster runs from the machine's binaries (Debian's PostgreSQL; the embedded wheel as a
fallback), as the ``postgres`` user when the suite runs as root. ``FLUX_TEST_VIA_PGBOUNCER=1``
puts a real PgBouncer in transaction pooling mode in front of it, which every agent then
goes through (CI's second pass).
"""

from __future__ import annotations

import asyncio
import os
import queue
import shutil
import threading
import uuid
from dataclasses import dataclass
from typing import Any
from urllib.parse import urlsplit, urlunsplit

import asyncpg

from flux_agent.postgres.embedded import LocalPostgres, find_bin_dir, free_port
from flux_agent.postgres.migrations import migrate_dsn

from .markers import require_marker
from .paths import short_tempdir

LOGIN_ROLE = "flux_test_sidecar"
LOGIN_PASSWORD = "s3cret-sidecar-pw"
TEMPLATE = "flux_template"

# Fast, still real: durability of the test cluster itself is not what is under test.
FAST_SETTINGS = {"fsync": "off", "synchronous_commit": "off", "full_page_writes": "off",
                 "max_connections": "200"}

# FLUX_TEST_VIA_PGBOUNCER=1 runs the suite with every agent behind a real PgBouncer in
# transaction pooling mode (CI does it as a second pass): what thousands of sidecars share.
VIA_PGBOUNCER = os.environ.get("FLUX_TEST_VIA_PGBOUNCER", "") == "1"


@dataclass
class PgServer:
    admin_dsn: str  # a superuser on the maintenance database
    cluster: LocalPostgres | None
    front: Any = None  # the PgBouncer every agent goes through, when so run

    def dsn(self, database: str, user: str | None = None, password: str | None = None) -> str:
        parts = urlsplit(self.admin_dsn)
        netloc = parts.netloc
        if user is not None:
            host = netloc.rsplit("@", 1)[-1]
            netloc = f"{user}:{password}@{host}" if password else f"{user}@{host}"
        return urlunsplit((parts.scheme, netloc, "/" + database, parts.query, ""))


@dataclass
class Database:
    name: str
    admin_dsn: str  # superuser (bypasses RLS): for checking what really is stored
    agent_dsn: str  # the unprivileged login role a sidecar uses (through PgBouncer, if so run)
    login_dsn: str = ""  # the same role, always direct: for SQL the tests run as it

    def __post_init__(self) -> None:
        self.login_dsn = self.login_dsn or self.agent_dsn

    async def fetch(self, query: str, *args: Any) -> list[asyncpg.Record]:
        conn = await asyncpg.connect(self.admin_dsn)
        try:
            return list(await conn.fetch(query, *args))
        finally:
            await conn.close()

    async def fetchval(self, query: str, *args: Any) -> Any:
        conn = await asyncpg.connect(self.admin_dsn)
        try:
            return await conn.fetchval(query, *args)
        finally:
            await conn.close()


class ServerUnavailable(Exception):
    """No PostgreSQL could be started (or reached) for the tests."""


def start_server() -> PgServer:
    """``FLUX_TEST_DATABASE_URL``'s server, else a new throwaway cluster (stop it with
    :func:`stop_server`); behind PgBouncer when the suite runs so."""
    require_marker("db", "starts PostgreSQL")
    url = os.environ.get("FLUX_TEST_DATABASE_URL")
    if url:
        server = PgServer(url, None)
    else:
        root = short_tempdir("fa-pg-")
        cluster = LocalPostgres(root / "data", bin_dir=find_bin_dir(prefer="system"),
                                port=free_port(), settings=FAST_SETTINGS)
        try:
            dsn = cluster.start()
        except Exception as exc:
            shutil.rmtree(root, ignore_errors=True)
            raise ServerUnavailable(f"cannot start PostgreSQL for the tests: {exc}") from exc
        server = PgServer(dsn, cluster)
    if VIA_PGBOUNCER:
        from .pgbouncer import PgBouncer

        parts = urlsplit(server.admin_dsn)
        front = PgBouncer(short_tempdir("fa-pgbf-"), host=parts.hostname or "127.0.0.1",
                          port=parts.port or 5432, users={LOGIN_ROLE: LOGIN_PASSWORD})
        try:
            front.start()
        except BaseException:
            stop_server(server)
            raise
        server.front = front
    return server


def stop_server(server: PgServer) -> None:
    if server.front is not None:
        server.front.stop()
    if server.cluster is not None:
        server.cluster.destroy()
        shutil.rmtree(server.cluster.data_dir.parent, ignore_errors=True)


async def prepare_template(server: PgServer) -> None:
    """The template every test database is copied from: migrated, with the login role."""
    conn = await asyncpg.connect(server.admin_dsn)
    try:
        exists = await conn.fetchval("SELECT 1 FROM pg_database WHERE datname = $1", TEMPLATE)
        if not exists:
            await conn.execute(f"CREATE DATABASE {TEMPLATE}")
    finally:
        await conn.close()
    await migrate_dsn(server.dsn(TEMPLATE))
    conn = await asyncpg.connect(server.dsn(TEMPLATE))
    try:
        await conn.execute(f"""
            DO $$ BEGIN
              CREATE ROLE {LOGIN_ROLE} LOGIN PASSWORD '{LOGIN_PASSWORD}' IN ROLE flux_agent;
            EXCEPTION WHEN duplicate_object THEN NULL; END $$""")
    finally:
        await conn.close()


async def create_database(server: PgServer, template: str = TEMPLATE) -> Database:
    require_marker("db", "creates a database")
    return database_named(server, await _copy(server, template))


async def _copy(server: PgServer, template: str) -> str:
    name = f"t_{uuid.uuid4().hex[:12]}"
    conn = await asyncpg.connect(server.admin_dsn)
    try:
        await conn.execute(f"CREATE DATABASE {name} TEMPLATE {template}")
    finally:
        await conn.close()
    return name


def database_named(server: PgServer, name: str) -> Database:
    direct = server.dsn(name, LOGIN_ROLE, LOGIN_PASSWORD)
    agent = server.front.url(LOGIN_ROLE, LOGIN_PASSWORD, name) if server.front else direct
    return Database(name, server.dsn(name), agent, direct)


class Spares:
    """Databases copied from the template ahead of the tests that take them, on a thread of
    their own. A copy costs PostgreSQL about 0.4 s; made while the test before runs (which
    mostly waits), it no longer adds to the ~200 tests that take one."""

    def __init__(self, server: PgServer, ahead: int = 2) -> None:
        self.server = server
        self._ready: queue.Queue[str | BaseException] = queue.Queue()
        self._wanted = threading.Semaphore(ahead)  # a permit per spare still to make
        self._closing = False
        self._thread = threading.Thread(target=self._make, name="flux-test-spares",
                                        daemon=True)
        self._thread.start()

    def _make(self) -> None:
        while True:
            self._wanted.acquire()
            if self._closing:
                return
            try:
                self._ready.put(asyncio.run(_copy(self.server, TEMPLATE)))
            except BaseException as exc:  # the test that takes it fails with it
                self._ready.put(exc)

    async def take(self) -> Database:
        require_marker("db", "creates a database")
        try:
            made = await asyncio.to_thread(self._ready.get, timeout=120)
        except queue.Empty:
            raise ServerUnavailable("no test database could be made in 120 s") from None
        self._wanted.release()  # the next one
        if isinstance(made, BaseException):
            raise made
        return database_named(self.server, made)

    def close(self) -> None:
        """Stop making spares and drop those not taken."""
        self._closing = True
        self._wanted.release()
        self._thread.join(60)
        while not self._ready.empty():
            made = self._ready.get()
            if isinstance(made, str):
                asyncio.run(drop_database(self.server, made))


async def drop_database(server: PgServer, name: str) -> None:
    conn = await asyncpg.connect(server.admin_dsn)
    try:
        await conn.execute(f"DROP DATABASE IF EXISTS {name} WITH (FORCE)")
    finally:
        await conn.close()


def proxied(database: Database, proxy: Any) -> Database:
    """The same database, but the agent reaches it through ``proxy`` (a TcpProxy, which
    forwards to PostgreSQL itself)."""
    parts = urlsplit(database.login_dsn)
    userinfo = parts.netloc.rsplit("@", 1)[0]
    agent_dsn = urlunsplit(parts._replace(netloc=f"{userinfo}@127.0.0.1:{proxy.port}"))
    return Database(database.name, database.admin_dsn, agent_dsn, database.login_dsn)


def port_of(dsn: str) -> int:
    port = urlsplit(dsn).port
    assert port is not None, "the fault tests need PostgreSQL on TCP"
    return port
