"""The hop to an aggregator, in process: the wire form, the client's classification of what
goes wrong (against a real HTTP server), the aggregator's records route (agencies, hashes,
media type), TLS between the two, and the configuration rules of the tier."""

from __future__ import annotations

import asyncio
import datetime as dt
import ipaddress
import json
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from aiohttp import web
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from flux_agent import Agent
from flux_agent.core.errors import ConfigError, Fault, PermissionDenied, StoreUnavailable
from flux_agent.core.event import ForwardedRecord, record_encoder
from flux_agent.core.settings import Secret, load_config
from flux_agent.flush.batch import Work
from flux_agent.forward import wire
from flux_agent.forward.upstream import Upstream
from flux_agent.postgres.embedded import free_port
from flux_agent.testing import make_event

from .support.agents import agent_config
from .support.http import get, post
from .support.paths import short_tempdir
from .support.polling import wait_until
from .support.postgres import Database


def sealed_rows(n: int, agency: str = "nasa") -> list[Any]:
    """Rows as a sidecar seals them (through its checker)."""
    from datetime import UTC, datetime, timedelta

    from flux_agent.core.event import Seal
    from flux_agent.intake.validate import EventChecker, Schemas

    checker = EventChecker(Schemas(), 256 * 1024)
    now = datetime.now(UTC)
    seal = Seal(agency, now, "corr", "agent-x", None, None, now + timedelta(days=30))
    return checker.rows([make_event() for _ in range(n)], seal, batch=True)


# --------------------------------------------------------------------------- the wire


def test_a_large_window_goes_in_bodies_that_fit_and_lose_nothing():
    rows = sealed_rows(300)
    bodies = list(wire.bodies(Work(events=rows), max_bytes=20_000))
    assert len(bodies) > 1 and all(len(b) <= 20_000 for b in bodies)
    back = [row for body in bodies for row in wire.decode(body).events()]
    assert back == rows
    with pytest.raises(ValueError, match=r"\w"):
        wire.decode(b"\x93not a record")


# --------------------------------------------------------------------------- the client


@pytest.fixture
async def replica() -> AsyncIterator[dict[str, Any]]:
    """A real HTTP server whose answers the test sets."""
    state: dict[str, Any] = {"status": 200, "seen": []}
    # "hang": no answer until the test is over (the server's shutdown would otherwise wait
    # a minute for the hanging handler).
    over = asyncio.Event()

    async def handle(request: web.Request) -> web.Response:
        state["seen"].append(request.headers.get("Authorization"))
        if state["status"] == "hang":
            await over.wait()
        return web.json_response({"events": 1, "code": "X"}, status=state["status"])

    app = web.Application()
    app.router.add_route("*", "/{tail:.*}", handle)
    runner = web.AppRunner(app)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    state["url"] = f"http://127.0.0.1:{runner.addresses[0][1]}"
    yield state
    over.set()
    await runner.cleanup()


async def test_the_client_classifies_each_failure_once(replica: dict[str, Any], tmp_path: Path):
    token = tmp_path / "token"
    token.write_text("first-token\n")
    dead = f"http://127.0.0.1:{free_port()}"
    upstream = Upstream((replica["url"], dead), token_file=str(token), timeout=1.0)
    upstream._next = 0
    try:
        assert (await upstream.request("GET", "/x")).status == 200
        assert replica["seen"][-1] == "Bearer first-token"
        token.write_text("second-token")  # rotated by the kubelet
        await upstream.request("GET", "/x")
        assert replica["seen"][-1] == "Bearer second-token"
        assert upstream.state(60) == "up"
        for status, kind, fault in ((503, StoreUnavailable, Fault.TRANSIENT),
                                    (403, PermissionDenied, Fault.ERROR),
                                    (500, Exception, Fault.ERROR)):
            replica["status"] = status
            upstream._next = 0
            with pytest.raises(kind) as caught:
                await upstream.request("GET", "/x")
            assert getattr(caught.value, "fault", None) is fault, caught.value
            assert upstream.state(60) == "down"
        # A refused connection is transient, and the next call goes to the next replica.
        upstream._next = 1
        with pytest.raises(StoreUnavailable):
            await upstream.request("GET", "/x")
        assert upstream.current == replica["url"]
        # An answer that never comes is transient too, within the deadline.
        replica["status"] = "hang"
        started = asyncio.get_running_loop().time()
        with pytest.raises(StoreUnavailable):
            await upstream.request("GET", "/x")
        assert asyncio.get_running_loop().time() - started < 5
        started = asyncio.get_running_loop().time()  # a call's own, longer deadline holds too
        with pytest.raises(StoreUnavailable):
            await upstream.request("GET", "/x", timeout=1.5)
        assert asyncio.get_running_loop().time() - started < 5
    finally:
        await upstream.close()


# --------------------------------------------------------------------------- the records route


@pytest.fixture
async def aggregator(database: Database, state_dir: Path) -> AsyncIterator[Agent]:
    config = agent_config(database, state_dir, role="aggregator", socket="off")
    async with Agent(config) as agent:
        yield agent


async def post_records(agent: Agent, body: bytes, **headers: str) -> tuple[int, Any]:
    assert agent.endpoints.event_url is not None
    async with aiohttp.ClientSession() as session, session.post(
            agent.endpoints.event_url + wire.RECORDS_PATH, data=body,
            headers={"Content-Type": wire.CONTENT_TYPE, **headers}) as resp:
        return resp.status, await resp.json(content_type=None)


async def test_an_aggregator_takes_sealed_records_and_refuses_foreign_or_damaged_ones(
        aggregator: Agent, database: Database):
    rows = sealed_rows(3)
    status, body = await post_records(aggregator, wire.encode(Work(events=rows)),
                                      Prefer="wait=committed")
    assert status == 200 and body["events"] == 3 and body["committed"] is True, body
    assert sorted(body["new_event_ids"]) == sorted(r.event_id for r in rows)
    stored = await database.fetch("SELECT event_id::text, payload_sha256, trace_id "
                                  "FROM flux.events")
    assert {(r[0], r[1]) for r in stored} == {(r.event_id, r.payload_sha256) for r in rows}
    # Sent twice (a retry after a lost answer): stored once.
    status, body = await post_records(aggregator, wire.encode(Work(events=rows)),
                                      Prefer="wait=committed")
    assert status == 200 and body["new_event_ids"] == []
    # Another agency's rows: nothing of the request is taken, and it is audited.
    mixed = sealed_rows(1) + sealed_rows(1, agency="noaa")
    status, body = await post_records(aggregator, wire.encode(Work(events=mixed)))
    assert status == 403 and body["code"] == "AGENCY_NOT_ALLOWED", body
    assert body["errors"][0]["pointer"] == "/events/1/agency_id"
    # A payload that does not match its hash (damaged on the way): 422, nothing taken.
    bad = sealed_rows(2)
    bad[1] = bad[1]._replace(payload='{"forged":true}')
    status, body = await post_records(aggregator, wire.encode(Work(events=bad)))
    assert status == 422 and body["code"] == "RECORD_INTEGRITY_FAILED", body
    status, body = await post_records(aggregator, b"not msgpack at all")
    assert status == 400 and body["code"] == "INVALID_RECORDS"
    status, body = await post_records(aggregator, wire.encode(Work(events=rows)),
                                      **{"Content-Type": "application/json"})
    assert status == 415
    assert aggregator.flusher is not None
    await aggregator.flusher.drain(10)
    ids = {r[0] for r in await database.fetch("SELECT event_id::text FROM flux.events")}
    assert ids == {r.event_id for r in rows}

    async def audited() -> bool:
        return bool(await database.fetch("SELECT 1 FROM flux.audit_log "
                                         "WHERE action = 'isolation.violation'"))

    assert await wait_until(audited, 10)
    # Reads for an agency the caller may not act for are refused, not answered empty.
    status, body, _ = await get(aggregator.endpoints.event_url + "/v1/runs/r-1",
                                headers={wire.AGENCY_HEADER: "noaa"})
    assert status == 403 and body["code"] == "AGENCY_NOT_ALLOWED"


async def test_a_sidecar_forwards_reads_and_checkpoints_through_its_aggregator(
        aggregator: Agent, database: Database):
    side_dir = short_tempdir()
    config = agent_config(database, side_dir, database_url=None,
                          upstream=(aggregator.endpoints.event_url,))
    async with Agent(config) as sidecar:
        url = sidecar.endpoints.event_url
        assert sidecar.pg is None  # no database client, no credentials
        event = make_event(run_id="fwd-1")
        status, body, _ = await post(url + "/v1/events", event,
                                     headers={"Prefer": "wait=committed"})
        assert status == 200 and body["committed"] is True, body
        status, run, _ = await get(url + "/v1/runs/fwd-1")
        assert status == 200 and run["events"] == 1
        status, page, _ = await get(url + "/v1/runs/fwd-1/events")
        assert [e["event_id"] for e in page["events"]] == [event["event_id"]]
        async with aiohttp.ClientSession() as session, session.put(
                url + "/v1/runs/fwd-1/checkpoint",
                json={"step": "load", "state": {"offset": 7, "x": 0.5}}) as resp:
            status, saved = resp.status, await resp.json()
        assert status == 201 and saved["version"] == 1
        # Another pod's sidecar (another state dir) asks for it at once: the aggregator
        # knows it before PostgreSQL does.
        async with Agent(agent_config(database, short_tempdir(), database_url=None,
                                      upstream=(aggregator.endpoints.event_url,))) as other:
            status, loaded, _ = await get(other.endpoints.event_url
                                          + "/v1/runs/fwd-1/checkpoint")
            assert status == 200 and loaded["state"] == {"offset": 7, "x": 0.5}, loaded
            assert loaded["checkpoint_hash"] == saved["checkpoint_hash"]
        status, _, _ = await get(url + "/v1/runs/never/checkpoint")
        assert status == 404
        status, health, _ = await get(sidecar.endpoints.admin_url + "/health/ready")
        assert health["upstream"] == "up" and "database" not in health


# --------------------------------------------------------------------------- TLS


def certificate(directory: Path) -> tuple[Path, Path]:
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "flux-aggregator")])
    now = dt.datetime.now(dt.UTC)
    cert = (x509.CertificateBuilder().subject_name(name).issuer_name(name)
            .public_key(key.public_key()).serial_number(x509.random_serial_number())
            .not_valid_before(now - dt.timedelta(minutes=1))
            .not_valid_after(now + dt.timedelta(days=1))
            .add_extension(x509.SubjectAlternativeName(
                [x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]), critical=False)
            .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
            .sign(key, hashes.SHA256()))
    cert_path, key_path = directory / "tls.crt", directory / "tls.key"
    cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    key_path.write_bytes(key.private_bytes(serialization.Encoding.PEM,
                                           serialization.PrivateFormat.PKCS8,
                                           serialization.NoEncryption()))
    return cert_path, key_path


async def test_sidecar_and_aggregator_over_tls(database: Database, state_dir: Path,
                                               tmp_path: Path):
    cert, key = certificate(tmp_path)
    config = agent_config(database, state_dir, role="aggregator", socket="off",
                          tls_cert_file=str(cert), tls_key_file=str(key))
    async with Agent(config) as aggregator:
        assert aggregator.endpoints.event_url is not None
        assert aggregator.endpoints.event_url.startswith("https://")
        side = agent_config(database, short_tempdir(), database_url=None,
                            upstream=(aggregator.endpoints.event_url,),
                            upstream_ca_file=str(cert))
        async with Agent(side) as sidecar:
            event = make_event()
            status, body, _ = await post(sidecar.endpoints.event_url + "/v1/events", event,
                                         headers={"Prefer": "wait=committed"})
            assert status == 200, body
        # Its event can never be sent: its drain at the end waits 1 s, not 10.
        untrusting = agent_config(database, short_tempdir(), database_url=None,
                                  upstream=(aggregator.endpoints.event_url,),
                                  upstream_timeout=2.0, drain_timeout=1.0)
        async with Agent(untrusting) as sidecar:
            status, body, _ = await post(sidecar.endpoints.event_url + "/v1/events",
                                         make_event())
            assert status == 202  # spooled: the certificate is not trusted, so not sent
            assert sidecar.flusher is not None

            async def refused() -> bool:
                return "certificate" in (sidecar.flusher.last_error or "").lower()

            assert await wait_until(refused, 10), sidecar.flusher.last_error


# --------------------------------------------------------------------------- configuration


def test_the_tiers_configuration_rules(tmp_path: Path):
    base = {"FLUX_AGENT_AUTH": "none", "FLUX_AGENT_AGENCY": "nasa",
            "FLUX_AGENT_STATE_DIR": str(tmp_path)}
    dsn = "postgresql://flux:pw@db:5432/flux"
    config = load_config([], environ={**base, "FLUX_AGENT_UPSTREAM": dsn})
    assert str.__str__(config.database_url) == dsn and config.aggregators == ()
    config = load_config([], environ={**base, "FLUX_AGENT_UPSTREAM":
                                      "https://a:8788,https://b:8788"})
    assert config.aggregators == ("https://a:8788", "https://b:8788")
    assert config.handoff_to == config.aggregators
    cases = [
        ({"FLUX_AGENT_UPSTREAM": "https://a:8788", "FLUX_AGENT_DATABASE_URL": dsn},
         "FLUX_AGENT_UPSTREAM"),
        ({"FLUX_AGENT_UPSTREAM": "ftp://a"}, "FLUX_AGENT_UPSTREAM"),
        ({"FLUX_AGENT_ROLE": "aggregator", "FLUX_AGENT_UPSTREAM": "https://a:8788"},
         "FLUX_AGENT_UPSTREAM"),
        ({"FLUX_AGENT_TLS_CERT_FILE": "x.crt"}, "FLUX_AGENT_TLS_KEY_FILE"),
        ({"FLUX_AGENT_ROLE": "aggregator", "FLUX_AGENT_AUTH": "jwt",
          "FLUX_AGENT_API_KEYS_FILE": str(tmp_path / "keys.json"),
          "FLUX_AGENT_LISTEN": "0.0.0.0:8788"}, "FLUX_AGENT_TLS_CERT_FILE"),
        ({"FLUX_AGENT_HANDOFF": dsn}, "FLUX_AGENT_HANDOFF"),
    ]
    for extra, setting in cases:
        with pytest.raises(ConfigError) as caught:
            load_config([], environ={**base, **extra})
        assert caught.value.setting == setting, (extra, caught.value)
        assert "pw" not in str(caught.value)
    plain = load_config([], environ={
        **base, "FLUX_AGENT_ROLE": "aggregator", "FLUX_AGENT_AUTH": "jwt",
        "FLUX_AGENT_API_KEYS_FILE": str(tmp_path / "keys.json"),
        "FLUX_AGENT_LISTEN": "0.0.0.0:8788", "FLUX_AGENT_ALLOW_PLAINTEXT": "true"})
    assert plain.role == "aggregator"
    assert plain.batch_max_age == 0.5  # an aggregator's windows wait half as long...
    slower = load_config(["--batch-max-age", "2s"], environ={
        **base, "FLUX_AGENT_ROLE": "aggregator"})
    assert slower.batch_max_age == 2.0  # ...unless set
    assert json.loads(json.dumps({"secret": str(Secret("x"))}))  # Secret stays a str
    assert record_encoder.encode(ForwardedRecord([], [], [])) == wire.encode(Work())


def test_an_upstreams_state_follows_its_last_calls():
    from flux_agent.core.health import path_state

    now = 1000.0
    state = {"connect_timeout": 5.0, "window": 30.0, "now": now}
    assert path_state(None, None, [], **state) == "unknown"
    assert path_state(now - 1, None, [], **state) == "up"
    assert path_state(now - 60, None, [], **state) == "unknown"  # idle: not proven either way
    assert path_state(now - 2, now - 1, [], **state) == "down"
    assert path_state(now - 1, now - 2, [], **state) == "up"  # recovered since
    # A call waiting longer than a connection may take, with nothing working since it began:
    # a black hole is down before the call's own deadline.
    assert path_state(now - 20, None, [now - 6], **state) == "down"
    assert path_state(now - 1, None, [now - 6], **state) == "up"
    assert path_state(now - 20, None, [now - 2], **state) == "up"



def test_a_late_failure_of_a_call_begun_before_a_success_does_not_outweigh_it():
    """A call stuck on a black-holed path fails only at its deadline, after the path healed
    and later calls succeeded (seen in CI: the database read "down" after a heal, once every
    event had landed): its failure counts from when it began."""
    from flux_agent.core.health import failed_at, path_state

    state = {"connect_timeout": 5.0, "window": 30.0, "now": 1000.0}
    began, healed_ok = 980.0, 995.0  # the stuck call began; a later call worked
    late = failed_at(None, began)  # the stuck call fails now, at 1000
    assert late == began
    assert path_state(healed_ok, late, [], **state) == "up"
    # A call begun after the last success that fails is the path's state: down.
    assert path_state(healed_ok, failed_at(late, 996.0), [], **state) == "down"
    assert failed_at(996.0, began) == 996.0  # never moves back
    assert failed_at(None, None) > 0  # unknown start: now
