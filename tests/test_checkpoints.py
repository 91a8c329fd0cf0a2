"""Run checkpoints: versions, optimistic concurrency, integrity on every load, read-your-writes
while PostgreSQL is down (also across a restart), and `flux-agent verify`."""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import sys
from pathlib import Path

from flux_agent import Agent
from flux_agent.core.digest import canonical_json, sha256_hex

from .support.agents import agent_config
from .support.faults import TcpProxy
from .support.http import assert_problem, get, put
from .support.polling import wait_until
from .support.postgres import Database, proxied


async def test_versions_load_and_stale_if_match(agent: Agent, database: Database):
    base = agent.endpoints.event_url + "/v1/runs/nightly-1/checkpoint"
    states = [{"offset": 100 * i, "files": [f"part-{i}"], "ratio": 0.5 + i} for i in range(3)]
    for i, state in enumerate(states, start=1):
        status, body, headers = await put(base, {"step": f"step-{i}", "state": state})
        assert status == 201, body
        assert body["version"] == i
        assert headers["ETag"] == f'"{i}"'
        assert body["checkpoint_hash"] == sha256_hex(canonical_json(state))
    status, body, headers = await get(base)
    assert status == 200
    assert body["version"] == 3
    assert body["state"] == states[2]
    assert body["step"] == "step-3"
    assert headers["ETag"] == '"3"'
    # Optimistic concurrency: a writer that read version 2 may not overwrite version 3.
    status, body, headers = await put(base, {"step": "late", "state": {}},
                                      headers={"If-Match": '"2"'})
    assert_problem(status, body, headers, 412, "CHECKPOINT_VERSION_MISMATCH")
    assert body["class"] == "CHECKPOINT_ERROR"
    assert body["context"]["current_version"] == 3
    status, body, _ = await put(base, {"step": "next", "state": {"offset": 400}},
                                headers={"If-Match": '"3"', "Prefer": "wait=committed"})
    assert status == 201, body
    assert body["version"] == 4
    history = await database.fetch("SELECT version, step FROM flux.checkpoint_history "
                                   "WHERE run_id = 'nightly-1' ORDER BY version")
    assert [tuple(r) for r in history] == [(1, "step-1"), (2, "step-2"), (3, "step-3"),
                                           (4, "next")]
    assert await database.fetchval("SELECT version FROM flux.checkpoints "
                                   "WHERE run_id = 'nightly-1'") == 4
    # Every save is also a checkpoint.saved event of the run.
    saved = await database.fetch("SELECT step, payload FROM flux.events "
                                 "WHERE run_id = 'nightly-1' AND kind = 'checkpoint.saved'")
    assert sorted(json.loads(r["payload"])["version"] for r in saved) == [1, 2, 3, 4]
    status, body, _ = await get(agent.endpoints.event_url + "/v1/runs/nightly-1/checkpoints")
    assert status == 200
    assert [v["version"] for v in body["versions"]] == [4, 3, 2, 1]


async def test_checkpoint_errors(agent: Agent):
    url = agent.endpoints.event_url
    status, body, headers = await get(url + "/v1/runs/never-saved/checkpoint")
    assert_problem(status, body, headers, 404, "CHECKPOINT_NOT_FOUND")
    status, body, headers = await put(url + "/v1/runs/r/checkpoint", {"state": {}})
    assert_problem(status, body, headers, 422, "MISSING_FIELD")
    assert body["errors"][0]["pointer"] == "/step"
    status, body, headers = await put(url + "/v1/runs/r/checkpoint",
                                      {"step": "s", "state": [1, 2]})
    assert_problem(status, body, headers, 422, "WRONG_TYPE")
    status, body, headers = await put(url + "/v1/runs/-bad/checkpoint",
                                      {"step": "s", "state": {}})
    assert_problem(status, body, headers, 422, "INVALID_RUN_ID")
    status, body, headers = await put(url + "/v1/runs/r/checkpoint",
                                      {"step": "s", "state": {"blob": "x" * 300_000}})
    assert_problem(status, body, headers, 413, "CHECKPOINT_TOO_LARGE")
    status, body, headers = await put(url + "/v1/runs/r/checkpoint",
                                      {"step": "s", "state": {}}, headers={"If-Match": "v2"})
    assert_problem(status, body, headers, 400, "INVALID_IF_MATCH")
    status, body, headers = await put(url + "/v1/runs/r2/checkpoint",
                                      {"step": "s", "state": {}}, headers={"If-Match": "*"})
    assert_problem(status, body, headers, 412, "CHECKPOINT_VERSION_MISMATCH")


async def test_tampered_checkpoint_is_refused_audited_and_named_by_verify(
        agent: Agent, database: Database, state_dir: Path):
    url = agent.endpoints.event_url + "/v1/runs/tamper-me/checkpoint"
    status, _, _ = await put(url, {"step": "s", "state": {"offset": 10}},
                             headers={"Prefer": "wait=committed"})
    assert status == 201
    await database.fetch("UPDATE flux.checkpoints SET state = '{\"offset\": 999999}' "
                         "WHERE run_id = 'tamper-me'")
    status, body, headers = await get(url)
    assert_problem(status, body, headers, 500, "CHECKPOINT_INTEGRITY_FAILED")
    assert body["class"] == "CHECKPOINT_ERROR"
    assert body["retryable"] is False
    assert "999999" not in json.dumps(body)  # the corrupt state is never returned

    async def audited() -> bool:
        return bool(await database.fetchval(
            "SELECT count(*) FROM flux.audit_log WHERE action = 'checkpoint.integrity_failed'"))

    assert await wait_until(audited, 10)
    _, metrics, _ = await get(agent.endpoints.admin_url + "/metrics")
    assert "flux_checkpoint_integrity_failures_total 1.0" in metrics

    env = {k: v for k, v in os.environ.items() if not k.startswith("FLUX_AGENT_")}
    env["FLUX_AGENT_DATABASE_URL"] = database.login_dsn
    result = await asyncio.to_thread(
        subprocess.run, [sys.executable, "-m", "flux_agent", "verify", "--agency", "nasa"],
        env=env, capture_output=True, text=True, timeout=60)
    assert result.returncode == 1, result.stderr
    reports = [json.loads(line) for line in result.stdout.splitlines()]
    bad = [r for r in reports if "stored_hash" in r]
    assert [(r["kind"], r["id"]) for r in bad] == [("checkpoint", "tamper-me v1 (latest)")]
    # The same store without the tampering verifies clean.
    await database.fetch("UPDATE flux.checkpoints SET state = '{\"offset\":10}' "
                         "WHERE run_id = 'tamper-me'")
    result = await asyncio.to_thread(
        subprocess.run, [sys.executable, "-m", "flux_agent", "verify", "--run", "tamper-me",
                         "--agency", "nasa"],
        env=env, capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stdout


async def test_verify_accepts_what_jsonb_normalises(agent: Agent, database: Database):
    """Event payloads live in jsonb, which rewrites 1e+16 as 10000000000000000: verification
    must not call that corruption."""
    from flux_agent.testing import make_event

    from .support.http import post

    event = make_event(payload={"big": 1e16, "small": 1.5e-5, "neg": -2.5e20})
    status, _, _ = await post(agent.endpoints.event_url + "/v1/events", event,
                              headers={"Prefer": "wait=committed"})
    assert status == 200
    env = {k: v for k, v in os.environ.items() if not k.startswith("FLUX_AGENT_")}
    env["FLUX_AGENT_DATABASE_URL"] = database.login_dsn
    result = await asyncio.to_thread(
        subprocess.run, [sys.executable, "-m", "flux_agent", "verify", "--agency", "nasa"],
        env=env, capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stdout + result.stderr
    await database.fetch("UPDATE flux.events SET payload = '{\"big\": 1}'")
    result = await asyncio.to_thread(
        subprocess.run, [sys.executable, "-m", "flux_agent", "verify", "--agency", "nasa"],
        env=env, capture_output=True, text=True, timeout=60)
    assert result.returncode == 1
    assert event["event_id"] in result.stdout
    # An agency the manifest does not know is a mistake to name, not a clean bill of health
    # (the flux profile's manifest here; by default no manifest restricts them).
    result = await asyncio.to_thread(
        subprocess.run, [sys.executable, "-m", "flux_agent", "verify", "--agency", "nope",
                         "--schema-profile", "flux"],
        env=env, capture_output=True, text=True, timeout=60)
    assert result.returncode == 78, result.stdout
    assert "FLUX_AGENT_AGENCY" in result.stderr and "nope" in result.stderr
    # Without a manifest there is no list of agencies to verify: name one.
    result = await asyncio.to_thread(
        subprocess.run, [sys.executable, "-m", "flux_agent", "verify"], env=env,
        capture_output=True, text=True, timeout=60)
    assert result.returncode == 78 and "FLUX_AGENT_AGENCY" in result.stderr, result.stderr


async def test_read_your_writes_while_postgres_is_down_across_a_restart(
        database: Database, proxy: TcpProxy, state_dir: Path):
    config = agent_config(proxied(database, proxy), state_dir, flush_retry_max=0.3,
                          drain_timeout=0.5)
    path = "/v1/runs/outage-run/checkpoint"
    async with Agent(config) as running:
        for i in range(1, 4):
            status, body, _ = await put(running.endpoints.event_url + path,
                                        {"step": f"s{i}", "state": {"i": i}},
                                        headers={"Prefer": "wait=committed"})
            assert status == 201, body
        proxy.cut()
        status, body, _ = await put(running.endpoints.event_url + path,
                                    {"step": "s4", "state": {"i": 4}})
        assert status == 201, body
        assert body["version"] == 4
        status, body, _ = await get(running.endpoints.event_url + path)
        assert (status, body["version"], body["state"]) == (200, 4, {"i": 4})
    # Restart with PostgreSQL still away: version 4 comes from the spool.
    async with Agent(config) as running:
        status, body, _ = await get(running.endpoints.event_url + path)
        assert (status, body["version"], body["state"]) == (200, 4, {"i": 4})
        # ... and the next save continues the numbering.
        status, body, _ = await put(running.endpoints.event_url + path,
                                    {"step": "s5", "state": {"i": 5}})
        assert (status, body["version"]) == (201, 5)
        proxy.restore()

        async def landed() -> bool:
            return await database.fetchval("SELECT max(version) FROM flux.checkpoint_history "
                                           "WHERE run_id = 'outage-run'") == 5

        assert await wait_until(landed, 20)
    rows = await database.fetch("SELECT version, count(*) AS n FROM flux.checkpoint_history "
                                "WHERE run_id = 'outage-run' GROUP BY version ORDER BY 1")
    assert [(r["version"], r["n"]) for r in rows] == [(1, 1), (2, 1), (3, 1), (4, 1), (5, 1)]
    events = await database.fetchval("SELECT count(*) FROM flux.events WHERE "
                                      "run_id = 'outage-run' AND kind = 'checkpoint.saved'")
    assert events == 5
    assert await database.fetchval("SELECT version FROM flux.checkpoints "
                                   "WHERE run_id = 'outage-run'") == 5


async def test_unknown_run_while_postgres_is_down_is_a_clear_503(
        database: Database, proxy: TcpProxy, state_dir: Path):
    config = agent_config(proxied(database, proxy), state_dir, drain_timeout=0.5)
    proxy.cut()
    async with Agent(config) as running:
        status, body, headers = await put(running.endpoints.event_url +
                                          "/v1/runs/fresh/checkpoint", {"step": "s", "state": {}})
        assert_problem(status, body, headers, 503, "CHECKPOINT_VERSION_UNKNOWN")
        assert body["retryable"] is True
        status, body, headers = await get(running.endpoints.event_url + "/v1/runs/fresh")
        assert_problem(status, body, headers, 503, "DATABASE_UNAVAILABLE")
