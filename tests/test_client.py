"""The workload client against a real agent and a real PostgreSQL: the sync client (standard
library only) and the async one, over the Unix socket and TCP; idempotent retries through
real 503s and a lost acknowledgement; run/step events; batching; tokens; errors."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import re
import subprocess
import sys
import time
import uuid
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import pytest
from aiohttp import web

from flux_agent import Agent
from flux_agent.client import (
    AsyncFluxClient,
    FluxAuthError,
    FluxClient,
    FluxClientError,
    FluxConnectionError,
    FluxNotFoundError,
    FluxRequestError,
    FluxUnavailableError,
    RetryPolicy,
    TokenSource,
    error_from,
    make_event,
    resolve_endpoint,
    uuid7,
)
from flux_agent.client.core import _retry_after
from flux_agent.core.settings import Secret
from flux_agent.intake.tokens import mint
from flux_agent.testing import make_events

from .support.agents import agent_config
from .support.faults import TcpProxy
from .support.http import post
from .support.postgres import Database

CLIENT_DIR = Path(__file__).resolve().parent.parent / "flux_agent" / "client"
# What the agent needs and a workload must not: importing the client loads none of them.
AGENT_DEPENDENCIES = ("aiohttp", "asyncpg", "msgspec", "jsonschema_rs", "prometheus_client",
                      "opentelemetry", "uvloop", "jwt", "yaml", "google_crc32c")
FAST = RetryPolicy(attempts=8, backoff=0.01, backoff_max=0.05, retry_after_max=0.2)


async def rows(database: Database, run_id: str) -> list[Any]:
    return await database.fetch(
        "SELECT event_id, kind, step, payload FROM flux.events WHERE run_id = $1 "
        "ORDER BY event_id", run_id)


class Sleeps:
    """A client's ``sleep``: records what the client asked for, sleeps briefly, and runs a
    hook (on the agent's loop) after a given number of waits."""

    def __init__(self, loop: asyncio.AbstractEventLoop | None = None, after: int = 0,
                 hook: Callable[[], None] | None = None, real: float = 0.05) -> None:
        self.asked: list[float] = []
        self.loop = loop
        self.after = after
        self.hook = hook
        self.real = real

    def __call__(self, seconds: float) -> None:
        self.asked.append(seconds)
        if self.hook is not None and len(self.asked) == self.after and self.loop is not None:
            self.loop.call_soon_threadsafe(self.hook)
        time.sleep(min(seconds, self.real))


class RecordingProxy:
    """Forwards TCP to the agent and keeps every byte the client sent. With
    ``drop_first_answer`` the first connection's answer is read from the agent and thrown
    away: the client loses an acknowledgement the agent did give."""

    def __init__(self, target_port: int, *, drop_first_answer: bool = False) -> None:
        self.target_port = target_port
        self.drop_first_answer = drop_first_answer
        self.sent = bytearray()
        self.connections = 0
        self.port = 0
        self._server: asyncio.Server | None = None

    async def start(self) -> None:
        self._server = await asyncio.start_server(self._handle, "127.0.0.1", 0)
        self.port = self._server.sockets[0].getsockname()[1]

    async def stop(self) -> None:
        if self._server is not None:
            self._server.close()
            await self._server.wait_closed()

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.connections += 1
        drop = self.drop_first_answer and self.connections == 1
        up_reader, up_writer = await asyncio.open_connection("127.0.0.1", self.target_port)

        async def upstream() -> None:
            with contextlib.suppress(OSError):
                while data := await reader.read(65536):
                    self.sent.extend(data)
                    up_writer.write(data)
                    await up_writer.drain()
            up_writer.close()

        async def downstream() -> None:
            with contextlib.suppress(OSError):
                while data := await up_reader.read(65536):
                    if drop:
                        writer.transport.abort()  # the answer never reaches the client
                        return
                    writer.write(data)
                    await writer.drain()
            writer.close()

        await asyncio.gather(upstream(), downstream(), return_exceptions=True)

    def count(self, text: str) -> int:
        return bytes(self.sent).count(text.encode())


@pytest.fixture
async def recorder(agent: Agent) -> AsyncIterator[RecordingProxy]:
    assert agent.endpoints.event_url is not None
    proxy = RecordingProxy(urlsplit(agent.endpoints.event_url).port or 0)
    await proxy.start()
    yield proxy
    await proxy.stop()


# --------------------------------------------------------------------------- transports


async def test_sync_client_over_the_socket_and_tcp(agent: Agent, database: Database):
    socket_path = agent.endpoints.socket_path
    url = agent.endpoints.event_url
    assert socket_path is not None and url is not None
    clients = {
        "socket": FluxClient(socket_path=socket_path, wait_committed=True),
        "tcp": FluxClient(url, wait_committed=True),
        "env-socket": FluxClient(environ={"FLUX_AGENT_SOCKET": str(socket_path),
                                          "FLUX_AGENT_URL": "http://127.0.0.1:1"},
                                 wait_committed=True),
        "env-url": FluxClient(environ={"FLUX_AGENT_URL": url}, wait_committed=True),
        "unix-url": FluxClient(f"unix://{socket_path}", wait_committed=True),
    }
    assert clients["env-socket"].endpoint.socket_path == str(socket_path)
    assert clients["env-url"].endpoint.socket_path is None
    for name, client in clients.items():
        run_id = f"sync-{name}"
        with client:
            result = await asyncio.to_thread(
                client.emit, "run.started", run_id,
                payload={"content_type": "text", "use_case": "search"})
            assert result.accepted == 1 and result.duplicates == 0
            assert result.committed is True
            assert result.request_id
            # A second request reuses the kept-alive connection.
            result2 = await asyncio.to_thread(client.emit, "step.completed", run_id,
                                              step="extract", payload={"items_processed": 3})
            assert result2.accepted == 1
        stored = await rows(database, run_id)
        assert [str(r["event_id"]) for r in stored] == result.event_ids + result2.event_ids
        assert [r["kind"] for r in stored] == ["run.started", "step.completed"]
        assert json.loads(stored[1]["payload"]) == {"items_processed": 3}


async def test_async_client_over_the_socket_and_tcp(agent: Agent, database: Database):
    assert agent.endpoints.socket_path is not None
    for name, client in {
        "socket": AsyncFluxClient(socket_path=agent.endpoints.socket_path, wait_committed=True),
        "tcp": AsyncFluxClient(agent.endpoints.event_url, wait_committed=True),
    }.items():
        async with client:
            events = [make_event("step.completed", f"async-{name}", step=f"s{i}",
                                 payload={"items_processed": i}) for i in range(5)]
            result = await client.post_events(events)
            assert result.accepted == 5 and result.committed
            again = await client.post_events(events)  # the same ids: duplicates only
            assert (again.accepted, again.duplicates) == (0, 5)
        stored = await rows(database, f"async-{name}")
        assert sorted(str(r["event_id"]) for r in stored) == sorted(e["event_id"]
                                                                    for e in events)


async def test_the_sync_client_needs_only_the_standard_library(agent: Agent,
                                                               database: Database):
    """The client package loaded on its own (outside flux_agent), in a process where importing
    aiohttp fails."""
    script = f"""
import importlib.util, json, sys
class Block:
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in ("aiohttp", "asyncpg", "msgspec", "yarl", "multidict"):
            raise ImportError("blocked: " + name)
sys.meta_path.insert(0, Block())
spec = importlib.util.spec_from_file_location(
    "flux_client_alone", {str(CLIENT_DIR / "__init__.py")!r},
    submodule_search_locations=[{str(CLIENT_DIR)!r}])
module = importlib.util.module_from_spec(spec)
sys.modules[spec.name] = module
spec.loader.exec_module(module)
client = module.FluxClient(socket_path={str(agent.endpoints.socket_path)!r},
                           wait_committed=True)
result = client.emit("run.started", "stdlib-only",
                     payload={{"content_type": "mixed", "use_case": "archival"}})
print(json.dumps({{"accepted": result.accepted, "ids": result.event_ids,
                   "aiohttp": "aiohttp" in sys.modules}}))
"""
    proc = await asyncio.to_thread(subprocess.run, [sys.executable, "-c", script],
                                   capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    out = json.loads(proc.stdout)
    assert out["accepted"] == 1 and out["aiohttp"] is False
    assert [str(r["event_id"]) for r in await rows(database, "stdlib-only")] == out["ids"]



def test_importing_the_client_loads_none_of_the_agent_dependencies(tmp_path: Path):
    """``import flux_agent.client`` (which runs ``flux_agent/__init__.py`` first) and the lazy
    ``from flux_agent import FluxClient`` stay light: an ETL image installs the client
    without the agent's dependencies (README, "The workload client")."""
    script = f"""
import json, sys
import flux_agent.client
from flux_agent import AsyncFluxClient, FluxClient
from flux_agent.client import FluxClient as Direct
assert FluxClient is Direct and AsyncFluxClient is flux_agent.client.AsyncFluxClient
print(json.dumps(sorted(name for name in sys.modules
                        if name.split(".")[0] in {AGENT_DEPENDENCIES!r})))
"""
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                          timeout=60, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    assert json.loads(proc.stdout) == []


# --------------------------------------------------------------------------- retries


@pytest.mark.fault
async def test_retries_through_a_real_spool_full_keep_the_same_ids(
        database: Database, state_dir: Path):
    """PostgreSQL unreachable, the spool full: the agent answers 503 SPOOL_FULL with
    Retry-After. The client waits at least that long, retries with the same event ids, and
    succeeds once PostgreSQL is back and the spool drained; every event lands once."""
    pg_port = urlsplit(database.admin_dsn).port
    assert pg_port is not None
    pg = TcpProxy("127.0.0.1", pg_port)
    await pg.start()
    parts = urlsplit(database.login_dsn)
    userinfo = parts.netloc.rsplit("@", 1)[0]
    cut_db = Database(database.name, database.admin_dsn,
                      parts._replace(netloc=f"{userinfo}@127.0.0.1:{pg.port}").geturl())
    config = agent_config(cut_db, state_dir, spool_max_bytes=1024**2,
                          spool_segment_bytes=128 * 1024, request_max_bytes=64 * 1024,
                          event_max_bytes=16 * 1024, flush_retry_max=0.2)
    try:
        async with Agent(config) as agent:
            assert agent.endpoints.event_url is not None
            pg.cut()
            url = agent.endpoints.event_url + "/v1/events"
            filler = "x" * 8000
            for _ in range(400):
                status, body, _ = await post(url, make_events(5, payload={"pad": filler}))
                if status == 503:
                    assert body["code"] == "SPOOL_FULL"
                    break
                assert status == 202, body
            else:
                pytest.fail("the spool never filled")
            proxy = RecordingProxy(urlsplit(agent.endpoints.event_url).port or 0)
            await proxy.start()
            sleeps = Sleeps(asyncio.get_running_loop(), after=2, hook=pg.restore, real=0.3)
            client = FluxClient(f"http://127.0.0.1:{proxy.port}", sleep=sleeps,
                                retry=RetryPolicy(attempts=40, backoff=0.05, backoff_max=0.2))
            # Larger than the refused filler request: certainly refused at first.
            events = [make_event("step.completed", "spool-full", step=f"s{i}",
                                 payload={"pad": "z" * 15000}) for i in range(3)]
            ids = [e["event_id"] for e in events]
            with client:
                result = await asyncio.to_thread(client.post_events, events)
            await proxy.stop()
            assert result.accepted == 3 and result.event_ids == ids
            assert len(sleeps.asked) >= 2
            assert all(s >= 2.0 for s in sleeps.asked[:2])  # Retry-After: 2 was honoured
            attempts = proxy.count("POST /v1/events")
            assert attempts == len(sleeps.asked) + 1 >= 3
            for event_id in ids:
                assert proxy.count(event_id) == attempts  # the same ids on every attempt
            # Nothing else was ever sent: one set of ids, however many attempts.
            seen = set(re.findall(rb"[0-9a-f]{8}-[0-9a-f]{4}-7[0-9a-f]{3}-[0-9a-f]{4}-"
                                  rb"[0-9a-f]{12}", bytes(proxy.sent)))
            assert {s.decode() for s in seen} == set(ids)
            for _ in range(200):
                if len(await rows(database, "spool-full")) == 3:
                    break
                await asyncio.sleep(0.05)
            assert sorted(str(r["event_id"]) for r in await rows(database, "spool-full")) == \
                sorted(ids)
    finally:
        await pg.stop()


async def test_draining_agent_answers_503_and_the_client_gives_up_cleanly(agent: Agent):
    agent.gate.close()  # what SIGTERM does first: refuse new events with 503
    sleeps = Sleeps()
    client = FluxClient(agent.endpoints.event_url, sleep=sleeps,
                        retry=RetryPolicy(attempts=3, backoff=0.01))
    with pytest.raises(FluxUnavailableError) as caught:
        await asyncio.to_thread(client.emit, "run.aborted", "draining")
    client.close()
    err = caught.value
    assert (err.status, err.code, err.retryable) == (503, "DRAINING", True)
    assert err.problem["class"] == "TRANSIENT_ERROR"
    assert err.request_id
    assert sleeps.asked and all(s >= 1.0 for s in sleeps.asked)  # Retry-After: 1
    assert len(sleeps.asked) == 2  # 3 attempts


async def test_a_lost_acknowledgement_is_retried_as_a_duplicate(agent: Agent,
                                                                database: Database):
    """The agent accepted the events but the answer never arrived: the retry carries the
    same ids and the agent reports them as duplicates; PostgreSQL holds each once."""
    assert agent.endpoints.event_url is not None
    port = urlsplit(agent.endpoints.event_url).port or 0
    for name, make_client in (
        ("sync", lambda p: FluxClient(f"http://127.0.0.1:{p}", retry=FAST)),
        ("async", lambda p: AsyncFluxClient(f"http://127.0.0.1:{p}", retry=FAST)),
    ):
        proxy = RecordingProxy(port, drop_first_answer=True)
        await proxy.start()
        client = make_client(proxy.port)
        events = [make_event("step.completed", f"lost-ack-{name}", step="load")
                  for _ in range(4)]
        if isinstance(client, FluxClient):
            with client:
                result = await asyncio.to_thread(client.post_events, events,
                                                 wait_committed=True)
        else:
            async with client:
                result = await client.post_events(events, wait_committed=True)
        await proxy.stop()
        assert proxy.connections == 2
        assert (result.accepted, result.duplicates) == (0, 4)
        assert result.event_ids == [e["event_id"] for e in events]
        assert all(proxy.count(e["event_id"]) == 2 for e in events)
        stored = await rows(database, f"lost-ack-{name}")
        assert sorted(str(r["event_id"]) for r in stored) == sorted(
            e["event_id"] for e in events)


async def test_an_unreachable_agent_raises_after_the_retries(state_dir: Path):
    sleeps = Sleeps(real=0)
    client = FluxClient(socket_path=state_dir / "nobody.sock", sleep=sleeps,
                        retry=RetryPolicy(attempts=4, backoff=0.01))
    with pytest.raises(FluxConnectionError) as caught:
        await asyncio.to_thread(client.emit, "run.aborted", "nobody")
    assert caught.value.retryable is True
    assert "after 4 attempts" in str(caught.value)
    assert len(sleeps.asked) == 3
    assert sleeps.asked == sorted(sleeps.asked) or max(sleeps.asked) <= 0.08  # backoff
    async with AsyncFluxClient(socket_path=state_dir / "nobody.sock",
                               retry=RetryPolicy(attempts=2, backoff=0.01)) as aclient:
        with pytest.raises(FluxConnectionError):
            await aclient.emit("run.aborted", "nobody")


# --------------------------------------------------------------------------- runs and steps


async def test_run_emits_started_steps_and_completed(agent: Agent, database: Database):
    client = FluxClient(socket_path=agent.endpoints.socket_path, wait_committed=True)

    def work() -> None:
        with client.run("run-ok", content_type="images", use_case="research",
                        payload={"agency": "nasa"}) as run:
            with run.step("extract") as step:
                step.payload["items_processed"] = 1200
            with run.step("load"):
                pass
            run.emit("checkpoint.saved", step="load", payload={"offset": 1200})
            run.payload["items_processed"] = 1200

    with client:
        await asyncio.to_thread(work)
    stored = await rows(database, "run-ok")
    assert [(r["kind"], r["step"]) for r in stored] == [
        ("run.started", None), ("step.started", "extract"), ("step.completed", "extract"),
        ("step.started", "load"), ("step.completed", "load"), ("checkpoint.saved", "load"),
        ("run.completed", None)]
    payloads = [json.loads(r["payload"]) for r in stored]
    assert payloads[0] == {"content_type": "images", "use_case": "research", "agency": "nasa"}
    assert payloads[2]["items_processed"] == 1200 and payloads[2]["duration_ms"] >= 0
    assert payloads[-1]["items_processed"] == 1200 and "duration_ms" in payloads[-1]


async def test_run_reports_a_failure_and_reraises(agent: Agent, database: Database):
    client = FluxClient(agent.endpoints.event_url, wait_committed=True)

    def work() -> None:
        with client.run("run-bad", content_type="documents", use_case="archival") as run, \
                run.step("transform"):
            raise ValueError("row 17: bad date '2026-02-30'")

    with client, pytest.raises(ValueError, match="row 17"):
        await asyncio.to_thread(work)
    stored = await rows(database, "run-bad")
    assert [r["kind"] for r in stored] == ["run.started", "step.started", "step.failed",
                                           "run.failed"]
    for row in stored[2:]:
        error = json.loads(row["payload"])["error"]
        assert error == {"type": "ValueError", "message": "row 17: bad date '2026-02-30'"}


def test_a_failure_that_cannot_be_reported_does_not_hide_the_error(state_dir: Path):
    client = FluxClient(socket_path=state_dir / "gone.sock", retry=RetryPolicy(attempts=1))
    run = client.run("run-x", content_type="text", use_case="vr")
    problem = KeyError("the real problem")
    run.__exit__(KeyError, problem, None)  # the agent is gone when the run fails
    assert any("could not be reported" in note for note in problem.__notes__)


async def test_async_run_failure_and_cancellation(agent: Agent, database: Database):
    async with AsyncFluxClient(socket_path=agent.endpoints.socket_path,
                               wait_committed=True) as client:
        async def failing() -> None:
            async with client.run("async-bad", content_type="text", use_case="search") as run:
                async with run.step("index") as step:
                    step.payload["items_processed"] = 2
                raise RuntimeError("boom")

        with pytest.raises(RuntimeError, match="boom"):
            await failing()

        started = asyncio.Event()

        async def job() -> None:
            async with client.run("async-cancel", content_type="text", use_case="search"):
                started.set()
                await asyncio.sleep(60)

        task = asyncio.create_task(job())
        await started.wait()
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
    stored = await rows(database, "async-bad")
    assert [r["kind"] for r in stored] == ["run.started", "step.started", "step.completed",
                                           "run.failed"]
    assert json.loads(stored[-1]["payload"])["error"]["type"] == "RuntimeError"
    stored = await rows(database, "async-cancel")
    assert [r["kind"] for r in stored] == ["run.started", "run.aborted"]
    assert json.loads(stored[-1]["payload"])["reason"] == "CancelledError"


# --------------------------------------------------------------------------- batching


async def test_batch_posts_arrays_on_size_flush_and_close(agent: Agent, database: Database,
                                                          recorder: RecordingProxy):
    client = FluxClient(f"http://127.0.0.1:{recorder.port}", wait_committed=True)

    def work() -> list[int]:
        with client, client.batch(max_events=3) as batch:
            for i in range(7):
                batch.add("step.completed", "batched", step=f"s{i}",
                          payload={"items_processed": i})
            sizes_before_close = [r.accepted for r in batch.results]
            assert len(batch) == 1
        return [*sizes_before_close, batch.results[-1].accepted]

    assert await asyncio.to_thread(work) == [3, 3, 1]
    assert recorder.count("POST /v1/events") == 3
    stored = await rows(database, "batched")
    assert [r["step"] for r in stored] == [f"s{i}" for i in range(7)]  # UUIDv7 order

    # By size, and an explicit flush; the async batch alike.
    async with AsyncFluxClient(agent.endpoints.event_url, wait_committed=True) as aclient:
        async with aclient.batch(max_events=1000, max_bytes=2000) as abatch:
            for i in range(6):
                await abatch.add("step.completed", "batched-bytes", step=f"s{i}",
                                 payload={"blob": "y" * 500})
            assert len(abatch.results) >= 2  # 2000 bytes hold at most three such events
            await abatch.flush()
            assert len(abatch) == 0
        assert sum(r.accepted for r in abatch.results) == 6
    assert len(await rows(database, "batched-bytes")) == 6


async def test_a_failed_flush_keeps_the_events(state_dir: Path):
    client = FluxClient(socket_path=state_dir / "none.sock", retry=RetryPolicy(attempts=1))
    batch = client.batch(max_events=10)
    batch.add("step.started", "kept", step="a")
    with pytest.raises(FluxConnectionError):
        batch.flush()
    assert len(batch) == 1  # still queued, with the same id, for the next flush


# --------------------------------------------------------------------------- errors, auth


async def test_agent_errors_carry_the_problem(database: Database, state_dir: Path):
    # The flux profile: its payload schema refuses this content_type.
    async with Agent(agent_config(database, state_dir, schema_profile="flux")) as agent:
        await _errors_carry_the_problem(agent)


async def _errors_carry_the_problem(agent: Agent) -> None:
    client = FluxClient(agent.endpoints.event_url, retry=FAST)
    with client:
        with pytest.raises(FluxRequestError) as caught:
            await asyncio.to_thread(client.emit, "run.started", "bad-payload",
                                    payload={"content_type": "videos", "use_case": "vr"})
        err = caught.value
        assert (err.status, err.code, err.retryable) == (422, "INVALID_CONTENT_TYPE", False)
        assert err.errors and err.errors[0]["pointer"] == "/payload/content_type"
        assert err.problem["class"] == "VALIDATION_ERROR"
        assert err.request_id
        status, body, headers = await asyncio.to_thread(client.request, "GET", "/v1/nowhere")
    missing = error_from(status, body, headers)
    assert isinstance(missing, FluxNotFoundError)
    assert (missing.status, missing.code) == (404, "NOT_FOUND")


def test_events_are_checked_before_sending():
    for kwargs, says in (
        ({"kind": "run.begun", "run_id": "r"}, "kind must be"),
        ({"kind": "run.started", "run_id": "-bad"}, "run_id"),
        ({"kind": "run.started", "run_id": "x" * 65}, "run_id"),
        ({"kind": "step.completed", "run_id": "r"}, "needs a step"),
        ({"kind": "step.completed", "run_id": "r", "step": "s" * 129}, "1 to 128"),
    ):
        with pytest.raises(ValueError, match=says):
            make_event(**kwargs)
    client = FluxClient(environ={})
    # The payload is the agent's payload schema's business: the client takes any fields.
    run = client.run("r", {"source": "s3://x"}, content_type="videos", rows=3)
    assert run._started_payload == {"source": "s3://x", "content_type": "videos", "rows": 3}
    assert client.run("r")._started_payload == {}
    with pytest.raises(ValueError, match="payload must be a mapping"):
        client.run("r", ["not", "a", "mapping"])  # type: ignore[arg-type]
    event = make_event("step.started", "r", step="s", provider="openai", model="gpt")
    assert event["occurred_at"].endswith("Z") and event["provider"] == "openai"


async def test_bearer_tokens_from_the_environment_and_a_rotating_file(
        database: Database, state_dir: Path, tmp_path: Path):
    secret = "a-development-hs256-secret-of-at-least-32-chars"
    config = agent_config(database, state_dir, auth="jwt", agency="",
                          jwt_algorithms=("HS256",), jwt_issuers=("flux-test",),
                          jwt_hs256_secret=Secret(secret))

    def token(agency: str = "nasa") -> str:
        return mint(secret, algorithm="HS256", issuer="flux-test", sub="etl@test",
                    agency=agency, role="operator", ttl=300)

    async with Agent(config) as agent:
        url = agent.endpoints.event_url
        anonymous = FluxClient(url, environ={}, retry=FAST)
        with pytest.raises(FluxAuthError) as caught:
            await asyncio.to_thread(anonymous.emit, "run.aborted", "auth")
        assert caught.value.status == 401
        by_env = FluxClient(url, environ={"FLUX_AGENT_TOKEN": token()}, wait_committed=True)
        assert (await asyncio.to_thread(by_env.emit, "run.aborted", "auth")).accepted == 1
        token_file = tmp_path / "token"
        token_file.write_text("not-a-token\n")
        by_file = FluxClient(url, environ={"FLUX_AGENT_TOKEN_FILE": str(token_file)},
                             retry=FAST, wait_committed=True)
        with pytest.raises(FluxAuthError):
            await asyncio.to_thread(by_file.emit, "run.aborted", "auth")
        token_file.write_text(token() + "\n")  # rotated: read again
        os.utime(token_file, (time.time() + 2, time.time() + 2))
        assert (await asyncio.to_thread(by_file.emit, "run.aborted", "auth")).accepted == 1
        async with AsyncFluxClient(url, token=token(), wait_committed=True) as aclient:
            assert (await aclient.emit("run.aborted", "auth")).accepted == 1
        for c in (anonymous, by_env, by_file):
            c.close()
    assert len(await rows(database, "auth")) == 3


def test_token_and_endpoint_resolution(tmp_path: Path):
    assert TokenSource(environ={}).get() is None
    assert TokenSource("explicit", environ={"FLUX_AGENT_TOKEN": "env"}).get() == "explicit"
    assert TokenSource(environ={"FLUX_AGENT_TOKEN": "env"}).get() == "env"
    with pytest.raises(FluxClientError, match="token file"):
        TokenSource(token_file=tmp_path / "missing", environ={}).get()
    assert resolve_endpoint(environ={}).display == "http://127.0.0.1:8787"
    assert resolve_endpoint("https://agent.example:8443/base", environ={}).display == \
        "https://agent.example:8443/base"
    assert resolve_endpoint(environ={"FLUX_AGENT_SOCKET": "/run/a.sock"}).socket_path == \
        "/run/a.sock"
    assert resolve_endpoint("http://h:1", environ={"FLUX_AGENT_SOCKET": "/s"}).host == "h"
    for bad in ("ftp://x", "unix://", "127.0.0.1:8787"):
        with pytest.raises(ValueError):  # noqa: PT011
            resolve_endpoint(bad, environ={})


def test_retry_after_and_backoff():
    assert _retry_after({"Retry-After": "2"}) == 2.0
    assert _retry_after({"retry-after": "0"}) == 0.0
    later = time.strftime("%a, %d %b %Y %H:%M:%S GMT", time.gmtime(time.time() + 30))
    assert 25 <= (_retry_after({"Retry-After": later}) or 0) <= 31
    assert _retry_after({"Retry-After": "soon"}) is None
    assert _retry_after({}) is None
    policy = RetryPolicy(backoff=0.1, backoff_max=1.0, retry_after_max=10)
    assert 0.05 <= policy.delay(0, None) <= 0.1
    assert 0.5 <= policy.delay(10, None) <= 1.0
    assert policy.delay(0, 3) == 3
    assert policy.delay(0, 60) == 10


def test_uuid7_is_time_ordered_and_well_formed():
    ids = [uuid7() for _ in range(5000)]
    assert len(set(ids)) == 5000
    assert ids == sorted(ids)  # monotonic within a process, even inside one millisecond
    parsed = uuid.UUID(ids[0])
    assert parsed.version == 7 and parsed.variant == uuid.RFC_4122
    ms = int(ids[-1].replace("-", "")[:12], 16)
    assert abs(ms - time.time() * 1000) < 5000


# --------------------------------------------------------------------------- checkpoints, drain


@pytest.fixture
async def checkpoint_stub() -> AsyncIterator[str]:
    """The agent's checkpoint API contract (``PUT``/``GET /v1/runs/{id}/checkpoint``),
    served by a stub until the agent has the routes."""
    store: dict[str, dict[str, Any]] = {}

    async def put(request: web.Request) -> web.Response:
        body = await request.json()
        run_id = request.match_info["run_id"]
        version = store.get(run_id, {}).get("version", 0) + 1
        store[run_id] = {"run_id": run_id, "step": body["step"], "state": body["state"],
                         "version": version, "checkpoint_hash": f"{version:064x}"}
        return web.json_response({"version": version, "run_id": run_id},
                                 status=201 if version == 1 else 200)

    async def get(request: web.Request) -> web.Response:
        found = store.get(request.match_info["run_id"])
        if found is None:
            return web.json_response({"code": "CHECKPOINT_NOT_FOUND", "status": 404},
                                     status=404, content_type="application/problem+json")
        return web.json_response(found)

    app = web.Application()
    app.router.add_put("/v1/runs/{run_id}/checkpoint", put)
    app.router.add_get("/v1/runs/{run_id}/checkpoint", get)
    runner = web.AppRunner(app)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
    yield f"http://127.0.0.1:{port}"
    await runner.cleanup()


async def test_checkpoint_and_resume_contract(checkpoint_stub: str):
    client = FluxClient(checkpoint_stub)
    with client:
        assert await asyncio.to_thread(client.resume, "run-cp") is None
        run = client.run("run-cp", content_type="text", use_case="search")
        saved = await asyncio.to_thread(run.checkpoint, "extract", {"offset": 10})
        assert saved["version"] == 1
        saved = await asyncio.to_thread(client.checkpoint, "run-cp", "load", {"offset": 20})
        assert saved["version"] == 2
        found = await asyncio.to_thread(run.resume)
        assert found is not None
        assert (found.step, found.state, found.version) == ("load", {"offset": 20}, 2)
        assert len(found.checkpoint_hash) == 64
        with pytest.raises(ValueError, match="run_id"):
            client.resume("bad/id")
    async with AsyncFluxClient(checkpoint_stub) as aclient:
        assert (await aclient.checkpoint("run-acp", "s", [1, 2]))["version"] == 1
        resumed = await aclient.resume("run-acp")
        assert resumed is not None and resumed.state == [1, 2]


async def test_drain_asks_a_legacy_sidecar_to_exit(agent: Agent, database: Database):
    client = FluxClient(socket_path=agent.endpoints.socket_path)
    with client:
        await asyncio.to_thread(client.emit, "run.completed", "drained")
        answer = await asyncio.to_thread(client.drain)
    assert answer["drained"] is True
    assert agent.exit_requested.is_set()
    assert len(await rows(database, "drained")) == 1


async def test_one_sync_client_shared_by_worker_threads(agent: Agent, database: Database):
    client = FluxClient(socket_path=agent.endpoints.socket_path)
    results: list[Any] = []

    def worker(n: int) -> None:
        for i in range(5):
            results.append(client.emit("step.completed", "threads", step=f"w{n}-{i}"))

    with client:
        await asyncio.gather(*(asyncio.to_thread(worker, n) for n in range(8)))
    assert len(results) == 40 and all(r.accepted == 1 for r in results)
    ids = {i for r in results for i in r.event_ids}
    assert len(ids) == 40
    for _ in range(200):
        if len(await rows(database, "threads")) == 40:
            break
        await asyncio.sleep(0.05)
    assert {str(r["event_id"]) for r in await rows(database, "threads")} == ids
