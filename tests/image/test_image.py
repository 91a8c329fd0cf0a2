"""The image, built and run for real with podman: no Docker daemon, no registry.

Deselected by default (marker ``image``: a cold run builds a base and the image, about
2-4 minutes); CI runs it after the unit suite with ``pytest -m image tests/image``. Without
podman, buildah, mmdebstrap or runc, or on a machine that cannot make namespaces, it is
skipped with the reason, and fails in CI (``FLUX_TEST_REQUIRE``). How the image is built and
run: ``harness.py``. The figures it measures (FIGURES) are printed at the end of the run
(conftest.py).
"""

from __future__ import annotations

import asyncio
import json
import os
import shutil
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import asyncpg
import pytest

from flux_agent.postgres.embedded import LocalPostgres, find_bin_dir

from ..support.paths import short_tempdir
from ..support.tools import require_tool, unavailable
from . import harness
from .harness import (
    ADMIN_URL,
    AGENT_UID,
    EVENT_URL,
    IMAGE,
    PG_SOCKET_DIR,
    SOCKET_PATH,
    STATE_DIR,
    Agent,
    Dirs,
)

# Most of them against a PostgreSQL of the module's own (the postgres fixture).
pytestmark = [pytest.mark.image, pytest.mark.db]

READY_WITHIN = 10.0  # seconds from `podman start` to /health/ready
STOP_TIMEOUT = 10  # docker stop's and podman stop's default
IDLE_RSS_MIB_MAX = 100
IMAGE_ADDED_MB_MAX = 150  # what the Dockerfile adds to the base
FIGURES: dict[str, Any] = {}


@dataclass
class Built:
    base: str
    workdir: Path


@pytest.fixture(scope="module")
def built() -> Iterator[Built]:
    for tool in ("podman", "buildah", "mmdebstrap", "runc", "nsenter"):
        require_tool(tool)
    reason = harness.can_run_containers()
    if reason:
        unavailable("podman", reason)
    workdir = short_tempdir("fa-img-")
    started = time.monotonic()
    try:
        base, base_seconds = harness.ensure_base(workdir)
        build_seconds = harness.build_image(base, workdir)
    except harness.HarnessError as exc:
        shutil.rmtree(workdir, ignore_errors=True)
        pytest.fail(str(exc), pytrace=False)
    FIGURES.update(base_seconds=round(base_seconds, 1), build_seconds=round(build_seconds, 1),
                   base_and_build_seconds=round(time.monotonic() - started, 1))
    yield Built(base, workdir)
    shutil.rmtree(workdir, ignore_errors=True)


@dataclass
class Postgres:
    cluster: LocalPostgres
    socket_dir: Path

    def admin_dsn(self, database: str = "flux") -> str:
        return self.cluster.dsn(database=database)

    def container_dsn(self, user: str, database: str = "flux") -> str:
        """The URL as the container sees it: the socket directory mounted at PG_SOCKET_DIR."""
        return f"postgresql://{user}@/{database}?host={PG_SOCKET_DIR}&port=5432"

    def fetchval(self, query: str, *args: Any) -> Any:
        async def go() -> Any:
            conn = await asyncpg.connect(self.admin_dsn())
            try:
                return await conn.fetchval(query, *args)
            finally:
                await conn.close()
        return asyncio.run(go())


@pytest.fixture(scope="module")
def postgres(built: Built) -> Iterator[Postgres]:
    """PostgreSQL on a Unix socket only (no TCP port anywhere), in a directory the agent's
    container mounts; migrated by the image's own `flux-agent migrate`."""
    root = built.workdir
    cluster = LocalPostgres(root / "pg", bin_dir=find_bin_dir(prefer="system"))
    shared = root / "pgsock"
    shared.mkdir()
    if cluster.user is not None:
        os.chown(shared, cluster.user.pw_uid, cluster.user.pw_gid)
    shared.chmod(0o755)
    cluster.settings = {"unix_socket_directories": f"{cluster.socket_dir},{shared}",
                        "fsync": "off", "full_page_writes": "off"}
    try:
        cluster.start()
    except Exception as exc:
        pytest.fail(f"cannot start PostgreSQL for the image test: {exc}", pytrace=False)
    pg = Postgres(cluster, shared)

    async def prepare() -> None:
        conn = await asyncpg.connect(pg.admin_dsn("postgres"))
        try:
            await conn.execute("CREATE DATABASE flux")
        finally:
            await conn.close()
    asyncio.run(prepare())
    migrate = harness.podman(
        "run", "--rm", "--network=none", *harness.hardening(),
        f"--volume={shared}:{PG_SOCKET_DIR}",
        f"--env=FLUX_AGENT_DATABASE_URL={pg.container_dsn('postgres')}", IMAGE, "migrate",
        check=False)
    assert migrate.returncode == 0, migrate.stdout + migrate.stderr

    async def login_role() -> None:
        conn = await asyncpg.connect(pg.admin_dsn())
        try:
            await conn.execute("CREATE ROLE sidecar LOGIN IN ROLE flux_agent")
        finally:
            await conn.close()
    asyncio.run(login_role())
    yield pg
    cluster.destroy()


def agent_env(pg: Postgres) -> dict[str, str]:
    """What the injector and the chart's ConfigMap give the sidecar (the drain timeout is
    left to the image's default)."""
    return {"FLUX_AGENT_DATABASE_URL": pg.container_dsn("sidecar"),
            "FLUX_AGENT_STATE_DIR": STATE_DIR, "FLUX_AGENT_SOCKET": SOCKET_PATH,
            "FLUX_AGENT_LISTEN": "127.0.0.1:8787", "FLUX_AGENT_ADMIN_LISTEN": "0.0.0.0:9464",
            "FLUX_AGENT_AUTH": "none", "FLUX_AGENT_AGENCY": "nasa",
            "FLUX_AGENT_MIGRATE": "false", "FLUX_AGENT_LOG_LEVEL": "info"}


def new_agent(built: Built, pg: Postgres, dirs: Dirs | None = None) -> Agent:
    dirs = dirs or harness.make_dirs(built.workdir, pg.socket_dir)
    agent = Agent(f"flux-image-test-{uuid.uuid4().hex[:8]}", dirs, agent_env(pg))
    agent.create()
    return agent


@pytest.fixture(scope="module")
def agent(built: Built, postgres: Postgres) -> Iterator[Agent]:
    running = new_agent(built, postgres)
    try:
        FIGURES["start_to_ready_seconds"] = round(running.start(), 2)
        yield running
    finally:
        running.remove()


def event(run_id: str) -> dict[str, Any]:
    return {"event_id": str(uuid.uuid4()), "run_id": run_id, "kind": "run.started",
            "occurred_at": "2026-11-23T07:00:00Z",
            "payload": {"content_type": "images", "use_case": "research"}}


def stored(pg: Postgres, event_id: str, within: float = 15) -> bool:
    """Whether the event is in flux.events, looking once and then until ``within`` s."""
    deadline = time.monotonic() + within
    while True:
        if pg.fetchval("SELECT count(*) FROM flux.events WHERE event_id = $1",
                       uuid.UUID(event_id)):
            return True
        if time.monotonic() >= deadline:
            return False
        time.sleep(0.2)


# --------------------------------------------------------------------------------- tests


def test_image_metadata_and_size(built: Built):
    config = harness.image_config()
    cfg = config["Config"]
    assert cfg["User"] == f"{AGENT_UID}:{AGENT_UID}"
    assert cfg["Entrypoint"] == ["flux-agent"] and cfg["Cmd"] == ["run"]
    assert cfg["StopSignal"] == "SIGTERM"
    assert "/health/live" in " ".join(config["Healthcheck"]["Test"])  # kept: --format docker
    env = dict(item.split("=", 1) for item in cfg["Env"])
    drain = float(env["FLUX_AGENT_DRAIN_TIMEOUT"].removesuffix("s"))
    assert drain + 1 < STOP_TIMEOUT  # a clean stop fits inside `docker stop`'s 10 s
    assert config["Labels"]["org.opencontainers.image.revision"] != ""
    size = int(config["Size"])
    base = int(harness.image_config(built.base)["Size"])
    FIGURES.update(image_mb=round(size / 1e6, 1), base_mb=round(base / 1e6, 1),
                   added_mb=round((size - base) / 1e6, 1))
    assert size - base < IMAGE_ADDED_MB_MAX * 1e6


def test_ready_within_bound(agent: Agent):
    assert agent.ready_seconds < READY_WITHIN
    health = harness.podman("healthcheck", "run", agent.name, check=False)
    assert health.returncode == 0, health.stdout + health.stderr  # the image's HEALTHCHECK


def test_posted_event_is_stored(agent: Agent, postgres: Postgres):
    sent = event("image-tcp")
    # An app container of the "pod": the agent's network namespace, its own uid.
    answer = harness.app_container(agent, "post", EVENT_URL + "/v1/events", json.dumps(sent))
    assert answer.get("status") == 202, answer
    assert stored(postgres, sent["event_id"])


def test_socket_reachable_from_its_group_only(agent: Agent, postgres: Postgres):
    info = os.stat(agent.dirs.socket / "agent.sock")
    assert info.st_gid == AGENT_UID and info.st_mode & 0o777 == 0o660
    sent = event("image-socket")
    allowed = harness.app_container(agent, "post", f"unix:{SOCKET_PATH}", json.dumps(sent),
                                    user=f"20001:{AGENT_UID}")
    assert allowed.get("status") == 202, allowed
    assert stored(postgres, sent["event_id"])
    refused = harness.app_container(agent, "post", f"unix:{SOCKET_PATH}",
                                    json.dumps(event("image-socket")), user="20001:20001")
    assert refused.get("error") == "EACCES", refused


def test_writes_outside_the_volumes_are_refused(agent: Agent):
    code = """
import errno, json, os, sysconfig
out = {}
for d in ("/", "/tmp", "/etc", "/var/tmp", "/home", sysconfig.get_path("purelib"),
          "/var/lib/flux-agent"):
    try:
        with open(os.path.join(d, ".probe"), "w") as f:
            f.write("x")
        os.unlink(os.path.join(d, ".probe"))
        out[d] = "written"
    except OSError as e:
        out[d] = errno.errorcode[e.errno]
status = dict(l.split(":\\t", 1) for l in open("/proc/self/status").read().splitlines()
              if ":\\t" in l)
out["CapEff"] = status["CapEff"].strip()
out["NoNewPrivs"] = status["NoNewPrivs"].strip()
for f in ("/sys/fs/cgroup/memory.max", "/sys/fs/cgroup/memory/memory.limit_in_bytes"):
    if os.path.exists(f):
        out["memory_limit"] = open(f).read().strip()
out["uid"] = os.getuid()
print(json.dumps(out))
"""
    result = agent.exec_python(code)
    assert result.returncode == 0, result.stderr
    out = json.loads(result.stdout)
    state = out.pop(STATE_DIR)
    assert state == "written"
    assert out.pop("CapEff") == "0000000000000000"
    assert out.pop("NoNewPrivs") == "1"
    assert out.pop("memory_limit") == str(256 * 1024 * 1024)
    assert out.pop("uid") == AGENT_UID
    assert set(out.values()) == {"EROFS"}, out


BYTECODE_CHECK = """
import importlib.util, json, os, subprocess, sys, time
import flux_agent.cli, flux_agent.agent, urllib.request  # the agent's and the HEALTHCHECK's
missing = sorted(m.__name__ for m in list(sys.modules.values())
                 if getattr(m, "__file__", None) and m.__file__.endswith(".py")
                 and not os.path.exists(importlib.util.cache_from_source(m.__file__)))
health = json.loads(sys.argv[1])
runs = []
for _ in range(5):
    t = time.perf_counter()
    subprocess.run(health, check=False, stdout=subprocess.DEVNULL)
    runs.append(time.perf_counter() - t)
print(json.dumps({"missing": missing, "healthcheck_seconds": min(runs)}))
"""


def test_all_bytecode_is_compiled_at_build_time(agent: Agent):
    """The base ships the standard library without .pyc (as the official images do): the
    Dockerfile compiles it, so a read-only root never compiles at start or per healthcheck."""
    health = harness.image_config()["Healthcheck"]["Test"][1:]  # after "CMD"
    result = harness.podman("exec", agent.name, "python", "-c", BYTECODE_CHECK,
                            json.dumps(health), check=False)
    assert result.returncode == 0, result.stderr
    out = json.loads(result.stdout)
    FIGURES["healthcheck_seconds"] = round(out["healthcheck_seconds"], 3)
    assert out["missing"] == [], out["missing"]


def test_idle_rss(agent: Agent):
    time.sleep(3)
    rss_mib = harness.rss_kib(agent.pid) / 1024
    FIGURES["idle_rss_mib"] = round(rss_mib, 1)
    cgroup = harness.cgroup_memory_bytes(agent.pid)
    if cgroup is not None:
        FIGURES["idle_cgroup_memory_mib"] = round(cgroup / 2**20, 1)
    assert rss_mib < IDLE_RSS_MIB_MAX


def post_then_stop(agent: Agent, run_id: str, exit_code: int = 0
                   ) -> tuple[dict[str, Any], float]:
    """Post an event over TCP, then `podman stop` with the default timeout: it must exit
    with ``exit_code`` (not 137, SIGKILL) before that timeout. The event and the seconds the
    stop took."""
    sent = event(run_id)
    answer = harness.in_netns(agent.pid, "post", EVENT_URL + "/v1/events", json.dumps(sent))
    assert answer.get("status") == 202, answer
    code, seconds = agent.stop(STOP_TIMEOUT)
    assert code == exit_code, f"exit {code} after {seconds:.1f} s\n{agent.logs()}"
    assert seconds < STOP_TIMEOUT
    return sent, seconds


def test_sigterm_with_the_database_up_exits_0_in_time(built: Built, postgres: Postgres):
    agent = new_agent(built, postgres)
    try:
        agent.start()
        sent, seconds = post_then_stop(agent, "image-stop-up")
        FIGURES["stop_seconds_database_up"] = round(seconds, 2)
        assert stored(postgres, sent["event_id"], within=0)  # flushed by the drain
    finally:
        agent.remove()


@pytest.mark.fault
def test_sigterm_with_the_database_down_exits_75_in_time(built: Built, postgres: Postgres):
    """The drain cannot flush and no aggregator takes a handoff, so it runs to the image's
    drain timeout, which is shorter than the stop timeout: exit 75 (events left on the
    spool, said in the log), not SIGKILL (137); the event reaches PostgreSQL after the next
    start on the same volume."""
    agent = new_agent(built, postgres)
    again: Agent | None = None
    try:
        agent.start()
        postgres.cluster.stop("fast")
        sent, seconds = post_then_stop(agent, "image-stop-down", exit_code=75)
        assert "events acknowledged but not delivered" in agent.logs()
        FIGURES["stop_seconds_database_down"] = round(seconds, 2)
        postgres.cluster.start()
        assert not stored(postgres, sent["event_id"], within=0)
        again = new_agent(built, postgres, agent.dirs)  # same state volume: the spool
        again.start()
        assert stored(postgres, sent["event_id"]), again.logs()
    finally:
        postgres.cluster.start()
        agent.remove()
        if again is not None:
            again.remove()


def test_admin_listener_answers_inside_the_namespace_only(agent: Agent):
    """The admin port is the container's own: from its namespace it answers; nothing was
    published on the host (``--network none``)."""
    answer = harness.in_netns(agent.pid, "get", ADMIN_URL + "/health/live")
    assert answer.get("status") == 200, answer
    ports = harness.podman("port", agent.name, check=False).stdout.strip()
    assert ports == ""
