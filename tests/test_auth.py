"""Tenancy and security: forged tokens, roles, agency isolation (API and PostgreSQL RLS),
the audit trail, key rotation, socket peer checks, and the development token command."""

from __future__ import annotations

import asyncio
import base64
import contextlib
import hashlib
import hmac
import json
import os
import secrets
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit, urlunsplit

import aiohttp
import asyncpg
import jwt
import pytest
from cryptography.hazmat.primitives.asymmetric import rsa

from flux_agent import Agent
from flux_agent.core.errors import AuthenticationError, ConfigError
from flux_agent.core.settings import Secret
from flux_agent.intake.tokens import JwtAuthenticator, KeySet, mint
from flux_agent.testing import make_event

from .support.agents import agent_config
from .support.capture import CAPTURED, remember_secret
from .support.faults import TcpProxy
from .support.http import assert_problem, post, raw_http, split_answer
from .support.polling import wait_until
from .support.postgres import Database
from .support.tokens import AUDIENCE, ISSUER, bearer, jwks, pem_public, private_key, token
from .support.tools import require_tool


@pytest.fixture(scope="module")
def rsa_key() -> rsa.RSAPrivateKey:
    return private_key()


@pytest.fixture(scope="module")
def other_rsa_key() -> rsa.RSAPrivateKey:
    return private_key()


def b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def unsigned(claims: dict[str, Any], alg: str = "none") -> str:
    head = b64(json.dumps({"alg": alg, "typ": "JWT"}).encode())
    body = b64(json.dumps(claims).encode())
    return f"{head}.{body}."


def hs256_with(secret: bytes, claims: dict[str, Any]) -> str:
    head = b64(json.dumps({"alg": "HS256", "typ": "JWT"}).encode())
    body = b64(json.dumps(claims).encode())
    sig = hmac.new(secret, f"{head}.{body}".encode(), hashlib.sha256).digest()
    return f"{head}.{body}.{b64(sig)}"


@pytest.fixture
async def jwt_agent(database: Database, state_dir: Path, rsa_key) -> AsyncIterator[Agent]:
    key_file = state_dir / "idp.pem"
    key_file.write_bytes(pem_public(rsa_key))
    config = agent_config(database, state_dir, auth="jwt", agency="",
                          jwt_algorithms=("RS256",), jwt_issuers=(ISSUER,),
                          jwt_audience=AUDIENCE, jwt_public_key_file=str(key_file))
    async with Agent(config) as running:
        yield running


async def test_valid_token_writes_for_its_agency(jwt_agent: Agent, database: Database,
                                                 rsa_key):
    tok = token(rsa_key)
    status, body, _ = await post(jwt_agent.endpoints.event_url + "/v1/events", make_event(),
                                 headers={**bearer(tok), "Prefer": "wait=committed"})
    assert status == 200, body
    assert await database.fetchval("SELECT agency_id FROM flux.events") == "nasa"
    # The same token again is served from the cache: one signature check in all.
    for _ in range(5):
        status, _, _ = await post(jwt_agent.endpoints.event_url + "/v1/events", make_event(),
                                  headers=bearer(tok))
        assert status == 202
    assert isinstance(jwt_agent.authenticator, JwtAuthenticator)
    assert jwt_agent.authenticator.verifications == 1


@pytest.mark.parametrize(
    ("name", "code"),
    [
        ("missing", "TOKEN_MISSING"),
        ("not bearer", "TOKEN_MALFORMED"),
        ("garbage", "TOKEN_MALFORMED"),
        ("alg none", "TOKEN_ALGORITHM_NOT_ALLOWED"),
        ("wrong key", "TOKEN_BAD_SIGNATURE"),
        ("hs256 signed with the public key", "TOKEN_ALGORITHM_NOT_ALLOWED"),
        ("expired", "TOKEN_EXPIRED"),
        ("not yet valid", "TOKEN_NOT_YET_VALID"),
        ("issued in the future", "TOKEN_NOT_YET_VALID"),
        ("wrong issuer", "TOKEN_WRONG_ISSUER"),
        ("wrong audience", "TOKEN_WRONG_AUDIENCE"),
        ("missing agency", "TOKEN_MISSING_CLAIM"),
        ("missing exp", "TOKEN_MISSING_CLAIM"),
        ("bad agency", "TOKEN_INVALID_CLAIM"),
        ("tampered payload", "TOKEN_BAD_SIGNATURE"),
        # RFC 7519: exp, nbf and iat are NumericDates (JSON numbers), never strings.
        ("exp as a numeric string", "TOKEN_INVALID_CLAIM"),
        ("nbf as a numeric string", "TOKEN_INVALID_CLAIM"),
        ("iat as a numeric string", "TOKEN_INVALID_CLAIM"),
        ("iat not a number", "TOKEN_INVALID_CLAIM"),
        ("exp as a boolean", "TOKEN_INVALID_CLAIM"),
    ],
)
async def test_forged_and_broken_tokens_are_401_with_a_precise_code(
        jwt_agent: Agent, rsa_key, other_rsa_key, name: str, code: str):
    now = int(time.time())
    good = {"iss": ISSUER, "sub": "x", "agency": "nasa", "role": "operator", "iat": now,
            "exp": now + 600, "aud": AUDIENCE}
    headers: dict[str, str]
    if name == "missing":
        headers = {}
    elif name == "not bearer":
        headers = {"Authorization": "Basic dXNlcjpwYXNz"}
    elif name == "garbage":
        headers = bearer("not.a.jwt")
    elif name == "alg none":
        headers = bearer(unsigned(good))
    elif name == "wrong key":
        headers = bearer(token(other_rsa_key))
    elif name == "hs256 signed with the public key":
        headers = bearer(hs256_with(pem_public(rsa_key), good))
    elif name == "expired":
        headers = bearer(token(rsa_key, iat=now - 7200, exp=now - 3600))
    elif name == "not yet valid":
        headers = bearer(token(rsa_key, nbf=now + 3600))
    elif name == "issued in the future":
        headers = bearer(token(rsa_key, iat=now + 3600, exp=now + 7200))
    elif name == "wrong issuer":
        headers = bearer(token(rsa_key, iss="https://evil.example"))
    elif name == "wrong audience":
        headers = bearer(token(rsa_key, aud="someone-else"))
    elif name == "missing agency":
        headers = bearer(token(rsa_key, agency=None))
    elif name == "missing exp":
        headers = bearer(token(rsa_key, exp=None))
    elif name == "bad agency":
        headers = bearer(token(rsa_key, agency="NASA HQ"))
    elif name.endswith("as a numeric string"):
        claim = name.split()[0]
        headers = bearer(token(rsa_key, **{claim: str(good.get(claim, now))}))
    elif name == "iat not a number":
        headers = bearer(token(rsa_key, iat="yesterday"))
    elif name == "exp as a boolean":
        headers = bearer(token(rsa_key, exp=True))
    else:
        head, _, sig = token(rsa_key).split(".")
        forged = b64(json.dumps({**good, "agency": "noaa"}).encode())
        headers = bearer(f"{head}.{forged}.{sig}")
    status, body, resp_headers = await post(jwt_agent.endpoints.event_url + "/v1/events",
                                            make_event(), headers=headers)
    assert_problem(status, body, resp_headers, 401, code)
    assert resp_headers["WWW-Authenticate"].startswith("Bearer")
    assert body["class"] == "VALIDATION_ERROR"
    if "numeric string" in name:
        assert repr(name.split()[0]) in body["detail"] and "NumericDate" in body["detail"]


async def test_two_authorization_headers_are_refused_on_every_route(jwt_agent: Agent, rsa_key,
                                                                   database: Database):
    """Two valid tokens for two agencies: the first once won. Ambiguous credentials are
    refused on every route, whichever agency either names."""
    parts = urlsplit(jwt_agent.endpoints.event_url)
    nasa, noaa = token(rsa_key, agency="nasa"), token(rsa_key, agency="noaa")
    for method, path, body, _ in ROUTES:
        payload = json.dumps(make_event() if body == "event" else body or {}).encode()
        for first, second in ((nasa, noaa), (nasa, nasa)):
            answer = await raw_http(parts.hostname, parts.port, (
                f"{method} {path} HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                f"Authorization: Bearer {first}\r\nAuthorization: Bearer {second}\r\n"
                f"Connection: close\r\nContent-Length: {len(payload)}\r\n\r\n").encode()
                + payload)
            status, headers, raw = split_answer(answer)
            assert status == 401, (method, path, raw[:300])
            assert headers["content-type"].startswith("application/problem+json")
            assert json.loads(raw)["code"] == "TOKEN_AMBIGUOUS", raw
    assert await database.fetchval("SELECT count(*) FROM flux.events") == 0


ROUTES = [  # (method, path, body, what it needs)
    ("POST", "/v1/events", "event", "write"),
    ("POST", "/api/v1/lineage", {"eventType": "START"}, "write"),
    ("PUT", "/v1/runs/matrix-run/checkpoint", {"step": "s", "state": {}}, "write"),
    ("GET", "/v1/runs/matrix-run/checkpoint", None, "read"),
    ("GET", "/v1/runs/matrix-run/checkpoints", None, "read"),
    ("GET", "/v1/runs/matrix-run", None, "read"),
    ("GET", "/v1/runs/matrix-run/events", None, "read"),
    ("GET", "/v1/events/0190f0b2-2f6c-7c3e-9d4a-1234567890ab", None, "read"),
    ("POST", "/v1/drain", {}, "write"),
]
PERMITS = {"admin": {"read", "write"}, "operator": {"read", "write"}, "viewer": {"read"},
           "analyzer": {"read"}, "superuser": set()}


@pytest.mark.parametrize("role", sorted(PERMITS))
async def test_role_matrix_over_every_route(jwt_agent: Agent, rsa_key, role: str):
    headers = bearer(token(rsa_key, role=role))
    for method, path, body, needs in ROUTES:
        if path == "/v1/drain" and needs in PERMITS[role]:
            continue  # allowed: it would stop the agent under test (see test_faults)
        payload = make_event() if body == "event" else body
        async with aiohttp.ClientSession() as session, session.request(
                method, jwt_agent.endpoints.event_url + path, headers=headers,
                json=payload) as resp:
            answer = await resp.json(content_type=None)
            CAPTURED.append(json.dumps(answer))
        if needs in PERMITS[role]:
            assert resp.status not in (401, 403), (role, method, path, answer)
        else:
            assert resp.status == 403, (role, method, path, answer)
            assert answer["code"] == "FORBIDDEN"
    # The event API answers no route without a token at all.
    for method, path, body, _ in ROUTES:
        async with aiohttp.ClientSession() as session, session.request(
                method, jwt_agent.endpoints.event_url + path, json=body or None) as resp:
            assert resp.status == 401, (method, path)


async def test_cross_agency_write_is_refused_and_audited(jwt_agent: Agent, database: Database,
                                                         rsa_key):
    headers = bearer(token(rsa_key, sub="mallory@nasa.gov"))
    event = make_event(agency="noaa")
    status, body, resp_headers = await post(jwt_agent.endpoints.event_url + "/v1/events",
                                            event, headers={**headers, "X-Request-ID": "x-1"})
    assert_problem(status, body, resp_headers, 403, "DATA_ISOLATION_ERROR")
    assert body["class"] == "DATA_ISOLATION_ERROR"

    async def audited() -> bool:
        return bool(await database.fetchval(
            "SELECT count(*) FROM flux.audit_log WHERE action = 'isolation.violation'"))

    assert await wait_until(audited, 10)
    row = (await database.fetch("SELECT * FROM flux.audit_log "
                                "WHERE action = 'isolation.violation'"))[0]
    assert (row["agency_id"], row["actor"], row["success"]) == ("nasa", "mallory@nasa.gov", False)
    assert row["correlation_id"] == "x-1"
    assert row["source"] == "tcp"
    assert "/agency" in row["detail"]
    assert await database.fetchval("SELECT count(*) FROM flux.events") == 0


async def test_token_for_an_unknown_agency_is_refused(jwt_agent: Agent, database: Database,
                                                     rsa_key, tmp_path: Path):
    # By default every agency is served...
    status, body, _ = await post(jwt_agent.endpoints.event_url + "/v1/events", make_event(),
                                 headers=bearer(token(rsa_key, agency="cia")))
    assert status == 202, body
    await jwt_agent.stop()
    # ... unless a manifest lists them: then the refusal names the setting.
    manifest = tmp_path / "agencies.json"
    manifest.write_text(json.dumps({"version": 1, "agencies": [
        {"slug": "nasa", "name": "NASA"}]}))
    config = jwt_agent.config.replace(agency_manifest=str(manifest))
    async with Agent(config) as restricted:
        status, body, headers = await post(restricted.endpoints.event_url + "/v1/events",
                                           make_event(), headers=bearer(token(rsa_key,
                                                                              agency="cia")))
        assert_problem(status, body, headers, 403, "UNKNOWN_AGENCY")
        assert "FLUX_AGENT_AGENCY_MANIFEST" in body["detail"]
        assert (await post(restricted.endpoints.event_url + "/v1/events", make_event(),
                           headers=bearer(token(rsa_key))))[0] == 202


async def test_bad_tokens_are_audited_but_rate_limited(jwt_agent: Agent, database: Database):
    url = jwt_agent.endpoints.event_url + "/v1/events"
    results = await asyncio.gather(*(post(url, make_event(), headers=bearer("x.y.z"))
                                     for _ in range(200)))
    assert all(status == 401 for status, _, _ in results)

    async def some() -> bool:
        return bool(await database.fetchval(
            "SELECT count(*) FROM flux.audit_log WHERE action = 'auth.failed'"))

    assert await wait_until(some, 10)
    assert jwt_agent.flusher is not None and await jwt_agent.flusher.drain(10)  # all of them
    n = await database.fetchval("SELECT count(*) FROM flux.audit_log "
                                "WHERE action = 'auth.failed'")
    assert 1 <= n <= 40, n  # a burst of 20, then 5 per second
    agency = await database.fetchval("SELECT DISTINCT agency_id FROM flux.audit_log "
                                     "WHERE action = 'auth.failed'")
    assert agency == "-"


async def test_jwks_rotation_with_kid(database: Database, state_dir: Path, rsa_key,
                                      other_rsa_key):
    jwks_file = state_dir / "jwks.json"
    jwks_file.write_text(jwks(("k1", rsa_key)))
    config = agent_config(database, state_dir, auth="jwt", agency="",
                          jwt_algorithms=("RS256",), jwt_issuers=(ISSUER,),
                          jwt_jwks_file=str(jwks_file))
    now = int(time.time())
    claims = {"iss": ISSUER, "sub": "s", "agency": "nasa", "role": "operator", "iat": now,
              "exp": now + 600}
    t1 = jwt.encode(claims, rsa_key, algorithm="RS256", headers={"kid": "k1"})
    t2 = jwt.encode(claims, other_rsa_key, algorithm="RS256", headers={"kid": "k2"})
    async with Agent(config) as running:
        url = running.endpoints.event_url + "/v1/events"
        assert (await post(url, make_event(), headers=bearer(t1)))[0] == 202
        status, body, headers = await post(url, make_event(), headers=bearer(t2))
        assert_problem(status, body, headers, 401, "TOKEN_UNKNOWN_KEY")
        await asyncio.sleep(1.1)  # a new mtime for the rotated file
        jwks_file.write_text(jwks(("k2", other_rsa_key)))

        async def rotated() -> bool:
            return (await post(url, make_event(), headers=bearer(t2)))[0] == 202

        assert await wait_until(rotated, 10, interval=0.3)
        status, body, headers = await post(url, make_event(), headers=bearer(t1))
        assert_problem(status, body, headers, 401, "TOKEN_UNKNOWN_KEY")


async def test_agent_refuses_a_superuser_login_in_jwt_mode(database: Database, state_dir: Path,
                                                            rsa_key):
    key_file = state_dir / "idp.pem"
    key_file.write_bytes(pem_public(rsa_key))
    config = agent_config(database, state_dir, auth="jwt", agency="",
                          database_url=Secret(database.admin_dsn), jwt_algorithms=("RS256",),
                          jwt_issuers=(ISSUER,), jwt_public_key_file=str(key_file))
    with pytest.raises(ConfigError) as info:
        async with Agent(config):
            pass
    assert info.value.setting == "FLUX_AGENT_DATABASE_URL"
    assert "row-level security" in info.value.message


async def test_reads_never_run_on_a_role_that_bypasses_row_level_security(
        database: Database, state_dir: Path, rsa_key, proxy: TcpProxy):
    """PostgreSQL down at start: a JWT agent whose login role bypasses row-level security
    starts (it cannot check the role yet). Once PostgreSQL answers, as that superuser, no
    read may run on it: isolation must not rest on each query's own filter."""
    admin = await asyncpg.connect(database.admin_dsn)
    await admin.execute("""
        INSERT INTO flux.events (agency_id, event_id, run_id, kind, occurred_at, received_at,
                                 payload, payload_sha256, expires_at)
        VALUES ('noaa', '0190f0b2-2f6c-7c3e-9d4a-00000000000a', 'r-su', 'run.started', now(),
                now(), '{}', repeat('a', 64), now() + interval '1 day')""")
    scans = ("SELECT sum(coalesce(seq_scan, 0) + coalesce(idx_scan, 0)) FROM "
             "pg_stat_user_tables WHERE schemaname = 'flux'")
    before = await admin.fetchval(scans)
    key_file = state_dir / "idp.pem"
    key_file.write_bytes(pem_public(rsa_key))
    parts = urlsplit(database.admin_dsn)
    superuser = urlunsplit(parts._replace(
        netloc=f"{parts.netloc.rsplit('@', 1)[0]}@127.0.0.1:{proxy.port}"))
    config = agent_config(database, state_dir, auth="jwt", agency="",
                          database_url=Secret(superuser), jwt_algorithms=("RS256",),
                          jwt_issuers=(ISSUER,), jwt_public_key_file=str(key_file),
                          database_connect_timeout=2.0, database_ping_interval=0.3,
                          # Nothing can be written as that role: each read waits for the
                          # agent's own writes (the audit trail) up to the commit wait, and
                          # the drain at the end its whole time. Both kept short.
                          commit_wait_timeout=0.5, drain_timeout=1.0)
    proxy.cut()
    try:
        async with Agent(config) as running:
            proxy.restore()  # PostgreSQL answers now, as the superuser
            url = running.endpoints.event_url
            for agency in ("noaa", "nasa"):
                headers = bearer(token(rsa_key, agency=agency, role="viewer"))
                for path in ("/v1/runs/r-su", "/v1/runs/r-su/events",
                             "/v1/events/0190f0b2-2f6c-7c3e-9d4a-00000000000a",
                             "/v1/runs/r-su/checkpoint", "/v1/runs/r-su/checkpoints"):
                    async with aiohttp.ClientSession() as session, session.get(
                            url + path, headers=headers) as resp:
                        answer = await resp.json(content_type=None)
                    CAPTURED.append(json.dumps(answer))
                    assert resp.status == 503, (path, answer)
                    assert "r-su" not in json.dumps(answer.get("events", answer.get("run_id")))

            async def unsafe() -> bool:
                ready = running.readiness()
                return "database_role_unsafe" in ready[1].get("reasons", [])

            assert await wait_until(unsafe, 15)
    finally:
        proxy.restore()
    await admin.execute("SELECT pg_stat_clear_snapshot()")

    async def flushed() -> bool:  # a backend reports its table scans when it ends
        await admin.execute("SELECT pg_stat_clear_snapshot()")
        gone = await admin.fetchval("SELECT count(*) FROM pg_stat_activity WHERE "
                                    "application_name = 'flux-agent' AND datname = $1",
                                    database.name)
        return gone == 0

    assert await wait_until(flushed, 30)
    assert await admin.fetchval(scans) == before
    await admin.close()


@contextlib.contextmanager
def remote_peer() -> Iterator[tuple[str, Any]]:
    """A network namespace joined to this one by a veth pair: a caller that is not on
    loopback, as the pod network is to the admin listener. Yields the address on this side
    and ``get(url, headers) -> (status, body)`` run from inside the namespace."""
    ip = str(require_tool("ip"))
    tag = f"{os.getpid() % 1000}{secrets.randbelow(100)}"
    ns, host_if, peer_if = f"fa-ns{tag}", f"fa-h{tag}", f"fa-p{tag}"
    octet = 16 + secrets.randbelow(200)
    here, there = f"10.213.{octet}.1", f"10.213.{octet}.2"

    def run(*args: str) -> None:
        subprocess.run([ip, *args], check=True, capture_output=True, timeout=30)

    run("netns", "add", ns)
    try:
        run("link", "add", host_if, "type", "veth", "peer", "name", peer_if, "netns", ns)
        run("addr", "add", f"{here}/30", "dev", host_if)
        run("link", "set", host_if, "up")
        for args in (("addr", "add", f"{there}/30", "dev", peer_if),
                     ("link", "set", peer_if, "up"), ("link", "set", "lo", "up")):
            run("netns", "exec", ns, ip, *args)

        def get(url: str, headers: dict[str, str]) -> tuple[int, str]:
            script = ("import json,sys,urllib.request,urllib.error\n"
                      "req=urllib.request.Request(sys.argv[1],headers=json.loads(sys.argv[2]))\n"
                      "try:\n r=urllib.request.urlopen(req,timeout=20)\n"
                      "except urllib.error.HTTPError as e:\n r=e\n"
                      "print(r.status);print(r.read().decode())\n")
            out = subprocess.run([ip, "netns", "exec", ns, sys.executable, "-c", script, url,
                                  json.dumps(headers)], capture_output=True, text=True,
                                 timeout=60, check=True).stdout
            status, _, body = out.partition("\n")
            CAPTURED.append(body)
            return int(status), body

        yield here, get
    finally:
        subprocess.run([ip, "netns", "del", ns], capture_output=True, timeout=30)
        subprocess.run([ip, "link", "del", host_if], capture_output=True, timeout=30)


@pytest.mark.fault
async def test_admin_listener_tells_the_pod_network_no_diagnostics(
        database: Database, state_dir: Path, rsa_key):
    """With the admin listener on the pod network, anyone reaching the pod read
    /health/deep: database errors naming roles and hosts, the tasks' errors."""
    key_file = state_dir / "idp.pem"
    key_file.write_bytes(pem_public(rsa_key))
    # A login role PostgreSQL does not know: its error names the role (and the test
    # cluster trusts local connections, so no password is ever checked).
    parts = urlsplit(database.login_dsn)
    user = "flux_no_such_role"
    dsn = urlunsplit(parts._replace(netloc=f"{user}@{parts.hostname}:{parts.port}"))
    with remote_peer() as (address, remote_get):
        config = agent_config(database, state_dir, auth="jwt", agency="",
                              database_url=Secret(dsn), admin_listen=f"{address}:0",
                              jwt_algorithms=("RS256",), jwt_issuers=(ISSUER,),
                              jwt_audience=AUDIENCE, jwt_public_key_file=str(key_file))
        async with Agent(config) as running:
            deep = running.endpoints.admin_url + "/health/deep"
            # The probes and the scrape stay open to the pod network.
            for path in ("/health/live", "/health/ready", "/metrics"):
                status, body = await asyncio.to_thread(
                    remote_get, running.endpoints.admin_url + path, {})
                assert status in (200, 503), (path, body)
                assert user not in body, (path, body)
            status, body = await asyncio.to_thread(remote_get, deep, {})
            assert user not in body and "does not exist" not in body, body
            assert json.loads(body)["diagnostics"].startswith("served to loopback")
            # An operator with an admin token sees it all, from anywhere.
            admin = bearer(token(rsa_key, role="admin"))
            status, body = await asyncio.to_thread(remote_get, deep, admin)
            assert f'role \\"{user}\\" does not exist' in body, body
            status, body = await asyncio.to_thread(
                remote_get, deep, bearer(token(rsa_key, role="operator")))
            assert status == 403 and json.loads(body)["code"] == "FORBIDDEN", body
            status, body = await asyncio.to_thread(remote_get, deep, bearer("x.y.z"))
            assert status == 401 and user not in body, body


async def test_socket_peer_uid_allow_list(database: Database, state_dir: Path):
    mine = str(os.getuid())
    other = str(os.getuid() + 4242)
    for allowed, expect in (((other,), 401), ((mine, other), 202)):
        config = agent_config(database, state_dir, socket_allowed_uids=allowed)
        async with Agent(config) as running:
            status, body, _ = await post("http://agent/v1/events", make_event(),
                                         socket=running.endpoints.socket_path)
            assert status == expect, body
            if expect == 401:
                assert body["code"] == "PEER_NOT_ALLOWED"
            # TCP is not subject to the socket's peer check.
            status, _, _ = await post(running.endpoints.event_url + "/v1/events", make_event())
            assert status == 202


# --------------------------------------------------------------------------- RLS in PostgreSQL


async def test_row_level_security_as_the_agents_login_role(database: Database):
    admin = await asyncpg.connect(database.admin_dsn)
    now = "now()"
    await admin.execute(f"""
        INSERT INTO flux.events (agency_id, event_id, run_id, kind, occurred_at, received_at,
                                 payload, payload_sha256, expires_at)
        VALUES ('nasa', gen_random_uuid(), 'r', 'run.started', {now}, {now}, '{{}}',
                repeat('a', 64), {now}),
               ('noaa', gen_random_uuid(), 'r', 'run.started', {now}, {now}, '{{}}',
                repeat('b', 64), {now})""")
    await admin.close()
    conn = await asyncpg.connect(database.login_dsn)
    try:
        # No agency declared: nothing is visible.
        assert await conn.fetchval("SELECT count(*) FROM flux.events") == 0
        async with conn.transaction():
            await conn.execute("SELECT set_config('flux.current_agency_id', 'nasa', true)")
            assert await conn.fetchval("SELECT array_agg(agency_id) FROM flux.events") == [
                "nasa"]
            await conn.execute("""
                INSERT INTO flux.events (agency_id, event_id, run_id, kind, occurred_at,
                    received_at, payload, payload_sha256, expires_at)
                VALUES ('nasa', gen_random_uuid(), 'r2', 'run.started', now(), now(), '{}',
                        repeat('c', 64), now())""")
        # The setting is transaction-local: nothing leaks to the next transaction.
        assert await conn.fetchval("SELECT count(*) FROM flux.events") == 0
        # Declaring nasa but writing a noaa row violates the policy's WITH CHECK.
        with pytest.raises(asyncpg.InsufficientPrivilegeError):
            await conn.execute("""
                SELECT set_config('flux.current_agency_id', 'nasa', false);
                INSERT INTO flux.events (agency_id, event_id, run_id, kind, occurred_at,
                    received_at, payload, payload_sha256, expires_at)
                VALUES ('noaa', gen_random_uuid(), 'r3', 'run.started', now(), now(),
                        '{}', repeat('d', 64), now())""")
        await conn.execute("RESET flux.current_agency_id")
        with pytest.raises(asyncpg.InsufficientPrivilegeError):
            await conn.execute("DELETE FROM flux.events")
        with pytest.raises(asyncpg.InsufficientPrivilegeError):
            await conn.execute("UPDATE flux.audit_log SET success = true")
        with pytest.raises(asyncpg.InsufficientPrivilegeError):
            await conn.execute("SELECT * FROM flux.audit_log")
        role = await conn.fetchrow("SELECT rolsuper, rolbypassrls FROM pg_roles "
                                   "WHERE rolname = current_user")
        assert tuple(role) == (False, False)
    finally:
        await conn.close()
    stored = await database.fetch("SELECT agency_id, run_id FROM flux.events ORDER BY 1, 2")
    assert [tuple(r) for r in stored] == [("nasa", "r"), ("nasa", "r2"), ("noaa", "r")]


# --------------------------------------------------------------------------- units


def test_mixed_hmac_and_public_key_algorithms_are_refused():
    from flux_agent.core.settings import load_config

    env = {"FLUX_AGENT_JWT_ISSUERS": ISSUER, "FLUX_AGENT_JWT_ALGORITHMS": "RS256,HS256",
           "FLUX_AGENT_JWT_PUBLIC_KEY_FILE": "/k.pem"}
    with pytest.raises(ConfigError, match="must not be mixed"):
        load_config([], env)
    with pytest.raises(ConfigError, match="not allowed: none"):
        load_config([], {**env, "FLUX_AGENT_JWT_ALGORITHMS": "none"})


def test_hs256_development_secret():
    secret = "a-development-secret-of-32-chars!!"
    remember_secret(secret)
    auth = JwtAuthenticator(KeySet(secret=secret), algorithms=["HS256"], issuers=[ISSUER])
    tok = mint(secret, algorithm="HS256", issuer=ISSUER, sub="s", agency="nasa",
               role="viewer", ttl=60)
    claims = auth.authenticate({"Authorization": f"Bearer {tok}"}, local=False)
    assert (claims.agency, claims.role) == ("nasa", "viewer")
    with pytest.raises(AuthenticationError):
        auth.authenticate({"Authorization": "Bearer " + tok[:-2] + "xx"}, local=False)


def test_token_command_mints_a_token_the_agent_accepts(tmp_path: Path):
    key = tmp_path / "dev.pem"
    gen = subprocess.run([sys.executable, "-m", "flux_agent", "token", "--generate-key",
                          str(key)], capture_output=True, text=True, timeout=60)
    assert gen.returncode == 0, gen.stderr
    out = subprocess.run([sys.executable, "-m", "flux_agent", "token", "--key", str(key),
                          "--agency", "noaa", "--role", "viewer"],
                         capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    assert "DEVELOPMENT TOKEN" in out.stderr
    tok = out.stdout.strip()
    public = KeySet(pem=(tmp_path / "dev.pem.pub").read_bytes())
    auth = JwtAuthenticator(public, algorithms=["ES256"], issuers=["flux-agent-dev"])
    claims = auth.authenticate({"Authorization": f"Bearer {tok}"}, local=False)
    assert (claims.agency, claims.role) == ("noaa", "viewer")
    assert jwt.decode(tok, options={"verify_signature": False})["dev"] is True


async def test_api_keys_map_a_key_to_an_agency(database: Database, state_dir: Path, rsa_key):
    gen = await asyncio.to_thread(
        subprocess.run, [sys.executable, "-m", "flux_agent", "token", "--api-key", "--agency",
                         "noaa", "--role", "operator", "--sub", "airflow"],
        capture_output=True, text=True, timeout=60)
    assert gen.returncode == 0, gen.stderr
    key = gen.stdout.strip()
    remember_secret(key)
    entry = json.loads(gen.stderr.split("FLUX_AGENT_API_KEYS_FILE: ", 1)[1])
    assert key not in gen.stderr  # the file holds only the hash
    keys_file = state_dir / "keys.json"
    keys_file.write_text(json.dumps({"keys": [entry]}))
    pem = state_dir / "idp.pem"
    pem.write_bytes(pem_public(rsa_key))
    config = agent_config(database, state_dir, auth="jwt", agency="",
                          api_keys_file=str(keys_file), jwt_algorithms=("RS256",),
                          jwt_issuers=(ISSUER,), jwt_audience=AUDIENCE,
                          jwt_public_key_file=str(pem))
    async with Agent(config) as running:
        url = running.endpoints.event_url + "/v1/events"
        status, body, _ = await post(url, make_event(), headers={
            **bearer(key), "Prefer": "wait=committed"})
        assert status == 200, body
        # JWTs still work beside the keys.
        assert (await post(url, make_event(), headers=bearer(token(rsa_key))))[0] == 202
        status, body, headers = await post(url, make_event(), headers=bearer("flux_wrong"))
        assert_problem(status, body, headers, 401, "TOKEN_UNKNOWN_KEY")
        # Two Authorization headers, on the OpenLineage route's API-key path too.
        parts = urlsplit(running.endpoints.event_url)
        for path in ("/v1/events", "/api/v1/lineage"):
            answer = await raw_http(parts.hostname, parts.port, (
                f"POST {path} HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {key}\r\n"
                f"Authorization: Bearer flux_other\r\nContent-Type: application/json\r\n"
                "Content-Length: 2\r\nConnection: close\r\n\r\n{}").encode())
            status, _, raw = split_answer(answer)
            assert status == 401 and json.loads(raw)["code"] == "TOKEN_AMBIGUOUS", raw
        # Header bytes beyond ASCII (no valid credential needed) once answered 500.
        parts = urlsplit(running.endpoints.event_url)
        reader, writer = await asyncio.open_connection(parts.hostname, parts.port)
        writer.write(b"GET /v1/runs/x HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer \xff\xfe"
                     b"\r\nConnection: close\r\n\r\n")
        answer = await asyncio.wait_for(reader.read(65536), 10)
        writer.close()
        assert answer.startswith(b"HTTP/1.1 401"), answer[:300]
        assert b'"TOKEN_MALFORMED"' in answer
        # A trusted signature over an exp no float can hold: a bad claim, not a 500.
        status, body, headers = await post(url, make_event(),
                                           headers=bearer(token(rsa_key, exp=10**400)))
        assert_problem(status, body, headers, 401, "TOKEN_INVALID_CLAIM")
    agencies = await database.fetch("SELECT agency_id, count(*) FROM flux.events GROUP BY 1 "
                                    "ORDER BY 1")
    assert [tuple(r) for r in agencies] == [("nasa", 1), ("noaa", 1)]
    bad = state_dir / "bad.json"
    bad.write_text('{"keys": [{"sha256": "abc", "agency": "noaa"}]}')
    with pytest.raises(ConfigError) as info:
        async with Agent(config.replace(api_keys_file=str(bad))):
            pass
    assert info.value.setting == "FLUX_AGENT_API_KEYS_FILE"
