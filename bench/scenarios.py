"""The scenarios. Each returns result rows; every figure is paired with a baseline measured in
the same run, because only ratios hold on shared, noisy machines."""

from __future__ import annotations

import asyncio
import threading
import time
from dataclasses import dataclass, field
from datetime import timedelta
from pathlib import Path
from typing import Any

import asyncpg
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import rsa

from flux_agent.intake.tokens import mint

from . import baselines
from .fleet import postgres_cpu_split
from .harness import (
    AgentProc,
    BareServer,
    Database,
    finish_load,
    run_load,
    run_wrk,
    start_load,
    wait_flushed,
)

MiB = 1024 * 1024


@dataclass
class Ctx:
    db: Database
    tmp: Path
    quick: bool
    results: list[dict[str, Any]] = field(default_factory=list)
    base: dict[str, float] = field(default_factory=dict)
    timelines: dict[str, list[dict[str, float]]] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)
    jwt_env: dict[str, str] = field(default_factory=dict)
    token: str = ""
    runs: int = 0

    @property
    def duration(self) -> float:
        return 4.0 if self.quick else 10.0

    def state(self, name: str) -> Path:
        self.runs += 1
        return self.tmp / f"{self.runs:02d}-{name}"

    def add(self, row: dict[str, Any]) -> None:
        clean = {k: (round(v, 3) if isinstance(v, float) else v) for k, v in row.items()
                 if v is not None}
        self.results.append(clean)
        print(f"  {clean['name']}: " + ", ".join(f"{k}={v}" for k, v in clean.items()
                                                  if k != "name"), flush=True)


# --------------------------------------------------------------------------- baselines


async def measure_baselines(ctx: Ctx) -> None:
    n = 50_000 if ctx.quick else 200_000
    await ctx.db.reset()
    ctx.base["a"] = await baselines.raw_copy(ctx.db.admin_dsn, n)
    await ctx.db.reset()
    ctx.base["b"] = await baselines.idempotent_path(ctx.db.agent_dsn, n)
    await ctx.db.reset()
    ctx.add({"name": "baseline (a) raw COPY, 500/batch, 1 connection",
             "events_per_s": ctx.base["a"]})
    ctx.add({"name": "baseline (b) staging COPY + ON CONFLICT, 500/batch, 1 connection",
             "events_per_s": ctx.base["b"]})
    if not ctx.quick:
        await ctx.db.reset()
        unnest = await baselines.unnest_path(ctx.db.agent_dsn, n)
        ctx.add({"name": "alternative: INSERT ... unnest(arrays) ON CONFLICT, 500/batch",
                 "events_per_s": unnest, "baseline": "b",
                 "baseline_events_per_s": ctx.base["b"], "ratio": unnest / ctx.base["b"]})
    await ctx.db.reset()
    with BareServer(ctx.tmp) as bare:
        d = ctx.duration
        wrk_batch = run_wrk(bare.url, events=500, fmt="json", connections=2, duration=d)
        wrk_single = run_wrk(bare.url, events=1, fmt="single", connections=32, duration=d)
        py_single_unix = run_load("--socket", str(bare.socket), "--format", "single",
                                  "--concurrency", "32", "--duration", str(d))
        py_single_tcp = run_load("--url", bare.url, "--format", "single", "--concurrency", "32",
                                 "--duration", str(d))
    ctx.base["c_batch"] = wrk_batch["events_acked"] / wrk_batch["elapsed_s"]
    ctx.base["c_single_tcp"] = wrk_single["requests_per_s"]
    ctx.base["c_single_unix"] = py_single_unix["requests_per_s"]
    ctx.base["client_py_tcp"] = py_single_tcp["requests_per_s"]
    for name, r in (("baseline (c) bare aiohttp, batches of 500, wrk c=2", wrk_batch),
                    ("baseline (c) bare aiohttp, single events TCP, wrk c=32", wrk_single),
                    ("baseline (c) bare aiohttp, single events socket, python client c=32",
                     py_single_unix),
                    ("client ceiling: python client vs bare aiohttp over TCP c=32",
                     py_single_tcp)):
        ctx.add({"name": name, "events_per_s": r["events_acked"] / r["elapsed_s"],
                 "requests_per_s": r["requests_per_s"], "p50_ms": r["p50_ms"],
                 "p99_ms": r["p99_ms"], "p999_ms": r["p999_ms"]})
    if py_single_tcp["requests_per_s"] < 0.8 * wrk_single["requests_per_s"]:
        ctx.notes.append(
            f"The Python load client reaches {py_single_tcp['requests_per_s']:.0f} req/s "
            f"against the bare server where wrk reaches {wrk_single['requests_per_s']:.0f}: "
            "figures measured with it are client-bound near that ceiling.")


# --------------------------------------------------------------------------- throughput


async def throughput(ctx: Ctx, name: str, *, events: int, fmt: str, connections: int,
                     transport: str = "tcp", auth: bool = False, trace: bool = False,
                     baseline: str = "b", env: dict[str, str] | None = None) -> dict[str, Any]:
    await ctx.db.reset()
    agent_env = dict(env or {})
    if auth:
        agent_env.update(ctx.jwt_env)
    agent = AgentProc(ctx.db, ctx.state(name.split(",")[0].replace(" ", "-")), **agent_env)
    await asyncio.to_thread(agent.start)
    try:
        cpu0 = agent.cpu_seconds()
        pg0 = postgres_cpu_split(ctx.db)
        flushed0 = agent.metrics().get("flux_events_flushed_total", 0.0)
        if transport == "tcp":
            load = await asyncio.to_thread(
                run_wrk, agent.url + "/v1/events", events=events, fmt=fmt,
                connections=connections, duration=ctx.duration,
                token=ctx.token if auth else "", trace=trace)
            client = "wrk"
        else:
            args = ["--socket", str(agent.socket), "--format", fmt, "--events", str(events),
                    "--concurrency", str(connections), "--duration", str(ctx.duration)]
            if auth:
                args += ["--header", f"Authorization: Bearer {ctx.token}"]
            load = await asyncio.to_thread(run_load, *args)
            client = "python"
        done = await asyncio.to_thread(wait_flushed, agent, flushed0 + load["events_acked"])
        cpu = agent.cpu_seconds() - cpu0
        pg1 = postgres_cpu_split(ctx.db)
    finally:
        agent.stop()
    e2e = load["events_acked"] / (done - load["t_start"])
    row: dict[str, Any] = {
        "name": name, "events_per_s": e2e, "requests_per_s": load["requests_per_s"],
        "p50_ms": load["p50_ms"], "p99_ms": load["p99_ms"], "p999_ms": load["p999_ms"],
        "cpu_us_per_event": cpu / max(1, load["events_acked"]) * 1e6,
        "pg_cpu_us_per_event": sum(pg1[k] - pg0[k] for k in pg1)
                               / max(1, load["events_acked"]) * 1e6,
        "pg_backends_cpu_us_per_event": (pg1["backends"] - pg0["backends"])
                                        / max(1, load["events_acked"]) * 1e6,
        "peak_rss_mib": (agent.sampler.peak_rss if agent.sampler else 0) / MiB,
        "peak_anon_rss_mib": (agent.sampler.peak_anon if agent.sampler else 0) / MiB,
        "client": client, "non_2xx": load["requests"] - _ok(load),
    }
    if baseline == "b":
        row.update(baseline="b", baseline_events_per_s=ctx.base["b"], ratio=e2e / ctx.base["b"])
    else:
        base = ctx.base[baseline]
        row.update(baseline="c", baseline_requests_per_s=base,
                   ratio=load["requests_per_s"] / base)
        ceiling = ctx.base.get("client_py_tcp") if client == "python" else None
        if ceiling and load["requests_per_s"] > 0.9 * ceiling:
            row["client_bound"] = True
    row["raw_copy_events_per_s"] = ctx.base["a"]
    ctx.add(row)
    return row


def _ok(load: dict[str, Any]) -> int:
    statuses = load["statuses"]
    if "2xx" in statuses:
        return int(statuses["2xx"])
    return sum(v for k, v in statuses.items() if 200 <= int(k) < 300)


def make_jwt(ctx: Ctx) -> None:
    key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    pub = ctx.tmp / "idp.pem"
    pub.write_bytes(key.public_key().public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo))
    ctx.jwt_env = {"FLUX_AGENT_AUTH": "jwt", "FLUX_AGENT_AGENCY": "",
                   "FLUX_AGENT_JWT_ALGORITHMS": "RS256",
                   "FLUX_AGENT_JWT_ISSUERS": "https://idp.bench",
                   "FLUX_AGENT_JWT_PUBLIC_KEY_FILE": str(pub)}
    ctx.token = mint(key, algorithm="RS256", issuer="https://idp.bench", sub="bench",
                     agency="nasa", role="operator", ttl=3600)


# --------------------------------------------------------------------------- faults


class Timeline(threading.Thread):
    """Scrapes the agent's metrics every half second: in, flushed, spool bytes."""

    def __init__(self, agent: AgentProc) -> None:
        super().__init__(daemon=True)
        self.agent = agent
        self.points: list[dict[str, float]] = []
        self.halt = threading.Event()
        self.t0 = time.time()

    def run(self) -> None:
        while not self.halt.wait(0.5):
            try:
                m = self.agent.metrics()
            except OSError:
                continue
            self.points.append({
                "t": time.time() - self.t0,
                "accepted": m.get("flux_events_accepted_total", 0.0),
                "flushed": m.get("flux_events_flushed_total", 0.0),
                "spool_bytes": m.get("flux_spool_bytes", 0.0),
            })


async def check_ids(ctx: Ctx, ids_file: Path) -> tuple[int, int, int]:
    """(acknowledged, lost, duplicated) for the ids a load generator wrote."""
    acked = [line for line in ids_file.read_text().splitlines() if line]
    conn = await asyncpg.connect(ctx.db.admin_dsn)
    try:
        found = await conn.fetchval(
            "SELECT count(*) FROM flux.events WHERE event_id = ANY($1::uuid[])", acked)
        total = await conn.fetchval("SELECT count(*) FROM flux.events")
        distinct = await conn.fetchval(
            "SELECT count(*) FROM (SELECT DISTINCT agency_id, event_id FROM flux.events) d")
    finally:
        await conn.close()
    return len(acked), len(set(acked)) - int(found), int(total - distinct)


async def outage(ctx: Ctx, rate_events: float) -> None:
    before, down, after = (3.0, 10.0, 5.0) if ctx.quick else (10.0, 30.0, 10.0)
    await ctx.db.reset()
    agent = AgentProc(ctx.db, ctx.state("outage"), FLUX_AGENT_FLUSH_RETRY_MAX="1s")
    await asyncio.to_thread(agent.start)
    ids = ctx.tmp / "outage.ids"
    per_request = 100
    load = start_load("--url", agent.url + "/v1/events", "--events", str(per_request),
                      "--concurrency", "8", "--rate", str(rate_events / per_request),
                      "--duration", str(before + down + after), "--ids-out", str(ids))
    timeline = Timeline(agent)
    timeline.start()
    try:
        await asyncio.sleep(before)
        await asyncio.to_thread(ctx.db.stop)
        t_stop = time.time() - timeline.t0
        await asyncio.sleep(down)
        await asyncio.to_thread(ctx.db.start_again)
        t_back = time.time() - timeline.t0
        result = await asyncio.to_thread(finish_load, load)
        target = result["events_acked"]
        done = await asyncio.to_thread(wait_flushed, agent, target, 600)
        t_drained = done - timeline.t0
        await asyncio.sleep(1.0)
    finally:
        timeline.halt.set()
        timeline.join()
        agent.stop()
    acked, lost, dup = await check_ids(ctx, ids)
    points = timeline.points
    ctx.timelines["outage"] = points
    # Average flush rate from the restart until the backlog was gone (nothing was flushed
    # during the outage, so the last sample before the restart is the starting count).
    before = [p["flushed"] for p in points if p["t"] <= t_back]
    flushed_at_restart = before[-1] if before else 0.0
    drain_rate = (target - flushed_at_restart) / max(1e-9, t_drained - t_back)
    ingest = result["events_acked"] / result["elapsed_s"]
    ctx.add({
        "name": f"outage: PostgreSQL stopped {down:.0f} s under load at {ingest:.0f} events/s",
        "events_per_s": ingest, "ingest_events_per_s": ingest,
        "drain_events_per_s": drain_rate, "drain_to_ingest_ratio": drain_rate / ingest,
        "time_to_drain_s": t_drained - t_back, "outage_started_s": t_stop,
        "peak_spool_mib": max((p["spool_bytes"] for p in points), default=0) / MiB,
        "p50_ms": result["p50_ms"], "p99_ms": result["p99_ms"], "p999_ms": result["p999_ms"],
        "peak_rss_mib": (agent.sampler.peak_rss if agent.sampler else 0) / MiB,
        "acknowledged": acked, "lost": lost, "duplicated": dup,
    })


async def crash(ctx: Ctx, rate_events: float) -> None:
    total = 8.0 if ctx.quick else 20.0
    await ctx.db.reset()
    state = ctx.state("crash")
    agent = AgentProc(ctx.db, state)
    await asyncio.to_thread(agent.start)
    ids = ctx.tmp / "crash.ids"
    per_request = 100
    load = start_load("--url", agent.url + "/v1/events", "--events", str(per_request),
                      "--concurrency", "8", "--rate", str(rate_events / per_request),
                      "--duration", str(total), "--ids-out", str(ids))
    await asyncio.sleep(total / 3)
    agent.kill()
    peak = agent.sampler.peak_rss if agent.sampler else 0
    again = AgentProc(ctx.db, state)
    again.port, again.admin_port = agent.port, agent.admin_port
    again.env.update(agent.env)
    ready = await asyncio.to_thread(again.start)
    try:
        result = await asyncio.to_thread(finish_load, load)
        deadline = time.monotonic() + 300
        while time.monotonic() < deadline:
            acked, lost, dup = await check_ids(ctx, ids)
            if lost == 0:
                break
            await asyncio.sleep(0.5)
    finally:
        again.stop()
    ctx.add({
        "name": "crash: SIGKILL under load, restart on the same spool",
        "events_per_s": result["events_acked"] / result["elapsed_s"],
        "time_to_ready_s": ready, "p50_ms": result["p50_ms"], "p99_ms": result["p99_ms"],
        "p999_ms": result["p999_ms"], "interrupted_requests": result["failures"],
        "peak_rss_mib": max(peak, again.sampler.peak_rss if again.sampler else 0) / MiB,
        "acknowledged": acked, "lost": lost, "duplicated": dup,
    })


async def idle(ctx: Ctx) -> None:
    agent = AgentProc(ctx.db, ctx.state("idle"))
    ready = await asyncio.to_thread(agent.start)
    try:
        await asyncio.sleep(1.0)
        cpu0 = agent.cpu_seconds()
        window = 3.0 if ctx.quick else 10.0
        await asyncio.sleep(window)
        cpu = agent.cpu_seconds() - cpu0
        assert agent.proc is not None
        import psutil

        rss = psutil.Process(agent.proc.pid).memory_info().rss
    finally:
        agent.stop()
    ctx.add({"name": "idle agent (external PostgreSQL)", "time_to_ready_s": ready,
             "idle_rss_mib": rss / MiB, "idle_cpu_percent": cpu / window * 100,
             "peak_rss_mib": (agent.sampler.peak_rss if agent.sampler else 0) / MiB})


async def steady(ctx: Ctx, rate_events: float) -> None:
    """Ack latency at a given load (open loop), with fsync acks."""
    await ctx.db.reset()
    agent = AgentProc(ctx.db, ctx.state("steady"))
    await asyncio.to_thread(agent.start)
    try:
        cpu0 = agent.cpu_seconds()
        per_request = 100
        result = await asyncio.to_thread(
            run_load, "--url", agent.url + "/v1/events", "--events", str(per_request),
            "--concurrency", "16", "--rate", str(rate_events / per_request),
            "--duration", str(ctx.duration))
        cpu = agent.cpu_seconds() - cpu0
    finally:
        agent.stop()
    ctx.add({"name": f"steady load at half of peak ({rate_events:.0f} events/s offered, "
                     "batches of 100)",
             "events_per_s": result["events_acked"] / result["elapsed_s"],
             "p50_ms": result["p50_ms"], "p99_ms": result["p99_ms"],
             "p999_ms": result["p999_ms"],
             "cpu_us_per_event": cpu / max(1, result["events_acked"]) * 1e6,
             "peak_rss_mib": (agent.sampler.peak_rss if agent.sampler else 0) / MiB})


async def backlog(ctx: Ctx, events: int) -> None:
    """Time to drain a backlog that piled up while PostgreSQL was away."""
    await ctx.db.reset()
    agent = AgentProc(ctx.db, ctx.state("backlog"), FLUX_AGENT_FLUSH_RETRY_MAX="0.5s")
    await asyncio.to_thread(agent.start)
    try:
        await asyncio.to_thread(ctx.db.stop)
        per_request = 500
        load = await asyncio.to_thread(
            run_load, "--url", agent.url + "/v1/events", "--events", str(per_request),
            "--concurrency", "4", "--requests", str(events // per_request), "--lazy",
            timeout=3600)
        spool = agent.metrics().get("flux_spool_bytes", 0.0)
        await asyncio.to_thread(ctx.db.start_again)
        t0 = time.time()
        done = await asyncio.to_thread(wait_flushed, agent, load["events_acked"], 3600)
        peak = (agent.sampler.peak_rss if agent.sampler else 0) / MiB
    finally:
        agent.stop()
    seconds = done - t0
    ctx.add({"name": f"backlog: {load['events_acked']:,} events spooled during an outage, "
                     "then drained",
             "events_per_s": load["events_acked"] / seconds, "time_to_drain_s": seconds,
             "spool_mib": spool / MiB, "peak_rss_mib": peak,
             "ingest_events_per_s": load["events_acked"] / load["elapsed_s"]})


async def checkpoints(ctx: Ctx) -> None:
    """Checkpoint save (fsync'ed, spooled) and load (from PostgreSQL, hash verified)."""
    import aiohttp

    await ctx.db.reset()
    agent = AgentProc(ctx.db, ctx.state("checkpoints"))
    await asyncio.to_thread(agent.start)
    n = 300 if ctx.quick else 2000
    state = {"offset": 0, "files": [f"part-{i:05d}.parquet" for i in range(20)],
             "watermark": "2026-11-23T07:00:00Z"}
    saves: list[float] = []
    loads: list[float] = []
    try:
        async with aiohttp.ClientSession() as session:
            async def save(i: int) -> None:
                body = {"step": f"step-{i % 9}", "state": {**state, "offset": i}}
                t = time.perf_counter()
                async with session.put(f"{agent.url}/v1/runs/cp-{i % 50}/checkpoint",
                                       json=body) as r:
                    await r.read()
                    assert r.status == 201, r.status
                saves.append((time.perf_counter() - t) * 1000)

            async def load(i: int) -> None:
                t = time.perf_counter()
                async with session.get(f"{agent.url}/v1/runs/cp-{i % 50}/checkpoint") as r:
                    await r.read()
                    assert r.status == 200, r.status
                loads.append((time.perf_counter() - t) * 1000)

            for start in range(0, n, 8):  # eight clients at a time
                await asyncio.gather(*(save(i) for i in range(start, min(n, start + 8))))
            await asyncio.to_thread(wait_flushed, agent, n)  # the checkpoint.saved events
            for start in range(0, n, 8):
                await asyncio.gather(*(load(i) for i in range(start, min(n, start + 8))))
    finally:
        agent.stop()
    for name, values in (("checkpoint save (fsync'ed), 8 clients", saves),
                         ("checkpoint load (PostgreSQL, hash verified), 8 clients", loads)):
        values.sort()
        ctx.add({"name": name, "requests": len(values), "p50_ms": _pct(values, 50),
                 "p99_ms": _pct(values, 99), "p999_ms": _pct(values, 99.9)})


def _pct(values: list[float], p: float) -> float:
    return values[min(len(values) - 1, round(p / 100 * (len(values) - 1)))]


async def event_pages(ctx: Ctx, total: int) -> None:
    """GET /v1/runs/{id}/events page latency on a table of ``total`` events, and the plan."""
    import aiohttp

    await ctx.db.reset()
    conn = await asyncpg.connect(ctx.db.admin_dsn)
    try:
        step = 100_000
        for start in range(0, total, step):
            rows = baselines.rows(min(step, total - start))
            base = rows[0][5]
            rows = [(r[0], r[1], f"page-run-{(start + i) % 200}", r[3], r[4],
                     base + timedelta(milliseconds=start + i), *r[6:])
                    for i, r in enumerate(rows)]
            await conn.copy_records_to_table("events", schema_name="flux", records=rows,
                                             columns=baselines.COLUMNS)
        await conn.execute("ANALYZE flux.events")
        plan = await _plan(conn)
    finally:
        await conn.close()
    agent = AgentProc(ctx.db, ctx.state("pages"))
    await asyncio.to_thread(agent.start)
    first: list[float] = []
    deep: list[float] = []
    try:
        async with aiohttp.ClientSession() as session:
            for i in range(40 if ctx.quick else 200):
                run = f"page-run-{i % 200}"
                cursor = None
                for page in range(5):
                    url = f"{agent.url}/v1/runs/{run}/events?limit=100"
                    if cursor:
                        url += f"&cursor={cursor}"
                    t = time.perf_counter()
                    async with session.get(url) as r:
                        body = await r.json()
                    (first if page == 0 else deep).append((time.perf_counter() - t) * 1000)
                    cursor = body["next_cursor"]
    finally:
        agent.stop()
    for name, values in ((f"events page (100 rows), first page, {total:,}-event table", first),
                         (f"events page (100 rows), pages 2-5 by cursor, {total:,}-event table",
                          deep)):
        values.sort()
        ctx.add({"name": name, "requests": len(values), "p50_ms": _pct(values, 50),
                 "p99_ms": _pct(values, 99), "p999_ms": _pct(values, 99.9),
                 "index_scan": "Index" in plan})
    ctx.notes.append("Query plan of an events page (EXPLAIN, as the agent's role):\n\n"
                     + "\n".join("    " + line for line in plan.splitlines()))


async def _plan(conn: Any) -> str:
    async with conn.transaction():
        await conn.execute("SET LOCAL ROLE flux_agent")
        await conn.execute("SELECT set_config('flux.current_agency_id', 'nasa', true)")
        rows = await conn.fetch(
            "EXPLAIN (ANALYZE, BUFFERS) SELECT event_id FROM flux.events "
            "WHERE agency_id = 'nasa' AND run_id = 'page-run-7' "
            "ORDER BY occurred_at, event_id LIMIT 101")
    return "\n".join(r[0] for r in rows)
