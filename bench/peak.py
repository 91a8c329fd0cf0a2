"""The agent's peak memory as a function of its settings: ``python -m bench.peak``.

A real agent process (``flux-agent run``, a throwaway PostgreSQL) takes, for ``--seconds``,
``--clients`` clients posting large batches at once (a third raw JSON, a third gzip, a third
chunked; small events, payloads of many small objects, payloads of long strings, about
1.6-3.8 MiB each), while its anonymous RSS (what a memory limit charges, besides the page
cache) and VmHWM are sampled. Each row is one setting changed from the defaults;
docs/operations.md ("Memory") quotes the table.
"""

from __future__ import annotations

import argparse
import asyncio
import gzip
import json
import random
import time
from collections import Counter
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import aiohttp

from flux_agent.testing import make_event

from .harness import AgentProc, Database

KiB = 1024
MiB = 1024 * KiB
CASES: list[tuple[str, dict[str, str]]] = [
    ("defaults", {}),
    ("FLUX_AGENT_REQUEST_MEMORY_BYTES=32MiB", {"FLUX_AGENT_REQUEST_MEMORY_BYTES": "32MiB"}),
    ("FLUX_AGENT_REQUEST_MEMORY_BYTES=128MiB", {"FLUX_AGENT_REQUEST_MEMORY_BYTES": "128MiB"}),
    ("FLUX_AGENT_MEMORY_QUEUE_BYTES=1MiB", {"FLUX_AGENT_MEMORY_QUEUE_BYTES": "1MiB"}),
    ("FLUX_AGENT_BATCH_MAX_BYTES=2MiB", {"FLUX_AGENT_BATCH_MAX_BYTES": "2MiB"}),
]


def _batch(n: int, tag: str, payload: dict[str, Any] | None = None) -> bytes:
    fields: dict[str, Any] = {"payload": payload} if payload is not None else {}
    one = len(json.dumps(make_event(**fields)))
    return json.dumps([make_event(run_id=f"{tag}-{i % 40}", **fields)
                       for i in range(max(1, n // (one + 2)))]).encode()


def batches() -> list[bytes]:
    objects: dict[str, Any] = {"v": [{"a": {}} for _ in range(2_000)]}
    return [_batch(int(3.8 * MiB), "small"), _batch(int(1.6 * MiB), "objects", objects),
            _batch(int(3.8 * MiB), "many-objects", objects),
            _batch(int(3.8 * MiB), "text", {"blob": "t" * 200_000})]


async def _client(url: str, kind: str, bodies: list[bytes], until: float,
                  answers: Counter[str]) -> None:
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=120)) as session:
        i = random.randrange(len(bodies))
        while time.monotonic() < until:
            body = bodies[i % len(bodies)]
            i += 1
            headers = {"Content-Type": "application/json"}
            data: Any = body
            if kind == "gzip":
                data, headers["Content-Encoding"] = gzip.compress(body, 1), "gzip"
            elif kind == "chunked":
                async def chunks(body: bytes = body) -> AsyncIterator[bytes]:
                    for start in range(0, len(body), 256 * KiB):
                        yield body[start:start + 256 * KiB]
                data = chunks()
            try:
                async with session.post(url + "/v1/events", data=data,
                                        headers=headers) as resp:
                    text = await resp.read()
                    code = json.loads(text).get("code", "") if resp.status >= 400 else ""
                    answers[f"{resp.status} {code}".strip()] += 1
                    if resp.status == 503:
                        await asyncio.sleep(float(resp.headers.get("Retry-After", "1")))
            except (aiohttp.ClientError, OSError) as exc:
                answers[f"connection: {type(exc).__name__}"] += 1
                await asyncio.sleep(0.5)


def _status(pid: int) -> dict[str, int]:
    fields = dict(line.split(":", 1) for line in
                  Path(f"/proc/{pid}/status").read_text().splitlines())
    return {k: int(fields[k].split()[0]) // 1024 for k in ("VmRSS", "VmHWM", "RssAnon")}


async def one(db: Database, root: Path, name: str, env: dict[str, str], clients: int,
              seconds: float, bodies: list[bytes]) -> dict[str, Any]:
    await db.reset()
    agent = AgentProc(db, root / name.replace("=", "-"), **env)
    await asyncio.to_thread(agent.start)
    assert agent.proc is not None
    pid = agent.proc.pid
    try:
        idle = _status(pid)
        answers: Counter[str] = Counter()
        anon_peak = 0
        until = time.monotonic() + seconds

        async def sample() -> None:
            nonlocal anon_peak
            while time.monotonic() < until:
                anon_peak = max(anon_peak, _status(pid)["RssAnon"])
                await asyncio.sleep(0.05)

        per_kind = max(1, clients // 3)
        await asyncio.gather(sample(), *(
            _client(agent.url, kind, bodies, until, answers)
            for kind in ("raw", "gzip", "chunked") for _ in range(per_kind)))
        return {"setting": name, "clients": 3 * per_kind, "idle_rss_mib": idle["VmRSS"],
                "idle_anon_mib": idle["RssAnon"], "peak_anon_mib": anon_peak,
                "peak_rss_mib": _status(pid)["VmHWM"], "answers": dict(answers)}
    finally:
        await asyncio.to_thread(agent.stop)


async def main_async(args: argparse.Namespace) -> list[dict[str, Any]]:
    db = Database(args.database_url)
    await db.start()
    bodies = batches()
    rows = []
    try:
        for name, env in CASES:
            for clients in args.clients:
                row = await one(db, db.root, f"{name}-{clients}", env, clients, args.seconds,
                                bodies)
                row["setting"] = name
                print(json.dumps(row), flush=True)
                rows.append(row)
    finally:
        await asyncio.to_thread(db.destroy)
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seconds", type=float, default=20.0)
    parser.add_argument("--clients", type=int, nargs="+", default=[12, 72])
    parser.add_argument("--database-url", default=None)
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    rows = asyncio.run(main_async(args))
    if args.json:
        args.json.write_text(json.dumps(rows, indent=2))


if __name__ == "__main__":
    main()
