"""The promise under real faults: a stopped PostgreSQL, a cut TCP line, SIGKILL of a real
agent process, a full spool, refused rows, SIGTERM. Every acknowledged event ends up in
flux.events, and nothing that was never sent does (the primary key makes a second copy of
an event impossible, so counting rows per id would prove nothing: test_exactly_once counts
the tables where a second copy is possible, and these tests check that a replay happened)."""

from __future__ import annotations

import asyncio
import contextlib
import json
import random
import shutil
import signal
import subprocess
import sys
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path

import asyncpg
import psutil
import pytest

from flux_agent import Agent
from flux_agent.cli.run import SAME_SIGNAL_WITHIN
from flux_agent.postgres.embedded import LocalPostgres, find_bin_dir, free_port
from flux_agent.postgres.migrations import bootstrap_database
from flux_agent.testing import make_events

from .support.agents import AgentProcess, agent_config, agent_env
from .support.faults import Ledger, LoadGen, TcpProxy, assert_exactly_once, stored_ids
from .support.http import get, post
from .support.paths import short_tempdir
from .support.polling import wait_until
from .support.postgres import FAST_SETTINGS, LOGIN_PASSWORD, LOGIN_ROLE, Database, proxied

# SIGKILL, stopped and crashed PostgreSQL (clusters of their own), cut lines, full spools.
pytestmark = [pytest.mark.slow, pytest.mark.fault, pytest.mark.db]


async def _acked_at_least(ledger: Ledger, n: int) -> bool:
    return len(ledger.acked) >= n


# --------------------------------------------------------------------------- PostgreSQL stops


@contextlib.asynccontextmanager
async def own_cluster(settings: dict[str, str]
                      ) -> AsyncIterator[tuple[LocalPostgres, Database]]:
    """A cluster of the test's own, so it can be stopped, crashed and started."""
    root = short_tempdir("fa-own-")
    cluster = LocalPostgres(root / "data", bin_dir=find_bin_dir(prefer="system"),
                            port=free_port(), settings=settings)
    await asyncio.to_thread(cluster.start)
    await bootstrap_database(cluster.dsn(), cluster.dsn(database="flux"), "flux", LOGIN_ROLE)
    conn = await asyncpg.connect(cluster.dsn(database="flux"))
    await conn.execute(f"ALTER ROLE {LOGIN_ROLE} PASSWORD '{LOGIN_PASSWORD}'")
    await conn.close()
    db = Database("flux", cluster.dsn(database="flux"),
                  cluster.dsn(user=LOGIN_ROLE, database="flux", password=LOGIN_PASSWORD))
    try:
        yield cluster, db
    finally:
        await asyncio.to_thread(cluster.destroy)
        shutil.rmtree(root, ignore_errors=True)


@pytest.fixture
async def own_pg() -> AsyncIterator[tuple[LocalPostgres, Database]]:
    async with own_cluster(FAST_SETTINGS) as pg:
        yield pg


async def test_postgres_stopped_under_load_then_restarted(own_pg, state_dir: Path):
    cluster, db = own_pg
    ledger = Ledger()
    config = agent_config(db, state_dir, flush_retry_max=0.5)
    async with Agent(config) as agent:
        load = LoadGen(agent.endpoints.event_url + "/v1/events", ledger, batch=25,
                       concurrency=4, pause=0.01)
        load.start()
        await asyncio.sleep(1.0)
        await asyncio.to_thread(cluster.stop, "fast")
        acked_at_stop = len(ledger.acked)
        await asyncio.sleep(3.0)
        # Intake keeps accepting onto the spool while PostgreSQL is away.
        assert len(ledger.acked) > acked_at_stop + 100
        _, body, _ = await get(agent.endpoints.admin_url + "/health/ready")
        assert body["database"] == "down"
        assert agent.flusher is not None and agent.flusher.backlog > 0
        await asyncio.to_thread(cluster.start)
        await asyncio.sleep(1.0)
        await load.stop()
        await assert_exactly_once(db, ledger)
        assert agent.flusher.stats.retries > 0
    assert ledger.failed == 0


async def test_postgres_crash_after_commit_loses_nothing_even_with_async_commit(
        state_dir: Path):
    # A server configured with synchronous_commit=off answers COMMIT before the commit
    # record is on disk, and a crash (immediate stop) forgets it. The agent moves its spool
    # cursor on that answer, so it must make its own commits synchronous. A long WAL writer
    # delay keeps the last commit record in memory for the whole test.
    lax = {**FAST_SETTINGS, "wal_writer_delay": "10s", "wal_writer_flush_after": "1GB"}
    async with own_cluster(lax) as (cluster, db), \
            Agent(agent_config(db, state_dir, flush_retry_max=0.5)) as agent:
        status, body, _ = await post(agent.endpoints.event_url + "/v1/events",
                                     make_events(200, run_id="crash-after-commit"))
        assert status == 202
        acked = set(body["event_ids"])
        assert await wait_until(
            lambda: _all_stored(db, acked), timeout=10), "the events never landed"
        assert agent.flusher is not None
        assert await wait_until(_async_true(lambda: agent.flusher.backlog == 0), 10)
        await asyncio.to_thread(cluster.stop, "immediate")  # a crash: no shutdown checkpoint
        await asyncio.to_thread(cluster.start)
        assert await wait_until(lambda: _all_stored(db, acked), timeout=15), \
            "events committed before the crash are gone after it"
        stored = await stored_ids(db)
        assert len(stored) == len(set(stored)) == len(acked)


async def _all_stored(db: Database, ids: set[str]) -> bool:
    try:
        return ids <= set(await stored_ids(db))
    except (OSError, asyncpg.PostgresError):
        return False


def _async_true(predicate: Callable[[], object]) -> Callable[[], Awaitable[bool]]:
    # wait_until takes a coroutine function
    async def check() -> bool:
        return bool(predicate())
    return check


# --------------------------------------------------------------------------- the line is cut


async def test_tcp_line_cut_and_restored_mid_batch(database: Database, proxy: TcpProxy,
                                                   state_dir: Path):
    ledger = Ledger()
    config = agent_config(proxied(database, proxy), state_dir, flush_retry_max=0.3,
                          batch_max_events=500)
    async with Agent(config) as agent:
        load = LoadGen(agent.endpoints.event_url + "/v1/events", ledger, batch=100,
                       concurrency=4)
        load.start()
        for _ in range(6):
            await asyncio.sleep(random.uniform(0.2, 0.6))
            proxy.cut()  # resets connections in the middle of COPY / INSERT / COMMIT
            await asyncio.sleep(random.uniform(0.1, 0.5))
            proxy.restore()
        await load.stop()
        await assert_exactly_once(database, ledger)
        assert agent.flusher is not None and agent.flusher.stats.retries > 0


# --------------------------------------------------------------------------- SIGKILL


async def test_sigkill_at_random_moments_twenty_rounds(database: Database, state_dir: Path):
    ledger = Ledger()
    proc = AgentProcess(agent_env(database, state_dir, FLUX_AGENT_BATCH_MAX_EVENTS="200"),
                        state_dir / "agent.log")
    rng = random.Random(1234)
    for _ in range(20):
        await asyncio.to_thread(proc.start)
        load = LoadGen(proc.url + "/v1/events", ledger, batch=rng.choice([1, 10, 50]),
                       concurrency=4)
        load.start()
        await asyncio.sleep(rng.uniform(0.1, 0.8))
        proc.kill()
        await load.stop()
    await asyncio.to_thread(proc.start)
    try:
        await assert_exactly_once(database, ledger, timeout=60)
        # The spool is empty once everything is committed.
        async def drained() -> bool:
            _, body, _ = await get(proc.admin_url + "/health/ready")
            return body["spool"]["backlog_records"] == 0
        assert await wait_until(drained, 30)
    finally:
        assert await asyncio.to_thread(proc.terminate) == 0
    assert ledger.failed > 0, "the kills should have interrupted requests"
    # The kills left work on the spool that later starts replayed: recovery found pending
    # records (the replays that PostgreSQL absorbed), and the re-sent events were not sent
    # to the spool twice by intake.
    replayed = [json.loads(line)["fields"]["pending_records"]
                for line in (state_dir / "agent.log").read_text().splitlines()
                if '"spool recovered"' in line]
    assert len(replayed) == 21 and sum(replayed) > 0, replayed


# --------------------------------------------------------------------------- spool full


async def test_spool_full_answers_503_memory_stays_flat_then_everything_lands(
        database: Database, proxy: TcpProxy, state_dir: Path):
    env = agent_env(proxied(database, proxy), state_dir,
                    FLUX_AGENT_SPOOL_MAX_BYTES="2MiB", FLUX_AGENT_SPOOL_SEGMENT_BYTES="256KiB",
                    FLUX_AGENT_REQUEST_MAX_BYTES="64KiB", FLUX_AGENT_EVENT_MAX_BYTES="16KiB",
                    FLUX_AGENT_FLUSH_RETRY_MAX="0.3s")
    proc = AgentProcess(env, state_dir / "agent.log")
    await asyncio.to_thread(proc.start)
    try:
        proxy.cut()  # PostgreSQL unreachable: everything piles up on the spool
        ledger = Ledger()
        url = proc.url + "/v1/events"
        first_refusal = None
        for _ in range(2000):
            events = make_events(20)
            ledger.attempted.update(e["event_id"] for e in events)
            status, body, headers = await post(url, events)
            if status == 202:
                ledger.acked.update(e["event_id"] for e in events)
                continue
            assert status == 503, body
            assert body["code"] == "SPOOL_FULL"
            assert body["retryable"] is True
            assert int(headers["Retry-After"]) >= 1
            first_refusal = body
            break
        assert first_refusal is not None, "the spool never filled"
        status, ready, _ = await get(proc.admin_url + "/health/ready")
        assert status == 503
        assert "spool_full" in ready["reasons"]
        rss = psutil.Process(proc.proc.pid).memory_info().rss
        refused = 0
        for _ in range(1500):
            status, _, _ = await post(url, make_events(20))
            refused += status == 503
        assert refused == 1500
        grown = psutil.Process(proc.proc.pid).memory_info().rss - rss
        assert grown < 8 * 1024 * 1024, f"RSS grew by {grown} bytes while full"
        proxy.restore()
        await assert_exactly_once(database, ledger, timeout=60)
        status, _, _ = await get(proc.admin_url + "/health/ready")
        assert status == 200
    finally:
        assert await asyncio.to_thread(proc.terminate) == 0


# --------------------------------------------------------------------------- poison


async def test_poison_rows_become_dead_letters_and_the_rest_lands(database: Database,
                                                                  state_dir: Path):
    conn = await asyncpg.connect(database.admin_dsn)
    await conn.execute("ALTER TABLE flux.events ADD CONSTRAINT no_poison "
                       "CHECK (payload->>'poison' IS NULL)")
    await conn.close()
    async with Agent(agent_config(database, state_dir)) as agent:
        events = make_events(10)
        events[3]["payload"]["poison"] = "yes"
        events[7]["payload"]["poison"] = "also"
        status, body, _ = await post(agent.endpoints.event_url + "/v1/events", events,
                                     headers={"Prefer": "wait=committed"})
        assert status == 200, body
        assert body["accepted"] == 8
    stored = set(await stored_ids(database))
    assert stored == {e["event_id"] for i, e in enumerate(events) if i not in (3, 7)}
    dead = await database.fetch("SELECT event_id, reason, sqlstate, agency_id, event "
                                "FROM flux.dead_letters ORDER BY event_id")
    assert {str(r["event_id"]) for r in dead} == {events[3]["event_id"], events[7]["event_id"]}
    for row in dead:
        assert row["sqlstate"] == "23514"
        assert "no_poison" in row["reason"]
        assert row["agency_id"] == "nasa"
        assert b'"poison"' in row["event"]


# --------------------------------------------------------------------------- drain


async def test_sigterm_with_database_away_exits_75_and_the_rest_is_replayed(
        database: Database, proxy: TcpProxy, state_dir: Path):
    """Nothing can be delivered by the drain deadline and no aggregator takes a handoff: the
    agent says what it keeps (ERROR, exit 75: in Kubernetes there may be no next start), and
    the same state dir started again delivers it."""
    env = agent_env(proxied(database, proxy), state_dir, FLUX_AGENT_DRAIN_TIMEOUT="2s",
                    FLUX_AGENT_FLUSH_RETRY_MAX="0.2s")
    proc = AgentProcess(env, state_dir / "agent.log")
    await asyncio.to_thread(proc.start)
    proxy.cut()
    ledger = Ledger()
    load = LoadGen(proc.url + "/v1/events", ledger, batch=10, concurrency=2)
    load.start()
    assert await wait_until(lambda: _acked_at_least(ledger, 50), 15)
    await load.stop()
    started = asyncio.get_running_loop().time()
    assert await asyncio.to_thread(proc.terminate, 30) == 75
    assert asyncio.get_running_loop().time() - started < 10
    assert set(await stored_ids(database)) == set()  # nothing could be flushed
    kept = [json.loads(line) for line in proc.log_path.read_text().splitlines()
            if '"events acknowledged but not delivered' in line]
    assert kept and kept[0]["level"] == "ERROR", proc.log_path.read_text()[-2000:]
    assert kept[0]["fields"]["events"] == len(ledger.acked)
    # The stopped agent's spool holds them, and the CLI can see it.
    inspect = await asyncio.to_thread(
        subprocess.run, [sys.executable, "-m", "flux_agent", "spool", "inspect"],
        env=env, capture_output=True, text=True, timeout=60)
    assert inspect.returncode == 0, inspect.stderr
    assert '"pending_records": 0' not in inspect.stdout
    verify = await asyncio.to_thread(
        subprocess.run, [sys.executable, "-m", "flux_agent", "spool", "verify"],
        env=env, capture_output=True, text=True, timeout=60)
    assert verify.returncode == 0, verify.stdout
    proxy.restore()
    await asyncio.to_thread(proc.start)
    try:
        await assert_exactly_once(database, ledger)
    finally:
        assert await asyncio.to_thread(proc.terminate) == 0


async def test_sigterm_with_database_up_flushes_everything_first(database: Database,
                                                                  state_dir: Path):
    proc = AgentProcess(agent_env(database, state_dir), state_dir / "agent.log")
    await asyncio.to_thread(proc.start)
    ledger = Ledger()
    load = LoadGen(proc.url + "/v1/events", ledger, batch=50, concurrency=4)
    load.start()
    assert await wait_until(lambda: _acked_at_least(ledger, 500), 15)
    await load.stop()
    assert await asyncio.to_thread(proc.terminate) == 0
    stored = await stored_ids(database)
    assert ledger.acked <= set(stored)  # drained before exit, not on a later start


async def test_post_drain_flushes_and_exits_0(database: Database, state_dir: Path):
    proc = AgentProcess(agent_env(database, state_dir), state_dir / "agent.log")
    await asyncio.to_thread(proc.start)
    events = make_events(30)
    status, _, _ = await post(proc.url + "/v1/events", events)
    assert status == 202
    status, body, _ = await post(proc.url + "/v1/drain", {})
    assert status == 200, body
    assert body["drained"] is True
    assert body["backlog_records"] == 0
    assert await asyncio.to_thread(proc.proc.wait, 30) == 0
    assert {e["event_id"] for e in events} <= set(await stored_ids(database))


async def test_second_signal_exits_at_once(database: Database, proxy: TcpProxy,
                                           state_dir: Path):
    env = agent_env(proxied(database, proxy), state_dir, FLUX_AGENT_DRAIN_TIMEOUT="60s")
    proc = AgentProcess(env, state_dir / "agent.log")
    await asyncio.to_thread(proc.start)
    proxy.cut()
    status, _, _ = await post(proc.url + "/v1/events", make_events(5))
    assert status == 202
    proc.proc.send_signal(signal.SIGTERM)

    async def draining() -> bool:
        status, body, _ = await get(proc.admin_url + "/health/ready")
        return status == 503 and "draining" in body.get("reasons", [])

    assert await wait_until(draining, 10)
    assert proc.proc.poll() is None  # draining (up to 60 s)
    await asyncio.sleep(SAME_SIGNAL_WITHIN)  # later than a duplicate of the first could come
    proc.proc.send_signal(signal.SIGTERM)
    assert await asyncio.to_thread(proc.proc.wait, 10) == 1
    # Said, not silent: what was left stays on the spool.
    assert "second signal: exiting now" in proc.log_path.read_text()


# --------------------------------------------------------------------------- damaged spool


async def test_agent_starts_on_a_damaged_spool_and_keeps_the_intact_records(
        database: Database, proxy: TcpProxy, state_dir: Path):
    config = agent_config(proxied(database, proxy), state_dir, spool_segment_bytes=64 * 1024,
                          request_max_bytes=32 * 1024, flush_retry_max=0.2,
                          drain_timeout=0.5)
    proxy.cut()
    accepted: list[list[str]] = []
    async with Agent(config) as agent:
        for _ in range(60):
            events = make_events(10)
            status, _, _ = await post(agent.endpoints.event_url + "/v1/events", events)
            assert status == 202
            accepted.append([e["event_id"] for e in events])
    segments = sorted((state_dir / "spool").glob("*.seg"))
    assert len(segments) >= 3
    victim = segments[1]
    raw = bytearray(victim.read_bytes())
    raw[len(raw) // 2] ^= 0x40  # one flipped bit in the middle of a record
    victim.write_bytes(bytes(raw))
    last = segments[-1]
    with last.open("r+b") as fh:  # and a torn tail on the newest segment
        fh.truncate(last.stat().st_size - 7)
    proxy.restore()
    async with Agent(config) as agent:
        assert agent.recovery is not None
        assert len(agent.recovery.quarantined) == 1
        assert agent.recovery.torn_tails == 1
        assert Path(agent.recovery.quarantined[0]).exists()

        async def settled() -> bool:
            return agent.flusher is not None and agent.flusher.backlog == 0
        assert await wait_until(settled, 20)
        _, metrics, _ = await get(agent.endpoints.admin_url + "/metrics")
        assert "flux_spool_quarantined_segments_total 1.0" in metrics
    stored = set(await stored_ids(database))
    whole = [ids for ids in accepted if set(ids) <= stored]
    # Two requests are lost to the damage (one flipped, one torn); requests stay atomic.
    assert len(whole) == len(accepted) - 2
    assert all(set(ids) <= stored or not set(ids) & stored for ids in accepted)
