"""Supervised background tasks: a task that raises is logged once with its traceback,
counted, restarted with backoff and shown by the probes, and what it was doing is not lost."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from pathlib import Path
from typing import Any

from flux_agent import Agent
from flux_agent.obs import supervise
from flux_agent.obs.supervise import Supervisor
from flux_agent.testing import make_events

from .support.agents import agent_config
from .support.http import get, post
from .support.polling import wait_until
from .support.postgres import Database


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


async def test_a_failing_task_is_logged_once_counted_restarted_and_probed(caplog):
    clock = Clock()
    counted: list[str] = []
    sup = Supervisor(on_failure=counted.append, backoff_max=0.01, stable_after=10.0,
                     dead_after=60.0, clock=clock)
    runs = 0
    healthy = asyncio.Event()

    async def task() -> None:
        nonlocal runs
        runs += 1
        if runs <= 4:
            raise RuntimeError(f"injected failure {runs}")
        healthy.set()
        await asyncio.Event().wait()  # runs for good

    with caplog.at_level(logging.INFO, logger="flux_agent.supervise"):
        sup.start("flusher", task)
        await asyncio.wait_for(healthy.wait(), 10)
        assert counted == ["flusher"] * 4
        errors = [r for r in caplog.records if r.levelno == logging.ERROR]
        assert len(errors) == 1, [r.getMessage() for r in errors]  # then rate-limited
        assert errors[0].exc_info is not None and "injected failure 1" in str(
            errors[0].exc_info[1])
        # Still failing as far as the probes know: it has not run stably yet.
        assert sup.failing() == ["flusher"]
        clock.now += 61
        assert sup.dead() == []  # it restarted 61 s ago and has not raised since
        sup.ok("flusher")  # progress
        assert sup.failing() == [] and sup.dead() == []
        assert any(r.getMessage() == "background task flusher recovered" for r in caplog.records)
        assert sup.describe()["flusher"] == {"failures": 4, "failing": False,
                                             "last_error": "RuntimeError: injected failure 4"}
    await sup.stop()


async def test_a_task_that_keeps_failing_fails_liveness_and_readiness_only_if_critical():
    clock = Clock()
    sup = Supervisor(backoff_max=0.01, stable_after=10.0, dead_after=5.0, clock=clock)
    failures = {"flusher": 0, "snapshots": 0}

    def failing(name: str) -> Any:
        async def task() -> None:
            failures[name] += 1
            raise OSError(f"{name} cannot go on")
        return task

    sup.start("flusher", failing("flusher"))
    sup.start("snapshots", failing("snapshots"), critical=False)
    async def failed_thrice() -> bool:
        return min(failures.values()) >= 3

    assert await wait_until(failed_thrice, 10)
    assert sup.failing() == ["flusher"]  # readiness: only the critical task
    assert sup.dead() == []
    clock.now += 6  # failing for longer than dead_after, without a stable run
    assert set(sup.dead()) == {"flusher"}
    await sup.stop()


async def test_the_flusher_raising_is_seen_counted_and_recovered_with_nothing_lost(
        database: Database, state_dir: Path, caplog):
    """The failure the outside run found: the flush task died on a failed cursor write
    and nothing said so. Here the spool's commit (the cursor write) raises something
    unexpected until the test lifts the fault."""
    config = agent_config(database, state_dir, live_fail_after=2.0)
    async with Agent(config) as agent:
        assert agent.spool is not None
        admin = agent.endpoints.admin_url
        real_commit = agent.spool.commit
        broken = True

        async def commit(seq: int) -> None:
            if broken:
                raise RuntimeError("injected: cursor write failed")
            await real_commit(seq)

        agent.spool.commit = commit  # type: ignore[method-assign]
        sent: list[str] = []
        with caplog.at_level(logging.INFO, logger="flux_agent.supervise"):
            for _ in range(3):
                events = make_events(5)
                status, body, _ = await post(agent.endpoints.event_url + "/v1/events", events)
                assert status == 202, body
                sent += [e["event_id"] for e in events]

            async def unready() -> bool:
                status, body, _ = await get(admin + "/health/ready")
                return status == 503 and "task_failing:flusher" in body.get("reasons", [])

            assert await wait_until(unready, 10)

            async def dead() -> bool:
                status, body, _ = await get(admin + "/health/live")
                return status == 503 and body.get("failing_tasks") == ["flusher"]

            assert await wait_until(dead, 10)
            _, metrics, _ = await get(admin + "/metrics")
            line = next(ln for ln in metrics.splitlines()
                        if ln.startswith("flux_task_failures_total") and 'task="flusher"' in ln)
            assert float(line.rsplit(" ", 1)[1]) >= 2
            errors = [r for r in caplog.records if r.levelno >= logging.ERROR]
            assert [r.getMessage() for r in errors] == [
                "background task flusher failed; restarting it"]
            assert "injected: cursor write failed" in str(errors[0].exc_info[1])

            broken = False  # the fault passes

            async def healthy() -> bool:
                ready, _, _ = await get(admin + "/health/ready")
                live, _, _ = await get(admin + "/health/live")
                return ready == 200 and live == 200

            assert await wait_until(healthy, 40)
            assert any(r.getMessage() == "background task flusher recovered"
                       for r in caplog.records)

        async def stored() -> bool:
            return await database.fetchval("SELECT count(*) FROM flux.events") == len(sent)

        assert await wait_until(stored, 10)
    rows = await database.fetch("SELECT event_id::text FROM flux.events")
    assert sorted(r[0] for r in rows) == sorted(sent)


async def test_a_stop_ends_a_task_that_swallows_a_cancellation_and_never_hangs(caplog,
                                                                             monkeypatch):
    """A task that swallows its first cancellation (a suppress(CancelledError) around an
    await it happened to be in) is cancelled again and ends; one that swallows every
    cancellation is left behind after STOP_WAIT, logged with where it is, and the stop (a
    teardown step) returns instead of hanging."""
    monkeypatch.setattr(supervise, "STOP_WAIT", 1.0)
    sup = Supervisor(backoff_max=0.01)
    swallowed = 0
    running = asyncio.Event()

    async def swallows_once() -> None:
        nonlocal swallowed
        running.set()
        try:
            await asyncio.Event().wait()
        except asyncio.CancelledError:
            swallowed += 1  # lost: the task goes on as if nothing happened
        await asyncio.Event().wait()

    sup.start("flusher", swallows_once)
    await asyncio.wait_for(running.wait(), 5)
    await asyncio.wait_for(sup.stop("flusher"), 3)
    assert swallowed == 1 and "flusher" not in sup.tasks

    stubborn_running = asyncio.Event()
    stubborn_for = {"ever": True}

    async def stubborn() -> None:
        while stubborn_for["ever"]:
            stubborn_running.set()
            with contextlib.suppress(asyncio.CancelledError):
                await asyncio.sleep(0.05)

    with caplog.at_level(logging.ERROR, logger="flux_agent.supervise"):
        sup.start("retention", stubborn)
        await asyncio.wait_for(stubborn_running.wait(), 5)
        runner = sup.tasks["retention"].runner
        started = time.monotonic()
        await asyncio.wait_for(sup.stop("retention"), 5)
        assert 0.9 <= time.monotonic() - started < 3
        assert runner is not None and not runner.done()  # left behind, not waited for
    stubborn_for["ever"] = False  # let it end, so that the test's loop can close
    await asyncio.wait_for(runner, 5)
    left = [r for r in caplog.records if "did not end within" in r.getMessage()]
    assert len(left) == 1
    assert "stubborn" in " ".join(left[0].fields["awaiting"])  # type: ignore[attr-defined]
