"""``python -m bench``: the benchmark suite (docs/benchmarks.md says what it
runs; bench/RESULTS.md explains each figure).

Starts a throwaway PostgreSQL (or uses ``--database-url``), runs the agent as a separate
process, drives load from separate processes, and reports every scenario next to a baseline
measured in the same run.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import shutil
import sys
import time
from pathlib import Path
from typing import Any

from .fleet import fleet, single_c1, trickle
from .harness import BareServer, Database, machine
from .report import markdown, plot_outage
from .retention import retention
from .scenarios import (
    Ctx,
    backlog,
    checkpoints,
    crash,
    event_pages,
    idle,
    make_jwt,
    measure_baselines,
    outage,
    steady,
    throughput,
)


async def suite(args: argparse.Namespace) -> dict[str, Any]:
    db = Database(args.database_url)
    await db.start()
    ctx = Ctx(db=db, tmp=db.root, quick=args.quick)
    info = machine()
    info["postgres"] = db.version
    info["command"] = " ".join(["python", "-m", "bench", *sys.argv[1:]])
    started = time.time()
    try:
        print("baselines", flush=True)
        await measure_baselines(ctx)
        make_jwt(ctx)
        print("throughput", flush=True)
        peak = 0.0
        for c in ((2,) if ctx.quick else (1, 2, 4)):
            row = await throughput(ctx, f"batches of 500, JSON array, TCP, c={c}",
                                   events=500, fmt="json", connections=c)
            peak = max(peak, row["events_per_s"])
        await throughput(ctx, "batches of 500, NDJSON, TCP, c=2", events=500, fmt="ndjson",
                         connections=2)
        await throughput(ctx, "batches of 500, in-memory acks (durability none), TCP, c=2",
                         events=500, fmt="json", connections=2,
                         env={"FLUX_AGENT_SPOOL_DURABILITY": "none"})
        await throughput(ctx, "single events, Unix socket, c=32", events=1, fmt="single",
                         connections=32, transport="unix", baseline="c_single_unix")
        await throughput(ctx, "single events, TCP, c=32", events=1, fmt="single",
                         connections=32, baseline="c_single_tcp")
        await throughput(ctx, "single events, TCP, c=32, JWT auth", events=1, fmt="single",
                         connections=32, baseline="c_single_tcp", auth=True)
        await throughput(ctx, "batches of 500, TCP, c=2, JWT auth", events=500, fmt="json",
                         connections=2, auth=True)
        with BareServer(ctx.tmp) as collector:  # an OTLP receiver that keeps nothing
            tracing = {"FLUX_AGENT_TRACING": "otlp",
                       "OTEL_EXPORTER_OTLP_TRACES_ENDPOINT":
                           f"http://127.0.0.1:{collector.port}/v1/traces"}
            await throughput(ctx, "batches of 500, TCP, c=2, tracing on (OTLP)", events=500,
                             fmt="json", connections=2, env=tracing)
            await throughput(ctx, "single events, TCP, c=32, tracing on (OTLP)", events=1,
                             fmt="single", connections=32, baseline="c_single_tcp",
                             env=tracing)
        print("the fleet's shape: c=1, trickles, many agents", flush=True)
        await single_c1(ctx)
        for rate in ((100.0,) if ctx.quick else (10.0, 100.0)):
            await trickle(ctx, rate)
        await fleet(ctx, 8 if ctx.quick else 32, 30.0, pgbouncer=False)
        await fleet(ctx, 8 if ctx.quick else 32, 30.0, aggregator=True)
        if not ctx.quick:
            await fleet(ctx, 32, 30.0, pgbouncer=True)
        print("latency, faults, footprint", flush=True)
        await steady(ctx, peak / 2)
        await outage(ctx, peak / 2)
        await crash(ctx, peak / 2)
        await checkpoints(ctx)
        await event_pages(ctx, 100_000 if ctx.quick else 1_000_000)
        if not ctx.quick:
            await backlog(ctx, 1_000_000)
        if not ctx.quick and not args.no_retention:
            print("retention", flush=True)
            await retention(ctx.db, 10_000_000, ctx.add, ctx.notes)
        await idle(ctx)
    finally:
        await asyncio.to_thread(db.destroy)
    return {"machine": info, "seconds": round(time.time() - started, 1),
            "scenarios": ctx.results, "notes": ctx.notes, "timelines": ctx.timelines}


def main() -> int:
    p = argparse.ArgumentParser(prog="python -m bench", description=__doc__)
    p.add_argument("--quick", action="store_true", help="a run under two minutes")
    p.add_argument("--database-url", default=None,
                   help="an existing PostgreSQL (a superuser) instead of a throwaway one")
    p.add_argument("--no-retention", action="store_true",
                   help="leave out retention on 10M events (python -m bench.retention runs it)")
    p.add_argument("--json", dest="json_path", default=None, help="write results here")
    p.add_argument("--markdown", default=None, help="write the table here")
    p.add_argument("--plot", default=None, help="PNG of the outage scenario")
    args = p.parse_args()
    if shutil.which("wrk") is None:
        print("bench: wrk is required for the TCP scenarios (Debian: apt-get install wrk)",
              file=sys.stderr)
        return 2
    results = asyncio.run(suite(args))
    table = markdown(results)
    print(table)
    if args.json_path:
        out = {k: v for k, v in results.items() if k != "timelines"}
        out["outage_timeline"] = results["timelines"].get("outage", [])
        Path(args.json_path).write_text(json.dumps(out, indent=2))
    if args.markdown:
        Path(args.markdown).write_text(table)
    if args.plot and "outage" in results["timelines"]:
        plot_outage(results["timelines"]["outage"], Path(args.plot))
    return 0


if __name__ == "__main__":
    sys.exit(main())
