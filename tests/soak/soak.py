"""Soak: many SIGKILL/restart rounds and PostgreSQL outages under load (not run in CI).

    python -m tests.soak.soak --rounds 200 --outages 20

Prints acknowledged, stored, lost (must be 0) and duplicated (must be 0), and exits 1 if
either is not 0.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import random
import shutil
import sys
import time

import asyncpg

from flux_agent.postgres.embedded import LocalPostgres, find_bin_dir, free_port
from flux_agent.postgres.migrations import bootstrap_database

from ..support.postgres import FAST_SETTINGS, LOGIN_PASSWORD, LOGIN_ROLE, Database
from ..support.agents import AgentProcess, agent_env
from ..support.paths import short_tempdir
from ..support.faults import Ledger, LoadGen


async def main(rounds: int, outages: int, seed: int) -> int:
    rng = random.Random(seed)
    root = short_tempdir("fa-soak-")
    cluster = LocalPostgres(root / "pg", bin_dir=find_bin_dir(prefer="system"), port=free_port(),
                            settings=FAST_SETTINGS)
    await asyncio.to_thread(cluster.start)
    await bootstrap_database(cluster.dsn(), cluster.dsn(database="flux"), "flux", LOGIN_ROLE)
    conn = await asyncpg.connect(cluster.dsn(database="flux"))
    await conn.execute(f"ALTER ROLE {LOGIN_ROLE} PASSWORD '{LOGIN_PASSWORD}'")
    await conn.close()
    db = Database("flux", cluster.dsn(database="flux"),
                  cluster.dsn(user=LOGIN_ROLE, database="flux", password=LOGIN_PASSWORD))
    state = root / "state"
    state.mkdir()
    proc = AgentProcess(agent_env(db, state, FLUX_AGENT_FLUSH_RETRY_MAX="1s"),
                        root / "agent.log")
    ledger = Ledger()
    # One ledger per round as well, so that a loss can be traced to what its round did.
    rounds_done: list[tuple[str, Ledger]] = []
    outage_rounds = set(rng.sample(range(rounds), min(outages, rounds)))
    started = time.monotonic()
    ok = False
    try:
        for n in range(rounds):
            await asyncio.to_thread(proc.start)
            batch, concurrency = rng.choice([1, 20, 200]), rng.choice([2, 8])
            round_ledger = Ledger()
            what = f"round {n}: batch={batch} concurrency={concurrency}"
            load = LoadGen(proc.url + "/v1/events", round_ledger, batch=batch,
                           concurrency=concurrency)
            load.start()
            if n in outage_rounds:
                mode = rng.choice(["fast", "immediate"])
                what += f" outage={mode}"
                await asyncio.sleep(rng.uniform(0.2, 1.0))
                await asyncio.to_thread(cluster.stop, mode)
                await asyncio.sleep(rng.uniform(1.0, 4.0))
                await asyncio.to_thread(cluster.start)
            await asyncio.sleep(rng.uniform(0.1, 1.5))
            proc.kill()
            await load.stop()
            rounds_done.append((what, round_ledger))
            ledger.attempted |= round_ledger.attempted
            ledger.acked |= round_ledger.acked
            ledger.refused += round_ledger.refused
            ledger.failed += round_ledger.failed
            if n % 10 == 9:
                print(f"round {n + 1}/{rounds}: acked {len(ledger.acked)}", file=sys.stderr)
        await asyncio.to_thread(proc.start)
        drain_started = time.monotonic()
        deadline = drain_started + 300
        while time.monotonic() < deadline:
            stored = {str(r[0]) for r in await db.fetch("SELECT event_id FROM flux.events")}
            if ledger.acked <= stored:
                break
            await asyncio.sleep(0.5)
        final_drain = time.monotonic() - drain_started
        total = await db.fetchval("SELECT count(*) FROM flux.events")
        distinct = await db.fetchval("SELECT count(DISTINCT (agency_id, event_id)) "
                                     "FROM flux.events")
        dead = await db.fetchval("SELECT count(*) FROM flux.dead_letters")
        lost, foreign = ledger.check(stored)
        report = {
            "rounds": rounds, "outages": len(outage_rounds), "seconds": round(
                time.monotonic() - started, 1), "final_drain_seconds": round(final_drain, 1),
            "attempted": len(ledger.attempted), "acknowledged": len(ledger.acked),
            "stored": int(total), "lost": lost, "duplicated": int(total - distinct),
            "stored_but_never_sent": foreign, "dead_letters": int(dead),
            "interrupted_requests": ledger.failed, "refused_503": ledger.refused,
        }
        if lost:
            report["lost_by_round"] = [
                f"{what}: lost {len(r.acked - stored)} of {len(r.acked)} acknowledged"
                for what, r in rounds_done if r.acked - stored]
        print(json.dumps(report, indent=2))
        ok = lost == 0 and total == distinct and foreign == 0 and dead == 0
        return 0 if ok else 1
    finally:
        proc.kill()
        if ok:
            await asyncio.to_thread(cluster.destroy)
            shutil.rmtree(root, ignore_errors=True)
        else:  # keep the evidence: the spool, the agent's log, the database files
            await asyncio.to_thread(cluster.stop)
            print(f"kept for inspection: {root} (agent log: {root / 'agent.log'})",
                  file=sys.stderr)


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--rounds", type=int, default=200)
    parser.add_argument("--outages", type=int, default=20)
    parser.add_argument("--seed", type=int, default=7)
    args = parser.parse_args()
    sys.exit(asyncio.run(main(args.rounds, args.outages, args.seed)))
