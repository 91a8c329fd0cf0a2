"""Agents for tests: the configuration and environment of an agent on a test database, and
a real ``flux-agent run`` process for signal, crash and descriptor tests."""

from __future__ import annotations

import contextlib
import functools
import os
import resource
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from flux_agent import AgentConfig
from flux_agent.cli.common import EXIT_CONFIG
from flux_agent.postgres.embedded import free_port

from .capture import CAPTURED
from .markers import require_marker
from .postgres import VIA_PGBOUNCER, Database


def agent_config(database: Database, state_dir: Path, **overrides: Any) -> AgentConfig:
    from flux_agent.core.settings import Secret

    values: dict[str, Any] = {
        "database_url": Secret(database.agent_dsn),
        "database_pgbouncer": VIA_PGBOUNCER,
        "listen": "127.0.0.1:0",
        "admin_listen": "127.0.0.1:0",
        "state_dir": str(state_dir),
        "auth": "none",
        "agency": "nasa",
        "migrate": False,
        "batch_max_age": 0.002,
        "drain_timeout": 10.0,
    }
    values.update(overrides)
    return AgentConfig(**values)


def agent_env(database: Database, state_dir: Path, **extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("FLUX_AGENT_")}
    env.update({
        "FLUX_AGENT_DATABASE_URL": database.agent_dsn,
        "FLUX_AGENT_DATABASE_PGBOUNCER": "true" if VIA_PGBOUNCER else "false",
        "FLUX_AGENT_STATE_DIR": str(state_dir),
        "FLUX_AGENT_AUTH": "none",
        "FLUX_AGENT_AGENCY": "nasa",
        "FLUX_AGENT_MIGRATE": "false",
        "FLUX_AGENT_LOG_LEVEL": "info",
    })
    env.update(extra)
    return env


PORT_TAKEN = "another process listens there"  # the agent's words for EADDRINUSE


class AgentProcess:
    """A real `flux-agent run` process, for signal and crash tests."""

    def __init__(self, env: dict[str, str], log_path: Path) -> None:
        self.env = env
        self.log_path = log_path
        self.proc: subprocess.Popen[bytes] | None = None
        self.port = 0
        self.admin_port = 0

    def start(self, timeout: float = 45.0, nofile: int | None = None) -> None:
        """``nofile``: run under that descriptor limit (soft and hard)."""
        if not self.env.get("FLUX_AGENT_DATABASE_URL"):
            require_marker("db", "runs an agent on its embedded PostgreSQL")
        for _ in range(3):
            if self._start(timeout, nofile):
                return
        raise RuntimeError(f"the ports chosen for the agent were taken, three times: "
                           f"{self.log_path.read_text(errors='replace')[-3000:]}")

    def _start(self, timeout: float, nofile: int | None) -> bool:
        """One try; False when a port chosen for it was taken meanwhile (by another test
        process's connection or agent: free_port() only finds a port free *now*), and
        then its lines are taken back out of the log."""
        self.port = free_port()
        self.admin_port = free_port()
        env = {**self.env, "FLUX_AGENT_LISTEN": f"127.0.0.1:{self.port}",
               "FLUX_AGENT_ADMIN_LISTEN": f"127.0.0.1:{self.admin_port}"}
        logged = self.log_path.stat().st_size if self.log_path.exists() else 0
        log = self.log_path.open("ab")
        limit = None if nofile is None else functools.partial(
            resource.setrlimit, resource.RLIMIT_NOFILE, (nofile, nofile))
        self.proc = subprocess.Popen([sys.executable, "-m", "flux_agent", "run"], env=env,
                                     stdout=log, stderr=subprocess.STDOUT, preexec_fn=limit)
        log.close()
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                said = self.log_path.read_text(errors="replace")
                if self.proc.returncode == EXIT_CONFIG and PORT_TAKEN in said[logged:]:
                    with self.log_path.open("r+b") as out:
                        out.truncate(logged)
                    return False
                raise RuntimeError(f"agent exited with {self.proc.returncode}: {said[-3000:]}")
            with contextlib.suppress(OSError), socket.create_connection(
                    ("127.0.0.1", self.admin_port), timeout=0.2):
                return True
            time.sleep(0.05)
        raise RuntimeError("agent did not start listening in time")

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def admin_url(self) -> str:
        return f"http://127.0.0.1:{self.admin_port}"

    def kill(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(10)
        self._capture()

    def terminate(self, timeout: float = 30) -> int:
        assert self.proc is not None
        self.proc.terminate()
        code = self.proc.wait(timeout)
        self._capture()
        return code

    def _capture(self) -> None:
        with contextlib.suppress(OSError):
            CAPTURED.append(self.log_path.read_text(errors="replace"))
