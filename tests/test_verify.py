"""`flux-agent verify` never reports an intact event, and still reports a tampered one.

Payloads are hashed as canonical JSON and stored as jsonb, which respells two kinds of
number: a float of 1e16 or more comes back as an integer (2.5e16 -> 25000000000000000) and
-0.0 as 0.0. The agent records where (flux.events.payload_hint, sql/008) and verification
puts them back exactly; everything runs through a real PostgreSQL and the real command."""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import sys
from typing import Any

import asyncpg
from hypothesis import given, settings
from hypothesis import strategies as st

from flux_agent import Agent
from flux_agent.core.digest import canonical_json, sha256_hex
from flux_agent.postgres.jsonb import UNRECORDED, matches, respelled, sha256_of
from flux_agent.testing import make_event

from .support.http import get, post
from .support.postgres import Database

HASH = sha256_of(canonical_json)

# Numbers jsonb keeps and those it respells, in every position a payload can hold them.
numbers = (
    st.integers(min_value=-(2**63), max_value=2**64)
    | st.sampled_from([0, 10**16, 25000000000000000, 1733583600123456789, -(10**17)])
    | st.floats(allow_nan=False, allow_infinity=False)
    | st.sampled_from([0.0, -0.0, 1e16, 2.5e16, -1e16, 1e21, 1e22, 1.7976931348623157e308,
                       5e-324, 1e-7, 1e-5, 123.0, 1e15, 9007199254740993.0])
)
payloads = st.dictionaries(
    st.text(alphabet="ab/~0", max_size=4),
    st.recursive(numbers | st.text(alphabet="-0.e+5", max_size=6),
                 lambda children: st.lists(children, max_size=4)
                 | st.dictionaries(st.text(alphabet="xy/~", max_size=3), children,
                                   max_size=4),
                 max_leaves=12),
    min_size=1, max_size=5)


def collect(strategy: st.SearchStrategy[Any], count: int) -> list[Any]:
    found: list[Any] = []

    @settings(max_examples=count, deadline=None, database=None)
    @given(strategy)
    def take(value: Any) -> None:
        found.append(value)

    take()
    return found


def verify(database: Database, *args: str) -> tuple[int, list[dict[str, Any]], str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("FLUX_AGENT_")}
    env["FLUX_AGENT_DATABASE_URL"] = database.login_dsn
    done = subprocess.run([sys.executable, "-m", "flux_agent", "verify", "--agency", "nasa",
                           *args], env=env, capture_output=True, text=True, timeout=120)
    reports = [json.loads(line) for line in done.stdout.splitlines() if line.strip()]
    return done.returncode, reports, done.stderr


async def test_jsonb_round_trip_is_undone_exactly(database: Database):
    """Property: for any payload, PostgreSQL's own jsonb text plus the recorded hint gives
    back the hashed bytes; one changed digit, or a hint that does not fit, never does."""
    conn = await asyncpg.connect(database.login_dsn)
    try:
        hinted = 0
        for payload in collect(payloads, 600):
            text = canonical_json(payload).decode()
            digest = sha256_hex(text.encode())
            stored = await conn.fetchval("SELECT $1::jsonb::text", text)
            hint = respelled(text)
            hinted += hint is not None
            assert matches(stored, hint, digest, HASH), (text, stored, hint)
            # Rows written before hints were recorded: found by trying the spellings.
            assert matches(stored, UNRECORDED, digest, HASH) is not False, (text, stored)
            # Tampering: every number nudged in turn is caught.
            for nudged in _nudges(stored):
                assert matches(nudged, hint, digest, HASH) is False, (text, nudged)
        assert hinted > 50  # the strategy reaches what jsonb respells
    finally:
        await conn.close()


def _nudges(text: str) -> list[str]:
    """jsonb's ``text`` with one number changed at a time (the first few)."""
    value = json.loads(text)
    out: list[str] = []
    stack = [value]
    places = []
    while stack:
        node = stack.pop()
        items = node.items() if isinstance(node, dict) else enumerate(node)
        for key, item in items:
            if isinstance(item, (dict, list)):
                stack.append(item)
            elif isinstance(item, (int, float)) and not isinstance(item, bool):
                places.append((node, key, item))
    for node, key, item in places[:5]:
        node[key] = item + 1 if isinstance(item, int) else (item or 0.5) * 3
        out.append(json.dumps(value))
        node[key] = item
    return out


async def test_verify_never_reports_an_intact_event(agent: Agent, database: Database):
    url = agent.endpoints.event_url + "/v1/events"
    issue = [{"started_ns": 1733583600123456789, "bytes_total": 2.5e16},
             {"facets": {"x": {"offset": -0.0, "values": [0.0, -0.0, 1e16, 10000000000000000]}}},
             {"a/b": {"~c": [[-1e22, [-0.0]], 1e-7, 12345678901234567890]}}]
    sent = issue + collect(payloads, 300)
    for start in range(0, len(sent), 100):
        batch = [make_event(payload=p, run_id="exact") for p in sent[start:start + 100]]
        status, body, _ = await post(url, batch, headers={"Prefer": "wait=committed"})
        assert status == 200, body
    hints = await database.fetch("SELECT payload_hint::text FROM flux.events "
                                 "WHERE run_id = 'exact' AND payload_hint IS NOT NULL")
    assert len(hints) > 10  # what jsonb respells is recorded, and only where it is
    code, reports, stderr = await asyncio.to_thread(verify, database)
    assert code == 0, (reports[:5], stderr)
    assert reports[-1]["events"] == len(sent) and reports[-1]["mismatches"] == 0
    # The read API gives back the payload as it was hashed, too.
    first = (await database.fetch("SELECT event_id::text FROM flux.events WHERE run_id = "
                                  "'exact' AND payload_hint IS NOT NULL LIMIT 1"))[0][0]
    status, event, _ = await get(agent.endpoints.event_url + f"/v1/events/{first}")
    assert status == 200
    assert sha256_hex(canonical_json(event["payload"])) == event["payload_sha256"]


async def test_verify_still_reports_tampering(agent: Agent, database: Database):
    url = agent.endpoints.event_url + "/v1/events"
    events = [make_event(payload={"started_ns": 1733583600123456789, "bytes_total": 2.5e16},
                         run_id="tamper"),
              make_event(payload={"offset": -0.0, "n": 1}, run_id="tamper"),
              make_event(payload={"plain": 1}, run_id="tamper")]
    status, _, _ = await post(url, events, headers={"Prefer": "wait=committed"})
    assert status == 200
    code, _, _ = await asyncio.to_thread(verify, database, "--run", "tamper")
    assert code == 0
    # The superuser (past row-level security) changes what is stored:
    # the big float nudged by one (the same double, another stored number) ...
    await database.fetch("UPDATE flux.events SET payload = jsonb_set(payload, '{bytes_total}', "
                         "'25000000000000001') WHERE event_id = $1::uuid", events[0]["event_id"])
    # ... the hint erased (-0.0 can no longer be told from 0.0) ...
    await database.fetch("UPDATE flux.events SET payload_hint = NULL WHERE event_id = $1::uuid",
                         events[1]["event_id"])
    # ... and a plain value changed.
    await database.fetch("UPDATE flux.events SET payload = jsonb_set(payload, '{plain}', '2') "
                         "WHERE event_id = $1::uuid", events[2]["event_id"])
    code, reports, stderr = await asyncio.to_thread(verify, database, "--run", "tamper")
    assert code == 1, (reports, stderr)
    named = {r["id"] for r in reports if "stored_hash" in r}
    assert named == {e["event_id"] for e in events}


async def test_rows_stored_before_hints_are_verified_by_search(agent: Agent,
                                                               database: Database):
    """Rows written before sql/008 (or by an agent of the previous version, through
    flux.write_v1) read payload_hint "unrecorded": verify tries the spellings jsonb may
    have merged, and only those."""
    url = agent.endpoints.event_url + "/v1/events"
    intact = make_event(payload={"started_ns": 1733583600123456789, "bytes_total": 2.5e16,
                                 "zero": -0.0, "zeros": [0.0, 0.0]}, run_id="old")
    tampered = make_event(payload={"total": 2.5e16, "x": 1}, run_id="old")
    status, _, _ = await post(url, [intact, tampered], headers={"Prefer": "wait=committed"})
    assert status == 200
    await database.fetch("UPDATE flux.events SET payload_hint = '\"unrecorded\"' "
                         "WHERE run_id = 'old'")
    await database.fetch("UPDATE flux.events SET payload = jsonb_set(payload, '{x}', '2') "
                         "WHERE event_id = $1::uuid", tampered["event_id"])
    code, reports, _ = await asyncio.to_thread(verify, database, "--run", "old")
    assert code == 1
    assert [r["id"] for r in reports if "stored_hash" in r] == [tampered["event_id"]]
    assert reports[-1]["events"] == 2 and reports[-1]["unverifiable"] == 0
