"""The parts every benchmark scenario uses: a throwaway PostgreSQL, an agent process whose
CPU and memory are sampled, load generators in their own processes, and metric scrapes."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import platform
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import asyncpg
import psutil

from flux_agent.postgres.embedded import LocalPostgres, find_bin_dir, free_port
from flux_agent.postgres.migrations import bootstrap_database

ROOT = Path(__file__).resolve().parent.parent
LOGIN_ROLE = "flux_bench_sidecar"
LOGIN_PASSWORD = "bench-sidecar-pw"
DATABASE = "flux"


def machine() -> dict[str, Any]:
    model = ""
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    return {
        "cpus": os.cpu_count(),
        "cpu_model": model,
        "memory_gib": round(psutil.virtual_memory().total / 2**30, 1),
        "kernel": platform.release(),
        "python": platform.python_version(),
        "wrk": shutil.which("wrk") is not None,
    }


class Database:
    """A throwaway PostgreSQL (or an existing one), migrated, with the agent's login role."""

    def __init__(self, url: str | None = None) -> None:
        self.external = url
        self.root = Path(tempfile.mkdtemp(prefix="flux-bench-", dir="/tmp"))
        self.root.chmod(0o755)
        self.cluster: LocalPostgres | None = None
        self.admin_dsn = url or ""
        self.agent_dsn = ""
        self.version = ""

    async def start(self) -> None:
        if self.external is None:
            # Production-like: durability settings left at PostgreSQL's defaults.
            self.cluster = LocalPostgres(self.root / "pg", bin_dir=find_bin_dir("system"),
                                         port=free_port(),
                                         settings={"max_connections": "200",
                                                   "shared_buffers": "256MB",
                                                   # commit times of rows: visibility
                                                   "track_commit_timestamp": "on"})
            await asyncio.to_thread(self.cluster.start)
            server = self.cluster.dsn()
            self.admin_dsn = self.cluster.dsn(database=DATABASE)
            await bootstrap_database(server, self.admin_dsn, DATABASE, LOGIN_ROLE)
        else:
            from flux_agent.postgres.migrations import migrate_dsn

            await migrate_dsn(self.admin_dsn)
        conn = await asyncpg.connect(self.admin_dsn)
        try:
            await conn.execute(f"""
                DO $$ BEGIN CREATE ROLE {LOGIN_ROLE} LOGIN IN ROLE flux_agent;
                EXCEPTION WHEN duplicate_object THEN NULL; END $$""")
            await conn.execute(f"ALTER ROLE {LOGIN_ROLE} PASSWORD '{LOGIN_PASSWORD}'")
            self.version = await conn.fetchval("SHOW server_version")
        finally:
            await conn.close()
        m = re.match(r"postgresql://[^@]*@([^/]*)/([^?]*)(\?.*)?$", self.admin_dsn)
        assert m, self.admin_dsn
        self.agent_dsn = (f"postgresql://{LOGIN_ROLE}:{LOGIN_PASSWORD}@{m.group(1)}/"
                          f"{m.group(2)}{m.group(3) or ''}")

    async def reset(self) -> None:
        conn = await asyncpg.connect(self.admin_dsn)
        try:
            await conn.execute("TRUNCATE flux.events, flux.dead_letters, flux.audit_log")
            await conn.execute("CHECKPOINT")
        finally:
            await conn.close()

    async def count(self) -> int:
        conn = await asyncpg.connect(self.admin_dsn)
        try:
            return int(await conn.fetchval("SELECT count(*) FROM flux.events"))
        finally:
            await conn.close()

    def stop(self) -> None:
        if self.cluster is not None:
            self.cluster.stop("fast")

    def start_again(self) -> None:
        if self.cluster is not None:
            self.cluster.start()

    def destroy(self) -> None:
        if self.cluster is not None:
            self.cluster.destroy()
        shutil.rmtree(self.root, ignore_errors=True)


@dataclass
class Sampler:
    """Samples a process's RSS and CPU time from a thread (20 ms period)."""

    pid: int
    peak_rss: int = 0
    peak_anon: int = 0  # RssAnon: what the process itself allocated (no file-backed pages)
    samples: list[tuple[float, int]] = field(default_factory=list)
    _stop: threading.Event = field(default_factory=threading.Event)
    _thread: threading.Thread | None = None

    def start(self) -> None:
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        status = Path(f"/proc/{self.pid}/status")
        try:
            while not self._stop.wait(0.02):
                fields = dict(line.split(":", 1) for line in status.read_text().splitlines())
                rss = int(fields["VmRSS"].split()[0]) * 1024
                anon = int(fields["RssAnon"].split()[0]) * 1024
                self.peak_rss = max(self.peak_rss, rss)
                self.peak_anon = max(self.peak_anon, anon)
                self.samples.append((time.time(), rss))
        except (OSError, KeyError, ValueError):
            return  # the process is gone

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(2)


class PortTaken(RuntimeError):
    """The agent could not bind the port chosen for it."""


class AgentProc:
    """``flux-agent run`` as a separate process, as in production."""

    def __init__(self, db: Database, state: Path, *, command: str = "run", **env: str) -> None:
        self.db = db
        self.state = state
        self.command = command  # run (a sidecar) or aggregate
        self.port = free_port()
        self.admin_port = free_port()
        self.socket = state / "agent.sock"
        self.env = {k: v for k, v in os.environ.items() if not k.startswith("FLUX_AGENT_")}
        self.env.update({
            "FLUX_AGENT_DATABASE_URL": db.agent_dsn,
            "FLUX_AGENT_STATE_DIR": str(state),
            "FLUX_AGENT_AUTH": "none",
            "FLUX_AGENT_AGENCY": "nasa",
            "FLUX_AGENT_LISTEN": f"127.0.0.1:{self.port}",
            "FLUX_AGENT_ADMIN_LISTEN": f"127.0.0.1:{self.admin_port}",
            "FLUX_AGENT_LOG_LEVEL": "warning",
            "FLUX_AGENT_MIGRATE": "false",
        })
        self.env.update(env)
        self.proc: subprocess.Popen[bytes] | None = None
        self.sampler: Sampler | None = None
        self.ready_after = 0.0

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def admin(self) -> str:
        return f"http://127.0.0.1:{self.admin_port}"

    def start(self, timeout: float = 60) -> float:
        """Start and wait for readiness; returns seconds from spawn to ready.

        A port chosen free may be taken before the agent binds it (by another agent's
        outgoing connection, in a fleet): then new ports, and once more."""
        for attempt in range(3):
            try:
                return self._start(timeout)
            except PortTaken:
                if attempt == 2:
                    raise
                self.port, self.admin_port = free_port(), free_port()
                self.env["FLUX_AGENT_LISTEN"] = f"127.0.0.1:{self.port}"
                self.env["FLUX_AGENT_ADMIN_LISTEN"] = f"127.0.0.1:{self.admin_port}"
        raise AssertionError("unreachable")

    def _start(self, timeout: float) -> float:
        self.state.mkdir(parents=True, exist_ok=True)
        log = (self.state / "agent.log").open("ab")
        t0 = time.perf_counter()
        self.proc = subprocess.Popen([sys.executable, "-m", "flux_agent", self.command],
                                     env=self.env, stdout=log, stderr=subprocess.STDOUT)
        log.close()
        self.sampler = Sampler(self.proc.pid)
        self.sampler.start()
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                log_text = (self.state / "agent.log").read_text()[-2000:]
                if "address already in use" in log_text or "cannot listen on" in log_text:
                    (self.state / "agent.log").unlink()
                    raise PortTaken(log_text)
                raise RuntimeError(f"agent exited: {log_text}")
            with contextlib.suppress(OSError), urllib.request.urlopen(
                    self.admin + "/health/ready", timeout=1) as r:
                if r.status == 200:
                    self.ready_after = time.perf_counter() - t0
                    return self.ready_after
            time.sleep(0.005)
        raise RuntimeError("agent not ready in time")

    def cpu_seconds(self) -> float:
        assert self.proc is not None
        t = psutil.Process(self.proc.pid).cpu_times()
        return float(t.user + t.system)

    def metrics(self) -> dict[str, float]:
        return scrape(self.admin + "/metrics")

    def kill(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGKILL)
            self.proc.wait(10)
        if self.sampler is not None:
            self.sampler.stop()

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(60)
            except subprocess.TimeoutExpired:
                self.proc.kill()
        if self.sampler is not None:
            self.sampler.stop()


def scrape(url: str) -> dict[str, float]:
    """Prometheus text -> {metric name: value summed over label sets}."""
    with urllib.request.urlopen(url, timeout=5) as r:
        text = r.read().decode()
    out: dict[str, float] = {}
    for line in text.splitlines():
        if not line or line.startswith("#"):
            continue
        name_labels, _, value = line.rpartition(" ")
        name = name_labels.split("{", 1)[0]
        with contextlib.suppress(ValueError):
            out[name] = out.get(name, 0.0) + float(value)
    return out


def wait_flushed(agent: AgentProc, target: float, timeout: float = 300) -> float:
    """Block until the agent's flushed counter reaches ``target``; returns that wall time."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if agent.metrics().get("flux_events_flushed_total", 0.0) >= target:
            return time.time()
        time.sleep(0.05)
    raise RuntimeError(f"flushed counter never reached {target}")


def run_load(*args: str, timeout: float = 600) -> dict[str, Any]:
    """The Python load generator, in its own process."""
    out = subprocess.run([sys.executable, "-m", "bench.load", *args], capture_output=True,
                         text=True, timeout=timeout, cwd=ROOT, check=False)
    if out.returncode != 0:
        raise RuntimeError(f"load generator failed: {out.stderr[-2000:]}")
    result: dict[str, Any] = json.loads(out.stdout.strip().splitlines()[-1])
    return result


def start_load(*args: str) -> subprocess.Popen[str]:
    return subprocess.Popen([sys.executable, "-m", "bench.load", *args], cwd=ROOT,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def finish_load(proc: subprocess.Popen[str], timeout: float = 600) -> dict[str, Any]:
    stdout, stderr = proc.communicate(timeout=timeout)
    if proc.returncode != 0:
        raise RuntimeError(f"load generator failed: {stderr[-2000:]}")
    result: dict[str, Any] = json.loads(stdout.strip().splitlines()[-1])
    return result


def run_wrk(url: str, *, events: int, fmt: str, connections: int, duration: float,
            threads: int = 1, token: str = "", trace: bool = False) -> dict[str, Any]:
    """wrk (compiled, so the client is rarely the bottleneck) with bench/wrk/post.lua."""
    env = {**os.environ, "FLUX_BENCH_EVENTS": str(events), "FLUX_BENCH_FORMAT": fmt,
           "FLUX_BENCH_TOKEN": token, "FLUX_BENCH_TRACE": "1" if trace else "0"}
    t0 = time.time()
    out = subprocess.run(
        ["wrk", "-t", str(threads), "-c", str(connections), "-d",
         f"{max(1, round(duration))}s", "--latency",
         "-s", str(ROOT / "bench" / "wrk" / "post.lua"), url],
        capture_output=True, text=True, env=env, timeout=duration + 60, check=False)
    line = next((ln for ln in out.stderr.splitlines() if ln.startswith("WRKJSON ")), None)
    if line is None:
        raise RuntimeError(f"wrk failed: {out.stderr[-2000:]} {out.stdout[-2000:]}")
    raw = json.loads(line[len("WRKJSON "):])
    elapsed = raw["duration_us"] / 1e6
    ok = raw["requests"] - raw["non2xx"]
    return {
        "t_start": t0, "elapsed_s": elapsed, "requests": raw["requests"],
        "failures": raw["connect_errors"] + raw["read_errors"] + raw["timeouts"],
        "statuses": {"2xx": ok, "other": raw["non2xx"]}, "events_acked": ok * events,
        "requests_per_s": raw["requests"] / elapsed if elapsed else 0.0,
        "p50_ms": raw["p50_us"] / 1000, "p99_ms": raw["p99_us"] / 1000,
        "p999_ms": raw["p999_us"] / 1000,
    }


class BareServer:
    """Baseline (c) in its own process."""

    def __init__(self, state: Path) -> None:
        self.port = free_port()
        self.socket = state / "bare.sock"
        self.proc: subprocess.Popen[str] | None = None

    def __enter__(self) -> BareServer:
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "bench.bare", "--port", str(self.port), "--socket",
             str(self.socket)], cwd=ROOT, stdout=subprocess.PIPE, text=True)
        assert self.proc.stdout is not None
        assert self.proc.stdout.readline().strip() == "ready"
        return self

    def __exit__(self, *exc: object) -> None:
        if self.proc is not None:
            self.proc.kill()
            self.proc.wait(10)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}/v1/events"
