"""The README's first command: `flux-agent run` with no database URL runs an embedded
PostgreSQL under the state dir, and a posted event is visible in it; the agent supervises
that PostgreSQL as its child."""

from __future__ import annotations

import asyncio
import json
import os
import re
import shlex
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import asyncpg
import pytest

from flux_agent.postgres.embedded import LocalPostgres, free_port
from flux_agent.testing import make_event

from .support.agents import AgentProcess
from .support.http import get, post
from .support.paths import short_tempdir
from .support.polling import wait_until


def _embedded_env(state: Path, **settings: str) -> dict[str, str]:
    """An agent on its embedded default under ``state``: no database URL, no FLUX_AGENT_*
    of the test run's own, authentication off for agency nasa, plus ``settings``."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("FLUX_AGENT_")}
    env.update({"FLUX_AGENT_STATE_DIR": str(state), "FLUX_AGENT_AUTH": "none",
                "FLUX_AGENT_AGENCY": "nasa", **settings})
    return env

@pytest.mark.db
async def test_embedded_default_accepts_a_curled_event():
    state = short_tempdir()
    port, admin = free_port(), free_port()
    env = _embedded_env(state, FLUX_AGENT_LISTEN=f"127.0.0.1:{port}",
                        FLUX_AGENT_ADMIN_LISTEN=f"127.0.0.1:{admin}")
    log = state / "agent.log"
    with log.open("wb") as out:
        proc = subprocess.Popen([sys.executable, "-m", "flux_agent", "run"], env=env,
                                stdout=out, stderr=subprocess.STDOUT)
    try:
        url, fields = None, {}
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline and url is None:
            assert proc.poll() is None, log.read_text()
            for line in log.read_text().splitlines():
                entry = json.loads(line)
                if entry["message"] == "embedded PostgreSQL running":
                    fields = entry["fields"]
                    url = fields["url"]
                    assert Path(fields["data_dir"]) == state / "postgres"
            await asyncio.sleep(0.1)
        assert url, log.read_text()
        event = make_event("run.started")
        for _ in range(100):
            try:
                status, body, _ = await post(f"http://127.0.0.1:{port}/v1/events", event,
                                             headers={"Prefer": "wait=committed"})
                break
            except OSError:
                await asyncio.sleep(0.1)
        assert status == 200, body
        conn = await asyncpg.connect(url)
        try:
            row = await conn.fetchrow("SELECT agency_id, kind FROM flux.events "
                                      "WHERE event_id = $1", event["event_id"])
            assert tuple(row) == ("nasa", "run.started")
            # The agent itself logs in as an unprivileged role: RLS applies to it.
            login = await conn.fetchval("SELECT rolsuper FROM pg_roles "
                                        "WHERE rolname = 'flux_agent_local'")
            assert login is False
        finally:
            await conn.close()
        await asyncio.to_thread(_psql_lines_say_what_they_can, fields)

        # A second agent on the same state dir is refused before it touches anything there,
        # and the first one's embedded PostgreSQL keeps running.
        env2 = dict(env, FLUX_AGENT_LISTEN=f"127.0.0.1:{free_port()}",
                    FLUX_AGENT_ADMIN_LISTEN=f"127.0.0.1:{free_port()}")
        second = subprocess.run([sys.executable, "-m", "flux_agent", "run"], env=env2,
                                capture_output=True, timeout=60)
        assert second.returncode == 78  # a configuration error: the message says which
        # A refusal reads as one, not as an agent that stopped with data left behind.
        assert b"agent did not start; nothing was accepted" in second.stdout
        assert b"agent stopped" not in second.stdout
        later = make_event("step.completed")
        status, body, _ = await post(f"http://127.0.0.1:{port}/v1/events", later,
                                     headers={"Prefer": "wait=committed"})
        assert status == 200, body
        conn = await asyncpg.connect(url)
        try:
            assert await conn.fetchval("SELECT count(*) FROM flux.events WHERE event_id = $1",
                                       later["event_id"]) == 1
        finally:
            await conn.close()
        assert re.search(rb"FLUX_AGENT_STATE_DIR: another agent \(pid %d\) is using the state "
                         rb"dir " % proc.pid + re.escape(str(state).encode()), second.stderr), \
            second.stderr

        proc.send_signal(signal.SIGTERM)
        assert proc.wait(60) == 0, log.read_text()[-2000:]
        assert not (state / "postgres" / "postmaster.pid").exists()
    finally:
        if proc.poll() is None:
            proc.kill()
        pidfile = state / "postgres" / "postmaster.pid"
        if pidfile.exists():
            os.kill(int(pidfile.read_text().split()[0]), signal.SIGKILL)
        shutil.rmtree(state, ignore_errors=True)


def _log_entries(log: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in log.read_text().splitlines() if line.startswith("{")]


def _logged(log: Path, message: str) -> dict[str, Any] | None:
    return next((e for e in _log_entries(log) if e["message"] == message), None)


@pytest.mark.db
@pytest.mark.fault
@pytest.mark.slow
async def test_embedded_postgres_is_supervised_restarted_and_nothing_is_lost():
    """Stop the agent's own PostgreSQL: it is restarted and every event lands once; when it
    cannot start, the agent says why, fails readiness, and recovers once it can."""
    state = short_tempdir()
    env = _embedded_env(state, FLUX_AGENT_FLUSH_RETRY_MAX="0.5s")
    log = state / "agent.log"
    agent = AgentProcess(env, log)
    pg = LocalPostgres(state / "postgres")
    try:
        await asyncio.to_thread(agent.start, 120)
        running = _logged(log, "embedded PostgreSQL running")
        assert running is not None
        url = running["fields"]["url"]
        events = [make_event("run.started", run_id="supervised")]
        status, body, _ = await post(agent.url + "/v1/events", events[0],
                                     headers={"Prefer": "wait=committed"})
        assert status == 200, body

        await asyncio.to_thread(pg.stop, "immediate")
        events.append(make_event(run_id="supervised"))
        status, body, _ = await post(agent.url + "/v1/events", events[-1])
        assert status == 202, body  # accepted onto the spool while the database is away

        async def restarted(times: int) -> bool:
            return sum(e["message"] == "the embedded PostgreSQL is running again"
                       for e in _log_entries(log)) >= times

        assert await wait_until(lambda: restarted(1), 60), log.read_text()[-3000:]
        events.append(make_event(run_id="supervised"))
        status, body, _ = await post(agent.url + "/v1/events", events[-1],
                                     headers={"Prefer": "wait=committed"})
        assert status == 200, body

        # A PostgreSQL that cannot start: said, with its own words, and on the probes.
        conf = state / "postgres" / "postgresql.conf"
        good = conf.read_text()
        conf.write_text(good + "\nno_such_setting_for_flux = on\n")
        await asyncio.to_thread(pg.stop, "immediate")

        async def not_ready() -> bool:
            code, ready, _ = await get(agent.admin_url + "/health/ready")
            return code == 503 and "task_failing:embedded-db" in ready.get("reasons", [])

        assert await wait_until(not_ready, 60), log.read_text()[-3000:]
        failed = _logged(log, "background task embedded-db failed; restarting it")
        assert failed is not None
        assert "no_such_setting_for_flux" in failed["exception"]  # PostgreSQL's own log
        _, metrics, _ = await get(agent.admin_url + "/metrics")
        assert 'flux_task_failures_total{task="embedded-db"}' in metrics
        events.append(make_event(run_id="supervised"))
        status, body, _ = await post(agent.url + "/v1/events", events[-1])
        assert status == 202, body  # intake goes on: the spool holds it

        conf.write_text(good)
        assert await wait_until(lambda: restarted(2), 60), log.read_text()[-3000:]

        async def all_landed() -> bool:
            conn = await asyncpg.connect(url)
            try:
                return await conn.fetchval(
                    "SELECT count(*) FROM flux.events WHERE event_id = ANY($1::uuid[])",
                    [e["event_id"] for e in events]) == len(events)
            finally:
                await conn.close()

        assert await wait_until(all_landed, 30)
        assert await asyncio.to_thread(agent.terminate, 60) == 0
    finally:
        agent.kill()
        if pg.running_pid() is not None:
            pg.kill()
        shutil.rmtree(state, ignore_errors=True)


def _psql_lines_say_what_they_can(fields: dict[str, Any]) -> None:
    """The printed connect command is the agent's own role: it sees its agency's rows and
    cannot change them; the superuser's line is printed with a warning."""
    assert "bypasses row-level security" in fields["warning"]
    assert "postgres@" in fields["connect_superuser"]
    psql = shlex.split(fields["connect"])
    seen = subprocess.run([*psql, "-At", "-c", "SELECT count(*) FROM flux.events"],
                          capture_output=True, text=True, timeout=30)
    assert seen.stdout.strip() == "1", seen.stderr
    changed = subprocess.run([*psql, "-c", "UPDATE flux.events SET kind = kind"],
                             capture_output=True, text=True, timeout=30)
    assert changed.returncode != 0
    assert "permission denied" in changed.stderr


@pytest.mark.db
@pytest.mark.fault
async def test_a_second_signal_leaves_no_embedded_postgresql_running():
    """A person's second Ctrl-C exits at once (exit 1) and asks the embedded PostgreSQL for a
    fast shutdown, so the next start does not find a server left behind; a signal delivered
    twice at once (``timeout``, a kill of the process and of its group) is one request and
    does not cut the drain. The drain is held by an upload that never completes."""
    state = short_tempdir()
    env = _embedded_env(state, FLUX_AGENT_REQUEST_BODY_TIMEOUT="60s")
    log = state / "agent.log"
    agent = AgentProcess(env, log)
    pg = LocalPostgres(state / "postgres")
    writer = None
    try:
        await asyncio.to_thread(agent.start, 120)
        assert pg.running_pid() is not None
        host, port = agent.url.removeprefix("http://").rsplit(":", 1)
        _, writer = await asyncio.open_connection(host, int(port))
        writer.write(b"POST /v1/events HTTP/1.1\r\nHost: agent\r\nContent-Type: "
                     b"application/json\r\nContent-Length: 1000\r\n\r\n[")
        await writer.drain()
        await asyncio.sleep(0.2)
        agent.proc.send_signal(signal.SIGINT)
        await asyncio.sleep(0.02)  # apart enough for the kernel not to merge the two
        agent.proc.send_signal(signal.SIGINT)  # the same request, delivered twice
        await asyncio.sleep(1.0)
        assert agent.proc.poll() is None, log.read_text()[-2000:]  # still draining
        agent.proc.send_signal(signal.SIGINT)  # the person's second Ctrl-C
        assert await asyncio.to_thread(agent.proc.wait, 10) == 1
        assert "second signal: exiting now" in log.read_text()

        async def stopped() -> bool:
            return pg.running_pid() is None

        assert await wait_until(stopped, 30), "the embedded PostgreSQL was left running"
    finally:
        if writer is not None:
            writer.close()
        if agent.proc is not None and agent.proc.poll() is None:
            agent.kill()
        await asyncio.to_thread(pg.stop, "immediate")
        shutil.rmtree(state, ignore_errors=True)
