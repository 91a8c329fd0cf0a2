"""No blocking call on the event loop, in the style of aiohttp's own suite: blockbuster
fails any blocking file, socket or sleep call that flux_agent's code makes while the loop
runs, over the paths that used to make them (start with a stale socket file, JWT key files,
the schema files read until the schema is ready, snapshots, checkpoints, reads, stop)."""

from __future__ import annotations

import socket
from collections.abc import Iterator
from pathlib import Path

import pytest
from blockbuster import BlockBuster, blockbuster_ctx

from flux_agent import Agent
from flux_agent.testing import make_events

from .support.agents import agent_config
from .support.http import get, post, put
from .support.postgres import Database


@pytest.fixture
def no_blocking() -> Iterator[BlockBuster]:
    with blockbuster_ctx(scanned_modules=["flux_agent"]) as bb:
        # prometheus_client's process collector reads /proc (memory, not a disk) when it is
        # built and at each scrape: allowed.
        for name in ("io.BufferedReader.read", "io.TextIOWrapper.read", "os.listdir",
                     "os.stat", "os.scandir"):
            if name in bb.functions:
                bb.functions[name].can_block_in("prometheus_client/process_collector.py",
                                                {"__init__", "collect", "_boot_time",
                                                 "_parse_stat"})
        # asyncpg looks for TLS client files (~/.postgresql/*) when it connects, on the loop:
        # its code, once per connection (the pool keeps connections), allowed.
        for function in bb.functions.values():
            function.can_block_in("asyncpg/connect_utils.py",
                                  {"_parse_connect_dsn_and_args", "_dot_postgresql_path"})
        yield bb


async def test_start_serve_and_stop_make_no_blocking_call(database: Database, state_dir: Path,
                                                          no_blocking: BlockBuster):
    stale = state_dir / "agent.sock"
    with socket.socket(socket.AF_UNIX) as s:
        s.bind(str(stale))  # a socket file nobody listens on: a dead agent's leftover
    async with Agent(agent_config(database, state_dir)) as agent:
        url = agent.endpoints.event_url
        status, body, _ = await post(url + "/v1/events", make_events(5),
                                     headers={"Prefer": "wait=committed"})
        assert status == 200, body
        status, body, _ = await put(url + "/v1/runs/nb-1/checkpoint",
                                    {"step": "s", "state": {"a": 1}})
        assert status == 201, body
        status, body, _ = await get(url + "/v1/runs/nb-1/checkpoint")
        assert status == 200, body
        status, body, _ = await get(url + "/v1/runs/run-1")
        assert status in (200, 404), body
        await agent.snapshots.save()
        status, body, _ = await get(agent.endpoints.admin_url + "/health/deep")
        assert status == 200, body


async def test_jwt_keys_are_read_and_reloaded_off_the_loop(database: Database, state_dir: Path,
                                                           no_blocking: BlockBuster):
    import time

    import jwt

    from .support.tokens import ISSUER, bearer, jwks, private_key

    key = private_key()
    jwks_file = state_dir / "jwks.json"
    jwks_file.write_text(jwks(("k1", key)))
    config = agent_config(database, state_dir, auth="jwt", agency="",
                          jwt_algorithms=("RS256",), jwt_issuers=(ISSUER,),
                          jwt_jwks_file=str(jwks_file))
    now = int(time.time())
    tok = jwt.encode({"iss": ISSUER, "sub": "s", "agency": "nasa", "role": "operator",
                      "iat": now, "exp": now + 600}, key, algorithm="RS256",
                     headers={"kid": "k1"})
    async with Agent(config) as agent:
        url = agent.endpoints.event_url + "/v1/events"
        status, body, _ = await post(url, make_events(1), headers=bearer(tok))
        assert status == 202, body
