"""`flux-agent emit` from a shell script, and the client's checkpoint/resume against a real
agent."""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import sys
from pathlib import Path

from flux_agent import Agent, FluxClient
from flux_agent.postgres.embedded import free_port

from .support.agents import agent_config
from .support.postgres import Database


def emit(*args: str, stdin: str | None = None) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("FLUX_AGENT_")}
    return subprocess.run([sys.executable, "-m", "flux_agent", "emit", *args], input=stdin,
                          env=env, capture_output=True, text=True, timeout=60)


async def test_emit_exit_codes(database: Database, state_dir: Path, tmp_path: Path):
    # The flux profile: its payload schema refuses a content_type it does not list.
    async with Agent(agent_config(database, state_dir, schema_profile="flux")) as agent:
        await _exit_codes(agent, database, tmp_path)


async def _exit_codes(agent: Agent, database: Database, tmp_path: Path) -> None:
    url = agent.endpoints.event_url
    payload = tmp_path / "p.json"
    payload.write_text('{"items_processed": 12}')
    ok = await asyncio.to_thread(emit, "--url", url, "--run", "sh-1", "--kind", "step.completed",
                                 "--step", "extract", "--payload", f"@{payload}",
                                 "--wait-committed")
    assert ok.returncode == 0, ok.stderr
    result = json.loads(ok.stdout)
    assert result["accepted"] == 1
    assert result["committed"] is True
    stored = await database.fetchval("SELECT payload FROM flux.events WHERE event_id = $1",
                                     result["event_ids"][0])
    assert json.loads(stored) == {"items_processed": 12}
    again = await asyncio.to_thread(emit, "--url", url, "--run", "sh-1", "--kind",
                                    "step.completed", "--step", "extract", "--payload", "-",
                                    "--event-id", result["event_ids"][0],
                                    stdin='{"items_processed": 12}')
    assert again.returncode == 0
    assert json.loads(again.stdout)["duplicates"] == 1
    refused = await asyncio.to_thread(emit, "--url", url, "--run", "sh-1", "--kind",
                                      "step.exploded")
    assert refused.returncode == 65
    assert "kind must be one of" in refused.stderr
    assert len(json.loads(refused.stdout)["event_ids"]) == 1  # the id, whatever happens
    server_refused = await asyncio.to_thread(emit, "--url", url, "--run", "sh-1", "--kind",
                                             "run.started", "--payload",
                                             '{"content_type": "video", "use_case": "vr"}')
    assert server_refused.returncode == 65
    assert "INVALID_CONTENT_TYPE" in server_refused.stderr
    # The violations, by JSON pointer, for the person (stderr) and the script (stdout).
    assert "/payload/content_type: " in server_refused.stderr
    out = json.loads(server_refused.stdout)
    assert out["accepted"] == 0 and len(out["event_ids"]) == 1
    assert out["error"]["status"] == 422
    assert [e["pointer"] for e in out["error"]["errors"]] == ["/payload/content_type"]
    unreachable = await asyncio.to_thread(emit, "--url", f"http://127.0.0.1:{free_port()}",
                                          "--run", "sh-1", "--kind", "run.aborted",
                                          "--attempts", "2")
    assert unreachable.returncode == 69
    assert len(json.loads(unreachable.stdout)["event_ids"]) == 1
    # Where it looked, and the settings that say where the agent is.
    assert "127.0.0.1:" in unreachable.stderr and "FLUX_AGENT_URL" in unreachable.stderr
    bad_json = await asyncio.to_thread(emit, "--url", url, "--run", "x", "--kind",
                                       "run.aborted", "--payload", "[1]")
    assert bad_json.returncode == 65
    assert len(json.loads(bad_json.stdout)["event_ids"]) == 1


async def test_client_checkpoint_and_resume_against_a_real_agent(agent: Agent):
    def work() -> tuple[object, object, object]:
        with FluxClient(agent.endpoints.event_url) as client:
            nothing = client.resume("resumable")
            first = client.checkpoint("resumable", "extract", {"offset": 100})
            client.checkpoint("resumable", "transform", {"offset": 250})
            return nothing, first, client.resume("resumable")

    nothing, first, latest = await asyncio.to_thread(work)
    assert nothing is None
    assert first["version"] == 1  # type: ignore[index]
    assert latest.version == 2  # type: ignore[union-attr]
    assert latest.step == "transform"  # type: ignore[union-attr]
    assert latest.state == {"offset": 250}  # type: ignore[union-attr]
