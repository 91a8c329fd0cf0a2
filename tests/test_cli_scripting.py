"""The command line where people script against it: `emit --wait-committed` with the
database away (exit 75, the id on stdout), `status` finding an agent wherever it listens and
its agency, errors that name the address and the setting, a taken port found before the
embedded PostgreSQL starts (and by `validate`), SIGHUP reloading a real agent process."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest

from flux_agent import Agent
from flux_agent.intake.auth import api_key_digest
from flux_agent.postgres.embedded import free_port
from flux_agent.testing import make_event

from .support.agents import AgentProcess, agent_config, agent_env
from .support.capture import remember_secret
from .support.faults import TcpProxy
from .support.http import post
from .support.paths import short_tempdir
from .support.polling import wait_until
from .support.postgres import Database, proxied


def flux(*args: str, env: dict[str, str] | None = None, timeout: float = 120
         ) -> subprocess.CompletedProcess[str]:
    base = {k: v for k, v in os.environ.items() if not k.startswith("FLUX_AGENT_")}
    return subprocess.run([sys.executable, "-m", "flux_agent", *args], env={**base, **(env or {})},
                          capture_output=True, text=True, timeout=timeout)


# --------------------------------------------------------------------------- emit


async def test_emit_wait_committed_with_the_database_away_exits_75_with_the_id(
        database: Database, proxy: TcpProxy, state_dir: Path):
    config = agent_config(proxied(database, proxy), state_dir, commit_wait_timeout=1.0,
                          flush_retry_max=0.2)
    async with Agent(config) as agent:
        proxy.cut()
        started = time.monotonic()
        result = await asyncio.to_thread(
            flux, "emit", "--url", agent.endpoints.event_url, "--run", "away", "--kind",
            "run.completed", "--wait-committed")
        took = time.monotonic() - started
        assert result.returncode == 75, result.stderr
        assert took < 20, took  # answered after the agent's wait, not after retries of it
        out = json.loads(result.stdout)
        assert out["accepted"] == 1 and out["committed"] is False
        assert out["error"]["code"] == "COMMIT_TIMEOUT"
        assert "accepted" in result.stderr and "not yet in PostgreSQL" in result.stderr
        [event_id] = out["event_ids"]
        proxy.restore()

        async def stored() -> bool:
            return bool(await database.fetchval(
                "SELECT count(*) FROM flux.events WHERE event_id = $1", event_id))

        assert await wait_until(stored, 20)  # the id printed is the event delivered


# --------------------------------------------------------------------------- status


async def test_status_finds_the_agent_where_it_listens_and_takes_its_agency():
    """An embedded-database agent on ports of its own: `status` with nothing but the state
    dir finds it, and its psql line is for the agent's agency."""
    state = short_tempdir()
    port, admin = free_port(), free_port()
    env = {"FLUX_AGENT_STATE_DIR": str(state), "FLUX_AGENT_AUTH": "none",
           "FLUX_AGENT_AGENCY": "acme-data", "FLUX_AGENT_LISTEN": f"127.0.0.1:{port}",
           "FLUX_AGENT_ADMIN_LISTEN": f"127.0.0.1:{admin}"}
    base = {k: v for k, v in os.environ.items() if not k.startswith("FLUX_AGENT_")}
    log = state / "agent.log"
    with log.open("wb") as out:
        proc = subprocess.Popen([sys.executable, "-m", "flux_agent", "run"],
                                env={**base, **env}, stdout=out, stderr=subprocess.STDOUT)
    try:
        only_the_dir = {"FLUX_AGENT_STATE_DIR": str(state)}
        deadline = time.monotonic() + 120
        while True:
            assert proc.poll() is None, log.read_text()
            result = await asyncio.to_thread(flux, "status", "--json", env=only_the_dir)
            if result.returncode == 0 or time.monotonic() > deadline:
                break
            await asyncio.sleep(0.5)
        assert result.returncode == 0, (result.stdout, result.stderr, log.read_text()[-2000:])
        report = json.loads(result.stdout)
        assert report["url"] == f"http://127.0.0.1:{admin}"
        assert "flux.current_agency_id%3Dacme-data" in report["embedded"]["connect"]
        text = await asyncio.to_thread(flux, "status", env=only_the_dir)
        assert "flux.current_agency_id%3Dacme-data" in text.stdout
        # An explicit --url still wins; where nothing listens, it says where and what to set.
        nowhere = await asyncio.to_thread(flux, "status", "--url",
                                          f"http://127.0.0.1:{free_port()}", env=only_the_dir)
        assert nowhere.returncode == 69
        assert "127.0.0.1:" in nowhere.stderr and "FLUX_AGENT_ADMIN_LISTEN" in nowhere.stderr
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.wait(60)
    assert not (state / "agent.json").exists()  # an agent that stopped says nothing more
    gone = await asyncio.to_thread(flux, "status", env={"FLUX_AGENT_STATE_DIR": str(state),
                                                       "FLUX_AGENT_ADMIN_LISTEN":
                                                       f"127.0.0.1:{free_port()}"})
    assert gone.returncode == 69 and "no agent runs on the state dir" in gone.stderr


# --------------------------------------------------------------------------- errors


def test_database_errors_name_the_socket_or_address_and_the_setting(tmp_path: Path):
    missing = flux("verify", "--agency", "acme", "--database-url",
                   f"postgresql://u@/flux?host={tmp_path}&port=5999", timeout=60)
    assert missing.returncode == 1
    assert f"{tmp_path}/.s.PGSQL.5999" in missing.stderr
    assert "FLUX_AGENT_DATABASE_URL" in missing.stderr
    assert "Errno" not in missing.stderr and "FileNotFoundError" not in missing.stderr
    port = free_port()
    refused = flux("migrate", "--database-url", f"postgresql://u@127.0.0.1:{port}/flux",
                   timeout=60)
    assert refused.returncode == 1
    assert f"127.0.0.1:{port}" in refused.stderr and "FLUX_AGENT_DATABASE_URL" in refused.stderr
    assert "Connection refused" in refused.stderr


def test_a_taken_port_exits_78_before_the_embedded_database_and_in_validate():
    state = short_tempdir()
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        env = {"FLUX_AGENT_STATE_DIR": str(state), "FLUX_AGENT_AUTH": "none",
               "FLUX_AGENT_AGENCY": "acme", "FLUX_AGENT_LISTEN": f"127.0.0.1:{port}",
               "FLUX_AGENT_ADMIN_LISTEN": f"127.0.0.1:{free_port()}"}
        checked = flux("validate", env=env, timeout=60)
        assert checked.returncode == 78, checked.stderr
        assert f"FLUX_AGENT_LISTEN: cannot listen on 127.0.0.1:{port}" in checked.stderr
        started = time.monotonic()
        run = flux("run", env=env, timeout=60)
        assert run.returncode == 78, run.stderr
        assert f"FLUX_AGENT_LISTEN: cannot listen on 127.0.0.1:{port}" in run.stderr
        assert time.monotonic() - started < 15
        assert not (state / "postgres").exists()  # the embedded database never started
        env["FLUX_AGENT_ADMIN_LISTEN"], env["FLUX_AGENT_LISTEN"] = env["FLUX_AGENT_LISTEN"], \
            f"127.0.0.1:{free_port()}"
        admin = flux("validate", env=env, timeout=60)
        assert admin.returncode == 78 and "FLUX_AGENT_ADMIN_LISTEN" in admin.stderr
    assert flux("validate", env=env, timeout=60).returncode == 0  # free again


# --------------------------------------------------------------------------- SIGHUP


def lines(path: Path) -> list[dict[str, Any]]:
    out = []
    for line in path.read_text().splitlines():
        with contextlib.suppress(ValueError):  # a line of the start before logs are set up
            out.append(json.loads(line))
    return out


def write_json(path: Path, value: Any) -> None:
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(value))
    tmp.replace(path)


def keys_file(path: Path, *entries: tuple[str, str]) -> None:
    write_json(path, {"keys": [{"sha256": api_key_digest(key), "agency": agency,
                                "role": "operator", "name": agency} for key, agency in entries]})


async def test_sighup_reloads_schemas_manifest_keys_and_log_level(database: Database,
                                                                  state_dir: Path,
                                                                  tmp_path: Path):
    schemas = tmp_path / "schemas"
    schemas.mkdir()
    write_json(schemas / "payload.json", {"type": "object"})
    manifest = tmp_path / "agencies.json"
    write_json(manifest, {"version": 1, "agencies": [{"slug": "acme", "name": "Acme"}]})
    key_a, key_b = "flux_key-a-" + os.urandom(8).hex(), "flux_key-b-" + os.urandom(8).hex()
    remember_secret(key_a)
    remember_secret(key_b)
    keys = tmp_path / "keys.json"
    keys_file(keys, (key_a, "acme"))
    toml = tmp_path / "agent.toml"
    toml.write_text('log_level = "info"\n')
    env = agent_env(database, state_dir, FLUX_AGENT_AUTH="jwt", FLUX_AGENT_AGENCY="",
                    FLUX_AGENT_API_KEYS_FILE=str(keys), FLUX_AGENT_SCHEMA_DIR=str(schemas),
                    FLUX_AGENT_AGENCY_MANIFEST=str(manifest), FLUX_AGENT_CONFIG=str(toml))
    del env["FLUX_AGENT_LOG_LEVEL"]  # from the file, which SIGHUP reads again
    proc = AgentProcess(env, tmp_path / "agent.log")
    proc.start()
    try:
        url = proc.url + "/v1/events"

        async def send(key: str, payload: dict[str, Any]) -> tuple[int, dict[str, Any]]:
            status, body, _ = await post(url, make_event(payload=payload),
                                         headers={"Authorization": f"Bearer {key}"})
            return status, body

        assert (await send(key_a, {}))[0] == 202
        assert (await send(key_b, {}))[0] == 401
        # New files: rows required, a second agency, key B for it; debug logs.
        write_json(schemas / "payload.json", {"type": "object", "required": ["rows"],
                                              "properties": {"rows": {"type": "integer"}}})
        write_json(manifest, {"version": 1, "agencies": [{"slug": "acme", "name": "Acme"},
                                                         {"slug": "beta", "name": "Beta"}]})
        keys_file(keys, (key_b, "beta"))
        toml.write_text('log_level = "debug"\n')
        assert proc.proc is not None
        proc.proc.send_signal(signal.SIGHUP)

        def reloaded_by_sighup() -> dict[str, Any] | None:
            return next((e for e in lines(proc.log_path) if e["message"].startswith("reloaded")
                         and e["fields"].get("trigger") == "SIGHUP"), None)

        assert await wait_until(lambda: asyncio.sleep(0, reloaded_by_sighup()), 10), \
            proc.log_path.read_text()[-3000:]
        entry = reloaded_by_sighup()
        assert entry is not None and entry["level"] == "INFO"
        said = entry["fields"]["reloaded"]
        assert said["log_level"] == "debug" and said["api_keys"] == 1
        assert str(manifest) == said["agency_manifest"] and str(schemas) in said["payload_schemas"]
        assert proc.proc.poll() is None  # SIGHUP no longer ends the agent
        status, body = await send(key_b, {})
        assert status == 422 and body["errors"][0]["pointer"] == "/payload/rows", body
        assert (await send(key_b, {"rows": 3}))[0] == 202  # agency beta, served now
        assert (await send(key_a, {"rows": 3}))[0] == 401  # key A is gone
        # At debug level every request is logged (at info it was not).
        def access() -> list[str]:
            return [e["message"] for e in lines(proc.log_path)
                    if e["logger"] == "aiohttp.access" and e["message"].startswith("POST")]

        assert await wait_until(lambda: asyncio.sleep(0, len(access()) == 3), 5), access()
        assert access() == ["POST /v1/events 422", "POST /v1/events 202",
                            "POST /v1/events 401"]

        # A reload that fails keeps what is in force, and says so at ERROR.
        write_json(schemas / "payload.json", {"type": "objekt"})
        proc.proc.send_signal(signal.SIGHUP)

        def failed() -> dict[str, Any] | None:
            return next((e for e in lines(proc.log_path) if e["level"] == "ERROR"
                         and e["message"].startswith("reload failed")), None)

        assert await wait_until(lambda: asyncio.sleep(0, failed()), 10)
        error = failed()
        assert error is not None and "FLUX_AGENT_SCHEMA_DIR" in error["fields"]["failed"]
        assert str(schemas / "payload.json") in error["fields"]["failed"]["FLUX_AGENT_SCHEMA_DIR"]
        assert (await send(key_b, {}))[0] == 422  # the previous schemas, still
        assert (await send(key_b, {"rows": 1}))[0] == 202
        assert proc.proc.poll() is None
        assert proc.terminate() == 0
    finally:
        proc.kill()


@pytest.mark.parametrize("variant", ["bad schema", "draft-07", "unresolvable ref", "not JSON"])
def test_a_bad_payload_schema_exits_78_naming_the_file_and_the_setting(tmp_path: Path,
                                                                       variant: str):
    schemas = tmp_path / "schemas"
    schemas.mkdir()
    bad = schemas / "run.started.json"
    bad.write_text({
        "bad schema": json.dumps({"type": "objekt"}),
        "draft-07": json.dumps({"$schema": "http://json-schema.org/draft-07/schema#"}),
        "unresolvable ref": json.dumps({"$ref": "missing.json"}),
        "not JSON": "{",
    }[variant])
    env = {"FLUX_AGENT_STATE_DIR": str(tmp_path / "state"), "FLUX_AGENT_AUTH": "none",
           "FLUX_AGENT_AGENCY": "acme", "FLUX_AGENT_SCHEMA_DIR": str(schemas),
           "FLUX_AGENT_LISTEN": f"127.0.0.1:{free_port()}",
           "FLUX_AGENT_ADMIN_LISTEN": f"127.0.0.1:{free_port()}"}
    for command in ("validate", "run"):
        result = flux(command, env=env, timeout=60)
        assert result.returncode == 78, (command, result.stderr)
        assert "FLUX_AGENT_SCHEMA_DIR" in result.stderr and str(bad) in result.stderr, \
            result.stderr
    assert not (tmp_path / "state" / "spool").exists()
