"""The read API (runs, events, pagination), agency isolation on reads, and retention."""

from __future__ import annotations

import asyncio
import uuid
from datetime import UTC, datetime, timedelta
from pathlib import Path

from flux_agent import Agent
from flux_agent.testing import make_event

from .support.agents import agent_config
from .support.http import assert_problem, get, post, put
from .support.paths import short_tempdir
from .support.polling import wait_until
from .support.postgres import Database


def at(seconds: float) -> str:
    base = datetime(2026, 11, 1, tzinfo=UTC)
    return (base + timedelta(seconds=seconds)).isoformat().replace("+00:00", "Z")


async def test_run_summary_events_and_one_event(agent: Agent):
    url = agent.endpoints.event_url
    events = [make_event("run.started", run_id="r-sum", occurred_at=at(0))]
    events += [make_event("step.completed", run_id="r-sum", step=f"s{i}", occurred_at=at(i))
               for i in range(1, 4)]
    events.append(make_event("run.completed", run_id="r-sum", occurred_at=at(10)))
    status, _, _ = await post(url + "/v1/events", events, headers={"Prefer": "wait=committed"})
    assert status == 200
    status, body, _ = await get(url + "/v1/runs/r-sum")
    assert status == 200
    assert body["status"] == "completed"
    assert body["last_step"] == "s3"
    assert body["first_event_at"] == at(0)
    assert body["last_event_at"] == at(10)
    assert body["counts_by_kind"] == {"run.started": 1, "step.completed": 3,
                                      "run.completed": 1}
    # A checkpoint saved after the end is bookkeeping: the run stays completed.
    status, body, _ = await put(url + "/v1/runs/r-sum/checkpoint",
                                {"step": "done", "state": {"offset": 3}},
                                headers={"Prefer": "wait=committed"})
    assert status in (200, 201), body
    status, body, _ = await get(url + "/v1/runs/r-sum")
    assert body["last_event"]["kind"] == "checkpoint.saved", body
    assert body["status"] == "completed"
    status, body, _ = await get(url + "/v1/runs/r-sum/events?kind=step.completed&step=s2")
    assert [e["step"] for e in body["events"]] == ["s2"]
    status, body, _ = await get(url + f"/v1/events/{events[2]['event_id']}")
    assert status == 200
    assert body["payload"] == events[2]["payload"]
    assert body["agency"] == "nasa"
    for path, code in (("/v1/runs/nope", "RUN_NOT_FOUND"),
                       ("/v1/runs/nope/events", "RUN_NOT_FOUND"),
                       ("/v1/events/0190f0b2-2f6c-7c3e-9d4a-000000000000", "EVENT_NOT_FOUND"),
                       ("/v1/events/not-a-uuid", "EVENT_NOT_FOUND")):
        status, body, headers = await get(url + path)
        assert_problem(status, body, headers, 404, code)
    for path, code in (("/v1/runs/r-sum/events?cursor=garbage", "INVALID_CURSOR"),
                       ("/v1/runs/r-sum/events?limit=0", "INVALID_LIMIT"),
                       ("/v1/runs/r-sum/events?kind=nope", "INVALID_KIND")):
        status, body, headers = await get(url + path)
        assert_problem(status, body, headers, 400, code)


async def test_pagination_is_stable_under_concurrent_inserts(agent: Agent):
    url = agent.endpoints.event_url
    # 240 events at scattered times, several sharing a timestamp (ties break on event_id).
    first = [make_event(run_id="r-page", occurred_at=at((i * 37) % 120)) for i in range(240)]
    status, _, _ = await post(url + "/v1/events", first, headers={"Prefer": "wait=committed"})
    assert status == 200
    seen: list[str] = []
    inserted: list[str] = []

    async def writer() -> None:
        for n in range(10):
            batch = [make_event(run_id="r-page", occurred_at=at(n * 13 % 150)) for _ in range(10)]
            status, body, _ = await post(url + "/v1/events", batch,
                                         headers={"Prefer": "wait=committed"})
            assert status == 200 and body["accepted"] == 10, body
            inserted.extend(e["event_id"] for e in batch)

    async def reader() -> None:
        cursor = None
        while True:
            query = f"?limit=25{'&cursor=' + cursor if cursor else ''}"
            status, body, _ = await get(url + "/v1/runs/r-page/events" + query)
            assert status == 200
            page = body["events"]
            keys = [(e["occurred_at"], e["event_id"]) for e in page]
            assert keys == sorted(keys)
            seen.extend(e["event_id"] for e in page)
            cursor = body["next_cursor"]
            if cursor is None:
                return

    await asyncio.gather(writer(), reader())
    assert len(seen) == len(set(seen)), "a row was repeated across pages"
    assert {e["event_id"] for e in first} <= set(seen), "a row that existed was skipped"
    assert set(seen) <= {e["event_id"] for e in first} | set(inserted)


async def test_another_agencys_data_is_404_not_403(database: Database, state_dir: Path):
    other_state = short_tempdir()
    nasa_cfg = agent_config(database, state_dir, agency="nasa")
    noaa_cfg = agent_config(database, other_state, agency="noaa")
    async with Agent(nasa_cfg) as nasa, Agent(noaa_cfg) as noaa:
        event = make_event("run.started", run_id="shared-name")
        status, _, _ = await post(nasa.endpoints.event_url + "/v1/events", event,
                                  headers={"Prefer": "wait=committed"})
        assert status == 200
        status, _, _ = await put(nasa.endpoints.event_url + "/v1/runs/shared-name/checkpoint",
                                 {"step": "s", "state": {"secret": "nasa-only"}},
                                 headers={"Prefer": "wait=committed"})
        assert status == 201
        url = noaa.endpoints.event_url
        for path, code in (("/v1/runs/shared-name", "RUN_NOT_FOUND"),
                           ("/v1/runs/shared-name/checkpoint", "CHECKPOINT_NOT_FOUND"),
                           ("/v1/runs/shared-name/checkpoints", "CHECKPOINT_NOT_FOUND"),
                           ("/v1/runs/shared-name/events", "RUN_NOT_FOUND"),
                           (f"/v1/events/{event['event_id']}", "EVENT_NOT_FOUND")):
            status, body, headers = await get(url + path)
            assert_problem(status, body, headers, 404, code)
            assert "nasa-only" not in str(body)
        # The same run name is independent per agency.
        status, body, _ = await get(nasa.endpoints.event_url + "/v1/runs/shared-name")
        assert status == 200


async def test_retention_removes_only_expired_rows_in_one_agent(database: Database):
    states = [short_tempdir() for _ in range(3)]
    configs = [agent_config(database, s, retention_interval=0.2, retention_batch=7)
               for s in states]
    async with Agent(configs[0]) as first:
        # uuid4 ids: rows without a time, which retention deletes row by row (events in a
        # time partition leave with it: tests/test_partitions.py).
        events = [make_event(run_id=f"ret-{i % 3}", event_id=str(uuid.uuid4()))
                  for i in range(50)]
        status, _, _ = await post(first.endpoints.event_url + "/v1/events", events,
                                  headers={"Prefer": "wait=committed"})
        assert status == 200
    expired = [e["event_id"] for e in events[:30]]
    await database.fetch("UPDATE flux.events SET expires_at = now() - interval '1 day' "
                         "WHERE event_id = ANY($1::uuid[])", expired)
    async with Agent(configs[0]) as a, Agent(configs[1]) as b, Agent(configs[2]) as c:
        async def purged() -> bool:
            return await database.fetchval("SELECT count(*) FROM flux.events") == 20

        assert await wait_until(purged, 20)
        await asyncio.sleep(0.6)
        rounds = [agent.retention.rounds for agent in (a, b, c)]
        assert sum(1 for r in rounds if r) == 1, rounds  # one agent holds the lease
        holder = next(agent for agent in (a, b, c) if agent.retention.rounds)
        _, metrics, _ = await get(holder.endpoints.admin_url + "/metrics")
        assert 'flux_retention_purged_rows_total{table="events"} 30.0' in metrics
    kept = {str(r[0]) for r in await database.fetch("SELECT event_id FROM flux.events")}
    assert kept == {e["event_id"] for e in events[30:]}


async def test_a_read_that_breaks_for_another_reason_than_the_database_is_a_logged_500(
        database: Database, state_dir: Path, caplog):
    """Only "the database is away" is a retryable 503. A query PostgreSQL refuses for a
    reason that retrying cannot fix (here: a column renamed behind the agent's back) is a
    500 with the error id, logged once with its traceback."""
    import logging

    import asyncpg

    async with Agent(agent_config(database, state_dir)) as agent:
        url = agent.endpoints.event_url
        status, _, _ = await post(url + "/v1/events", make_event(run_id="r-broken"),
                                  headers={"Prefer": "wait=committed"})
        assert status == 200
        conn = await asyncpg.connect(database.admin_dsn)
        await conn.execute("ALTER TABLE flux.events RENAME COLUMN step TO step_renamed")
        await conn.close()
        caplog.clear()
        with caplog.at_level(logging.ERROR):
            status, body, headers = await get(url + "/v1/runs/r-broken/events")
        assert_problem(status, body, headers, 500, "INTERNAL_ERROR")
        assert body["retryable"] is False
        errors = [r for r in caplog.records if r.levelno >= logging.ERROR]
        assert len(errors) == 1 and errors[0].exc_info is not None, errors
        assert "UndefinedColumnError" in errors[0].exc_text or "step" in str(errors[0].exc_info)
