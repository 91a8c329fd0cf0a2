"""Request memory (issue 26.15): what a request holds is estimated before its body is
decoded, and the estimate is above what decoding, validating, sealing and spooling it
really allocate, for bodies of every shape; and a real agent in a memory cgroup at the
chart's default limit, under many clients posting large batches at once (raw, gzip,
chunked), answers 202, 503 or 413 and is never killed."""

from __future__ import annotations

import asyncio
import contextlib
import gc
import gzip
import json
import os
import random
import subprocess
import sys
import time
import tracemalloc
from collections import Counter
from collections.abc import AsyncIterator, Callable, Iterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import aiohttp
import msgspec
import pytest
import yaml

from flux_agent.core.event import EventsRecord, Seal, record_encoder
from flux_agent.intake.memory import ByteBudget, body_cost
from flux_agent.intake.openlineage import Lineage
from flux_agent.intake.validate import EventChecker, Schemas
from flux_agent.postgres.embedded import free_port
from flux_agent.spool.format import frame
from flux_agent.testing import make_event

from .support.agents import agent_env
from .support.capture import CAPTURED
from .support.postgres import Database
from .support.tools import require_root, unavailable

KiB = 1024
MiB = 1024 * KiB
ROOT = Path(__file__).resolve().parent.parent


# --------------------------------------------------------------------------- the estimate


def _run_event(i: int, facets: dict[str, Any]) -> dict[str, Any]:
    return {"eventType": "RUNNING", "eventTime": "2026-11-23T08:00:00Z",
            "run": {"runId": f"0190f0b2-2f6c-7c3e-9d4a-{i:012d}", "facets": facets},
            "job": {"namespace": "etl", "name": "nightly"}, "producer": "https://example.com/x",
            "schemaURL": "https://openlineage.io/spec/2-0-2/OpenLineage.json#/$defs/RunEvent"}


def bodies() -> Iterator[tuple[str, bytes, bool]]:
    """(name, body, is a RunEvent) of every shape that costs memory differently."""
    def events(n: int, **fields: Any) -> bytes:
        return json.dumps([make_event(**fields) for _ in range(n)]).encode()

    def raw(n: int, **fields: Any) -> bytes:
        return json.dumps([make_event(**fields) for _ in range(n)], ensure_ascii=False).encode()

    n = MiB
    yield "small events", events(4000), False
    yield "small events, indented", json.dumps([make_event() for _ in range(1000)],
                                               indent=2).encode(), False
    yield "large ASCII payloads", events(4, payload={"blob": "x" * 250_000}), False
    yield "ASCII with one astral character", raw(4, payload={"b": "x" * 60_000 + "😀"}), False
    yield "the same, escaped", events(4, payload={"b": "x" * 60_000 + "😀"}), False
    yield "CJK text", raw(4, payload={"b": "漢字" * 30_000}), False
    yield "Latin-1 text", raw(4, payload={"b": "é" * 80_000}), False
    yield "escaped newlines", events(4, payload={"b": "line\n" * 40_000}), False
    yield "many keys", events(4, payload={f"k{i}": i for i in range(9_000)}), False
    yield "arrays of floats", events(4, payload={"v": [1.5 + i for i in range(20_000)]}), False
    yield "arrays of small dicts", events(4, payload={"v": [{"a": {}}] * 20_000}), False
    yield "nested lists", events(4, payload={"v": [[[1]]] * 20_000}), False
    yield "arrays of short strings", events(4, payload={"v": ["abcdefgh"] * 30_000}), False
    for name, item in (("{}", b"{}"), ("[]", b"[]"), ('"ab"', b'"ab"'), ("1.5", b"1.5"),
                       ("0", b"0")):
        yield f"[{name}, {name}, ...]", b"[" + b",".join([item] * (n // len(item))) + b"]", False
    plan = {"spark_logicalPlan": {
        "_producer": "https://x", "_schemaURL": "https://x/y",
        "plan": [{"class": "org.apache.spark.sql.Node", "num-children": 2, "child": i,
                  "output": [[{"name": f"c{j}", "dataType": "string", "nullable": True}]
                             for j in range(5)]} for i in range(1_500)]}}
    yield "an OpenLineage Spark plan", json.dumps(_run_event(1, plan)).encode(), True
    yield "an OpenLineage large string", json.dumps(_run_event(2, {"x": {
        "_producer": "https://x", "_schemaURL": "https://x/y", "blob": "s" * MiB}})).encode(), True


def allocated(body: bytearray, lineage: Lineage | None) -> int:
    """Peak bytes allocated while a request's body becomes a spool frame, as intake does
    it (decode, map a RunEvent, validate and seal, encode the record, frame it)."""
    now = datetime.now(UTC)
    seal = Seal("nasa", now, "rid", "agent", None, None, now)
    checker = EventChecker(Schemas(), 8 * MiB)
    decoder = msgspec.json.Decoder()
    gc.collect()
    tracemalloc.start()
    try:
        base = tracemalloc.get_traced_memory()[0]
        doc = decoder.decode(body)
        events = lineage.to_events(doc) if lineage is not None else doc
        del doc
        with contextlib.suppress(Exception):  # shapes that are not events stop here
            rows = checker.rows(events, seal, batch=True)
            del events
            record = record_encoder.encode(EventsRecord(rows))
            framed = frame(1, record)
            del record
            joined = b"".join([framed])  # what the spool's writer thread joins
            del joined, framed, rows
        return tracemalloc.get_traced_memory()[1] - base
    finally:
        tracemalloc.stop()


def test_the_estimate_of_a_body_is_above_what_it_really_allocates():
    lineage = Lineage()
    for name, body, is_run_event in bodies():
        buffer = bytearray(body)
        real = allocated(buffer, lineage if is_run_event else None)
        # The body is counted by the estimate too; what decoding adds must be under it.
        estimate = body_cost(buffer, copies=4 if is_run_event else 3) - len(buffer)
        assert estimate >= 1.05 * real, (name, len(body), real, estimate)
        assert estimate <= 12 * real + MiB, (name, real, estimate)  # and still useful


async def test_a_waiter_cancelled_as_memory_frees_leaves_the_budget_whole():
    """A request whose wait for memory timed out just as memory was freed got a 500 (the
    budget had already dropped its cancelled place in the queue)."""
    budget = ByteBudget(10)
    assert budget.try_acquire(10) == 10
    waiter = asyncio.ensure_future(budget.acquire(5))
    await asyncio.sleep(0)
    assert budget.waiting == 1
    waiter.cancel()
    budget.release(10)  # before the waiter runs its cancellation
    with pytest.raises(asyncio.CancelledError):
        await waiter
    assert budget.free == 10 and budget.waiting == 0
    assert await budget.acquire(10) == 10


# --------------------------------------------------------------------------- a memory cgroup


class MemoryCgroup:
    """A child memory cgroup of this process's own, on cgroup v2 (memory.max) or, where
    the memory controller is still mounted as v1, the v1 hierarchy (memory.limit_in_bytes):
    real kernel enforcement either way, and the count of OOM kills."""

    def __init__(self, name: str, limit: int) -> None:
        self.limit = limit
        unified = Path("/sys/fs/cgroup")
        if "memory" in _read(unified / "cgroup.controllers").split():
            parent = unified / _own("0::")
            self.v2 = True
        else:
            mount = unified / "memory"
            if not (mount / "memory.limit_in_bytes").exists():
                unavailable("cgroup", "no memory cgroup controller is mounted (neither "
                            "cgroup v2 with memory nor v1 memory)")
            parent = mount / _own("memory")
            self.v2 = False
        self.path = parent / name
        try:
            self.path.mkdir()
            if self.v2:
                (self.path / "memory.max").write_text(str(limit))
                (self.path / "memory.swap.max").write_text("0")
            else:
                (self.path / "memory.limit_in_bytes").write_text(str(limit))
                with contextlib.suppress(OSError):  # no swap accounting: nothing to limit
                    (self.path / "memory.memsw.limit_in_bytes").write_text(str(limit))
        except OSError as exc:
            self.remove()
            unavailable("cgroup", f"cannot create a memory cgroup under {parent}: {exc}")

    def enter(self) -> None:
        """In a child before exec: move the calling process into the cgroup."""
        (self.path / "cgroup.procs").write_text("0")

    @property
    def oom_kills(self) -> int:
        text = _read(self.path / ("memory.events" if self.v2 else "memory.oom_control"))
        fields = dict(line.split() for line in text.splitlines() if line.strip())
        return int(fields.get("oom_kill", 0))

    @property
    def peak(self) -> int:
        name = "memory.peak" if self.v2 else "memory.max_usage_in_bytes"
        text = _read(self.path / name)
        return int(text) if text.strip().isdigit() else 0

    def remove(self) -> None:
        with contextlib.suppress(OSError):
            self.path.rmdir()


def _read(path: Path) -> str:
    try:
        return path.read_text()
    except OSError:
        return ""


def _own(prefix: str) -> str:
    """This process's cgroup path in the hierarchy whose /proc/self/cgroup line has
    ``prefix`` (``0::`` for v2, a controller name for v1)."""
    for line in Path("/proc/self/cgroup").read_text().splitlines():
        _, controllers, path = line.split(":", 2)
        if prefix == "0::" and line.startswith("0::"):
            return path.lstrip("/")
        if prefix in controllers.split(","):
            return path.lstrip("/")
    return ""


@pytest.fixture
def cgroup() -> Iterator[Callable[[int], MemoryCgroup]]:
    require_root("creating a memory cgroup")
    made: list[MemoryCgroup] = []

    def make(limit: int) -> MemoryCgroup:
        group = MemoryCgroup(f"flux-test-{os.getpid()}-{len(made)}", limit)
        made.append(group)
        return group

    yield make
    for group in made:
        group.remove()


def chart_memory_limit() -> int:
    """The sidecar's memory limit in the chart's defaults (sidecar.resources)."""
    values = yaml.safe_load((ROOT / "helm/flux-agent/values.yaml").read_text())
    text = str(values["sidecar"]["resources"]["memoryLimit"])
    units = {"Ki": KiB, "Mi": MiB, "Gi": 1024 * MiB}
    return int(text[:-2]) * units[text[-2:]]


@contextlib.asynccontextmanager
async def agent_in(group: MemoryCgroup, env: dict[str, str], log: Path
                   ) -> AsyncIterator[tuple[subprocess.Popen[bytes], str]]:
    port, admin = free_port(), free_port()
    env = {**env, "FLUX_AGENT_LISTEN": f"127.0.0.1:{port}",
           "FLUX_AGENT_ADMIN_LISTEN": f"127.0.0.1:{admin}"}
    with log.open("ab") as out:
        proc = subprocess.Popen([sys.executable, "-m", "flux_agent", "run"], env=env,
                                stdout=out, stderr=subprocess.STDOUT, preexec_fn=group.enter)
    try:
        deadline = time.monotonic() + 45
        async with aiohttp.ClientSession() as session:
            while True:
                assert proc.poll() is None, log.read_text()[-3000:]
                assert time.monotonic() < deadline, "the agent did not start"
                with contextlib.suppress(aiohttp.ClientError):
                    async with session.get(f"http://127.0.0.1:{admin}/health/ready") as r:
                        if r.status == 200:
                            break
                await asyncio.sleep(0.2)
        yield proc, f"http://127.0.0.1:{port}"
    finally:
        if proc.poll() is None:
            proc.terminate()
            with contextlib.suppress(subprocess.TimeoutExpired):
                proc.wait(60)
        if proc.poll() is None:
            proc.kill()
            proc.wait(10)
        CAPTURED.append(log.read_text(errors="replace"))


def _peak_rss(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) * KiB
    return 0


def batch(n: int, tag: str, payload: Callable[[], dict[str, Any]] | None = None) -> bytes:
    """About ``n`` bytes of events (small ones by default: the most memory per byte)."""
    one = len(json.dumps(make_event(payload=payload()) if payload else make_event()))
    count = max(1, n // (one + 2))
    return json.dumps([make_event(run_id=f"{tag}-{i % 40}", **(
        {"payload": payload()} if payload else {})) for i in range(count)]).encode()


def large_batches() -> list[bytes]:
    """What clients send: small events; payloads of many small objects (a 1.6 MiB body of
    them decodes to ~40 MiB, a 3.8 MiB one to ~90 MiB); payloads of long strings."""
    def objects() -> dict[str, Any]:
        return {"v": [{"a": {}} for _ in range(2_000)]}

    def text() -> dict[str, Any]:
        return {"blob": "t" * 200_000}

    return [batch(int(3.8 * MiB), "small"), batch(int(1.6 * MiB), "objects", objects),
            batch(int(3.8 * MiB), "many-objects", objects), batch(int(3.8 * MiB), "text", text)]


async def client(url: str, kind: str, bodies: list[bytes], until: float,
                 outcomes: Counter[str]) -> None:
    """Post large batches, one after another, until ``until``; count what came back."""
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=120)) as session:
        i = random.randrange(len(bodies))
        while time.monotonic() < until:
            body = bodies[i % len(bodies)]
            i += 1
            headers = {"Content-Type": "application/json"}
            data: Any = body
            if kind == "gzip":
                data = gzip.compress(body, 1)
                headers["Content-Encoding"] = "gzip"
            elif kind == "chunked":
                async def chunks(body: bytes = body) -> AsyncIterator[bytes]:
                    for start in range(0, len(body), 256 * KiB):
                        yield body[start:start + 256 * KiB]
                data = chunks()
            try:
                async with session.post(url + "/v1/events", data=data,
                                        headers=headers) as resp:
                    answer = await resp.read()
                    code = ""
                    if resp.status >= 400:
                        code = json.loads(answer).get("code", "")
                    outcomes[f"{resp.status} {code}".strip()] += 1
                    if resp.status == 503:
                        await asyncio.sleep(float(resp.headers.get("Retry-After", "1")))
            except (aiohttp.ClientError, OSError) as exc:
                outcomes[f"connection: {type(exc).__name__}"] += 1
                await asyncio.sleep(0.5)


@pytest.mark.fault
@pytest.mark.filterwarnings("ignore:Sending a large body directly:ResourceWarning")
async def test_in_a_memory_cgroup_at_the_charts_limit_clients_get_answers_not_a_kill(
        database: Database, state_dir: Path, cgroup: Callable[[int], MemoryCgroup]):
    """Issue 26.15: in a 160 MiB cgroup, 28 clients posting 3.8 MiB batches got the agent
    OOM-killed within seconds and saw connection resets. At the chart's default limit
    (256Mi), 72 clients posting large batches (raw, gzip and chunked) get 202, 503 or 413
    (a body that would decode beyond the request memory), never a reset, and the kernel
    kills nothing."""
    limit = chart_memory_limit()
    group = cgroup(limit)
    bodies = large_batches()
    outcomes: Counter[str] = Counter()
    env = agent_env(database, state_dir, FLUX_AGENT_LOG_LEVEL="warning")
    async with agent_in(group, env, state_dir / "agent.log") as (proc, url):
        until = time.monotonic() + 20
        await asyncio.gather(*(client(url, kind, bodies, until, outcomes)
                               for kind in ("raw", "gzip", "chunked") for _ in range(24)))
        alive = proc.poll() is None
        rss_peak = _peak_rss(proc.pid) if alive else 0
        after = 0
        if alive:
            async with aiohttp.ClientSession() as session, session.post(
                    url + "/v1/events", json=make_event(),
                    headers={"Prefer": "wait=committed"}) as resp:
                after = resp.status
    peak = group.peak
    print(f"cgroup limit {limit / MiB:.0f} MiB ({'v2' if group.v2 else 'v1'}), its peak "
          f"{peak / MiB:.0f} MiB (page cache included), the agent's peak RSS "
          f"{rss_peak / MiB:.0f} MiB, OOM kills {group.oom_kills}, answers {dict(outcomes)}")
    assert group.oom_kills == 0 and alive, (proc.returncode, dict(outcomes))
    assert after == 200
    errors = [line for line in (state_dir / "agent.log").read_text().splitlines()
              if '"level": "ERROR"' in line or '"level":"ERROR"' in line]
    assert not errors, errors[:3]
    assert not [k for k in outcomes if k.startswith("connection")], dict(outcomes)
    assert set(outcomes) <= {"202", "503 INTAKE_BUSY", "503 SPOOL_FULL", "413 REQUEST_TOO_COMPLEX"
                             }, dict(outcomes)
    assert outcomes["202"] >= 10, dict(outcomes)
    assert outcomes["413 REQUEST_TOO_COMPLEX"], dict(outcomes)
