"""The tiered topology with real processes and real faults: sidecars -> aggregators -> one
PostgreSQL, processes on loopback standing for pods. Every test asserts that each event a
sidecar acknowledged is stored exactly once, whatever happened on the way: the database away
while a pod ends and its emptyDir goes, an aggregator killed under load, an aggregator's disk
full, callers of the wrong namespace or agency, a black-holed path."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from flux_agent.postgres.embedded import free_port
from flux_agent.testing import make_event

from .support.agents import agent_env
from .support.capture import CAPTURED
from .support.faults import Ledger, LoadGen, TcpProxy
from .support.paths import short_tempdir
from .support.polling import wait_until
from .support.postgres import Database, proxied
from .support.tokens import jwks, private_key
from .support.tools import require_root
from .test_resource_faults import fill
from .test_workload_identity import CLUSTER_ISSUER, kubelet_token

# Aggregators killed, lines cut, a disk filled: real faults, every one.
pytestmark = [pytest.mark.tiered, pytest.mark.fault]


class Flux:
    """A real ``flux-agent run`` (a sidecar) or ``flux-agent aggregate`` process."""

    def __init__(self, command: str, env: dict[str, str], state_dir: Path,
                 log_dir: Path | None = None) -> None:
        self.command = command
        self.state_dir = state_dir
        self.port = free_port()
        self.admin_port = free_port()
        self.env = {**env, "FLUX_AGENT_STATE_DIR": str(state_dir),
                    "FLUX_AGENT_LISTEN": f"127.0.0.1:{self.port}",
                    "FLUX_AGENT_ADMIN_LISTEN": f"127.0.0.1:{self.admin_port}"}
        self.log_path = (log_dir or state_dir.parent) / f"{command}-{state_dir.name}.log"
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    async def start(self, timeout: float = 45.0) -> Flux:
        with self.log_path.open("ab") as log:
            self.proc = subprocess.Popen([sys.executable, "-m", "flux_agent", self.command],
                                         env=self.env, stdout=log, stderr=subprocess.STDOUT)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"{self.command} exited {self.proc.returncode}: "
                                   f"{self.log_path.read_text()[-3000:]}")
            with contextlib.suppress(OSError), socket.create_connection(
                    ("127.0.0.1", self.admin_port), timeout=0.2):
                return self
            await asyncio.sleep(0.05)
        raise RuntimeError(f"{self.command} did not start in time")

    async def ready(self) -> tuple[int, dict[str, Any]]:
        async with aiohttp.ClientSession() as session, session.get(
                f"http://127.0.0.1:{self.admin_port}/health/ready") as resp:
            return resp.status, await resp.json()

    async def post(self, events: list[dict[str, Any]]) -> int:
        async with aiohttp.ClientSession() as session, session.post(
                self.url + "/v1/events", json=events) as resp:
            await resp.read()
            return resp.status

    def signal(self, sig: int) -> None:
        assert self.proc is not None
        self.proc.send_signal(sig)

    def wait(self, timeout: float = 60) -> int:
        assert self.proc is not None
        code = self.proc.wait(timeout)
        self._capture()
        return code

    def kill(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(10)
        self._capture()

    def records(self) -> list[dict[str, Any]]:
        out = []
        for line in self.log_path.read_text(errors="replace").splitlines():
            with contextlib.suppress(ValueError):
                record = json.loads(line)
                if isinstance(record, dict):
                    out.append(record)
        return out

    def _capture(self) -> None:
        with contextlib.suppress(OSError):
            CAPTURED.append(self.log_path.read_text(errors="replace"))


@pytest.fixture
async def fleet() -> AsyncIterator[list[Flux]]:
    """Processes started by a test, killed at its end whatever happened."""
    started: list[Flux] = []
    yield started
    for flux in started:
        flux.kill()


@pytest.fixture
def dirs() -> Iterator[list[Path]]:
    made: list[Path] = []
    yield made
    for path in made:
        subprocess.run(["umount", "-l", str(path / "disk")], check=False,
                       capture_output=True)
        shutil.rmtree(path, ignore_errors=True)


def new_dir(dirs: list[Path]) -> Path:
    path = short_tempdir("fa-t-")
    dirs.append(path)
    return path / "state"


def aggregator_env(database: Database, **extra: str) -> dict[str, str]:
    env = agent_env(database, Path("/nonexistent"), FLUX_AGENT_SOCKET="off",
                    FLUX_AGENT_BATCH_MAX_AGE="50ms", FLUX_AGENT_DRAIN_TIMEOUT="10s",
                    FLUX_AGENT_DATABASE_PING_INTERVAL="1s",
                    FLUX_AGENT_COMMIT_WAIT_TIMEOUT="2s")
    env.update(extra)
    return env


def sidecar_env(database: Database, upstream: list[Flux] | None = None, **extra: str
                ) -> dict[str, str]:
    env = agent_env(database, Path("/nonexistent"), FLUX_AGENT_BATCH_MAX_AGE="50ms",
                    FLUX_AGENT_DRAIN_TIMEOUT="20s", FLUX_AGENT_HANDOFF_TIMEOUT="10s",
                    FLUX_AGENT_UPSTREAM_TIMEOUT="3s", FLUX_AGENT_DATABASE_PING_INTERVAL="1s",
                    FLUX_AGENT_COMMIT_WAIT_TIMEOUT="4s")
    if upstream is not None:  # aggregators: no database credentials at all
        del env["FLUX_AGENT_DATABASE_URL"]
        env["FLUX_AGENT_UPSTREAM"] = ",".join(a.url for a in upstream)
    env.update(extra)
    return env


async def stored(database: Database) -> dict[str, int]:
    rows = await database.fetch("SELECT event_id::text, count(*) FROM flux.events GROUP BY 1")
    return {r[0]: r[1] for r in rows}


async def all_stored_once(database: Database, acked: set[str], timeout: float = 60) -> None:
    async def done() -> bool:
        return acked <= set(await stored(database))

    assert await wait_until(done, timeout, interval=0.2), (
        f"{len(acked - set(await stored(database)))} acknowledged events missing")
    counts = await stored(database)
    assert all(counts[i] == 1 for i in acked), {i: counts[i] for i in acked if counts[i] != 1}
    assert set(counts) <= acked, "stored events nobody acknowledged"


async def post_all(sidecar: Flux, n: int, run_id: str = "tiered-run") -> set[str]:
    acked: set[str] = set()
    for _ in range(n // 10):
        events = [make_event(run_id=run_id) for _ in range(10)]
        assert await sidecar.post(events) == 202
        acked.update(e["event_id"] for e in events)
    return acked


# --------------------------------------------------------------------------- (a) the pod's end


async def test_a_pod_ended_during_an_outage_loses_nothing_through_an_aggregator(
        database: Database, proxy: TcpProxy, fleet: list[Flux], dirs: list[Path]):
    """PostgreSQL away; a Job's pod ends (SIGTERM to its sidecar) with events acknowledged
    and undelivered; its emptyDir is deleted. The aggregator holds them: every one is stored
    exactly once after PostgreSQL returns."""
    behind = proxied(database, proxy)
    aggregator = await Flux("aggregate", aggregator_env(behind), new_dir(dirs)).start()
    fleet.append(aggregator)
    sidecar = await Flux("run", sidecar_env(database, [aggregator]), new_dir(dirs)).start()
    fleet.append(sidecar)
    proxy.cut()  # the outage
    acked = await post_all(sidecar, 200)
    # A caller that needs its event in PostgreSQL is told it is not there yet (it is durable
    # at the aggregator), and that does not hold up the sidecar's delivery.
    waiting = make_event(run_id="tiered-run")
    async with aiohttp.ClientSession() as session, session.post(
            sidecar.url + "/v1/events", json=waiting,
            headers={"Prefer": "wait=committed"}) as resp:
        problem = await resp.json(content_type=None)
    assert resp.status == 503 and problem["code"] == "COMMIT_TIMEOUT", problem
    acked.add(waiting["event_id"])

    async def delivered() -> bool:
        return (await sidecar.ready())[1]["spool"]["backlog_records"] == 0

    assert await wait_until(delivered, 20, interval=0.2)
    sidecar.signal(signal.SIGTERM)
    assert sidecar.wait(30) == 0, sidecar.log_path.read_text()[-3000:]
    shutil.rmtree(sidecar.state_dir)  # the emptyDir goes with the pod
    _, body = await aggregator.ready()
    assert body["database"] == "down" and body["spool"]["backlog_records"] >= 1, body
    assert await stored(database) == {}
    proxy.restore()
    await all_stored_once(database, acked)


async def test_a_direct_sidecar_hands_its_backlog_to_an_aggregator_at_its_end(
        database: Database, proxy: TcpProxy, fleet: list[Flux], dirs: list[Path]):
    """Direct to PostgreSQL, with a handoff aggregator: PostgreSQL unreachable when the pod
    ends, so the drain hands the backlog over at once instead of waiting for it."""
    aggregator = await Flux("aggregate", aggregator_env(database), new_dir(dirs)).start()
    fleet.append(aggregator)
    behind = proxied(database, proxy)
    sidecar = await Flux("run", sidecar_env(behind, FLUX_AGENT_HANDOFF=aggregator.url),
                         new_dir(dirs)).start()
    fleet.append(sidecar)
    proxy.cut()
    acked = await post_all(sidecar, 100)
    await asyncio.sleep(1.5)  # the sidecar has seen PostgreSQL down
    started = time.monotonic()
    sidecar.signal(signal.SIGTERM)
    assert sidecar.wait(40) == 0, sidecar.log_path.read_text()[-3000:]
    assert time.monotonic() - started < 15  # no wait for a database known to be down
    assert any(r.get("message", "").startswith("handing what is left")
               for r in sidecar.records())
    shutil.rmtree(sidecar.state_dir)
    await all_stored_once(database, acked)


async def test_with_no_upstream_left_the_agent_says_what_it_keeps_and_exits_75(
        database: Database, proxy: TcpProxy, fleet: list[Flux], dirs: list[Path]):
    """Neither PostgreSQL nor any aggregator takes the backlog by the deadline: ERROR with
    the count and the runs, exit 75 (the pod's status shows it); the same state dir started
    again delivers everything."""
    behind = proxied(database, proxy)
    nobody = f"http://127.0.0.1:{free_port()}"
    state = new_dir(dirs)
    sidecar = await Flux("run", sidecar_env(behind, FLUX_AGENT_HANDOFF=nobody,
                                            FLUX_AGENT_DRAIN_TIMEOUT="6s",
                                            FLUX_AGENT_HANDOFF_TIMEOUT="3s"), state).start()
    fleet.append(sidecar)
    proxy.cut()
    acked = await post_all(sidecar, 50, run_id="left-behind")
    sidecar.signal(signal.SIGTERM)
    assert sidecar.wait(40) == 75
    left = [r for r in sidecar.records() if r.get("level") == "ERROR"
            and r.get("message", "").startswith("events acknowledged but not delivered")]
    assert left, sidecar.log_path.read_text()[-3000:]
    assert left[0]["fields"]["events"] == 50
    assert left[0]["fields"]["runs"] == ["nasa/left-behind"]
    proxy.restore()
    again = await Flux("run", sidecar_env(database), state).start()
    fleet.append(again)
    await all_stored_once(database, acked)


# --------------------------------------------------------------------------- (b) a replica dies


async def test_an_aggregator_killed_under_load_loses_and_doubles_nothing(
        database: Database, fleet: list[Flux], dirs: list[Path]):
    """Two aggregators, three sidecars under load; one aggregator is SIGKILLed: sidecars go
    on with the other. Its spool (a PersistentVolumeClaim) is replayed when it comes back."""
    a = await Flux("aggregate", aggregator_env(database), new_dir(dirs)).start()
    b = await Flux("aggregate", aggregator_env(database), new_dir(dirs)).start()
    fleet += [a, b]
    sidecars = []
    for order in ([a, b], [b, a], [a, b]):
        sidecar = await Flux("run", sidecar_env(database, order), new_dir(dirs)).start()
        fleet.append(sidecar)
        sidecars.append(sidecar)
    ledger = Ledger()
    loads = [LoadGen(s.url + "/v1/events", ledger, batch=10, concurrency=2, pause=0.01)
             for s in sidecars]
    for load in loads:
        load.start()
    await asyncio.sleep(2.0)
    a.kill()  # SIGKILL mid-load
    await asyncio.sleep(3.0)
    for load in loads:
        await load.stop()
    assert ledger.acked and ledger.statuses.get(202, 0) > 10, ledger.statuses
    # Sidecars moved to the other replica: their backlog drains with one aggregator gone.
    async def drained() -> bool:
        backlogs = [(await s.ready())[1]["spool"]["backlog_records"] for s in sidecars]
        return not any(backlogs)

    assert await wait_until(drained, 30, interval=0.2)
    restarted = await Flux("aggregate", aggregator_env(database), a.state_dir).start()
    fleet.append(restarted)
    await all_stored_once(database, ledger.acked)


# --------------------------------------------------------------------------- (c) a full disk


async def test_an_aggregators_full_disk_makes_sidecars_spool_and_loses_nothing(
        database: Database, proxy: TcpProxy, fleet: list[Flux], dirs: list[Path]):
    require_root("mounts a tmpfs to fill it")
    base = new_dir(dirs).parent
    disk = base / "disk"
    disk.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=24m,mode=0755", "tmpfs", str(disk)],
                   check=True)
    behind = proxied(database, proxy)
    aggregator = await Flux("aggregate", aggregator_env(
        behind, FLUX_AGENT_SPOOL_SEGMENT_BYTES="5MiB", FLUX_AGENT_REQUEST_MAX_BYTES="4MiB",
        FLUX_AGENT_RETENTION_INTERVAL="0"), disk / "state", log_dir=base).start()
    fleet.append(aggregator)
    sidecar = await Flux("run", sidecar_env(database, [aggregator]), new_dir(dirs)).start()
    fleet.append(sidecar)
    proxy.cut()  # the aggregator keeps what it takes
    acked = await post_all(sidecar, 50)
    ballast = fill(disk)  # the aggregator's disk is full
    more = await post_all(sidecar, 100)  # the sidecar still takes events: it spools them

    async def aggregator_refuses() -> bool:
        _, body = await aggregator.ready()
        return "spool_unwritable" in body.get("reasons", [])

    assert await wait_until(aggregator_refuses, 20, interval=0.2)
    _, body = await sidecar.ready()
    assert body["spool"]["backlog_records"] >= 1
    ballast.unlink()  # room again; PostgreSQL back
    proxy.restore()
    await all_stored_once(database, acked | more)


# --------------------------------------------------------------------------- (d) identity


async def test_an_aggregator_refuses_other_namespaces_and_other_agencies(
        database: Database, fleet: list[Flux], dirs: list[Path]):
    """Sidecars authenticate with their projected service-account token; the aggregator
    binds namespaces to agencies. A token of an unbound namespace, and records of an agency
    the caller's namespace is not bound to, are refused (403) and audited; nothing of them
    is stored, and the sidecars keep them spooled (not ready once flushing stalls)."""
    key = private_key()
    keys_dir = new_dir(dirs).parent
    jwks_file = keys_dir / "jwks.json"
    jwks_file.write_text(jwks(("k1", key)))
    aggregator = await Flux("aggregate", aggregator_env(
        database, FLUX_AGENT_AUTH="kubernetes", FLUX_AGENT_AGENCY="",
        FLUX_AGENT_JWT_ALGORITHMS="RS256", FLUX_AGENT_JWT_ISSUERS=CLUSTER_ISSUER,
        FLUX_AGENT_JWT_JWKS_FILE=str(jwks_file), FLUX_AGENT_JWT_AUDIENCE="flux-aggregator",
        FLUX_AGENT_KUBE_BINDINGS="etl=nasa"), new_dir(dirs)).start()
    fleet.append(aggregator)

    def token_file(namespace: str) -> str:
        path = keys_dir / f"{namespace}.token"
        path.write_text(kubelet_token(key, "k1", namespace=namespace,
                                      audience="flux-aggregator"))
        return str(path)

    good = await Flux("run", sidecar_env(database, [aggregator],
                                         FLUX_AGENT_UPSTREAM_TOKEN_FILE=token_file("etl")),
                      new_dir(dirs)).start()
    intruder = await Flux("run", sidecar_env(
        database, [aggregator], FLUX_AGENT_UPSTREAM_TOKEN_FILE=token_file("elsewhere"),
        FLUX_AGENT_READY_STALL_AFTER="2s"), new_dir(dirs)).start()
    forger = await Flux("run", sidecar_env(
        database, [aggregator], FLUX_AGENT_UPSTREAM_TOKEN_FILE=token_file("etl"),
        FLUX_AGENT_AGENCY="noaa", FLUX_AGENT_READY_STALL_AFTER="2s"), new_dir(dirs)).start()
    fleet += [good, intruder, forger]
    acked = await post_all(good, 20)
    refused = await post_all(intruder, 20) | await post_all(forger, 20)
    await all_stored_once(database, acked)
    for sidecar in (intruder, forger):
        async def stalled(sidecar: Flux = sidecar) -> bool:
            status, body = await sidecar.ready()
            return status == 503 and "flush_stalled" in body.get("reasons", [])

        assert await wait_until(stalled, 20, interval=0.2)
        errors = [r for r in sidecar.records() if r.get("level") == "ERROR"]
        assert any("403" in str(r.get("fields", {}).get("error", "")) for r in errors), errors
    assert not refused & set(await stored(database))

    async def audited() -> bool:
        rows = await database.fetch("SELECT action, detail::text FROM flux.audit_log "
                                    "WHERE success = false")
        actions = {r[0] for r in rows}
        return {"auth.failed", "isolation.violation"} <= actions

    assert await wait_until(audited, 20, interval=0.2)
    rows = await database.fetch("SELECT detail::text FROM flux.audit_log "
                                "WHERE action = 'isolation.violation'")
    assert any("AGENCY_NOT_ALLOWED" in r[0] for r in rows)


# --------------------------------------------------------------------------- (e) a black hole


async def test_a_black_holed_aggregator_is_a_bounded_stall_and_probes_say_so(
        database: Database, fleet: list[Flux], dirs: list[Path]):
    aggregator = await Flux("aggregate", aggregator_env(database), new_dir(dirs)).start()
    fleet.append(aggregator)
    hole = TcpProxy("127.0.0.1", aggregator.port)
    await hole.start()
    try:
        via = f"http://127.0.0.1:{hole.port}"
        sidecar = await Flux("run", {**sidecar_env(database, [aggregator]),
                                     "FLUX_AGENT_UPSTREAM": via,
                                     "FLUX_AGENT_UPSTREAM_TIMEOUT": "2s",
                                     "FLUX_AGENT_READY_STALL_AFTER": "5s"},
                             new_dir(dirs)).start()
        fleet.append(sidecar)
        first = await post_all(sidecar, 20)
        await all_stored_once(database, first)
        hole.black_hole()
        started = time.monotonic()
        during = await post_all(sidecar, 30)  # still acknowledged: spooled

        async def down() -> bool:
            return (await sidecar.ready())[1].get("upstream") == "down"

        assert await wait_until(down, 10, interval=0.1)
        assert time.monotonic() - started < 10  # bounded by the call's deadline

        async def unready() -> bool:
            status, body = await sidecar.ready()
            return status == 503 and "flush_stalled" in body.get("reasons", [])

        assert await wait_until(unready, 15, interval=0.2)
        hole.restore()
        await all_stored_once(database, first | during)
        assert (await sidecar.ready())[0] == 200
        assert os.path.exists(sidecar.log_path)
    finally:
        await hole.stop()


def test_a_forwarding_sidecar_loads_no_database_client(database: Database,
                                                       dirs: list[Path]):
    """Upstream mode: no asyncpg in the process, no database URL needed."""
    env = sidecar_env(database, [])
    env["FLUX_AGENT_UPSTREAM"] = f"http://127.0.0.1:{free_port()}"
    env["FLUX_AGENT_STATE_DIR"] = str(new_dir(dirs))
    env["FLUX_AGENT_LISTEN"] = "127.0.0.1:0"
    env["FLUX_AGENT_ADMIN_LISTEN"] = "127.0.0.1:0"
    probe = ("import asyncio, json, sys\n"
             "from flux_agent import Agent, load_config\n"
             "async def main():\n"
             "    async with Agent(load_config([])) as agent:\n"
             "        print(json.dumps(sorted(sys.modules)))\n"
             "asyncio.run(main())\n")
    result = subprocess.run([sys.executable, "-c", probe], env=env, capture_output=True,
                            text=True, timeout=60)
    assert result.returncode == 0, result.stderr[-3000:]
    modules = set(json.loads(result.stdout.strip().splitlines()[-1]))
    assert not {m for m in modules if m == "asyncpg" or m.startswith("asyncpg.")}
    assert not {m for m in modules if m.startswith("flux_agent.postgres")}
