"""Trace context end to end: a traceparent posted with an event is the trace stored with it
and in the request's log lines; with tracing on, the spans of intake, spool and flush."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

from flux_agent import Agent
from flux_agent.core.settings import load_config
from flux_agent.testing import make_event

from .support.agents import agent_config
from .support.capture import CAPTURED
from .support.http import post
from .support.polling import wait_until
from .support.postgres import Database

TRACE = "4bf92f3577b34da6a3ce929d0e0e4736"
PARENT = "00f067aa0ba902b7"


async def test_traceparent_is_stored_and_in_the_request_log_lines(agent: Agent,
                                                                   database: Database):
    seen_before = len(CAPTURED)
    event = make_event()
    status, _, headers = await post(agent.endpoints.event_url + "/v1/events", event,
                                    headers={"traceparent": f"00-{TRACE}-{PARENT}-01",
                                             "Prefer": "wait=committed"})
    assert status == 200
    row = (await database.fetch("SELECT trace_id, span_id, correlation_id FROM flux.events"))[0]
    assert row["trace_id"] == TRACE
    assert row["span_id"] == PARENT  # tracing off: the caller's span
    lines = [json.loads(line) for line in CAPTURED[seen_before:] if line.startswith("{")
             and '"logger":"aiohttp.access"' in line]
    mine = [line for line in lines if line["correlation_id"] == headers["X-Request-ID"]]
    assert mine, lines
    assert mine[0]["trace_id"] == TRACE
    assert mine[0]["fields"]["status"] == 200


async def test_spans_of_intake_spool_and_flush(database: Database, state_dir: Path):
    exporter = InMemorySpanExporter()
    async with Agent(agent_config(database, state_dir), span_exporter=exporter) as running:
        assert running.tracing.enabled
        events = [make_event(), make_event()]
        status, _, _ = await post(running.endpoints.event_url + "/v1/events", events,
                                  headers={"traceparent": f"00-{TRACE}-{PARENT}-01",
                                           "Prefer": "wait=committed"})
        assert status == 200

        async def flushed() -> bool:
            return any(s.name == "flux.flush" for s in exporter.get_finished_spans())

        assert await wait_until(flushed, 10)
    spans = {s.name: s for s in exporter.get_finished_spans()}
    server = spans["POST /v1/events"]
    assert f"{server.context.trace_id:032x}" == TRACE
    assert f"{server.parent.span_id:016x}" == PARENT
    durable = [e for e in server.events if e.name == "flux.spool.durable"]
    assert len(durable) == 1 and durable[0].attributes["flux.events"] == 2, server.events
    assert durable[0].attributes["flux.spool.wait_ms"] >= 0
    flush = spans["flux.flush"]
    assert flush.attributes["flux.events"] == 2
    assert [(link.context.trace_id, link.context.span_id) for link in flush.links] == [
        (server.context.trace_id, server.context.span_id)]
    rows = await database.fetch("SELECT DISTINCT trace_id, span_id FROM flux.events")
    assert [tuple(r) for r in rows] == [(TRACE, f"{server.context.span_id:016x}")]


@pytest.mark.parametrize(("env", "expected"), [
    ({}, "off"),
    ({"OTEL_EXPORTER_OTLP_ENDPOINT": "http://collector:4318"}, "otlp"),
    ({"OTEL_TRACES_EXPORTER": "console"}, "console"),
    ({"OTEL_TRACES_EXPORTER": "none", "OTEL_EXPORTER_OTLP_ENDPOINT": "http://c:4318"}, "off"),
    ({"OTEL_SDK_DISABLED": "true", "OTEL_TRACES_EXPORTER": "otlp"}, "off"),
    ({"FLUX_AGENT_TRACING": "on"}, "otlp"),
    ({"FLUX_AGENT_TRACING": "off", "OTEL_TRACES_EXPORTER": "otlp"}, "off"),
])
def test_tracing_follows_opentelemetry_variables(env: dict[str, str], expected: str):
    base = {"FLUX_AGENT_AUTH": "none", "FLUX_AGENT_AGENCY": "nasa"}
    assert load_config([], {**base, **env}).tracing == expected
