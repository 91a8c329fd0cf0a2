"""Deep nesting: every route that takes JSON answers a precise 400 past the nesting limit,
never a 500, at any depth up to what the JSON decoder refuses itself.

The decoder accepts almost 1,000 levels. What ran after it recursed on that depth and
failed a few levels short: canonical JSON (a checkpoint state ~982 deep, an OpenLineage
facet ~977 deep: 500 INTERNAL_ERROR), and the schema validator's explanations of an invalid
event (beyond ~255 levels: "Recursion limit reached", 500). The limit is now checked by the
walks that precede those, iteratively, with the path to the first level too deep."""

from __future__ import annotations

import json
import logging
import uuid
from typing import Any

import aiohttp
import pytest

from flux_agent import Agent
from flux_agent.core.digest import MAX_DEPTH

from .support.capture import CAPTURED
from .support.http import PROBLEM

EVENT = ('{"event_id":"%s","run_id":"deep","kind":"step.completed","step":"s",'
         '"occurred_at":"2026-12-07T00:00:00Z","payload":{"v":%s}%s}')
RUN_EVENT = ('{"eventType":"RUNNING","eventTime":"2026-12-07T00:00:00Z","run":{"runId":"%s",'
             '"facets":{"deep":{"_producer":"https://example.com/p",'
             '"_schemaURL":"https://example.com/s#/$defs/F","v":%s}}},'
             '"job":{"namespace":"n","name":"j"},"producer":"https://example.com/p",'
             '"schemaURL":"https://openlineage.io/spec/2-0-2/OpenLineage.json#/$defs/RunEvent"}')
ROUTES = ("event", "array", "ndjson", "checkpoint", "lineage")
# Where the value `v` sits in what each route limits: an event's payload and a checkpoint's
# state are level 1 and `v` level 2; in a RunEvent `v` is level 5 (run, facets, deep, v).
V_LEVEL = {"event": 2, "array": 2, "ndjson": 2, "checkpoint": 2, "lineage": 5}
# The JSON pointer, in the request body, of the value `v`.
V_POINTER = {"event": "/payload/v", "array": "/0/payload/v", "ndjson": "/0/payload/v",
             "checkpoint": "/state/v", "lineage": "/run/facets/deep/v"}


def nested(levels: int, kind: str = "[") -> str:
    """JSON text of `levels` arrays (or objects) around 1, built without recursion."""
    if levels <= 0:
        return "1"
    if kind == "[":
        return "[" * levels + "1" + "]" * levels
    return '{"a":' * levels + "1" + "}" * levels


async def send(agent: Agent, route: str, value: str, extra: str = ""
               ) -> tuple[int, dict[str, Any]]:
    """One request of `route` carrying `value` (JSON text) as `v`, as shown in V_POINTER."""
    url = agent.endpoints.event_url
    one = (EVENT % (uuid.uuid4(), value, extra)).encode()
    method, path, ctype = "POST", "/v1/events", "application/json"
    if route == "event":
        body = one
    elif route == "array":
        body = b"[" + one + b"]"
    elif route == "ndjson":
        body, ctype = one + b"\n", "application/x-ndjson"
    elif route == "checkpoint":
        method, path = "PUT", "/v1/runs/deep/checkpoint"
        body = ('{"step":"s","state":{"v":' + value + "}" + extra + "}").encode()
    else:
        path = "/api/v1/lineage"
        body = (RUN_EVENT % (uuid.uuid4(), value)).encode()
    async with aiohttp.ClientSession() as session, session.request(
            method, url + path, data=body, headers={"Content-Type": ctype}) as resp:
        text = await resp.read()
        CAPTURED.append(text.decode(errors="replace"))
        if resp.status >= 400:
            assert resp.headers["Content-Type"].startswith(PROBLEM), (route, resp.status)
        return resp.status, json.loads(text) if text else {}


def too_deep(route: str, status: int, body: dict[str, Any]) -> None:
    assert status == 400, (route, status, body)
    assert body["code"] == "NESTING_TOO_DEEP", (route, body)
    assert body["class"] == "VALIDATION_ERROR"
    assert body["context"]["max_depth"] == MAX_DEPTH
    assert str(MAX_DEPTH) in body["detail"]


@pytest.mark.parametrize("kind", ["[", "{"])
async def test_the_limit_is_exact_on_every_route(agent: Agent, kind: str):
    for route in ROUTES:
        deepest = MAX_DEPTH - V_LEVEL[route] + 1  # levels of `v`, itself at V_LEVEL
        status, body = await send(agent, route, nested(deepest, kind))
        assert status in (201, 202), (route, status, body)
        status, body = await send(agent, route, nested(deepest + 1, kind))
        too_deep(route, status, body)
        [error] = body["errors"]
        # The pointer leads to the first array or object one level too deep.
        step = "/0" if kind == "[" else "/a"
        assert error["pointer"] == V_POINTER[route] + step * deepest, (route, error)
        assert error["code"] == "NESTING_TOO_DEEP"


async def test_no_depth_answers_500(agent: Agent, caplog: pytest.LogCaptureFixture):
    """Every depth from the limit to beyond what the decoder takes, on every route: a 400
    naming the limit (the decoder's own refusal included), never a 500 and never an ERROR
    line. The old 500s were a few levels wide, just short of the decoder's limit (which
    moves with the stack it is called on): every depth is tried there."""
    depths = [*range(MAX_DEPTH + 1, 900, 97), *range(900, 1010)]
    answers = {(route, depth): await send(agent, route, nested(depth))
               for route in ROUTES for depth in depths}
    failed = sorted((route, depth, status, body.get("code"))
                    for (route, depth), (status, body) in answers.items() if status >= 500)
    assert not failed, failed
    for (route, _), (status, body) in answers.items():
        too_deep(route, status, body)
    assert not [r for r in caplog.records if r.levelno >= logging.ERROR], caplog.text


async def test_an_invalid_event_nested_deep_is_explained_or_refused_never_500(agent: Agent):
    """The schema validator's explanation of an invalid document converts the document, and
    gave up beyond ~255 levels (ValueError: 500): a deep payload or state beside an unknown
    field, and a deep value where a string belongs."""
    url = agent.endpoints.event_url
    answers: dict[tuple[str, int], tuple[int, dict[str, Any]]] = {}
    for route in ("event", "array", "ndjson", "checkpoint"):
        for depth in (MAX_DEPTH - 2, MAX_DEPTH - 1, MAX_DEPTH, 260, 600):
            answers[route, depth] = await send(agent, route, nested(depth), extra=',"bogus":1')
    for depth in (100, 300, 600):
        deep_run_id = (EVENT % (uuid.uuid4(), "1", "")).replace(
            '"run_id":"deep"', '"run_id":' + nested(depth))
        async with aiohttp.ClientSession() as session, session.post(
                url + "/v1/events", data=deep_run_id,
                headers={"Content-Type": "application/json"}) as resp:
            answers["run_id", depth] = resp.status, await resp.json(content_type=None)
    failed = sorted((route, depth, status, body.get("code"))
                    for (route, depth), (status, body) in answers.items() if status >= 500)
    assert not failed, failed
    for (route, depth), (status, body) in answers.items():
        if route == "run_id":
            if depth < MAX_DEPTH:
                assert status == 422 and body["code"] == "WRONG_TYPE", body
            else:
                too_deep(route, status, body)
                assert body["errors"][0]["pointer"] == "/run_id" + "/0" * MAX_DEPTH
        elif depth < MAX_DEPTH:  # within the limit: the real violation, explained
            assert status == 422, (route, depth, status, body)
            assert body["code"] == "UNKNOWN_FIELD"
        else:
            too_deep(route, status, body)
