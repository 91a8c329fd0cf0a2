"""A real PgBouncer in transaction pooling mode, for the tests that drive one and for the
whole suite run through one (FLUX_TEST_VIA_PGBOUNCER=1: every agent then reaches PostgreSQL
through it, as a fleet's sidecars do)."""

from __future__ import annotations

import os
import pwd
import shutil
import signal
import socket
import subprocess
import time
from pathlib import Path

from flux_agent.postgres.embedded import free_port

from .tools import require_tool


class PgBouncer:
    def __init__(self, root: Path, *, host: str, port: int, users: dict[str, str],
                 databases: str = "*", pool_size: int = 4) -> None:
        self.root = root
        self.target = (host, port)
        self.users = users
        self.databases = databases
        self.pool_size = pool_size
        self.port = free_port()
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        binary = require_tool("pgbouncer")
        root = self.root
        root.mkdir(parents=True, exist_ok=True)
        (root / "userlist.txt").write_text(
            "".join(f'"{u}" "{p}"\n' for u, p in self.users.items()))
        host, port = self.target
        (root / "pgbouncer.ini").write_text(f"""
[databases]
{self.databases} = host={host} port={port}{'' if self.databases == '*' else
                                            f' dbname={self.databases}'}

[pgbouncer]
listen_addr = 127.0.0.1
listen_port = {self.port}
unix_socket_dir =
auth_type = plain
auth_file = {root}/userlist.txt
pool_mode = transaction
default_pool_size = {self.pool_size}
max_client_conn = 500
server_reset_query =
ignore_startup_parameters = extra_float_digits
logfile = {root}/pgbouncer.log
pidfile = {root}/pgbouncer.pid
""")
        kwargs = {}
        if os.geteuid() == 0:  # PgBouncer refuses to run as root
            user = _user("postgres") or pwd.getpwnam("nobody")
            for p in (root, *root.iterdir()):
                os.chown(p, user.pw_uid, user.pw_gid)
            kwargs = {"user": user.pw_uid, "group": user.pw_gid}
        self.proc = subprocess.Popen([str(binary), str(root / "pgbouncer.ini")], **kwargs)
        deadline = time.monotonic() + 15
        while time.monotonic() < deadline:
            try:
                socket.create_connection(("127.0.0.1", self.port), timeout=0.5).close()
                return
            except OSError:
                time.sleep(0.05)
        raise RuntimeError("PgBouncer did not listen: " + self.log())

    def log(self) -> str:
        try:
            return (self.root / "pgbouncer.log").read_text()[-3000:]
        except OSError:
            return ""

    def url(self, user: str, password: str, database: str) -> str:
        return f"postgresql://{user}:{password}@127.0.0.1:{self.port}/{database}"

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            self.proc.wait(10)
        shutil.rmtree(self.root, ignore_errors=True)


def _user(name: str) -> pwd.struct_passwd | None:
    try:
        return pwd.getpwnam(name)
    except KeyError:
        return None
