"""/openapi.json is true to behaviour: schemathesis drives a live agent from it and finds no
server error and no status, content type or response body the document does not describe."""

from __future__ import annotations

import asyncio
import re
import subprocess
import sys
from pathlib import Path

from openapi_spec_validator import validate as validate_spec

from flux_agent import Agent
from flux_agent.testing import make_event

from .support.http import get, post
from .support.postgres import Database


async def test_document_is_valid_openapi_31_and_lists_every_route(agent: Agent):
    status, doc, _ = await get(agent.endpoints.event_url + "/openapi.json")
    assert status == 200
    validate_spec(doc)
    assert doc["openapi"] == "3.1.0"
    routes = {(method.upper(), resource.canonical)
              for resource in agent.event_app.router.resources()  # type: ignore[union-attr]
              for route in resource for method in [route.method] if method != "HEAD"}
    documented = {(m.upper(), path) for path, ops in doc["paths"].items()
                  for m in ops if m in {"get", "put", "post", "delete"}}
    assert routes <= documented, routes - documented
    assert {"/health/live", "/health/ready", "/health/deep", "/metrics"} <= set(doc["paths"])


async def test_schemathesis_finds_nothing_undocumented(agent: Agent, database: Database,
                                                       tmp_path: Path):
    url = agent.endpoints.event_url
    # Some data, so reads can find things as well as miss them.
    events = [make_event("run.started", run_id="st-run"), make_event(run_id="st-run")]
    await post(url + "/v1/events", events, headers={"Prefer": "wait=committed"})
    cmd = [sys.executable, "-m", "schemathesis.cli", "run", url + "/openapi.json",
           "--checks", "not_a_server_error,status_code_conformance,"
           "content_type_conformance,response_headers_conformance,"
           "response_schema_conformance",
           "--max-examples", "25", "--seed", "1",
           "--exclude-path", "/v1/drain",  # would stop the agent under test
           "--exclude-path-regex", "^/(health|metrics)",  # the admin listener's port
           "--request-timeout", "20", "--no-color"]
    result = await asyncio.to_thread(subprocess.run, cmd, capture_output=True, text=True,
                                     timeout=600, cwd=tmp_path)  # it leaves a cache behind
    assert result.returncode == 0, result.stdout[-6000:] + result.stderr[-3000:]
    counts = re.search(r"(\d+) generated, (\d+) passed", result.stdout)
    assert counts, result.stdout[-3000:]
    assert int(counts.group(1)) >= 200  # it really exercised the API
    assert counts.group(1) == counts.group(2)
