"""Load generator, run as its own process: ``python -m bench.load ...``.

Closed loop (``--concurrency`` workers, as fast as the server answers) or open loop
(``--rate`` requests per second, spread over the workers). Bodies carry fresh event ids;
they are built before the clock starts (or, for long open-loop runs, from a template cheap
enough not to matter). Prints one JSON object: counts, wall times, latency percentiles, and
optionally writes the acknowledged ids to a file (for lost/duplicated checks).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import sys
import time
from typing import Any

import aiohttp

NOW = "2026-11-23T07:00:00Z"
PAYLOAD = ('{"items_processed": %d, "duration_ms": 12.5, "content_type": "images", '
           '"use_case": "research", "note": "benchmark payload of about two hundred bytes, '
           'typical of a step event with a few counters and labels"}')


def _ids(n: int) -> list[str]:
    out = []
    for _ in range(n):
        h = os.urandom(16).hex()
        out.append(f"{h[:8]}-{h[8:12]}-4{h[13:16]}-8{h[17:20]}-{h[20:32]}")
    return out


def make_body(n: int, fmt: str, seq: int) -> tuple[bytes, list[str]]:
    ids = _ids(n)
    events = [
        '{"event_id": "%s", "run_id": "bench-%d", "kind": "step.completed", "step": "load", '
        '"occurred_at": "%s", "payload": %s}' % (eid, (seq + i) % 64, NOW, PAYLOAD % (seq + i))
        for i, eid in enumerate(ids)
    ]
    if fmt == "ndjson":
        return ("\n".join(events) + "\n").encode(), ids
    if n == 1 and fmt == "single":
        return events[0].encode(), ids
    return ("[" + ",".join(events) + "]").encode(), ids


def percentile(sorted_values: list[float], p: float) -> float:
    if not sorted_values:
        return 0.0
    k = min(len(sorted_values) - 1, max(0, round(p / 100 * (len(sorted_values) - 1))))
    return sorted_values[k]


async def run(args: argparse.Namespace) -> dict[str, Any]:
    ctype = "application/x-ndjson" if args.format == "ndjson" else "application/json"
    headers = {"Content-Type": ctype}
    for h in args.header:
        k, _, v = h.partition(":")
        headers[k.strip()] = v.strip()
    n = args.events
    pre: list[tuple[bytes, list[str]]] = []
    if args.requests and not args.lazy:
        pre = [make_body(n, args.format, i * n) for i in range(args.requests)]
    latencies: list[float] = []
    statuses: dict[int, int] = {}
    acked: list[str] = []
    failures = 0
    sent = 0
    deadline = None
    stop = asyncio.Event()
    interval = args.concurrency / args.rate if args.rate else 0.0
    connector: aiohttp.BaseConnector
    if args.socket:
        connector = aiohttp.UnixConnector(path=args.socket, limit=0)
        urls = ["http://agent" + args.path]
    else:
        connector = aiohttp.TCPConnector(limit=0)
        urls = args.url or ["http://127.0.0.1:8787/v1/events"]
    timeout = aiohttp.ClientTimeout(total=30)

    async def worker(wid: int, session: aiohttp.ClientSession) -> None:
        nonlocal sent, failures
        url = urls[wid % len(urls)]  # several agents: workers spread over them evenly
        next_at = time.perf_counter() + (interval * wid / max(1, args.concurrency))
        while not stop.is_set():
            if deadline is not None and time.perf_counter() >= deadline:
                return
            if args.requests and sent >= args.requests:
                return
            if pre:
                body, ids = pre[sent]
            else:
                body, ids = make_body(n, args.format, sent * n)
            sent += 1
            if interval:
                delay = next_at - time.perf_counter()
                if delay > 0:
                    await asyncio.sleep(delay)
                next_at += interval
            started = time.perf_counter()
            try:
                async with session.post(url, data=body, headers=headers) as resp:
                    await resp.read()
                    status = resp.status
            except (aiohttp.ClientError, OSError, TimeoutError):
                failures += 1
                await asyncio.sleep(0.05)
                continue
            latencies.append((time.perf_counter() - started) * 1000)
            statuses[status] = statuses.get(status, 0) + 1
            if 200 <= status < 300:
                acked.extend(ids)
            elif status == 503:
                await asyncio.sleep(0.01)

    async with aiohttp.ClientSession(connector=connector, timeout=timeout) as session:
        t0 = time.time()
        p0 = time.perf_counter()
        if args.duration:
            deadline = p0 + args.duration
        await asyncio.gather(*(worker(i, session) for i in range(args.concurrency)))
        elapsed = time.perf_counter() - p0
    latencies.sort()
    if args.ids_out:
        with open(args.ids_out, "w") as fh:
            fh.write("\n".join(acked))
    return {
        "t_start": t0, "elapsed_s": elapsed, "requests": sum(statuses.values()),
        "failures": failures, "statuses": statuses, "events_acked": len(acked),
        "requests_per_s": sum(statuses.values()) / elapsed if elapsed else 0.0,
        "p50_ms": percentile(latencies, 50), "p99_ms": percentile(latencies, 99),
        "p999_ms": percentile(latencies, 99.9),
    }


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--url", action="append", default=[],
                   help="where to post (repeat it: the workers spread over several agents)")
    p.add_argument("--socket", default=None)
    p.add_argument("--path", default="/v1/events")
    p.add_argument("--events", type=int, default=1, help="events per request")
    p.add_argument("--format", choices=["json", "ndjson", "single"], default="json")
    p.add_argument("--concurrency", type=int, default=8)
    p.add_argument("--requests", type=int, default=0, help="how many requests to send")
    p.add_argument("--lazy", action="store_true",
                   help="build bodies while sending instead of before the clock starts")
    p.add_argument("--duration", type=float, default=0.0, help="seconds (open-ended runs)")
    p.add_argument("--rate", type=float, default=0.0, help="requests per second (open loop)")
    p.add_argument("--header", action="append", default=[])
    p.add_argument("--ids-out", default=None)
    args = p.parse_args()
    try:
        import uvloop

        result = uvloop.run(run(args))
    except ImportError:
        result = asyncio.run(run(args))
    json.dump(result, sys.stdout)
    sys.stdout.write("\n")


if __name__ == "__main__":
    main()
