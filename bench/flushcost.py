"""What one flush costs PostgreSQL: ``python -m bench.flushcost``.

One connection as the agent's role calls ``flux.write_v1`` (the agent's whole write) with 1
and with 30 events, back to back and paced (one call every 50 ms, 200 ms, 1 s: a sidecar's
trickle, where the backend sleeps between flushes), and ``SELECT 1`` the same two ways for
scale. Figures per call: the backend's on-CPU time (``/proc/PID/schedstat``, nanoseconds),
its user and system shares (``/proc/PID/stat``, clock ticks: coarse for the paced runs), and
the WAL it wrote (``pg_current_wal_lsn()`` around the run). The fleet's PostgreSQL cost
follows from two of them: a fixed cost per flush and a cost per event.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
from pathlib import Path
from typing import Any

import asyncpg

from flux_agent.postgres.sink import _WRITE

from .baselines import rows
from .harness import Database

TICK_US = 1e6 / os.sysconf("SC_CLK_TCK")


def _on_cpu_us(pid: int) -> float:
    return int(Path(f"/proc/{pid}/schedstat").read_text().split()[0]) / 1e3


def _user_sys_us(pid: int) -> tuple[float, float]:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return int(fields[11]) * TICK_US, int(fields[12]) * TICK_US


async def _run(conn: Any, pid: int, call: Any, n: int, pace: float,
               admin: Any) -> dict[str, float]:
    lsn0 = await admin.fetchval("SELECT pg_current_wal_lsn()")
    cpu0, (u0, s0) = _on_cpu_us(pid), _user_sys_us(pid)
    for i in range(n):
        await call(i)
        if pace:
            await asyncio.sleep(pace)
    cpu1, (u1, s1) = _on_cpu_us(pid), _user_sys_us(pid)
    wal = await admin.fetchval("SELECT pg_current_wal_lsn() - $1::pg_lsn", lsn0)
    return {"calls": n, "cpu_us": (cpu1 - cpu0) / n, "user_us": (u1 - u0) / n,
            "sys_us": (s1 - s0) / n, "wal_bytes": float(wal) / n}


async def measure(seconds: float) -> list[dict[str, Any]]:
    db = Database()
    await db.start()
    out: list[dict[str, Any]] = []
    try:
        conn = await asyncpg.connect(db.agent_dsn)
        admin = await asyncpg.connect(db.admin_dsn)
        pid = await conn.fetchval("SELECT pg_backend_pid()")
        for pace in (0.0, 0.05, 0.2, 1.0):
            n = 400 if pace == 0 else max(10, int(seconds / pace))

            async def select1(_: int) -> None:
                await conn.fetchval("SELECT 1")

            await select1(0)
            out.append({"call": "SELECT 1", "events": 0, "pace_s": pace,
                        **await _run(conn, pid, select1, n, pace, admin)})
            for size in (1, 30):
                data = rows(n * size)
                await conn.fetchrow(_WRITE, rows(size), [], [], False)  # warm

                async def write(i: int, size: int = size, data: Any = data) -> None:
                    await conn.fetchrow(_WRITE, data[i * size:(i + 1) * size], [], [], False)

                row = {"call": "flux.write_v1", "events": size, "pace_s": pace,
                       **await _run(conn, pid, write, n, pace, admin)}
                out.append(row)
                print(json.dumps(row), flush=True)
        await conn.close()
        await admin.close()
    finally:
        await asyncio.to_thread(db.destroy)
    return out


def main() -> None:
    p = argparse.ArgumentParser(prog="python -m bench.flushcost", description=__doc__)
    p.add_argument("--seconds", type=float, default=12.0, help="length of each paced run")
    p.add_argument("--json", type=Path)
    args = p.parse_args()
    result = asyncio.run(measure(args.seconds))
    print("| call | events | pace | backend CPU µs/call | user | sys | WAL bytes/call |")
    print("|---|---|---|---|---|---|---|")
    for r in result:
        print(f"| {r['call']} | {r['events']} | {r['pace_s']} s | {r['cpu_us']:,.0f} | "
              f"{r['user_us']:,.0f} | {r['sys_us']:,.0f} | {r['wal_bytes']:,.0f} |")
    if args.json:
        args.json.write_text(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
