"""The docs and /openapi.json say what the code does: every error code the agent can
answer is in the error table (docs/events.md), every metric it exports is in the metrics list, the
size limits are in the answers, and the admin routes are described on the admin listener."""

from __future__ import annotations

import ast
import re
from pathlib import Path
from typing import Any

import aiohttp

from flux_agent import Agent
from flux_agent.intake.routes.openapi import document
from flux_agent.testing import make_event, make_events

from .support.agents import agent_config
from .support.http import get, post
from .support.postgres import Database

ROOT = Path(__file__).resolve().parent.parent
EVENTS = (ROOT / "docs" / "events.md").read_text()  # the error table
OPERATIONS = (ROOT / "docs" / "operations.md").read_text()  # the metrics list
CODE = re.compile(r"^[A-Z][A-Z0-9]*(_[A-Z0-9]+)+$")
# Upper-case strings in the agent's modules that are not error codes.
NOT_CODES = {
    "VALIDATION_ERROR", "TRANSIENT_ERROR", "TERMINAL_ERROR", "CHECKPOINT_ERROR",  # classes
    "PG_VERSION", "POISON_CLASSES", "TCP_KEEPIDLE", "TCP_KEEPINTVL", "TCP_KEEPCNT",
    "TCP_USER_TIMEOUT", "XDG_STATE_HOME",
}


def _constants(path: Path) -> set[str]:
    return {node.value for node in ast.walk(ast.parse(path.read_text()))
            if isinstance(node, ast.Constant) and isinstance(node.value, str)}


async def put(url: str, body: Any) -> tuple[int, Any, Any]:
    async with aiohttp.ClientSession() as session, session.put(url, json=body) as resp:
        return resp.status, await resp.json(content_type=None), resp.headers


def test_every_error_code_the_agent_answers_is_in_the_readme_table():
    # The agent's side: the workload client (client/) and the injector (kube/) answer no
    # problem+json of the agent's.
    modules = [p for p in (ROOT / "flux_agent").rglob("*.py")
               if not {"client", "kube"} & set(p.relative_to(ROOT / "flux_agent").parts)]
    codes = {c for p in modules for c in _constants(p) if CODE.match(c)}
    codes -= NOT_CODES
    codes = {c for c in codes if not c.startswith(("FLUX_AGENT_", "OTEL_"))}
    table = EVENTS[EVENTS.index("### Errors"):EVENTS.index("## Checkpoints")]
    documented = set(re.findall(r"`([A-Z][A-Z0-9_]+)`", table))
    assert len(codes) > 60  # the scan still finds them
    assert codes <= documented, sorted(codes - documented)


def test_every_exported_metric_is_in_the_readme():
    names = {c for c in _constants(ROOT / "flux_agent" / "obs" / "metrics.py")
             if re.fullmatch(r"flux_[a-z_]+", c)}
    assert len(names) > 30
    listed = OPERATIONS[OPERATIONS.index("- **Metrics**"):OPERATIONS.index("- **Health**")]
    assert {n for n in names if n not in listed} == set()


def test_admin_routes_have_their_own_server_in_the_openapi_document():
    doc = document(["http://127.0.0.1:1"], ["http://127.0.0.1:2"])
    assert doc["servers"] == [{"url": "http://127.0.0.1:1"}]
    for path in ("/health/live", "/health/ready", "/health/deep", "/metrics"):
        assert [s["url"] for s in doc["paths"][path]["servers"]] == ["http://127.0.0.1:2"]
    assert "servers" not in doc["paths"]["/v1/events"]
    assert "/metrics" not in document(["http://127.0.0.1:1"], [])["paths"]  # admin off


async def test_the_documented_servers_answer_the_documented_paths(agent: Agent):
    status, doc, _ = await get(agent.endpoints.event_url + "/openapi.json")
    assert status == 200
    for path in ("/health/live", "/health/ready", "/metrics"):
        (server,) = doc["paths"][path]["servers"]
        assert server["url"] == agent.endpoints.admin_url
        assert (await get(server["url"] + path))[0] == 200
        assert (await get(doc["servers"][0]["url"] + path))[0] == 404  # not the event API's


async def test_too_large_answers_carry_the_limit(database: Database, state_dir: Path):
    config = agent_config(database, state_dir, request_max_bytes=200_000, event_max_bytes=1000,
                          spool_segment_bytes=1024 * 1024)
    async with Agent(config) as running:
        url = running.endpoints.event_url
        answers = {
            "EVENT_TOO_LARGE": await post(url + "/v1/events",
                                          make_event(payload={"blob": "x" * 2000})),
            "REQUEST_TOO_LARGE": await post(url + "/v1/events",
                                            make_events(1, payload={"blob": "y" * 300_000})),
            "CHECKPOINT_TOO_LARGE": await put(url + "/v1/runs/big/checkpoint",
                                              {"step": "s", "state": {"blob": "z" * 2000}}),
        }
    limits = {"EVENT_TOO_LARGE": 1000, "REQUEST_TOO_LARGE": 200_000,
              "CHECKPOINT_TOO_LARGE": 1000}
    for code, (status, body, _) in answers.items():
        assert (status, body["code"]) == (413, code), body
        assert body["context"]["limit_bytes"] == limits[code], body
