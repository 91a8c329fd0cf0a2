"""``flux-agent runs`` and ``flux-agent events --run X [--follow]`` (issue 27.5): reading back
without psql, one JSON object per line, pages walked by their cursor; following polls for
new events and stops cleanly on SIGINT."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import sys
from datetime import UTC, datetime, timedelta
from typing import Any

from flux_agent import Agent
from flux_agent.postgres.embedded import free_port
from flux_agent.testing import make_event

from .support.http import post


def at(seconds: float) -> str:
    base = datetime(2026, 11, 3, tzinfo=UTC)
    return (base + timedelta(seconds=seconds)).isoformat().replace("+00:00", "Z")


async def flux_agent(*args: str, timeout: float = 60) -> tuple[int, list[Any], str]:
    """Run the CLI in a process of its own; (exit code, stdout as JSON lines, stderr)."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("FLUX_AGENT_")}
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "flux_agent", *args, env=env,
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE)
    out, err = await asyncio.wait_for(proc.communicate(), timeout)
    lines = [json.loads(line) for line in out.decode().splitlines()]
    assert proc.returncode is not None
    return proc.returncode, lines, err.decode()


async def post_all(url: str, events: list[dict[str, Any]]) -> None:
    status, body, _ = await post(url + "/v1/events", events,
                                 headers={"Prefer": "wait=committed"})
    assert status == 200, body


async def test_runs_and_events_print_json_lines_page_after_page(agent: Agent):
    url = agent.endpoints.event_url
    events = []
    for r in range(3):
        events.append(make_event("run.started", run_id=f"cli-{r}", occurred_at=at(r * 100)))
        events += [make_event(run_id=f"cli-{r}", step=f"s{i}", occurred_at=at(r * 100 + i))
                   for i in range(1, 8)]
    events.append(make_event("run.completed", run_id="cli-1", occurred_at=at(150)))
    await post_all(url, events)
    code, runs, err = await flux_agent("runs", "--url", url)
    assert code == 0, err
    assert [r["run_id"] for r in runs] == ["cli-2", "cli-1", "cli-0"]
    assert runs[1]["status"] == "completed" and runs[0]["status"] == "running"
    assert runs[2]["events"] == 8
    code, runs, _ = await flux_agent("runs", "--url", url, "--limit", "2")
    assert code == 0 and [r["run_id"] for r in runs] == ["cli-2", "cli-1"]
    # Pages of three, walked to the end: every event once, in order, over the socket too.
    code, got, err = await flux_agent("events", "--run", "cli-1", "--url", url,
                                      "--limit", "3")
    assert code == 0, err
    expected = [e["event_id"] for e in events if e["run_id"] == "cli-1"]
    assert [e["event_id"] for e in got] == expected
    assert got[0]["payload"] == events[8]["payload"]
    assert agent.endpoints.socket_path is not None
    code, got, err = await flux_agent("events", "--run", "cli-1", "--kind", "step.completed",
                                      "--socket", str(agent.endpoints.socket_path))
    assert code == 0, err
    assert [e["step"] for e in got] == [f"s{i}" for i in range(1, 8)]
    # What goes wrong says so, with a distinct exit code.
    code, got, err = await flux_agent("events", "--run", "never-ran", "--url", url)
    assert (code, got) == (1, []) and "RUN_NOT_FOUND" in err, err
    code, got, err = await flux_agent("events", "--run", "cli-1", "--kind", "nope",
                                      "--url", url)
    assert code == 65 and "INVALID_KIND" in err, err
    dead = f"http://127.0.0.1:{free_port()}"
    code, _, err = await flux_agent("runs", "--url", dead, "--timeout", "2")
    assert code == 69 and dead.removeprefix("http://") in err, err


async def test_events_follow_prints_new_events_and_stops_cleanly_on_sigint(agent: Agent):
    url = agent.endpoints.event_url
    first = [make_event("run.started", run_id="follow-1", occurred_at=at(i)) if i == 0 else
             make_event(run_id="follow-1", occurred_at=at(i)) for i in range(5)]
    await post_all(url, first)
    env = {k: v for k, v in os.environ.items() if not k.startswith("FLUX_AGENT_")}
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "flux_agent", "events", "--run", "follow-1", "--follow",
        "--interval", "200ms", "--limit", "2", "--url", url, env=env,
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE)
    assert proc.stdout is not None and proc.stderr is not None
    seen: list[str] = []

    async def read(n: int) -> None:
        assert proc.stdout is not None
        while len(seen) < n:
            line = await asyncio.wait_for(proc.stdout.readline(), 20)
            assert line, "the follow ended"
            seen.append(json.loads(line)["event_id"])

    try:
        await read(5)
        later = [make_event(run_id="follow-1", occurred_at=at(10 + i)) for i in range(3)]
        await post_all(url, later[:1])
        await read(6)
        await post_all(url, later[1:])
        await read(8)
        assert seen == [e["event_id"] for e in first + later]  # each once, in order
        await asyncio.sleep(0.5)  # a few empty polls: nothing printed twice
        proc.send_signal(signal.SIGINT)
        out, err = await asyncio.wait_for(proc.communicate(), 20)
    finally:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()
    assert proc.returncode == 0, err.decode()
    assert not out.strip(), out  # nothing after the last event
    assert b"Traceback" not in err, err.decode()


async def test_following_a_run_that_has_not_started_waits_for_it(agent: Agent):
    url = agent.endpoints.event_url
    env = {k: v for k, v in os.environ.items() if not k.startswith("FLUX_AGENT_")}
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "flux_agent", "events", "--run", "later-1", "--follow",
        "--interval", "200ms", "--url", url, env=env,
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE)
    assert proc.stdout is not None
    try:
        await asyncio.sleep(1.0)
        event = make_event("run.started", run_id="later-1")
        await post_all(url, [event])
        line = await asyncio.wait_for(proc.stdout.readline(), 20)
        assert json.loads(line)["event_id"] == event["event_id"]
        proc.send_signal(signal.SIGINT)
        await asyncio.wait_for(proc.wait(), 20)
    finally:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()
    assert proc.returncode == 0
