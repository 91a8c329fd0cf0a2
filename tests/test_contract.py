"""Tenants and payloads of the user's choosing: the neutral default (any agency slug, any
payload object), payload schemas per event kind from a directory, the agency manifest and
its retention, reloads when those files change; the flux profile as it was."""

from __future__ import annotations

import asyncio
import json
import logging
from datetime import timedelta
from pathlib import Path
from typing import Any

import pytest

from flux_agent import Agent, FluxClient
from flux_agent.intake.schemas import Contract, SchemaError, Schemas, load_payload_schemas
from flux_agent.testing import make_event

from .support.agents import agent_config
from .support.http import assert_problem, post
from .support.polling import wait_until
from .support.postgres import Database


def write(path: Path, value: Any) -> Path:
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(value))
    tmp.replace(path)
    return path


async def stored(database: Database, event_id: str) -> dict[str, Any] | None:
    rows = await database.fetch("SELECT * FROM flux.events WHERE event_id = $1", event_id)
    return dict(rows[0]) if rows else None


async def test_the_default_takes_any_agency_and_any_payload(database: Database,
                                                           state_dir: Path):
    """A new user's agency and payload, nothing configured but the agency."""
    async with Agent(agent_config(database, state_dir, agency="acme-data")) as agent:
        event = make_event("run.started", payload={"source": "s3://acme/raw", "rows": 12})
        status, body, _ = await post(agent.endpoints.event_url + "/v1/events", event,
                                     headers={"Prefer": "wait=committed"})
        assert status == 200, body
        row = await stored(database, event["event_id"])
        assert row is not None and row["agency_id"] == "acme-data"
        assert json.loads(row["payload"]) == {"source": "s3://acme/raw", "rows": 12}
        assert row["expires_at"] - row["received_at"] == timedelta(days=30)

        # The client's run takes whatever the payload needs, or nothing.
        def job() -> None:
            with FluxClient(agent.endpoints.event_url) as flux, \
                    flux.run("acme-nightly", source="s3://acme/raw") as run, \
                    run.step("extract") as step:
                step.payload["rows"] = 3

        await asyncio.to_thread(job)
        assert agent.flusher is not None and await agent.flusher.drain(10)
        kinds = await database.fetch("SELECT kind, payload FROM flux.events WHERE run_id = "
                                     "'acme-nightly' ORDER BY occurred_at, kind")
        assert [r["kind"] for r in kinds] == ["run.started", "step.started", "step.completed",
                                              "run.completed"]
        assert json.loads(kinds[0]["payload"]) == {"source": "s3://acme/raw"}
        # The envelope still holds: a bad run id or kind is refused whatever the profile.
        status, body, headers = await post(agent.endpoints.event_url + "/v1/events",
                                           make_event(run_id="-bad id"))
        assert_problem(status, body, headers, 422, "INVALID_RUN_ID")


async def test_payload_schemas_per_kind_from_a_directory(database: Database, state_dir: Path,
                                                         tmp_path: Path):
    schemas = tmp_path / "schemas"
    schemas.mkdir()
    write(schemas / "common.json", {"$defs": {"count": {"type": "integer", "minimum": 0}}})
    write(schemas / "run.started.json", {
        "$schema": "https://json-schema.org/draft/2020-12/schema", "type": "object",
        "required": ["source"], "properties": {"source": {"type": "string", "format": "uri"}}})
    write(schemas / "payload.json", {
        "type": "object", "properties": {"rows": {"$ref": "common.json#/$defs/count"}}})
    config = agent_config(database, state_dir, agency="acme", schema_dir=str(schemas))
    async with Agent(config) as agent:
        url = agent.endpoints.event_url + "/v1/events"
        ok = [make_event("run.started", payload={"source": "s3://acme/raw"}),
              make_event("step.completed", payload={"rows": 5}),
              make_event("run.completed", payload={})]
        status, body, _ = await post(url, ok)
        assert status == 202, body
        bad = [make_event("run.started", payload={"rows": 1}),
               make_event("step.completed", payload={"rows": -1}),
               make_event("run.failed", payload={"rows": "many"})]
        status, body, headers = await post(url, bad)
        assert_problem(status, body, headers, 422, "SCHEMA_VIOLATION")
        assert sorted((e["pointer"], e["code"]) for e in body["errors"]) == [
            ("/0/payload/source", "MISSING_FIELD"), ("/1/payload/rows", "OUT_OF_RANGE"),
            ("/2/payload/rows", "WRONG_TYPE")]


def test_a_schema_directory_is_checked_whole(tmp_path: Path,
                                            caplog: pytest.LogCaptureFixture):
    d = tmp_path / "schemas"
    d.mkdir()
    write(d / "run_started.json", {"required": ["x"]})  # a typo: no such kind
    with caplog.at_level(logging.WARNING):
        assert load_payload_schemas(d) == {}
    assert any("it is not used" in r.getMessage() for r in caplog.records)
    write(d / "step.failed.json", {"properties": {"error": {"$ref": "gone.json"}}})
    with pytest.raises(SchemaError) as info:
        load_payload_schemas(d)
    assert info.value.setting == "FLUX_AGENT_SCHEMA_DIR"
    assert str(d / "step.failed.json") in info.value.message
    write(d / "step.failed.json", {"type": "object", "minProperties": "two"})
    with pytest.raises(SchemaError, match=r"step\.failed\.json is not a valid JSON Schema"):
        load_payload_schemas(d)


async def test_a_manifest_restricts_agencies_and_gives_their_retention(
        database: Database, state_dir: Path, tmp_path: Path):
    manifest = write(tmp_path / "agencies.json", {
        "version": 1, "default_retention_days": 7,
        "agencies": [{"slug": "acme", "name": "Acme", "retention_days": 90},
                     {"slug": "beta", "name": "Beta"}]})
    config = agent_config(database, state_dir, agency="acme", agency_manifest=str(manifest))
    async with Agent(config) as agent:
        event = make_event()
        status, body, _ = await post(agent.endpoints.event_url + "/v1/events", event,
                                     headers={"Prefer": "wait=committed"})
        assert status == 200, body
        row = await stored(database, event["event_id"])
        assert row is not None and row["expires_at"] - row["received_at"] == timedelta(days=90)
    unlisted = agent_config(database, state_dir, agency="gamma",
                            agency_manifest=str(manifest))
    from flux_agent.core.errors import ConfigError

    with pytest.raises(ConfigError) as info:
        async with Agent(unlisted):
            pass
    assert info.value.setting == "FLUX_AGENT_AGENCY"
    assert "FLUX_AGENT_AGENCY_MANIFEST" in info.value.message


def test_retention_covers_the_agencies_served_beyond_the_manifest(tmp_path: Path):
    open_contract = Contract(Schemas())
    assert open_contract.knows("anyone-at-all")
    assert open_contract.retention("acme") == timedelta(days=30)
    assert open_contract.retention_days() == {"acme": 30}  # purged, with the default
    manifest = write(tmp_path / "m.json", {"version": 1, "default_retention_days": 5,
                                           "agencies": [{"slug": "beta", "name": "B",
                                                         "retention_days": 60}]})
    listed = Contract(Schemas(manifest_path=manifest))
    listed.serve("acme")
    assert listed.retention_days() == {"acme": 5, "beta": 60}
    flux = Schemas(profile="flux")
    assert flux.manifest.knows("nasa") and not flux.manifest.knows("acme")
    assert sorted(flux.payloads) == ["checkpoint.saved", "run.aborted", "run.completed",
                                     "run.failed", "run.started", "step.completed",
                                     "step.failed", "step.started"]


async def test_schemas_and_manifest_reload_when_their_files_change(
        database: Database, state_dir: Path, tmp_path: Path,
        caplog: pytest.LogCaptureFixture):
    schemas = tmp_path / "schemas"
    schemas.mkdir()
    write(schemas / "payload.json", {"type": "object"})
    manifest = write(tmp_path / "agencies.json", {"version": 1, "agencies": [
        {"slug": "acme", "name": "Acme"}]})
    config = agent_config(database, state_dir, agency="acme", schema_dir=str(schemas),
                          agency_manifest=str(manifest))
    caplog.set_level(logging.INFO)
    async with Agent(config) as agent:
        url = agent.endpoints.event_url + "/v1/events"

        async def answer(payload: dict[str, Any]) -> int:
            return (await post(url, make_event(payload=payload)))[0]

        assert await answer({}) == 202
        write(schemas / "payload.json", {"type": "object", "required": ["rows"]})
        assert await wait_until(lambda: _is(answer({}), 422), 10)
        assert await answer({"rows": 1}) == 202
        assert any(r.getMessage().startswith("reloaded") and
                   getattr(r, "fields", {}).get("trigger") == "file changed"
                   for r in caplog.records)
        # A file that does not load keeps what is in force, loudly.
        (schemas / "payload.json").write_text("{ not json")

        def failed() -> bool:
            return any(r.levelno == logging.ERROR and r.getMessage().startswith(
                "reload failed") for r in caplog.records)

        assert await wait_until(lambda: asyncio.sleep(0, failed()), 10)
        assert await answer({}) == 422 and await answer({"rows": 2}) == 202
        # A manifest that drops the agent's own agency is refused the same way.
        caplog.clear()
        write(manifest, {"version": 1, "agencies": [{"slug": "other", "name": "Other"}]})
        assert await wait_until(lambda: asyncio.sleep(0, failed()), 10)
        assert await answer({"rows": 3}) == 202


async def _is(status: Any, expected: int) -> bool:
    return bool(await status == expected)
