"""A database path that stops carrying bytes without closing (a black hole) and one that
resets: intake keeps acknowledging onto the spool, the probes say the database is down
within the configured deadlines (and answer within their own budget), and everything
acknowledged is stored exactly once within a bound after the path heals."""

from __future__ import annotations

import asyncio
import time
from pathlib import Path

import pytest

from flux_agent import Agent

from .support.agents import agent_config
from .support.faults import Ledger, LoadGen, TcpProxy, assert_exactly_once
from .support.http import get
from .support.polling import wait_until
from .support.postgres import Database, proxied

pytestmark = [pytest.mark.slow, pytest.mark.fault]

# Deadlines shortened for the test; the defaults (5 s connect, 10 s statement, 30 s flush)
# scale the same figures up.
DEADLINES = {"database_connect_timeout": 1.0, "database_statement_timeout": 2.0,
             "flush_timeout": 3.0, "database_ping_interval": 1.0, "flush_retry_max": 1.0}


async def ready(agent: Agent) -> tuple[int, dict[str, object]]:
    status, body, _ = await get(agent.endpoints.admin_url + "/health/ready")
    return status, body


@pytest.mark.parametrize("fault", ["black_hole", "reset"])
async def test_database_path_fault_then_heal(database: Database, proxy: TcpProxy,
                                            state_dir: Path, fault: str):
    ledger = Ledger()
    config = agent_config(proxied(database, proxy), state_dir, **DEADLINES)
    async with Agent(config) as agent:
        load = LoadGen(agent.endpoints.event_url + "/v1/events", ledger, batch=10,
                       concurrency=2, pause=0.02)
        load.start()
        assert await wait_until(lambda: _some(ledger), 10)
        if fault == "black_hole":
            proxy.black_hole()
        else:
            proxy.cut()
        faulted_at = time.monotonic()
        acked_at_fault = len(ledger.acked)

        async def database_down() -> bool:
            return (await ready(agent))[1]["database"] == "down"

        assert await wait_until(database_down, 15), await ready(agent)
        detected_after = time.monotonic() - faulted_at
        # Intake keeps acknowledging (durably spooled) and stays ready meanwhile.
        assert await wait_until(lambda: _more(ledger, acked_at_fault + 50), 10)
        status, body = await ready(agent)
        assert status == 200, body
        # /health/deep answers within its budget (5 s) whatever the database does.
        started = time.monotonic()
        status, deep, _ = await get(agent.endpoints.admin_url + "/health/deep")
        deep_took = time.monotonic() - started
        assert deep_took < 7.0, deep_took
        assert deep["database"]["status"] in ("down", "timeout"), deep
        await asyncio.sleep(2.0)  # a few failed retries into the fault

        proxy.restore()
        healed_at = time.monotonic()
        await load.stop()
        await assert_exactly_once(database, ledger, timeout=30)
        recovered_after = time.monotonic() - healed_at
        assert agent.flusher is not None and agent.flusher.stats.retries > 0
        assert agent.pg is not None and agent.pg.state(60) == "up"
        failures = {n: i["failures"] for n, i in agent.supervisor.describe().items()
                    if i["failures"]}
        assert failures == {}, failures
    print(f"{fault}: database down reported after {detected_after:.1f} s; "
          f"/health/deep answered in {deep_took:.2f} s; everything acknowledged stored "
          f"{recovered_after:.1f} s after the path healed")
    # Recovery is bounded by a connect deadline plus one backoff step, not by minutes.
    assert recovered_after < 15.0, recovered_after


async def _some(ledger: Ledger) -> bool:
    return len(ledger.acked) > 20


async def _more(ledger: Ledger, n: int) -> bool:
    return len(ledger.acked) > n
