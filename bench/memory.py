"""Where the agent's memory goes, by stage: ``python -m bench.memory``.

Two figures, both from a real agent: what the modules it imports cost (RSS and anonymous RSS
after each import, in a fresh interpreter), and the high-water mark of Python allocations
under load (tracemalloc, an agent in this process taking batches of 500 events from a load
process), grouped by the stage that allocated them (the innermost frame of the agent's own
code, else the library's package).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import subprocess
import sys
import tempfile
import tracemalloc
from collections import Counter
from pathlib import Path
from typing import Any

from .harness import Database, run_load

IMPORTS = ("asyncio", "ssl", "uvloop", "msgspec", "google_crc32c", "prometheus_client",
           "jsonschema_rs", "asyncpg", "aiohttp", "aiohttp.web", "flux_agent.core.settings",
           "flux_agent.intake.validate", "flux_agent.postgres.pool", "flux_agent.spool",
           "flux_agent.flush.flusher", "flux_agent.intake.app", "flux_agent.agent",
           "flux_agent.cli")

_STEP = r"""
import json, sys
def mem():
    st = dict(l.split(":", 1) for l in open("/proc/self/status").read().splitlines())
    return int(st["VmRSS"].split()[0]) / 1024, int(st["RssAnon"].split()[0]) / 1024
out = [["interpreter", *mem()]]
for name in sys.argv[1:]:
    __import__(name)
    out.append([name, *mem()])
print(json.dumps(out))
"""


def imports() -> list[dict[str, Any]]:
    result = subprocess.run([sys.executable, "-c", _STEP, *IMPORTS], capture_output=True,
                            text=True, check=True)
    steps = json.loads(result.stdout)
    rows = []
    prev = (0.0, 0.0)
    for name, rss, anon in steps:
        rows.append({"import": name, "rss_mib": round(rss - prev[0], 1),
                     "anon_mib": round(anon - prev[1], 1), "total_rss_mib": round(rss, 1),
                     "total_anon_mib": round(anon, 1)})
        prev = (rss, anon)
    return rows


def stage_of(frames: Any) -> str:
    """The agent's own module nearest the allocation, else the library's package."""
    for frame in frames:  # innermost first
        path: str = frame.filename
        if "/flux_agent/" in path:
            return "flux_agent/" + path.split("/flux_agent/", 1)[1]
    path = str(frames[0].filename)
    if "site-packages/" in path:
        return path.split("site-packages/", 1)[1].split("/", 1)[0]
    return "python: " + Path(path).name


async def under_load(seconds: float) -> dict[str, Any]:
    from flux_agent.agent import Agent
    from flux_agent.core.settings import load_config
    from flux_agent.postgres.embedded import free_port

    db = Database()
    await db.start()
    state = Path(tempfile.mkdtemp(prefix="flux-mem-", dir="/tmp"))
    port = free_port()
    env = {"FLUX_AGENT_AUTH": "none", "FLUX_AGENT_AGENCY": "nasa",
           "FLUX_AGENT_STATE_DIR": str(state), "FLUX_AGENT_DATABASE_URL": db.agent_dsn,
           "FLUX_AGENT_LISTEN": f"127.0.0.1:{port}", "FLUX_AGENT_ADMIN_LISTEN": "off",
           "FLUX_AGENT_MIGRATE": "false", "FLUX_AGENT_LOG_LEVEL": "warning"}
    try:
        async with Agent(load_config([], environ=env)):
            tracemalloc.start(25)
            base, _ = tracemalloc.get_traced_memory()
            tracemalloc.reset_peak()
            load = asyncio.ensure_future(asyncio.to_thread(
                run_load, "--url", f"http://127.0.0.1:{port}/v1/events", "--events", "500",
                "--concurrency", "4", "--duration", str(seconds)))
            # The fullest moment seen: a snapshot every half second, the largest kept.
            snapshot, largest = tracemalloc.take_snapshot(), 0
            while not load.done():
                await asyncio.sleep(0.5)
                current, _ = tracemalloc.get_traced_memory()
                if current > largest:
                    snapshot, largest = tracemalloc.take_snapshot(), current
            await load
            _, peak = tracemalloc.get_traced_memory()
            tracemalloc.stop()
    finally:
        await asyncio.to_thread(db.destroy)
    by_stage: Counter[str] = Counter()
    for stat in snapshot.statistics("traceback"):
        by_stage[stage_of(list(reversed(stat.traceback)))] += stat.size
    return {"traced_at_start_mib": round(base / 2**20, 1),
            "traced_peak_mib": round(peak / 2**20, 1),
            "largest_snapshot_mib": round(largest / 2**20, 1),
            "largest_snapshot_by_stage_kib": {k: round(v / 1024) for k, v in
                                              by_stage.most_common(15)}}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seconds", type=float, default=10.0)
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    out = {"imports": imports(), "load": asyncio.run(under_load(args.seconds))}
    text = json.dumps(out, indent=2)
    print(text)
    if args.json:
        args.json.write_text(text)


if __name__ == "__main__":
    main()
