"""/openapi.json is true to behaviour: schemathesis drives a live agent from it and finds no
server error and no status, content type or response body the document does not describe."""

from __future__ import annotations

import asyncio
import os
import re
import subprocess
import sys
from pathlib import Path

from openapi_spec_validator import validate as validate_spec

from flux_agent import Agent
from flux_agent.testing import make_event

from .support.agents import agent_config
from .support.capture import remember_secret
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
    assert "security" not in doc  # this agent runs with FLUX_AGENT_AUTH=none: it asks none


ROOT = Path(__file__).resolve().parent.parent


async def run_schemathesis(url: str, cwd: Path, *extra: str) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "SCHEMATHESIS_HOOKS": "tests.schemathesis_hooks",
           "PYTHONPATH": str(ROOT)}
    cmd = [sys.executable, "-m", "schemathesis.cli", "run", url + "/openapi.json",
           "--checks", "all", "--seed", "1",
           "--generation-allow-x00", "false",  # NUL is refused, by a rule JSON Schema lacks
           "--exclude-path", "/v1/drain",  # would stop the agent under test
           "--exclude-path-regex", "^/(health|metrics)",  # the admin listener's port
           "--request-timeout", "20", "--no-color", *extra]
    return await asyncio.to_thread(subprocess.run, cmd, capture_output=True, text=True,
                                   timeout=600, cwd=cwd, env=env)  # it leaves a cache behind


async def test_schemathesis_with_all_checks_finds_nothing_undocumented(
        agent: Agent, database: Database, tmp_path: Path):
    """Issue 26.13: every check schemathesis has (status codes, content types, headers,
    response schemas, schema-valid requests accepted, schema-violating ones refused, 405
    with Allow, ...) passes, but for schema-valid requests refused by one of the rules the
    document lists for the operation (x-flux-rules: a payload's hash, a cursor, a stale
    checkpoint version)."""
    url = agent.endpoints.event_url
    # Some data, so reads can find things as well as miss them.
    events = [make_event("run.started", run_id="st-run"), make_event(run_id="st-run")]
    await post(url + "/v1/events", events, headers={"Prefer": "wait=committed"})
    result = await run_schemathesis(url, tmp_path, "--max-examples", "40")
    assert result.returncode == 0, result.stdout[-8000:] + result.stderr[-3000:]
    counts = re.search(r"(\d+) generated, (\d+) passed", result.stdout)
    assert counts, result.stdout[-3000:]
    assert int(counts.group(1)) >= 300  # it really exercised the API
    assert counts.group(1) == counts.group(2)


async def test_schemathesis_with_authentication_on(database: Database, state_dir: Path,
                                                    tmp_path: Path):
    """With FLUX_AGENT_AUTH=jwt the document declares bearer tokens, and the agent refuses
    what it should: no token, a bad one (schemathesis's ignored_auth check)."""
    from flux_agent.core.settings import Secret
    from flux_agent.intake.tokens import mint

    secret = "s" * 40
    config = agent_config(database, state_dir, auth="jwt", agency="",
                          jwt_algorithms=("HS256",), jwt_issuers=("openapi-test",),
                          jwt_hs256_secret=Secret(secret))
    tok = mint(secret, algorithm="HS256", issuer="openapi-test", sub="st", agency="nasa",
               role="operator", ttl=3600)
    remember_secret(tok)
    async with Agent(config) as agent:
        url = agent.endpoints.event_url
        status, doc, _ = await get(url + "/openapi.json")
        assert status == 200 and doc["security"] == [{"bearer": []}]
        result = await run_schemathesis(url, tmp_path, "--max-examples", "8",
                                        "--phases", "coverage,fuzzing",
                                        "-H", f"Authorization: Bearer {tok}")
    assert result.returncode == 0, result.stdout[-8000:] + result.stderr[-3000:]
