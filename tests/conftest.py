"""Fixtures only: what they build lives in tests/support/ (see its __init__ for the map).

PostgreSQL starts on first use of a database fixture, never for a test that does not ask for
one; ``FLUX_TEST_DATABASE_URL`` names a server to use instead (a role that may create
databases and roles). A test that needs PostgreSQL fails when none can be started: it never
skips. Tests that use a database are marked ``db`` by the hook imported below, tests that
use the cutting proxy ``fault`` (tests/support/markers.py).
"""

from __future__ import annotations

import asyncio
import logging
import shutil
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import pytest

from flux_agent import Agent
from flux_agent.postgres.embedded import LocalPostgres

from .support import profiles
from .support.agents import AgentProcess, agent_config, agent_env
from .support.capture import CaptureHandler, leaked_secrets, remember_secret
from .support.faults import TcpProxy
from .support.hooks import (
    pytest_collection_modifyitems,
    pytest_runtest_protocol,
    pytest_xdist_auto_num_workers,
)
from .support.markers import require_marker
from .support.paths import short_tempdir
from .support.postgres import (
    FAST_SETTINGS,
    LOGIN_PASSWORD,
    LOGIN_ROLE,
    TEMPLATE,
    VIA_PGBOUNCER,
    Database,
    PgServer,
    ServerUnavailable,
    Spares,
    create_database,
    drop_database,
    port_of,
    prepare_template,
    proxied,
    start_server,
    stop_server,
)

# Exported: the hooks (pytest finds them here), and the names tests written before
# tests/support import from here (kept for them; new tests import from tests.support).
__all__ = [
    "FAST_SETTINGS", "LOGIN_PASSWORD", "LOGIN_ROLE", "TEMPLATE", "VIA_PGBOUNCER",
    "AgentProcess", "Database", "PgServer", "agent_config", "agent_env", "create_database",
    "drop_database", "proxied", "pytest_collection_modifyitems", "pytest_runtest_protocol",
    "pytest_xdist_auto_num_workers", "short_tempdir",
]

profiles.load()


@pytest.fixture(scope="session", autouse=True)
def no_secret_is_ever_printed() -> Iterator[None]:
    """Every log line and every answer of the whole session is checked for secrets."""
    remember_secret(LOGIN_PASSWORD)
    handler = CaptureHandler()
    root = logging.getLogger()
    root.addHandler(handler)
    previous = root.level
    root.setLevel(logging.DEBUG)
    yield
    root.removeHandler(handler)
    root.setLevel(previous)
    leaks = leaked_secrets()
    assert not leaks, f"secrets leaked into logs or answers: {leaks}"


@pytest.fixture(scope="session", autouse=True)
def embedded_postgres_is_a_db_test() -> Iterator[None]:
    """An in-process agent with no database URL starts an embedded PostgreSQL: only a test
    marked ``db`` may (the pure layer starts none)."""
    start = LocalPostgres.start

    def guarded(self: LocalPostgres, *args: object, **kwargs: object) -> str:
        require_marker("db", "starts PostgreSQL")
        return start(self, *args, **kwargs)  # type: ignore[arg-type]

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(LocalPostgres, "start", guarded)
        yield


@pytest.fixture(scope="session")
def pg_server() -> Iterator[PgServer]:
    """The session's PostgreSQL (and PgBouncer in front of it, when so run), started by the
    first test that needs it."""
    try:
        server = start_server()
    except ServerUnavailable as exc:
        pytest.fail(str(exc), pytrace=False)
    yield server
    stop_server(server)


@pytest.fixture(scope="session")
def pg_template(pg_server: PgServer) -> PgServer:
    asyncio.run(prepare_template(pg_server))
    return pg_server


@pytest.fixture(scope="session")
def spare_databases(pg_template: PgServer) -> Iterator[Spares]:
    spares = Spares(pg_template)
    yield spares
    spares.close()


@pytest.fixture
async def database(pg_template: PgServer, spare_databases: Spares) -> AsyncIterator[Database]:
    """A database of its own, at the current schema, made from the template (ahead of
    time: :class:`Spares`)."""
    db = await spare_databases.take()
    yield db
    await drop_database(pg_template, db.name)


@pytest.fixture
def state_dir() -> Iterator[Path]:
    path = short_tempdir()
    yield path
    shutil.rmtree(path, ignore_errors=True)


@pytest.fixture
async def agent(database: Database, state_dir: Path) -> AsyncIterator[Agent]:
    async with Agent(agent_config(database, state_dir)) as running:
        yield running


@pytest.fixture
async def proxy(database: Database) -> AsyncIterator[TcpProxy]:
    """A TCP proxy between the agent and PostgreSQL: ``proxy.cut()`` is an outage."""
    p = TcpProxy("127.0.0.1", port_of(database.admin_dsn))
    await p.start()
    yield p
    await p.stop()
