"""PostgreSQL refusing the agent: a revoked role (reads answer 503 DATABASE_PERMISSION_DENIED,
readiness says why, one ERROR line names the privilege), and a login refused for a while (a
changed password, NOLOGIN: the probes and flux_postgres_up say down, and recover).

Each test has a login role of its own (roles are the cluster's, shared by every test), made
here and dropped at the end; the agent connects to PostgreSQL directly, as that role."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import subprocess
import sys
import uuid
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit, urlunsplit

import asyncpg
import pytest

from flux_agent import Agent
from flux_agent.core.settings import Secret
from flux_agent.testing import make_event

from .support.agents import agent_config
from .support.capture import remember_secret
from .support.http import assert_problem, get, post
from .support.polling import wait_until
from .support.postgres import Database

PASSWORD = "a-login-of-its-own-pw"


@contextlib.asynccontextmanager
async def own_login_role(database: Database) -> AsyncIterator[tuple[str, str]]:
    """(role, dsn): a login role granted flux_agent, connecting directly."""
    role = f"flux_t_{uuid.uuid4().hex[:10]}"
    remember_secret(PASSWORD)
    conn = await asyncpg.connect(database.admin_dsn)
    try:
        await conn.execute(f"CREATE ROLE {role} LOGIN PASSWORD '{PASSWORD}' IN ROLE flux_agent")
        parts = urlsplit(database.login_dsn)
        host = parts.netloc.rsplit("@", 1)[-1]
        yield role, urlunsplit(parts._replace(netloc=f"{role}:{PASSWORD}@{host}"))
    finally:
        await conn.execute("SELECT pg_terminate_backend(pid) FROM pg_stat_activity "
                           "WHERE usename = $1", role)
        await conn.execute(f"DROP ROLE IF EXISTS {role}")
        await conn.close()


@contextlib.asynccontextmanager
async def passwords_checked(database: Database, role: str, dsn: str) -> AsyncIterator[None]:
    """Make PostgreSQL check ``role``'s password. The suite's own cluster trusts local
    connections, so a changed password would change nothing: a first pg_hba.conf rule for
    this role alone asks for it (scram-sha-256), until the end."""
    wrong = dsn.replace(PASSWORD, "not-the-password")
    if await _refused(wrong):
        yield  # the server checks passwords already
        return
    conn = await asyncpg.connect(database.admin_dsn)
    try:
        hba = Path(await conn.fetchval("SHOW hba_file"))
        if not hba.is_file():
            pytest.fail(f"PostgreSQL trusts {role} and its pg_hba.conf ({hba}) is not on this "
                        "machine: cannot make it check passwords", pytrace=False)
        original = hba.read_text()
        hba.write_text(f"host all {role} all scram-sha-256\nlocal all {role} scram-sha-256\n"
                       + original)
        await conn.execute("SELECT pg_reload_conf()")
        assert await wait_until(lambda: _refused(wrong), 10), "pg_hba.conf not reloaded"
        try:
            yield
        finally:
            hba.write_text(original)
            await conn.execute("SELECT pg_reload_conf()")
    finally:
        await conn.close()


async def _refused(dsn: str) -> bool:
    try:
        conn = await asyncpg.connect(dsn)
    except asyncpg.InvalidPasswordError:
        return True
    await conn.close()
    return False


async def admin(database: Database, *statements: str) -> None:
    conn = await asyncpg.connect(database.admin_dsn)
    try:
        for statement in statements:
            await conn.execute(statement)
    finally:
        await conn.close()


def config_for(database: Database, state_dir: Path, dsn: str) -> Any:
    return agent_config(database, state_dir, database_url=Secret(dsn), database_pgbouncer=False,
                        flush_retry_max=0.2, database_ping_interval=0.5,
                        commit_wait_timeout=0.5)


async def ready(agent: Agent) -> tuple[int, dict[str, Any]]:
    status, body, _ = await get(agent.endpoints.admin_url + "/health/ready")
    return status, body


async def postgres_up(agent: Agent) -> float:
    _, text, _ = await get(agent.endpoints.admin_url + "/metrics")
    line = next(li for li in text.splitlines() if li.startswith("flux_postgres_up "))
    return float(line.split()[1])


async def stored(database: Database, event_id: str) -> bool:
    return bool(await database.fetchval(
        "SELECT count(*) FROM flux.events WHERE event_id = $1", event_id))


async def test_a_revoked_role_reads_503_permission_denied_and_readiness_says_why(
        database: Database, state_dir: Path, caplog: pytest.LogCaptureFixture):
    caplog.set_level(logging.INFO)
    async with own_login_role(database) as (role, dsn), \
            Agent(config_for(database, state_dir, dsn)) as agent:
        url = agent.endpoints.event_url
        before = make_event("step.completed", run_id="granted")
        assert (await post(url + "/v1/events", before))[0] == 202
        assert await wait_until(lambda: stored(database, before["event_id"]), 10)

        await admin(database, f"REVOKE flux_agent FROM {role}")
        # Writes go on: onto the spool.
        during = make_event("step.completed", run_id="granted")
        status, body, _ = await post(url + "/v1/events", during)
        assert status == 202, body
        # Every read route answers the same clear 503.
        for path in ("/v1/runs/granted", "/v1/runs/granted/events",
                     f"/v1/events/{before['event_id']}", "/v1/runs/never-saved/checkpoint",
                     "/v1/runs/never-saved/checkpoints"):
            status, body, headers = await get(url + path)
            assert_problem(status, body, headers, 503, "DATABASE_PERMISSION_DENIED")
            assert body["class"] == "TRANSIENT_ERROR" and body["retryable"] is True, path
            assert int(headers["Retry-After"]) > 0, path
            assert body["context"]["sqlstate"] == "42501", path
        # Readiness says why, and stays ready: events are still taken.
        assert await wait_until(
            lambda: _reason(agent, "database_permission_denied"), 10), await ready(agent)
        status, body = await ready(agent)
        assert status == 200 and body["database"] == "down"
        assert await postgres_up(agent) == 0.0
        deep = (await get(agent.endpoints.admin_url + "/health/deep"))[1]
        assert deep["database"]["reason"] == "database_permission_denied"
        said = await asyncio.to_thread(
            subprocess.run, [sys.executable, "-m", "flux_agent", "status", "--url",
                             agent.endpoints.admin_url], capture_output=True, text=True,
            timeout=60)
        assert said.returncode == 1, said.stderr  # not healthy
        assert "down (database_permission_denied): 42501" in said.stdout, said.stdout

        # One ERROR line names the refused privilege and the grant, however often it failed.
        named = [r for r in caplog.records if r.levelno == logging.ERROR
                 and "refuses this agent a privilege" in r.getMessage()]
        assert len(named) == 1, [r.getMessage() for r in named]
        assert "permission denied for" in named[0].getMessage()
        assert f"GRANT flux_agent TO {role}" in named[0].getMessage()

        await admin(database, f"GRANT flux_agent TO {role}")
        assert await wait_until(lambda: stored(database, during["event_id"]), 15)
        assert await wait_until(lambda: _reason(agent, None), 10), await ready(agent)
        status, body, _ = await get(url + "/v1/runs/granted")
        assert status == 200 and body["counts_by_kind"]["step.completed"] == 2, body


async def _reason(agent: Agent, reason: str | None) -> bool:
    status, body = await ready(agent)
    if reason is None:
        return status == 200 and body["database"] == "up" and "database_reason" not in body
    return body.get("database_reason") == reason


@pytest.mark.parametrize(("refuse", "allow", "sqlstate"), [
    ("ALTER ROLE {role} PASSWORD 'changed-meanwhile-pw'", f"ALTER ROLE {{role}} PASSWORD "
     f"'{PASSWORD}'", "28P01"),
    ("ALTER ROLE {role} NOLOGIN", "ALTER ROLE {role} LOGIN", "28000"),
])
async def test_a_refused_login_is_down_on_the_probes_and_the_gauge_then_recovers(
        database: Database, state_dir: Path, refuse: str, allow: str, sqlstate: str):
    remember_secret("changed-meanwhile-pw")
    async with own_login_role(database) as (role, dsn), \
            passwords_checked(database, role, dsn), \
            Agent(config_for(database, state_dir, dsn)) as agent:
        url = agent.endpoints.event_url
        first = make_event()
        assert (await post(url + "/v1/events", first))[0] == 202
        assert await wait_until(lambda: stored(database, first["event_id"]), 10)
        assert (await ready(agent))[1]["database"] == "up"
        assert await postgres_up(agent) == 1.0

        # Refused for a while; the agent's open connections go too, so it must log in.
        await admin(database, refuse.format(role=role),
                    f"SELECT pg_terminate_backend(pid) FROM pg_stat_activity "
                    f"WHERE usename = '{role}'")
        during = make_event()
        assert (await post(url + "/v1/events", during))[0] == 202
        assert await wait_until(lambda: _reason(agent, "database_login_refused"), 15), \
            await ready(agent)
        status, body = await ready(agent)
        assert status == 200 and body["database"] == "down"
        assert await postgres_up(agent) == 0.0
        deep = (await get(agent.endpoints.admin_url + "/health/deep"))[1]
        assert deep["database"]["status"] == "down"
        assert deep["database"]["error"].startswith(sqlstate), deep["database"]

        await admin(database, allow.format(role=role))
        assert await wait_until(lambda: stored(database, during["event_id"]), 15)
        assert await wait_until(lambda: _reason(agent, None), 10), await ready(agent)
        assert await postgres_up(agent) == 1.0
