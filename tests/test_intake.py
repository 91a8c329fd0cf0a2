"""End to end through a real agent and a real PostgreSQL: what a workload sees."""

from __future__ import annotations

import asyncio
import contextlib
import gzip
import json
import logging
import os
import time
from pathlib import Path

import pytest

from flux_agent import Agent
from flux_agent.core.digest import canonical_json, sha256_hex
from flux_agent.testing import make_event, make_events

from .support.agents import agent_config
from .support.http import assert_problem, get, post
from .support.polling import wait_until
from .support.postgres import Database


@pytest.fixture
async def flux_profile_agent(database: Database, state_dir: Path):
    """An agent under the flux profile: its payload schema and five agencies."""
    async with Agent(agent_config(database, state_dir, schema_profile="flux")) as running:
        yield running


async def wait_rows(database: Database, count: int, timeout: float = 10.0) -> int:
    deadline = time.monotonic() + timeout
    n = 0
    while time.monotonic() < deadline:
        n = await database.fetchval("SELECT count(*) FROM flux.events")
        if n >= count:
            return int(n)
        await asyncio.sleep(0.02)
    return int(n)


async def test_single_event_over_tcp_lands_in_postgres(agent: Agent, database: Database):
    event = make_event("run.started", payload={"content_type": "text", "use_case": "search",
                                               "agency": "nasa", "note": "é ✓"})
    status, body, headers = await post(agent.endpoints.event_url + "/v1/events", event,
                                       headers={"X-Request-ID": "req-abc-1"})
    assert status == 202, body
    assert body == {"accepted": 1, "duplicates": 0, "event_ids": [event["event_id"]]}
    assert headers["X-Request-ID"] == "req-abc-1"
    assert await wait_rows(database, 1) == 1
    row = (await database.fetch("SELECT * FROM flux.events"))[0]
    assert str(row["event_id"]) == event["event_id"]
    assert row["agency_id"] == "nasa"
    assert row["kind"] == "run.started"
    assert row["correlation_id"] == "req-abc-1"
    assert json.loads(row["payload"]) == event["payload"]
    expected = sha256_hex(json.dumps(event["payload"], sort_keys=True,
                                     separators=(",", ":")).encode())
    assert row["payload_sha256"] == expected
    assert row["agent_id"]
    assert row["expires_at"] > row["received_at"]


async def test_unix_socket_is_mode_0660_and_accepts_events(agent: Agent, database: Database):
    sock = agent.endpoints.socket_path
    assert sock is not None
    assert sock.stat().st_mode & 0o777 == 0o660
    events = make_events(3)
    status, body, _ = await post("http://agent/v1/events", events, socket=sock)
    assert status == 202, body
    assert body["accepted"] == 3
    assert await wait_rows(database, 3) == 3


async def test_state_dir_and_every_file_in_it_are_private(database: Database, state_dir: Path,
                                                          caplog):
    """The state dir was 0755 and the seen index, checkpoint index and spool cursor 0644:
    every local user could read every agency's event ids and run and step names."""
    assert state_dir.stat().st_mode & 0o777 == 0o755  # as an older agent left it
    async with Agent(agent_config(database, state_dir)) as agent:
        status, _, _ = await post(agent.endpoints.event_url + "/v1/events",
                                  make_event(kind="checkpoint.saved", step="s"),
                                  headers={"Prefer": "wait=committed"})
        assert status == 200
        from .support.http import put

        status, _, _ = await put(agent.endpoints.event_url + "/v1/runs/r-private/checkpoint",
                                 {"step": "s", "state": {"offset": 1}})
        assert status == 201
    assert "tightened" in caplog.text
    # Search permission for the socket's group only, never read or write for anyone else.
    assert state_dir.stat().st_mode & 0o777 == 0o710
    files = [p for p in state_dir.rglob("*") if not p.is_dir()]
    assert {p.name for p in files} >= {"seen.idx", "checkpoints.idx", "agent.lock"}
    assert any(p.parent.name == "spool" and p.name != "cursor" for p in files)
    for path in files:
        assert path.stat().st_mode & 0o777 == 0o600, (path, oct(path.stat().st_mode))
    for path in (p for p in state_dir.rglob("*") if p.is_dir()):
        assert path.stat().st_mode & 0o077 == 0, path
    # Created by the agent: private from the start, whatever the umask.
    fresh = state_dir / "fresh"
    old_umask = os.umask(0)
    try:
        async with Agent(agent_config(database, fresh, socket="off")):
            pass
    finally:
        os.umask(old_umask)
    assert fresh.stat().st_mode & 0o777 == 0o700


async def test_ndjson_and_gzip_bodies(agent: Agent, database: Database):
    events = make_events(4)
    raw = "\n".join(json.dumps(e) for e in events).encode() + b"\n\n"
    status, body, _ = await post(agent.endpoints.event_url + "/v1/events", None, raw=raw,
                                 headers={"Content-Type": "application/x-ndjson"},
                                 compress=True)
    assert status == 202, body
    assert body["event_ids"] == [e["event_id"] for e in events]
    assert await wait_rows(database, 4) == 4


async def test_acceptance_1100_events_then_all_duplicates(agent: Agent, database: Database):
    """1,000 events in 10 batches over TCP plus 100 singles over the socket, all in
    flux.events within 10 s; posting them again changes nothing and reports duplicates."""
    url = agent.endpoints.event_url + "/v1/events"
    sock = agent.endpoints.socket_path
    batches = [make_events(100) for _ in range(10)]
    singles = make_events(100)
    started = time.monotonic()

    async def send_all() -> list[dict]:
        tasks = [post(url, b) for b in batches]
        tasks += [post("http://agent/v1/events", e, socket=sock) for e in singles]
        results = await asyncio.gather(*tasks)
        assert all(status == 202 for status, _, _ in results), results[:3]
        return [body for _, body, _ in results]

    first = await send_all()
    assert sum(b["accepted"] for b in first) == 1100
    assert await wait_rows(database, 1100, timeout=10) == 1100
    assert time.monotonic() - started < 10

    again = await send_all()
    assert sum(b["accepted"] for b in again) == 0
    assert sum(b["duplicates"] for b in again) == 1100
    assert agent.flusher is not None and await agent.flusher.drain(10)
    assert await database.fetchval("SELECT count(*) FROM flux.events") == 1100


async def test_duplicate_unknown_to_the_index_is_stored_once(
        database: Database, state_dir: Path):
    """Exactly-once never depends on the index: with it wiped, PostgreSQL still dedupes, and
    a committed wait reports the truth."""
    events = make_events(5)
    config = agent_config(database, state_dir, dedupe_index_size=2)
    async with Agent(config) as running:
        url = running.endpoints.event_url + "/v1/events"
        status, body, _ = await post(url, events, headers={"Prefer": "wait=committed"})
        assert status == 200, body
        assert body["accepted"] == 5
        running.seen.clear()
        status, body, headers = await post(url, events, headers={"Prefer": "wait=committed"})
        assert status == 200, body
        assert headers["Preference-Applied"] == "wait=committed"
        assert body["accepted"] == 0
        assert body["duplicates"] == 5
    assert await database.fetchval("SELECT count(*) FROM flux.events") == 5


async def test_duplicates_within_one_request(agent: Agent, database: Database):
    event = make_event()
    status, body, _ = await post(agent.endpoints.event_url + "/v1/events", [event, event])
    assert status == 202, body
    assert (body["accepted"], body["duplicates"]) == (1, 1)
    assert await wait_rows(database, 1) == 1


async def test_reused_event_id_with_other_payload_is_a_conflict(agent: Agent):
    event = make_event()
    url = agent.endpoints.event_url + "/v1/events"
    assert (await post(url, event))[0] == 202
    other = dict(event, payload={"items_processed": 999})
    status, body, headers = await post(url, other)
    assert_problem(status, body, headers, 409, "EVENT_ID_CONFLICT")
    assert body["errors"][0]["pointer"] == "/event_id"


async def test_batch_with_one_bad_event_stores_nothing(flux_profile_agent: Agent,
                                                      database: Database):
    agent = flux_profile_agent
    events = make_events(5)
    events[3]["payload"]["content_type"] = "video"
    events[3]["kind"] = "run.started"
    events[3]["payload"]["use_case"] = "research"
    status, body, headers = await post(agent.endpoints.event_url + "/v1/events", events)
    assert_problem(status, body, headers, 422, "INVALID_CONTENT_TYPE")
    assert body["errors"] == [{
        "pointer": "/3/payload/content_type", "code": "INVALID_CONTENT_TYPE",
        "message": body["errors"][0]["message"],
    }]
    assert "video" in body["errors"][0]["message"]
    assert agent.flusher is not None and await agent.flusher.drain(10)
    assert await database.fetchval("SELECT count(*) FROM flux.events") == 0


@pytest.mark.parametrize(
    ("mutate", "status", "code", "pointer"),
    [
        (lambda e: e.pop("run_id"), 422, "MISSING_FIELD", "/run_id"),
        (lambda e: e.update(run_id="-bad id"), 422, "INVALID_RUN_ID", "/run_id"),
        (lambda e: e.update(event_id="not-a-uuid"), 422, "INVALID_EVENT_ID", "/event_id"),
        (lambda e: e.update(kind="step.exploded"), 422, "INVALID_KIND", "/kind"),
        (lambda e: e.pop("step"), 422, "MISSING_FIELD", "/step"),
        (lambda e: e.update(occurred_at="yesterday"), 422, "INVALID_TIMESTAMP", "/occurred_at"),
        (lambda e: e.update(extra=1), 422, "UNKNOWN_FIELD", ""),
        (lambda e: e.update(agency="National-Archives"), 422, "INVALID_AGENCY_SLUG", "/agency"),
        (lambda e: e["payload"].update(agency="NASA"), 422, "INVALID_AGENCY_SLUG",
         "/payload/agency"),
        (lambda e: e["payload"].update(items_processed=-1), 422, "OUT_OF_RANGE",
         "/payload/items_processed"),
        (lambda e: e["payload"].update(items_processed=1.5), 422, "WRONG_TYPE",
         "/payload/items_processed"),
        (lambda e: e["payload"].update(duration_ms="fast"), 422, "WRONG_TYPE",
         "/payload/duration_ms"),
        (lambda e: e.update(payload=[1, 2]), 422, "WRONG_TYPE", "/payload"),
        (lambda e: e.update(payload_sha256="0" * 64), 422, "PAYLOAD_HASH_MISMATCH",
         "/payload_sha256"),
        (lambda e: e["payload"].update(note="nul\u0000here"), 422, "NUL_CHARACTER", ""),
        (lambda e: e.update(agency="noaa"), 403, "DATA_ISOLATION_ERROR", "/agency"),
        (lambda e: e["payload"].update(agency="noaa"), 403, "DATA_ISOLATION_ERROR",
         "/payload/agency"),
    ],
)
async def test_each_validation_error_has_status_code_and_pointer(
        flux_profile_agent: Agent, database: Database, mutate, status, code, pointer):
    agent = flux_profile_agent
    event = make_event()
    mutate(event)
    got, body, headers = await post(agent.endpoints.event_url + "/v1/events", event)
    assert_problem(got, body, headers, status, code)
    assert pointer in [e["pointer"] for e in body["errors"]], body["errors"]
    assert body["class"] == ("DATA_ISOLATION_ERROR" if status == 403 else "VALIDATION_ERROR")
    assert body["retryable"] is False


async def test_run_started_requires_content_type_and_use_case(flux_profile_agent: Agent):
    agent = flux_profile_agent
    event = make_event("run.started", payload={"agency": "nasa"})
    status, body, headers = await post(agent.endpoints.event_url + "/v1/events", [event])
    assert_problem(status, body, headers, 422, "MISSING_FIELD")
    assert sorted(e["pointer"] for e in body["errors"]) == [
        "/0/payload/content_type", "/0/payload/use_case"]


async def test_producer_hash_that_matches_is_accepted(agent: Agent, database: Database):
    event = make_event()
    event["payload_sha256"] = sha256_hex(canonical_json(event["payload"]))
    status, body, _ = await post(agent.endpoints.event_url + "/v1/events", event)
    assert status == 202, body


async def test_malformed_json_names_the_position(agent: Agent):
    url = agent.endpoints.event_url + "/v1/events"
    status, body, headers = await post(url, None, raw=b'{"event_id": "x",, }')
    assert_problem(status, body, headers, 400, "MALFORMED_JSON")
    assert body["context"]["position"] == 17
    status, body, headers = await post(url, None, raw=b'{"event_id": ')  # cut short
    assert_problem(status, body, headers, 400, "MALFORMED_JSON")
    assert body["context"]["position"] == 13  # where the body ended
    status, body, headers = await post(url, None, raw=b'{"a": 1e400}')
    assert_problem(status, body, headers, 400, "MALFORMED_JSON")
    status, body, headers = await post(url, None, raw=b"")
    assert_problem(status, body, headers, 400, "MALFORMED_JSON")
    status, body, headers = await post(url, None, raw=b"[]")
    assert_problem(status, body, headers, 422, "EMPTY_REQUEST")
    status, body, headers = await post(url, None, raw=b"not json",
                                       headers={"Content-Type": "application/x-ndjson"})
    assert_problem(status, body, headers, 400, "MALFORMED_JSON")
    assert "line 1" in body["detail"]


async def test_unsupported_media_type(agent: Agent):
    status, body, headers = await post(agent.endpoints.event_url + "/v1/events", None,
                                       raw=b"a=b", headers={"Content-Type": "text/csv"})
    assert_problem(status, body, headers, 415, "UNSUPPORTED_MEDIA_TYPE")


async def test_too_large_request_and_event(database: Database, state_dir: Path):
    config = agent_config(database, state_dir, request_max_bytes=200_000,
                          event_max_bytes=1000, spool_segment_bytes=1024 * 1024)
    async with Agent(config) as running:
        url = running.endpoints.event_url + "/v1/events"
        big = make_event(payload={"blob": "x" * 2000})
        status, body, headers = await post(url, [make_event(), big])
        assert_problem(status, body, headers, 413, "EVENT_TOO_LARGE")
        assert body["errors"][0]["pointer"] == "/1/payload"
        huge = make_events(1, payload={"blob": "y" * 300_000})
        status, body, headers = await post(url, huge)
        assert_problem(status, body, headers, 413, "REQUEST_TOO_LARGE")
        # Gzip does not get around the limit: it applies to the decoded body.
        status, body, headers = await post(url, huge, compress=True)
        assert_problem(status, body, headers, 413, "REQUEST_TOO_LARGE")


async def test_aiohttp_own_errors_are_problem_json(agent: Agent):
    status, body, headers = await get(agent.endpoints.event_url + "/v1/nothing-here")
    assert_problem(status, body, headers, 404, "NOT_FOUND")
    status, body, headers = await get(agent.endpoints.event_url + "/v1/events")
    assert_problem(status, body, headers, 405, "METHOD_NOT_ALLOWED")


async def test_bad_gzip_is_a_clear_400(agent: Agent):
    status, body, headers = await post(agent.endpoints.event_url + "/v1/events", None,
                                       raw=b"this is not gzip",
                                       headers={"Content-Encoding": "gzip"})
    assert status == 400, body
    assert headers["Content-Type"].startswith("application/problem+json")


async def test_agent_stays_up_after_every_error(agent: Agent, database: Database):
    url = agent.endpoints.event_url + "/v1/events"
    for raw in (b"{", b"[1,2,3]", b'"str"', b"null", b'{"payload": {}}', b"\xff\xfe"):
        status, body, headers = await post(url, None, raw=raw)
        assert 400 <= status < 500, (raw, body)
        assert headers["Content-Type"].startswith("application/problem+json")
    status, body, _ = await post(url, make_event())
    assert status == 202
    assert await wait_rows(database, 1) == 1


async def test_health_live_and_ready(agent: Agent):
    status, body, _ = await get(agent.endpoints.admin_url + "/health/live")
    assert status == 200
    assert body["status"] == "alive"
    status, body, _ = await get(agent.endpoints.admin_url + "/health/ready")
    assert status == 200
    assert body["status"] == "ready"
    assert body["database"] in {"up", "unknown"}
    # The event API does not serve health or metrics, and the admin port serves no events.
    assert (await get(agent.endpoints.event_url + "/metrics"))[0] == 404
    assert (await post(agent.endpoints.admin_url + "/v1/events", make_event()))[0] == 404


async def test_request_id_generated_when_absent_and_stored(agent: Agent, database: Database):
    status, _, headers = await post(agent.endpoints.event_url + "/v1/events", make_event())
    assert status == 202
    rid = headers["X-Request-ID"]
    assert len(rid) >= 16
    await wait_rows(database, 1)
    assert await database.fetchval("SELECT correlation_id FROM flux.events") == rid


async def test_traceparent_ids_are_stored(agent: Agent, database: Database):
    trace, span = "4bf92f3577b34da6a3ce929d0e0e4736", "00f067aa0ba902b7"
    status, _, _ = await post(agent.endpoints.event_url + "/v1/events", make_event(),
                              headers={"traceparent": f"00-{trace}-{span}-01"})
    assert status == 202
    await wait_rows(database, 1)
    row = (await database.fetch("SELECT trace_id, span_id FROM flux.events"))[0]
    assert row["trace_id"] == trace
    assert len(row["span_id"]) == 16


async def test_gzip_of_json_array(agent: Agent, database: Database):
    events = make_events(50)
    raw = gzip.compress(json.dumps(events).encode())
    status, body, _ = await post(agent.endpoints.event_url + "/v1/events", None, raw=raw,
                                 headers={"Content-Encoding": "gzip"})
    assert status == 202, body
    assert await wait_rows(database, 50) == 50


async def test_body_budget_waits_in_order_and_survives_cancellation():
    from flux_agent.intake.body import ByteBudget

    budget = ByteBudget(100)
    assert await budget.acquire(60) == 60
    order: list[str] = []

    async def take(name: str, n: int) -> None:
        await budget.acquire(n)
        order.append(name)

    first = asyncio.create_task(take("first", 50))
    second = asyncio.create_task(take("second", 10))  # fits, but must not overtake
    cancelled = asyncio.create_task(take("cancelled", 30))
    # All three queue (40 free, first wants 50).
    assert await wait_until(lambda: _async(len(budget._waiters) == 3), 5)
    assert order == []
    cancelled.cancel()
    with contextlib.suppress(asyncio.CancelledError):
        await cancelled
    budget.release(60)
    await asyncio.gather(first, second)
    assert order == ["first", "second"]
    assert budget.free == 40
    budget.release(60)
    assert await budget.acquire(10**9) == 100  # a request larger than the budget gets all of it


async def test_duplicate_index_survives_a_restart(database: Database, state_dir: Path):
    """Re-posts after a restart are still answered as duplicates (not only stored once)."""
    events = make_events(20)
    config = agent_config(database, state_dir)
    async with Agent(config) as first:
        status, body, _ = await post(first.endpoints.event_url + "/v1/events", events,
                                     headers={"Prefer": "wait=committed"})
        assert (status, body["accepted"]) == (200, 20)
    async with Agent(config) as second:
        assert len(second.seen) >= 20
        status, body, _ = await post(second.endpoints.event_url + "/v1/events", events)
        assert status == 202
        assert (body["accepted"], body["duplicates"]) == (0, 20)
    assert await database.fetchval("SELECT count(*) FROM flux.events") == 20


async def test_hostile_input_gets_a_precise_answer_never_a_500(agent: Agent, database: Database):
    """Inputs found by fuzzing a running agent: each once answered 500, or 503 as if
    PostgreSQL were down, or stored a run id the rules forbid."""
    from .support.http import put
    from .test_lineage import run_event

    url = agent.endpoints.event_url
    events = url + "/v1/events"
    bad_utf8 = b'{"event_id": "\xff"}'
    status, body, headers = await post(events, None, raw=bad_utf8)
    assert_problem(status, body, headers, 400, "MALFORMED_JSON")
    assert body["context"]["position"] == 14
    status, body, headers = await post(events, None, raw=b'{}\n' + bad_utf8,
                                       headers={"Content-Type": "application/x-ndjson"})
    assert_problem(status, body, headers, 400, "MALFORMED_JSON")
    assert "line 2" in body["detail"]
    status, body, headers = await post(url + "/api/v1/lineage", None, raw=bad_utf8)
    assert_problem(status, body, headers, 400, "MALFORMED_JSON")
    deep = b"[" * 5000 + b"]" * 5000
    status, body, headers = await post(events, None, raw=deep)
    assert_problem(status, body, headers, 400, "NESTING_TOO_DEEP")
    assert "nests" in body["detail"] and body["context"]["max_depth"] == 200

    # Valid RFC 3339, but before year 1 once converted to UTC.
    for edge in ("0001-01-01T00:00:00+14:00",
                 # asyncpg writes the two ends of the range as -infinity and infinity
                 "0001-01-01T00:00:00Z", "9999-12-31T23:59:59.999999Z"):
        status, body, headers = await post(events, make_event(occurred_at=edge))
        assert_problem(status, body, headers, 422, "INVALID_TIMESTAMP")
    status, body, headers = await post(
        url + "/api/v1/lineage", run_event(eventTime="9999-12-31T23:59:59-23:59"))
    assert_problem(status, body, headers, 422, "INVALID_TIMESTAMP")

    # Numbers: more digits than int() takes, and digits that are not ASCII.
    for if_match in ('"' + "9" * 4301 + '"', '"\uff13"', '"\u00b2"'):
        status, body, headers = await put(url + "/v1/runs/r-hostile/checkpoint",
                                          {"step": "s", "state": {}},
                                          headers={"If-Match": if_match})
        assert_problem(status, body, headers, 400, "INVALID_IF_MATCH")
    for limit in ("9" * 5000, "%C2%B2"):
        status, body, headers = await get(url + f"/v1/runs/r-hostile/events?limit={limit}")
        assert_problem(status, body, headers, 400, "INVALID_LIMIT")

    # Read parameters PostgreSQL would refuse are the caller's mistake, not an outage.
    import base64
    forged = base64.urlsafe_b64encode(b'["2026-01-01T00:00:00+00:00","not-a-uuid"]').decode()
    status, body, headers = await get(url + f"/v1/runs/r-hostile/events?cursor={forged}")
    assert_problem(status, body, headers, 400, "INVALID_CURSOR")
    status, body, headers = await get(url + "/v1/runs/r-hostile/events?step=%00")
    assert_problem(status, body, headers, 400, "INVALID_STEP")
    for path, code in (("/v1/runs/%00", "RUN_NOT_FOUND"),
                       ("/v1/runs/%00/events", "RUN_NOT_FOUND"),
                       ("/v1/runs/%00/checkpoint", "CHECKPOINT_NOT_FOUND"),
                       ("/v1/runs/%00/checkpoints", "CHECKPOINT_NOT_FOUND")):
        status, body, headers = await get(url + path)
        assert_problem(status, body, headers, 404, code)

    # "$" matches before a final newline: such a run id once got through and was stored.
    status, body, headers = await put(url + "/v1/runs/xyz%0A/checkpoint",
                                      {"step": "s", "state": {}})
    assert_problem(status, body, headers, 422, "INVALID_RUN_ID")

    # Thousands of invalid events buy a bounded answer, not one explanation each.
    status, body, headers = await post(events, None, raw=b"[" + b",".join([b"{}"] * 20000)
                                       + b"]")
    assert_problem(status, body, headers, 422)
    assert len(body["errors"]) == 100
    assert body["context"]["more_omitted"] is True
    assert len(json.dumps(body)) < 100_000

    # A gzip stream cut short decodes to nothing; that is not "the body is empty".
    status, body, headers = await post(events, None, raw=b"\x1f\x8b\x08\x00garbage",
                                       headers={"Content-Encoding": "gzip"})
    assert_problem(status, body, headers, 400, "INVALID_BODY")
    status, body, headers = await put(url + "/v1/runs/r-hostile/checkpoint",
                                      {"step": "s", "state": {}}, headers={"If-Match": "*"})
    assert_problem(status, body, headers, 412, "CHECKPOINT_VERSION_MISMATCH")
    assert "not any version" in body["detail"]

    assert await database.fetchval("SELECT count(*) FROM flux.events") == 0
    status, _, _ = await get(agent.endpoints.admin_url + "/health/ready")
    assert status == 200
    # A preference with parameters (RFC 7240) is still the preference.
    status, body, _ = await post(events, make_event(),
                                 headers={"Prefer": "wait=committed; timeout=5"})
    assert status == 200 and body["committed"] is True, body


async def test_unparseable_http_is_problem_json_and_quotes_nothing(agent: Agent, caplog):
    """aiohttp's own parser errors (before any middleware) once came back as text/plain
    quoting the bad header: the caller's bearer token included."""
    from urllib.parse import urlsplit

    parts = urlsplit(agent.endpoints.event_url)
    secret = "eyJhbGciOiJIUzI1NiJ9.c2VjcmV0LWNsYWltcw.c2lnbmF0dXJlLXNlY3JldA"

    async def raw(request: bytes) -> tuple[int, str, bytes]:
        reader, writer = await asyncio.open_connection(parts.hostname, parts.port)
        writer.write(request)
        await writer.drain()
        answer = await asyncio.wait_for(reader.read(65536), 10)
        writer.close()
        head, _, body = answer.partition(b"\r\n\r\n")
        lines = head.decode("latin-1").split("\r\n")
        ctype = next((ln.split(":", 1)[1].strip() for ln in lines
                      if ln.lower().startswith("content-type:")), "")
        return int(lines[0].split()[1]), ctype, body

    requests = [
        f"POST /v1/events HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {secret}\x01\r\n"
        "Content-Length: 2\r\n\r\n{}".encode("latin-1"),
        b"POST /v1/events HTTP/1.1\r\nHost: x\r\nX-Long: " + b"a" * 9000 + b"\r\n\r\n",
        b"POST /v1/events HTTP/1.1\r\nHost: x\r\nContent-Length: 2\r\nContent-Length: 3\r\n\r\n{}",
    ]
    status, ctype, body = await raw(b"POST /v1/events HTTP/1.1\r\nHost: x\r\nExpect: magic\r\n"
                                    b"Content-Length: 2\r\nConnection: close\r\n\r\n{}")
    assert status == 417 and ctype.startswith("application/problem+json"), (ctype, body)
    # curl sends Expect: 100-continue for bodies over 1 KiB: the body follows the 100.
    reader, writer = await asyncio.open_connection(parts.hostname, parts.port)
    event = json.dumps(make_event()).encode()
    writer.write(b"POST /v1/events HTTP/1.1\r\nHost: x\r\nExpect: 100-continue\r\n"
                 b"Content-Type: application/json\r\nConnection: close\r\n"
                 b"Content-Length: " + str(len(event)).encode() + b"\r\n\r\n")
    await writer.drain()
    interim = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 10)
    assert interim.startswith(b"HTTP/1.1 100"), interim
    writer.write(event)
    final = await asyncio.wait_for(reader.read(65536), 10)
    writer.close()
    assert final.startswith(b"HTTP/1.1 202"), final
    for request in requests:
        status, ctype, body = await raw(request)
        assert status == 400, body
        assert ctype.startswith("application/problem+json"), (ctype, body)
        problem = json.loads(body)
        assert problem["code"] == "BAD_REQUEST"
        assert secret.encode() not in body and b"aaaa" not in body
    # A caller that hangs up mid-body is not an agent failure worth a traceback.
    assert not [r for r in caplog.records if r.levelno >= logging.ERROR], caplog.text
    caplog.clear()
    with caplog.at_level(logging.DEBUG):
        _reader, writer = await asyncio.open_connection(parts.hostname, parts.port)
        writer.write(b"POST /v1/events HTTP/1.1\r\nHost: x\r\nContent-Length: 1000\r\n\r\n[{")
        await writer.drain()
        assert await wait_until(lambda: _async(agent.gate.inflight == 1), 5)
        writer.close()
        assert await wait_until(lambda: _async(agent.gate.inflight == 0), 10)
    assert not [r for r in caplog.records if r.levelno >= logging.ERROR], caplog.text
    # An encoding aiohttp does not know reaches the handler undecoded: 415, not a parse.
    status, ctype, body = await raw(b"POST /v1/events HTTP/1.1\r\nHost: x\r\n"
                                    b"Content-Encoding: snappy\r\nContent-Length: 2\r\n"
                                    b"Connection: close\r\n\r\n{}")
    assert status == 415 and json.loads(body)["code"] == "UNSUPPORTED_MEDIA_TYPE", body
    # x-gzip is not decoded by aiohttp, br and zstd need codecs it may lack: all 415.
    for encoding in (b"x-gzip", b"br", b"zstd"):
        status, ctype, body = await raw(b"POST /v1/events HTTP/1.1\r\nHost: x\r\n"
                                        b"Content-Encoding: " + encoding + b"\r\n"
                                        b"Content-Length: 2\r\nConnection: close\r\n\r\n{}")
        assert status == 415 and json.loads(body)["code"] == "UNSUPPORTED_MEDIA_TYPE", body
    status, _, _ = await get(agent.endpoints.admin_url + "/health/live")
    assert status == 200


@pytest.mark.parametrize(("method", "path", "ok"), [
    ("POST", "/v1/events", 202),
    ("PUT", "/v1/runs/stalled-1/checkpoint", 201),
    ("POST", "/api/v1/lineage", 201),
])
async def test_a_stalled_upload_cannot_hold_intake(database: Database, state_dir: Path,
                                                  method: str, path: str, ok: int):
    """Every route that reads a body reserves request memory by Content-Length before the
    body arrives; an upload that stalls holds it (others wait), gets 408 after
    FLUX_AGENT_REQUEST_BODY_TIMEOUT and gives the memory back."""
    from urllib.parse import urlsplit

    from .support.http import put
    from .test_lineage import run_event

    budget = 4 * 1024**2
    config = agent_config(database, state_dir, request_body_timeout=1.0,
                          request_memory_bytes=budget, request_max_bytes=budget)
    async with Agent(config) as agent:
        assert agent.api is not None
        bodies = agent.api.ingest.bodies.budget
        parts = urlsplit(agent.endpoints.event_url)
        reader, writer = await asyncio.open_connection(parts.hostname, parts.port)
        writer.write(f"{method} {path} HTTP/1.1\r\nHost: x\r\nContent-Type: application/json"
                     f"\r\nContent-Length: {budget}\r\n\r\n{{".encode())
        await writer.drain()
        assert await wait_until(lambda: _async(bodies.free == 0), 5), bodies.free
        # A second request of the same route waits for the memory the stalled one holds.
        url = agent.endpoints.event_url + path
        if method == "PUT":
            second = asyncio.ensure_future(put(url, {"step": "s", "state": {"n": 1}}))
        elif path == "/api/v1/lineage":
            second = asyncio.ensure_future(post(url, run_event("START")))
        else:
            second = asyncio.ensure_future(post(url, make_event()))
        assert await wait_until(lambda: _async(len(bodies._waiters) == 1), 5)
        assert not second.done()
        answer = await asyncio.wait_for(reader.read(65536), 10)
        writer.close()
        head, _, raw = answer.partition(b"\r\n\r\n")
        assert head.startswith(b"HTTP/1.1 408"), answer[:200]
        assert json.loads(raw)["code"] == "BODY_TIMEOUT"
        status, body, _ = await asyncio.wait_for(second, 10)
        assert status == ok, body
        assert bodies.free == budget


async def _async(value: bool) -> bool:
    return value
