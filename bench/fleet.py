"""The fleet's shape: one sidecar per pod, a trickle of single events each, one PostgreSQL
for all of them. What matters there is the cost of a flush, summed on the shared database,
and the agent's cost per event at a low rate, not its peak.

- ``single events, c=1``: one request at a time; ack latency and requests/s.
- ``trickle``: single events at a fixed rate (10 and 100/s), and baseline (c), the bare
  aiohttp handler, at the same rate in the same run.
- ``fleet``: N agent processes against one PostgreSQL, each posting single events at a
  fixed rate, directly and through PgBouncer in transaction mode.

Figures per event: agent CPU (every agent process), PostgreSQL CPU (the postmaster and all
its children, backends that exited included), PostgreSQL transactions
(``pg_stat_database.xact_commit``); catalog churn (``pg_class`` inserts); server
connections the agents hold; time from acknowledgement to visibility in ``flux.events``
(each row's commit timestamp, ``track_commit_timestamp``, minus its ``received_at``).
"""

from __future__ import annotations

import asyncio
import statistics
import threading
import time
from pathlib import Path
from typing import Any

import asyncpg
import psutil

from .harness import LOGIN_PASSWORD, LOGIN_ROLE, AgentProc, BareServer, Database, run_load

MiB = 1024 * 1024


# --------------------------------------------------------------------------- measurements


def postgres_cpu(db: Database) -> float:
    """CPU seconds of the whole cluster so far: the postmaster, its live children, and the
    children that exited (counted in the postmaster's children times once reaped)."""
    return sum(postgres_cpu_split(db).values())


def postgres_cpu_split(db: Database) -> dict[str, float]:
    """The cluster's CPU seconds by kind of process: the agents' backends (live sessions of
    the agents' login role), the rest alive (postmaster, WAL writer, checkpointer, launchers)
    and what exited (autovacuum workers, closed sessions: reaped into the postmaster's
    children times, so not attributable to one kind)."""
    assert db.cluster is not None
    pid = db.cluster.running_pid()
    assert pid is not None
    pm = psutil.Process(pid)
    t = pm.cpu_times()
    out = {"backends": 0.0, "background": t.user + t.system,
           "exited": t.children_user + t.children_system}
    for child in pm.children(recursive=True):
        try:
            c = child.cpu_times()
            title = " ".join(child.cmdline())
        except psutil.NoSuchProcess:
            continue
        kind = "backends" if title.startswith(f"postgres: {LOGIN_ROLE} ") else "background"
        out[kind] += c.user + c.system
    return out


def _maintenance(db: Database) -> str:
    """The same server's postgres database: the bench's own queries go there, so that they
    are not counted among the transactions of the agents' database."""
    return db.admin_dsn.rsplit("/", 1)[0] + "/postgres"


async def db_counters(db: Database) -> dict[str, float]:
    conn = await asyncpg.connect(_maintenance(db))
    try:
        xacts = await conn.fetchval(
            "SELECT xact_commit + xact_rollback FROM pg_stat_database WHERE datname = 'flux'")
    finally:
        await conn.close()
    conn = await asyncpg.connect(db.admin_dsn)  # catalog statistics are per database
    try:
        catalog = await conn.fetchval(
            "SELECT n_tup_ins FROM pg_stat_sys_tables WHERE relname = 'pg_class'")
    finally:
        await conn.close()
    return {"xacts": float(xacts), "pg_class_inserts": float(catalog or 0)}


class Connections(threading.Thread):
    """Samples how many server connections the agents hold, once a second."""

    def __init__(self, db: Database) -> None:
        super().__init__(daemon=True)
        self.db = db
        self.samples: list[int] = []
        self.halt = threading.Event()

    def run(self) -> None:
        asyncio.run(self._loop())

    async def _loop(self) -> None:
        conn = await asyncpg.connect(_maintenance(self.db))
        try:
            while not self.halt.is_set():
                n = await conn.fetchval(
                    "SELECT count(*) FROM pg_stat_activity WHERE usename = $1", LOGIN_ROLE)
                self.samples.append(int(n))
                await asyncio.sleep(1.0)
        finally:
            await conn.close()

    def stop(self) -> dict[str, float]:
        self.halt.set()
        self.join(5)
        s = self.samples or [0]
        return {"server_connections_max": max(s), "server_connections_mean": statistics.mean(s)}


async def visibility(db: Database, since: float) -> dict[str, float]:
    """Acknowledged-to-visible, from each row's commit timestamp."""
    conn = await asyncpg.connect(db.admin_dsn)
    try:
        rows = await conn.fetch(
            "SELECT extract(epoch FROM pg_xact_commit_timestamp(xmin) - received_at) AS s "
            "FROM flux.events WHERE received_at >= to_timestamp($1)", since)
    finally:
        await conn.close()
    values = sorted(float(r["s"]) * 1000 for r in rows if r["s"] is not None)
    if not values:
        return {}
    return {"visible_p50_ms": _pct(values, 50), "visible_p99_ms": _pct(values, 99),
            "visible_rows": len(values)}


def _pct(values: list[float], p: float) -> float:
    return values[min(len(values) - 1, round(p / 100 * (len(values) - 1)))]


def _rss(pid: int) -> tuple[float, float]:
    """(RSS, anonymous RSS) in MiB, from /proc."""
    fields = {}
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        key, _, value = line.partition(":")
        fields[key] = value.strip()
    return int(fields["VmRSS"].split()[0]) / 1024, int(fields["RssAnon"].split()[0]) / 1024


# --------------------------------------------------------------------------- scenarios


async def single_c1(ctx: Any) -> None:
    """One request at a time: the latency a lone ETL step pays per event."""
    await ctx.db.reset()
    agent = AgentProc(ctx.db, ctx.state("c1"))
    await asyncio.to_thread(agent.start)
    try:
        cpu0 = agent.cpu_seconds()
        load = await asyncio.to_thread(
            run_load, "--url", agent.url + "/v1/events", "--format", "single",
            "--concurrency", "1", "--duration", str(ctx.duration))
        cpu = agent.cpu_seconds() - cpu0
        assert agent.proc is not None
        rss, anon = _rss(agent.proc.pid)
    finally:
        agent.stop()
    ctx.add({"name": "single events, TCP, c=1", "requests_per_s": load["requests_per_s"],
             "p50_ms": load["p50_ms"], "p99_ms": load["p99_ms"], "p999_ms": load["p999_ms"],
             "cpu_us_per_event": cpu / max(1, load["events_acked"]) * 1e6,
             "rss_mib": rss, "anon_rss_mib": anon})


async def trickle(ctx: Any, rate: float) -> dict[str, Any]:
    """Single events at ``rate``/s, one agent; baseline (c) at the same rate."""
    seconds = 10.0 if ctx.quick else 20.0
    with BareServer(ctx.tmp) as bare:
        proc = psutil.Process(bare.proc.pid)
        c0 = proc.cpu_times()
        base = await asyncio.to_thread(
            run_load, "--url", bare.url, "--format", "single", "--concurrency", "4",
            "--rate", str(rate), "--duration", str(seconds))
        c1 = proc.cpu_times()
    bare_us = ((c1.user + c1.system) - (c0.user + c0.system)) / max(1, base["requests"]) * 1e6
    await ctx.db.reset()
    agent = AgentProc(ctx.db, ctx.state(f"trickle-{rate:.0f}"))
    await asyncio.to_thread(agent.start)
    try:
        await asyncio.sleep(1.0)
        counters0 = await db_counters(ctx.db)
        pg0 = postgres_cpu_split(ctx.db)
        cpu0 = agent.cpu_seconds()
        since = time.time()
        load = await asyncio.to_thread(
            run_load, "--url", agent.url + "/v1/events", "--format", "single",
            "--concurrency", "4", "--rate", str(rate), "--duration", str(seconds))
        await asyncio.sleep(2.0)  # the last window's age passes
        cpu = agent.cpu_seconds() - cpu0
        pg1 = postgres_cpu_split(ctx.db)
        pg_by = {k: pg1[k] - pg0[k] for k in pg1}
        pg = sum(pg_by.values())
        counters1 = await db_counters(ctx.db)
        seen = await visibility(ctx.db, since)
    finally:
        agent.stop()
    events = max(1, load["events_acked"])
    agent_us = cpu / events * 1e6
    row = {
        "name": f"trickle, single events at {rate:.0f}/s, TCP",
        "requests_per_s": load["requests_per_s"], "p50_ms": load["p50_ms"],
        "p99_ms": load["p99_ms"], "cpu_us_per_event": agent_us, "baseline": "c",
        "bare_cpu_us_per_request": bare_us, "ratio": agent_us / bare_us if bare_us else None,
        "pg_cpu_us_per_event": pg / events * 1e6,
        **{f"pg_{k}_cpu_us_per_event": v / events * 1e6 for k, v in pg_by.items()},
        "pg_xacts_per_event": (counters1["xacts"] - counters0["xacts"]) / events,
        "pg_class_inserts": counters1["pg_class_inserts"] - counters0["pg_class_inserts"],
        **seen,
    }
    ctx.add(row)
    return row


async def fleet(ctx: Any, agents: int, rate: float, *, pgbouncer: bool = False,
                aggregator: bool = False, env: dict[str, str] | None = None,
                aggregator_env: dict[str, str] | None = None,
                label: str = "") -> dict[str, Any]:
    """``agents`` agent processes, each taking single events at ``rate``/s; directly to
    PostgreSQL, through PgBouncer, or through one aggregator (the sidecars then hold no
    database connection: the aggregator's pool is all PostgreSQL sees)."""
    seconds = 10.0 if ctx.quick else 20.0
    await ctx.db.reset()
    front = None
    hub = None
    target = ctx.db
    env = {"FLUX_AGENT_LOG_LEVEL": "warning", **(env or {})}
    if aggregator:
        hub = AgentProc(ctx.db, ctx.state("aggregator"), command="aggregate",
                        FLUX_AGENT_SOCKET="off", **(aggregator_env or {}))
        await asyncio.to_thread(hub.start)
        env = {**env, "FLUX_AGENT_UPSTREAM": hub.url, "FLUX_AGENT_DATABASE_URL": ""}
    if pgbouncer:
        from tests.support.pgbouncer import PgBouncer

        host, port = ctx.db.agent_dsn.split("@", 1)[1].split("/", 1)[0].rsplit(":", 1)
        front = PgBouncer(ctx.tmp / "pgbouncer", host=host, port=int(port),
                          users={LOGIN_ROLE: LOGIN_PASSWORD}, pool_size=8)
        await asyncio.to_thread(front.start)
        target = Database.__new__(Database)
        target.__dict__.update(ctx.db.__dict__)
        target.agent_dsn = front.url(LOGIN_ROLE, LOGIN_PASSWORD, "flux")
        env["FLUX_AGENT_DATABASE_PGBOUNCER"] = "true"
    procs = [AgentProc(target, ctx.state(f"fleet-{i}"), **env) for i in range(agents)]
    try:
        for p in procs:
            await asyncio.to_thread(p.start)
        await asyncio.sleep(2.0)
        idle = [_rss(p.proc.pid) for p in procs if p.proc is not None]
        counters0 = await db_counters(ctx.db)
        pg0 = postgres_cpu_split(ctx.db)
        cpu0 = [p.cpu_seconds() for p in procs]
        hub_cpu0 = hub.cpu_seconds() if hub is not None else 0.0
        conns = Connections(ctx.db)
        conns.start()
        since = time.time()
        urls: list[str] = []
        for p in procs:
            urls += ["--url", p.url + "/v1/events"]
        load = await asyncio.to_thread(
            run_load, *urls, "--format", "single", "--concurrency", str(agents * 2),
            "--rate", str(rate * agents), "--duration", str(seconds))
        await asyncio.sleep(2.0)
        connections = conns.stop()
        cpu = sum(p.cpu_seconds() - c for p, c in zip(procs, cpu0, strict=True))
        hub_cpu = hub.cpu_seconds() - hub_cpu0 if hub is not None else 0.0
        pg1 = postgres_cpu_split(ctx.db)
        pg_by = {k: pg1[k] - pg0[k] for k in pg1}
        pg = sum(pg_by.values())
        counters1 = await db_counters(ctx.db)
        seen = await visibility(ctx.db, since)
        stored = await ctx.db.count()
    finally:
        for p in procs:
            p.stop()
        if hub is not None:
            hub.stop()
        if front is not None:
            await asyncio.to_thread(front.stop)
    events = max(1, load["events_acked"])
    peak = [(p.sampler.peak_rss if p.sampler else 0) / MiB for p in procs]
    row = {
        "name": f"fleet: {agents} agents x {rate:.0f} single events/s"
                + (", through PgBouncer (transaction mode)" if pgbouncer
                   else ", through one aggregator" if aggregator else ", direct")
                + label,
        "events_per_s": load["events_acked"] / load["elapsed_s"],
        "p50_ms": load["p50_ms"], "p99_ms": load["p99_ms"],
        "cpu_us_per_event": cpu / events * 1e6,
        **({"aggregator_cpu_us_per_event": hub_cpu / events * 1e6} if hub is not None else {}),
        "pg_cpu_us_per_event": pg / events * 1e6,
        **{f"pg_{k}_cpu_us_per_event": v / events * 1e6 for k, v in pg_by.items()},
        "pg_xacts_per_s": (counters1["xacts"] - counters0["xacts"]) / seconds,
        "pg_xacts_per_event": (counters1["xacts"] - counters0["xacts"]) / events,
        "pg_class_inserts": counters1["pg_class_inserts"] - counters0["pg_class_inserts"],
        **connections,
        "connections_per_agent": connections["server_connections_max"] / agents,
        "idle_rss_mib": statistics.mean(r for r, _ in idle),
        "idle_anon_rss_mib": statistics.mean(a for _, a in idle),
        "peak_rss_mib": max(peak), "lost": load["events_acked"] - min(stored,
                                                                       load["events_acked"]),
        **seen,
    }
    ctx.add(row)
    return row


# --------------------------------------------------------------------------- alone


async def _alone(agents: int, rate: float, ages: list[str], pgbouncer: bool,
                 aggregator: bool) -> None:
    from .scenarios import Ctx, measure_baselines, throughput

    db = Database()
    await db.start()
    ctx = Ctx(db=db, tmp=db.root, quick=False)
    try:
        await measure_baselines(ctx)
        # The single-agent batched reference of the same run.
        await throughput(ctx, "batches of 500, JSON array, TCP, c=1", events=500,
                         fmt="json", connections=1)
        for age in ages:
            env = {"FLUX_AGENT_BATCH_MAX_AGE": age} if age else {}
            label = f", FLUX_AGENT_BATCH_MAX_AGE={age}" if age else ""
            await fleet(ctx, agents, rate, pgbouncer=False, env=env, label=label)
            if pgbouncer:
                await fleet(ctx, agents, rate, pgbouncer=True, env=env, label=label)
            if aggregator:
                await fleet(ctx, agents, rate, aggregator=True, env=env, label=label)
    finally:
        await asyncio.to_thread(db.destroy)


def main() -> None:
    """``python -m bench.fleet``: the fleet alone, beside the batched reference."""
    import argparse

    p = argparse.ArgumentParser(prog="python -m bench.fleet", description=main.__doc__)
    p.add_argument("--agents", type=int, default=32)
    p.add_argument("--rate", type=float, default=30.0, help="single events/s per agent")
    p.add_argument("--age", action="append", default=[],
                   help="FLUX_AGENT_BATCH_MAX_AGE to run with (repeat; default: the default)")
    p.add_argument("--pgbouncer", action="store_true", help="also through PgBouncer")
    p.add_argument("--aggregator", action="store_true", help="also through one aggregator")
    args = p.parse_args()
    asyncio.run(_alone(args.agents, args.rate, args.age or [""], args.pgbouncer,
                       args.aggregator))


if __name__ == "__main__":
    main()
