"""Recovery from faults, with the agent's default settings: how long each fault takes to be
seen on the probes, and how long after it ends every acknowledged event is in PostgreSQL.

    python -m bench.faults [--fault NAME ...] [--seconds 20] [--json out.json]

Faults: pg-stop (a clean stop and start), reset (every connection reset, new ones refused),
black-hole (the path accepts and carries nothing), pg-freeze (SIGSTOP of every PostgreSQL
process), sigkill (the agent killed and started again), disk-full (the state dir on a
tmpfs that fills; root only). A load process posts ten-event requests at a steady pace
throughout; each row says what it acknowledged during the fault and that none was lost.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import signal
import subprocess
import tempfile
import time
import urllib.request
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import psutil

from tests.support.faults import Ledger, LoadGen, TcpProxy

from .harness import AgentProc, Database

FAULTS = ("pg-stop", "reset", "black-hole", "pg-freeze", "sigkill", "disk-full")


def ready(agent: AgentProc) -> tuple[int, dict[str, Any]]:
    try:
        with urllib.request.urlopen(agent.admin + "/health/ready", timeout=10) as r:
            return r.status, json.loads(r.read())
    except urllib.error.HTTPError as exc:
        return exc.code, json.loads(exc.read() or b"{}")
    except OSError:
        return 0, {}


async def until(check: Callable[[], Awaitable[bool] | bool], timeout: float) -> float | None:
    """Seconds until ``check`` holds, or None."""
    start = time.monotonic()
    while time.monotonic() - start < timeout:
        result = check()
        if not isinstance(result, bool):
            result = await result
        if result:
            return time.monotonic() - start
        await asyncio.sleep(0.1)
    return None


async def stored(db: Database) -> set[str]:
    import asyncpg

    conn = await asyncpg.connect(db.admin_dsn)
    try:
        return {str(r[0]) for r in await conn.fetch("SELECT event_id FROM flux.events")}
    finally:
        await conn.close()


def postgres_pids(db: Database) -> list[int]:
    assert db.cluster is not None
    pid = db.cluster.running_pid()
    if pid is None:
        return []
    parent = psutil.Process(pid)
    return [pid] + [c.pid for c in parent.children(recursive=True)]


async def run_fault(name: str, db: Database, tmp: Path, seconds: float) -> dict[str, Any]:
    await db.reset()
    state = tmp / name
    env: dict[str, str] = {}
    proxy = TcpProxy("127.0.0.1", int(db.admin_dsn.rsplit(":", 1)[1].split("/")[0]))
    await proxy.start()
    mount = None
    if name == "disk-full":
        state.mkdir(parents=True)
        subprocess.run(["mount", "-t", "tmpfs", "-o", "size=24m", "tmpfs", str(state)],
                       check=True)
        mount = state
        env["FLUX_AGENT_SPOOL_SEGMENT_BYTES"] = "4MiB"
        env["FLUX_AGENT_REQUEST_MAX_BYTES"] = "1MiB"
        env["FLUX_AGENT_LINEAGE_MAX_BYTES"] = "1MiB"
        env["FLUX_AGENT_REQUEST_MEMORY_BYTES"] = "4MiB"
    agent = AgentProc(_via(db, proxy), state, **env)
    row: dict[str, Any] = {"fault": name, "fault_seconds": seconds}
    ledger = Ledger()
    try:
        agent.start()
        load = LoadGen(agent.url + "/v1/events", ledger, batch=10, concurrency=2, pause=0.02)
        load.start()
        await asyncio.sleep(3)
        acked_before = len(ledger.acked)
        began = time.monotonic()
        ballast: Path | None = None
        if name == "pg-stop":
            await asyncio.to_thread(db.stop)
        elif name == "reset":
            proxy.cut()
        elif name == "black-hole":
            proxy.black_hole()
        elif name == "pg-freeze":
            for pid in postgres_pids(db):
                os.kill(pid, signal.SIGSTOP)
        elif name == "sigkill":
            agent.kill()
        elif name == "disk-full":
            ballast = _fill(state)
        if name == "sigkill":
            row["detected_s"] = 0.0
        elif name == "disk-full":
            row["detected_s"] = await until(
                lambda: "spool_unwritable" in ready(agent)[1].get("reasons", []), seconds)
        else:
            row["detected_s"] = await until(
                lambda: ready(agent)[1].get("database") == "down", seconds)
        await asyncio.sleep(max(0.0, seconds - (time.monotonic() - began)))
        acked_during = len(ledger.acked) - acked_before
        healed = time.monotonic()
        if name == "pg-stop":
            await asyncio.to_thread(db.start_again)
        elif name in ("reset", "black-hole"):
            proxy.restore()
        elif name == "pg-freeze":
            for pid in postgres_pids(db):
                os.kill(pid, signal.SIGCONT)
        elif name == "sigkill":
            row["restart_to_ready_s"] = round(await asyncio.to_thread(agent.start), 3)
        elif name == "disk-full" and ballast is not None:
            ballast.unlink()
            row["writable_again_s"] = await until(lambda: ready(agent)[0] == 200, 60)
        await load.stop()
        acked = ledger.acked

        async def landed() -> bool:
            return acked <= await stored(db)

        row["recovered_s"] = await until(landed, 120)
        final = await stored(db)
        row.update({
            "acked_during_fault": acked_during, "acked": len(acked),
            "lost": len(acked - final), "foreign": len(final - ledger.attempted),
            "refused_503": ledger.refused,
        })
        del healed
    finally:
        agent.stop()
        await proxy.stop()
        if name == "pg-freeze":
            for pid in postgres_pids(db):
                os.kill(pid, signal.SIGCONT)
        if name == "pg-stop" and db.cluster is not None and db.cluster.running_pid() is None:
            await asyncio.to_thread(db.start_again)
        if mount is not None:
            subprocess.run(["umount", "-l", str(mount)], check=False)
    return {k: round(v, 2) if isinstance(v, float) else v for k, v in row.items()}


def _via(db: Database, proxy: TcpProxy) -> Database:
    """The same database, the agent reaching it through the proxy."""
    clone = Database.__new__(Database)
    clone.__dict__.update(db.__dict__)
    host, rest = db.agent_dsn.split("@", 1)
    clone.agent_dsn = f"{host}@127.0.0.1:{proxy.port}/{rest.split('/', 1)[1]}"
    return clone


def _fill(directory: Path) -> Path:
    path = directory / "ballast"
    fd = os.open(path, os.O_WRONLY | os.O_CREAT, 0o600)
    try:
        for chunk in (1 << 20, 4096):
            try:
                while True:
                    os.write(fd, b"\0" * chunk)
            except OSError:
                pass
    finally:
        os.close(fd)
    return path


async def main(argv: list[str] | None = None) -> list[dict[str, Any]]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--fault", action="append", choices=FAULTS)
    parser.add_argument("--seconds", type=float, default=20.0, help="how long each fault lasts")
    parser.add_argument("--json", type=Path)
    args = parser.parse_args(argv)
    faults = args.fault or [f for f in FAULTS if f != "disk-full" or os.geteuid() == 0]
    db = Database()
    await db.start()
    tmp = Path(tempfile.mkdtemp(prefix="flux-faults-", dir="/tmp"))
    rows = []
    try:
        for name in faults:
            row = await run_fault(name, db, tmp, args.seconds)
            print(json.dumps(row), flush=True)
            rows.append(row)
    finally:
        db.destroy()
    if args.json:
        args.json.write_text(json.dumps(rows, indent=2))
    return rows


if __name__ == "__main__":
    asyncio.run(main())
