"""Large OpenLineage RunEvents (issue 26.12): Spark's logical-plan facets exceed 256 KiB, and
OpenLineage's HTTP transport does not retry a 413, so such an event was lost at the
producer. ``POST /api/v1/lineage`` has its own limit (FLUX_AGENT_LINEAGE_MAX_BYTES, 4 MiB by
default); below it a RunEvent is stored exactly once, above it the answer says which limit."""

from __future__ import annotations

import asyncio
import gzip
import json
import uuid
from pathlib import Path
from typing import Any

import aiohttp
import pytest
import requests
from openlineage.client.transport.http import HttpCompression, HttpConfig, HttpTransport

from flux_agent import Agent
from flux_agent.testing import make_event

from .support.agents import agent_config
from .support.http import assert_problem, post
from .support.postgres import Database

KiB = 1024
MiB = 1024 * KiB
PRODUCER = "https://github.com/OpenLineage/OpenLineage/tree/1.0.0/integration/spark"


def spark_event(run_id: str, plan_bytes: int, event_type: str = "COMPLETE") -> dict[str, Any]:
    """A RunEvent with a Spark logical-plan facet of about ``plan_bytes`` of JSON."""
    node = {"class": "org.apache.spark.sql.catalyst.plans.logical.Project", "num-children": 1,
            "projectList": [[{"class": "org.apache.spark.sql.catalyst.expressions."
                              "AttributeReference", "num-children": 0, "name": f"col_{i}",
                              "dataType": "string", "nullable": True,
                              "exprId": {"id": i, "jvmId": str(uuid.UUID(int=i))}}]
                            for i in range(8)]}
    count = max(1, plan_bytes // len(json.dumps(node)))
    return {
        "eventType": event_type, "eventTime": "2026-11-23T08:00:00.123Z",
        "run": {"runId": run_id, "facets": {"spark.logicalPlan": {
            "_producer": PRODUCER,
            "_schemaURL": "https://openlineage.io/spec/facets/1-0-0/LogicalPlanFacet.json",
            "plan": [node] * count}}},
        "job": {"namespace": "spark", "name": "nightly.aggregate"},
        "producer": PRODUCER,
        "schemaURL": "https://openlineage.io/spec/2-0-2/OpenLineage.json#/$defs/RunEvent",
    }


class Recording(HttpTransport):
    """OpenLineage's own HTTP transport; remembers the status of each answer."""

    def __init__(self, config: HttpConfig) -> None:
        super().__init__(config)
        self.statuses: list[int] = []

    def emit(self, event: Any) -> Any:
        try:
            resp = super().emit(event)
        except requests.HTTPError as exc:  # what it raises for a 4xx or 5xx left
            self.statuses.append(exc.response.status_code if exc.response is not None else 0)
            return exc.response
        self.statuses.append(resp.status_code)
        return resp


async def emit_with_the_real_client(url: str, doc: dict[str, Any], times: int) -> list[int]:
    """What openlineage-python's HTTP transport (gzip, no retries) answers for ``doc``, sent
    ``times`` (its serialisation of the document, its compression, its headers)."""
    transport = Recording(HttpConfig(url=url, compression=HttpCompression.GZIP, timeout=60.0,
                                     retry={"total": 0}))

    def emit() -> None:
        for _ in range(times):
            transport.emit(doc)  # type: ignore[arg-type]

    try:
        await asyncio.to_thread(emit)
    finally:
        transport.close()
    return transport.statuses


async def stored(database: Database, run_id: str) -> list[Any]:
    return await database.fetch(
        "SELECT event_id::text, payload->'openlineage' AS doc, payload_sha256 FROM flux.events "
        "WHERE run_id = $1", run_id)


@pytest.mark.filterwarnings("ignore:Sending a large body directly:ResourceWarning")
async def test_a_large_run_event_is_stored_once_within_the_lineage_limit(
        database: Database, state_dir: Path):
    async with Agent(agent_config(database, state_dir)) as agent:
        url = agent.endpoints.event_url
        run_id = str(uuid.uuid4())
        doc = spark_event(run_id, int(1.5 * MiB))
        assert len(json.dumps(doc)) > 6 * 256 * KiB
        # The real transport (gzip), twice (a retry after a lost answer): stored once.
        assert await emit_with_the_real_client(url, doc, 2) == [201, 201]
        status, body, _ = await post(url + "/api/v1/lineage", doc,
                                     headers={"Prefer": "wait=committed"})
        assert status == 200 and body["duplicates"] == 1, body
        rows = await stored(database, run_id)
        assert len(rows) == 1
        assert json.loads(rows[0][1]) == doc
        # Read back whole, as stored.
        async with aiohttp.ClientSession() as session, session.get(
                f"{url}/v1/events/{rows[0][0]}") as resp:
            event = await resp.json()
        assert resp.status == 200 and event["payload"]["openlineage"] == doc
        # Plain JSON, not compressed, works as well.
        other = spark_event(str(uuid.uuid4()), 600 * KiB, "START")
        status, body, _ = await post(url + "/api/v1/lineage", other)
        assert status == 201 and body["accepted"] == 1, body
        # The limit of /v1/events is unchanged: a 300 KiB payload there is still 413.
        status, body, headers = await post(url + "/v1/events",
                                           make_event(payload={"blob": "x" * 300 * KiB}))
        assert_problem(status, body, headers, 413, "EVENT_TOO_LARGE")


@pytest.mark.filterwarnings("ignore:Sending a large body directly:ResourceWarning")
async def test_above_the_lineage_limit_the_answer_names_it(database: Database,
                                                           state_dir: Path):
    config = agent_config(database, state_dir, lineage_max_bytes=MiB)
    async with Agent(config) as agent:
        url = agent.endpoints.event_url + "/api/v1/lineage"
        # A body beyond the limit (here gzipped: the limit is on the decoded body).
        big = spark_event(str(uuid.uuid4()), int(1.2 * MiB))
        async with aiohttp.ClientSession() as session, session.post(
                url, data=gzip.compress(json.dumps(big).encode()),
                headers={"Content-Type": "application/json",
                         "Content-Encoding": "gzip"}) as resp:
            body = await resp.json(content_type=None)
            assert_problem(resp.status, body, resp.headers, 413, "REQUEST_TOO_LARGE")
        assert body["context"]["limit_bytes"] == MiB
        # What OpenLineage's transport then does: nothing more (a 413 is not retried).
        assert await emit_with_the_real_client(agent.endpoints.event_url, big, 1) == [413]
        # A body within the limit whose canonical JSON (non-ASCII text escaped) is beyond it.
        wide = spark_event(str(uuid.uuid4()), 10 * KiB)
        wide["run"]["facets"]["notes"] = {"_producer": PRODUCER, "_schemaURL": PRODUCER,
                                          "text": "数据" * (160 * KiB)}
        raw = json.dumps(wide, ensure_ascii=False).encode()
        assert len(raw) < MiB
        status, body, headers = await post(url, None, raw=raw)
        assert_problem(status, body, headers, 413, "EVENT_TOO_LARGE")
        assert body["context"]["limit_bytes"] == MiB
        # Nothing of either was stored.
        assert await database.fetchval("SELECT count(*) FROM flux.events") == 0
