"""Read answers bounded by bytes as well as rows (issue 26.2) and the list of runs (27.5):
pages stop at the page byte budget and their cursor continues where they stopped, directly
and through an aggregator; answers nobody reads cannot hold the agent's memory (the real
process's RSS is measured); beyond the answers' share of request memory a read is 503."""

from __future__ import annotations

import asyncio
import json
import random
import socket
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import aiohttp

from flux_agent import Agent
from flux_agent.testing import make_event

from .support.agents import AgentProcess, agent_config, agent_env
from .support.http import assert_problem, get, post
from .support.paths import short_tempdir
from .support.polling import wait_until
from .support.postgres import Database

KiB = 1024
MiB = 1024 * KiB


def at(seconds: float) -> str:
    base = datetime(2026, 11, 2, tzinfo=UTC)
    return (base + timedelta(seconds=seconds)).isoformat().replace("+00:00", "Z")


async def post_all(url: str, events: list[dict[str, Any]], per_request: int = 10) -> None:
    for i in range(0, len(events), per_request):
        status, body, _ = await post(url + "/v1/events", events[i:i + per_request],
                                     headers={"Prefer": "wait=committed"})
        assert status == 200, body


async def get_raw(url: str) -> tuple[int, bytes, dict[str, str]]:
    async with aiohttp.ClientSession() as session, session.get(url) as resp:
        return resp.status, await resp.read(), dict(resp.headers)


async def walk(url: str, path: str, key: str, limit: int, budget: int,
               largest: int, cursor: str | None = None) -> list[dict[str, Any]]:
    """Every item of every page, following next_cursor; each page within the budget."""
    items: list[dict[str, Any]] = []
    for _ in range(1000):
        sep = "&" if "?" in path else "?"
        query = f"{sep}limit={limit}" + (f"&cursor={cursor}" if cursor else "")
        status, raw, _ = await get_raw(url + path + query)
        assert status == 200, raw[:300]
        page = json.loads(raw)
        assert 1 <= len(page[key]) <= limit or (not page[key] and not page["next_cursor"])
        if len(page[key]) > 1:
            # A page ends before it would exceed the budget; one item may be larger alone.
            assert len(raw) <= budget + 1024, (len(raw), len(page[key]))
        else:
            assert len(raw) <= max(budget, largest) + 1024
        items += page[key]
        assert page["next_cursor"] is None or page["next_cursor"] != cursor, page
        cursor = page["next_cursor"]
        if cursor is None:
            return items
    raise AssertionError("the cursor never ended")


async def test_pages_stop_at_the_byte_budget_and_the_cursor_walks_every_event_once(
        database: Database, state_dir: Path):
    budget = 64 * KiB
    config = agent_config(database, state_dir, read_page_max_bytes=budget)
    rng = random.Random(26)
    # Payloads from a few bytes to twice the budget, several events sharing a timestamp.
    sizes = [rng.choice([10, 300, 5 * KiB, 20 * KiB, 40 * KiB, 2 * budget])
             for _ in range(150)]
    events = [make_event(run_id="bytes-run", occurred_at=at(i // 3),
                         payload={"blob": "x" * size, "n": i}) for i, size in enumerate(sizes)]
    async with Agent(config) as agent:
        url = agent.endpoints.event_url
        await post_all(url, events)
        expected = [e["event_id"] for e in sorted(
            events, key=lambda e: (e["occurred_at"], e["event_id"]))]
        for limit in (1000, 7, 1):
            got = await walk(url, "/v1/runs/bytes-run/events", "events", limit, budget,
                             2 * budget + 2 * KiB)
            ids = [e["event_id"] for e in got]
            assert ids == expected, limit  # every event once, in order
        # With a filter too.
        got = await walk(url, "/v1/runs/bytes-run/events?kind=step.completed", "events",
                         1000, budget, 2 * budget + 2 * KiB)
        assert len(got) == len(events)
        # Many small events: rows, not bytes, end the page.
        small = [make_event(run_id="small-run", occurred_at=at(i)) for i in range(30)]
        await post_all(url, small, 30)
        status, page, _ = await get(url + "/v1/runs/small-run/events?limit=30")
        assert status == 200 and len(page["events"]) == 30 and page["next_cursor"] is None


async def test_the_runs_list_is_newest_first_and_paged(database: Database, state_dir: Path):
    config = agent_config(database, state_dir, read_page_max_bytes=64 * KiB)
    async with Agent(config) as agent:
        url = agent.endpoints.event_url
        status, page, _ = await get(url + "/v1/runs")
        assert status == 200 and page == {"runs": [], "next_cursor": None}
        events = []
        for r in range(25):
            run = f"list-{r:02d}"
            events.append(make_event("run.started", run_id=run, occurred_at=at(r * 10)))
            events.append(make_event(run_id=run, occurred_at=at(r * 10 + 5)))
            if r % 3 == 0:
                events.append(make_event("run.failed", run_id=run, occurred_at=at(r * 10 + 6)))
            if r % 5 == 0:  # a checkpoint after the end does not change the status
                events.append(make_event("checkpoint.saved", run_id=run,
                                         occurred_at=at(r * 10 + 7)))
        await post_all(url, events, 50)
        got = await walk(url, "/v1/runs", "runs", 4, 64 * KiB, 1024)
        assert [r["run_id"] for r in got] == [f"list-{r:02d}" for r in reversed(range(25))]
        by_id = {r["run_id"]: r for r in got}
        assert by_id["list-03"]["status"] == "failed"
        assert by_id["list-04"]["status"] == "running"
        assert by_id["list-15"]["status"] == "failed"
        assert by_id["list-04"]["first_event_at"] == at(40)
        assert by_id["list-04"]["last_event_at"] == at(45)
        assert by_id["list-05"]["events"] == 3
        # A later event of a listed run does not move it between pages.
        status, first, _ = await get(url + "/v1/runs?limit=5")
        await post_all(url, [make_event(run_id="list-10", occurred_at=at(900))])
        rest = await walk(url, "/v1/runs", "runs", 5, 64 * KiB, 1024, first["next_cursor"])
        names = [r["run_id"] for r in first["runs"] + rest]
        assert sorted(names) == sorted(by_id) and len(names) == len(set(names))
        for query, code in (("?cursor=garbage", "INVALID_CURSOR"),
                            ("?limit=0", "INVALID_LIMIT")):
            status, body, headers = await get(url + "/v1/runs" + query)
            assert_problem(status, body, headers, 400, code)
        # An events cursor is not a runs cursor.
        status, page, _ = await get(url + "/v1/runs/list-01/events?limit=1")
        status, body, headers = await get(url + f"/v1/runs?cursor={page['next_cursor']}")
        assert_problem(status, body, headers, 400, "INVALID_CURSOR")
        # Another agency's runs are not listed.
        other = agent_config(database, short_tempdir(), agency="noaa")
        async with Agent(other) as noaa:
            status, page, _ = await get(noaa.endpoints.event_url + "/v1/runs")
            assert status == 200 and page["runs"] == []


async def test_a_sidecar_pages_through_its_aggregator_within_its_own_budget(
        database: Database, state_dir: Path):
    aggregator = agent_config(database, state_dir, role="aggregator", socket="off",
                              read_page_max_bytes=MiB)
    async with Agent(aggregator) as agg:
        side = agent_config(database, short_tempdir(), database_url=None,
                            upstream=(agg.endpoints.event_url,), read_page_max_bytes=64 * KiB)
        async with Agent(side) as sidecar:
            url = sidecar.endpoints.event_url
            events = [make_event(run_id="fwd-bytes", occurred_at=at(i),
                                 payload={"blob": "y" * (9 * KiB), "n": i}) for i in range(40)]
            await post_all(url, events)
            got = await walk(url, "/v1/runs/fwd-bytes/events", "events", 1000, 64 * KiB,
                             12 * KiB)
            assert [e["event_id"] for e in got] == [e["event_id"] for e in events]
            assert got[3]["payload"] == events[3]["payload"]
            runs = await walk(url, "/v1/runs", "runs", 1000, 64 * KiB, 1024)
            assert [r["run_id"] for r in runs] == ["fwd-bytes"]


async def test_reads_beyond_the_answers_share_are_503(database: Database, state_dir: Path):
    """Unread answers fill the answers' share of request memory; then pages shrink, and
    when not even a small one fits, reads are refused at once (503, Retry-After)."""
    config = agent_config(database, state_dir, request_memory_bytes=16 * MiB,
                          request_max_bytes=MiB, lineage_max_bytes=MiB,
                          read_page_max_bytes=MiB, request_body_timeout=30.0)
    async with Agent(config) as agent:
        assert agent.request_memory is not None
        share = agent.request_memory.answers
        assert share.total == 2 * MiB
        url = agent.endpoints.event_url
        events = [make_event(run_id="big-run", occurred_at=at(i),
                             payload={"blob": "z" * (100 * KiB)}) for i in range(40)]
        await post_all(url, events, 8)
        host, port = url.removeprefix("http://").rsplit(":", 1)
        stuck = []
        for _ in range(6):  # clients that ask and never read (small receive buffers)
            sock = socket.socket()
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
            sock.connect((host, int(port)))
            reader, writer = await asyncio.open_connection(sock=sock)
            writer.write(b"GET /v1/runs/big-run/events?limit=1000 HTTP/1.1\r\nHost: x\r\n\r\n")
            await writer.drain()
            stuck.append((reader, writer))
            await asyncio.sleep(0.3)
        assert 0 <= share.free < 100 * KiB, share.free  # held by the unread answers
        status, body, headers = await get(url + "/v1/runs/big-run/events")
        assert_problem(status, body, headers, 503, "ANSWERS_BUSY")
        assert headers["Retry-After"] == "1"
        status, body, headers = await get(url + f"/v1/events/{events[0]['event_id']}")
        assert_problem(status, body, headers, 503, "ANSWERS_BUSY")
        for _, writer in stuck:
            writer.close()
        # every answer's memory comes back
        assert await wait_until(lambda: _true(share.free == share.total), 15), share.free
        status, page, _ = await get(url + "/v1/runs/big-run/events?limit=1000")
        assert status == 200 and len(page["events"]) == 10  # 1 MiB of 100 KiB events


async def _whole_chunked_body(reader: asyncio.StreamReader) -> bool:
    """Read a chunked body: True if it ended properly, False if the connection ended it."""
    try:
        while size := int((await reader.readuntil(b"\r\n")).split(b";")[0], 16):
            await reader.readexactly(size + 2)
        await reader.readuntil(b"\r\n")
    except (asyncio.IncompleteReadError, ConnectionError):
        return False
    return True


async def _true(value: bool) -> bool:
    return value


def _rss(pid: int) -> tuple[int, int]:
    """(VmRSS, VmHWM) of a process, in bytes."""
    fields = {}
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        name, _, value = line.partition(":")
        if name in ("VmRSS", "VmHWM"):
            fields[name] = int(value.split()[0]) * 1024
    return fields["VmRSS"], fields["VmHWM"]


async def test_unread_answers_keep_the_agents_memory_bounded(database: Database,
                                                             state_dir: Path):
    """Issue 26.2: 255 events of 250 KiB in one run, pages of up to 1,000 asked for on
    connections that never read took the agent from 99 to 613 MiB (four connections). Now
    each unread page holds at most the page budget, and the total is capped."""
    env = agent_env(database, state_dir, FLUX_AGENT_REQUEST_BODY_TIMEOUT="8s")
    proc = AgentProcess(env, state_dir / "agent.log")
    proc.start()
    conns: list[tuple[asyncio.StreamReader, asyncio.StreamWriter]] = []
    try:
        events = [make_event(run_id="huge-run", occurred_at=at(i),
                             payload={"blob": "q" * (250 * KiB), "n": i}) for i in range(255)]
        await post_all(proc.url, events, 3)
        del events
        assert proc.proc is not None
        pid = proc.proc.pid
        await asyncio.sleep(1)
        Path(f"/proc/{pid}/clear_refs").write_text("5")  # VmHWM from here on
        baseline, _ = _rss(pid)
        paths = [b"/v1/runs/huge-run/events?limit=1000"] * 10 + [
            b"/v1/runs/huge-run/events?limit=1000&kind=step.completed"] * 6
        for path in paths:
            reader, writer = await asyncio.open_connection("127.0.0.1", proc.port)
            writer.write(b"GET " + path + b" HTTP/1.1\r\nHost: x\r\n\r\n")
            await writer.drain()
            conns.append((reader, writer))
        statuses = []
        for _ in range(6):  # readers meanwhile get a page or a 503, never a hang
            status, _, _ = await get_raw(proc.url + "/v1/runs/huge-run/events?limit=1000")
            statuses.append(status)
        await asyncio.sleep(3)
        _, peak = _rss(pid)
        grown = peak - baseline
        print(f"RSS {baseline / MiB:.0f} MiB before, peak {peak / MiB:.0f} MiB with "
              f"{len(conns)} unread answers; readers got {statuses}")
        assert set(statuses) <= {200, 503}, statuses
        assert grown < 48 * MiB, f"peak RSS grew by {grown / MiB:.0f} MiB over {baseline / MiB:.0f}"
        # A client that never reads is cut off after the send timeout (8 s), its memory
        # freed: the answers under way end before they are complete.
        await asyncio.sleep(8)
        cut = 0
        for reader, _ in conns:
            async with asyncio.timeout(30):
                head = await reader.readuntil(b"\r\n\r\n")
                if head.startswith(b"HTTP/1.1 200"):
                    cut += not await _whole_chunked_body(reader)
                else:
                    assert head.startswith(b"HTTP/1.1 503"), head
        assert cut >= 4, cut
        status, page, _ = await get(proc.url + "/v1/runs/huge-run/events?limit=1000")
        assert status == 200 and 1 <= len(page["events"]) <= 4
    finally:
        for _, writer in conns:
            writer.close()
        assert proc.terminate() == 0
