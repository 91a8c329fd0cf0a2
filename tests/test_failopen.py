"""A client that can be told not to fail the job: with ``fail_open`` events are dropped
(logged, counted) while the agent cannot take them, checkpoints still fail; and the async
client in a client-only install says what to install."""

from __future__ import annotations

import asyncio
import logging
import subprocess
import sys
import time
from pathlib import Path

import pytest

from flux_agent import Agent, AsyncFluxClient, FluxClient
from flux_agent.client import FluxConnectionError, FluxRequestError, RetryPolicy, failopen
from flux_agent.postgres.embedded import free_port

from .support.agents import agent_config
from .support.postgres import Database

FAST = RetryPolicy(attempts=2, backoff=0.05, backoff_max=0.1)


def test_by_default_an_absent_agent_fails_the_job():
    with FluxClient(f"http://127.0.0.1:{free_port()}", retry=FAST, environ={}) as flux, \
            pytest.raises(FluxConnectionError), flux.run("strict"):
        pass


def test_fail_open_runs_the_job_without_the_agent_but_not_its_checkpoints(
        caplog: pytest.LogCaptureFixture):
    url = f"http://127.0.0.1:{free_port()}"
    caplog.set_level(logging.WARNING, logger="flux_agent.client")
    started = time.monotonic()
    with FluxClient(url, retry=FAST, environ={"FLUX_AGENT_CLIENT_FAIL_OPEN": "true"}) as flux:
        with flux.run("lenient", source="s3://x") as run:
            for name in ("extract", "transform", "load"):
                with run.step(name) as step:
                    step.payload["rows"] = 1
            with pytest.raises(FluxConnectionError):  # checkpoints stay fail-closed
                run.checkpoint("load", {"offset": 3})
            with pytest.raises(FluxConnectionError):
                run.resume()
        result = flux.emit("step.completed", "lenient", step="late")
    assert result.dropped and result.accepted == 0 and len(result.event_ids) == 1
    assert flux.dropped == 9  # run.started, 3 x (started, completed), run.completed, late
    # One attempt paid its retries; the rest were dropped at once (the cool-down).
    assert time.monotonic() - started < 5
    warned = [r for r in caplog.records if "dropping them (fail_open)" in r.getMessage()]
    assert len(warned) == 1 and url.split("//")[1] in warned[0].getMessage()
    with pytest.raises(ValueError, match="FLUX_AGENT_CLIENT_FAIL_OPEN"):
        FluxClient(url, environ={"FLUX_AGENT_CLIENT_FAIL_OPEN": "perhaps"})


async def test_fail_open_delivers_again_when_the_agent_is_back_and_still_raises_on_4xx(
        database: Database, state_dir: Path, monkeypatch: pytest.MonkeyPatch,
        caplog: pytest.LogCaptureFixture):
    monkeypatch.setattr(failopen, "COOLDOWN", 0.3)
    caplog.set_level(logging.WARNING, logger="flux_agent.client")
    port = free_port()
    flux = FluxClient(f"http://127.0.0.1:{port}", retry=FAST, fail_open=True)
    before = await asyncio.to_thread(flux.emit, "step.completed", "back", step="a")
    assert before.dropped
    async with Agent(agent_config(database, state_dir, listen=f"127.0.0.1:{port}")):
        await asyncio.sleep(0.4)  # past the cool-down
        after = await asyncio.to_thread(flux.emit, "step.completed", "back", step="b",
                                        wait_committed=True)
        assert not after.dropped and after.accepted == 1 and after.committed
        assert any("takes events again; 1 were dropped" in r.getMessage()
                   for r in caplog.records)
        # A refused event is the job's bug: the switch does not hide it.
        with pytest.raises(FluxRequestError) as refused:
            await asyncio.to_thread(flux.post_events, [{"run_id": "-bad id",
                                                        "kind": "run.started"}])
        assert refused.value.status == 422
    flux.close()
    ids = [r["run_id"] for r in await database.fetch("SELECT run_id FROM flux.events")]
    assert ids == ["back"]


async def test_the_async_client_fails_open_too():
    url = f"http://127.0.0.1:{free_port()}"
    async with AsyncFluxClient(url, retry=FAST, fail_open=True) as flux:
        async with flux.run("async-lenient") as run:
            async with run.step("extract"):
                pass
            with pytest.raises(FluxConnectionError):
                await run.checkpoint("extract", {"offset": 1})
        assert flux.dropped == 4
    async with AsyncFluxClient(url, retry=FAST) as strict:
        with pytest.raises(FluxConnectionError):
            await strict.emit("run.aborted", "async-strict")


BLOCK_AIOHTTP = """
import sys

class NoAiohttp:  # a client-only install: pip install --no-deps, without aiohttp
    def find_spec(self, name, path=None, target=None):
        if name == "aiohttp" or name.startswith("aiohttp."):
            raise ModuleNotFoundError(f"No module named {name!r}", name=name)

sys.meta_path.insert(0, NoAiohttp())
from flux_agent.client import AsyncFluxClient, FluxClient

FluxClient(environ={}).close()  # the standard-library client needs nothing more
try:
    AsyncFluxClient(environ={})
except ImportError as exc:
    print(type(exc).__name__, exc)
"""


def test_the_async_client_without_aiohttp_says_what_to_install():
    result = subprocess.run([sys.executable, "-c", BLOCK_AIOHTTP], capture_output=True,
                            text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith("ImportError AsyncFluxClient needs aiohttp"), result.stdout
    assert "pip install 'aiohttp" in result.stdout and "--no-deps" in result.stdout
