"""Build and run the image with podman, without a Docker daemon or a registry.

* The base: a stand-in for ``python:3.11-slim-bookworm`` made by ``mmdebstrap`` from the
  host's apt sources (Debian's python3 with ``python`` on PATH, pip allowed to install, the
  host's CA bundle), with the standard library's ``.pyc`` files removed as in the official
  images, then ``podman import``-ed. Tagged by a hash of everything it is made from, so it
  is made once per machine (about 40 s) and reused.
* The image: the project's Dockerfile, ``podman build --format docker`` (the format that
  keeps HEALTHCHECK) with ``--build-arg PYTHON_IMAGE=<the base>``, from scratch each time
  (about 20 s; see build_image for why no layer cache). The build's pip reaches
  the package index the way the host's does: the host's effective pip configuration (index,
  mirrors, CA, timeouts; not its constraints) goes in as the ``pip.conf`` build secret, and
  local paths it names (``file://`` indexes, find-links, the CA file) are bind-mounted
  read-only at the same place. The build's RUN steps use the host's network (``--network
  host``: they only connect out, to the index).
* The containers run as the injected pod runs the agent: read-only root (and no tmpfs on
  /tmp, as Kubernetes' readOnlyRootFilesystem), uid 10001, every capability dropped,
  no-new-privileges, the injector's default memory limit, the state and socket dirs as
  volumes, and a network namespace of their own (``--network none``: loopback only, never a
  host port). PostgreSQL runs on the host on a Unix socket only, in a directory mounted into
  the container. An app container shares the agent's network namespace and socket volume
  (``--network container:...``), as containers of one pod do.
"""

from __future__ import annotations

import ast
import configparser
import contextlib
import hashlib
import json
import os
import re
import resource
import shlex
import subprocess
import sys
import time
import uuid
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

# The pod's side of the contract, as the injector writes it: paths, uid, ports.
from flux_agent.kube.config import (  # noqa: F401  (re-exported for the tests)
    ADMIN_PORT,
    AGENT_UID,
    EVENT_URL,
    SOCKET_DIR,
    SOCKET_PATH,
    STATE_DIR,
)

ROOT = Path(__file__).resolve().parents[2]
PROBE = Path(__file__).resolve().parent / "probe.py"
IMAGE = "localhost/flux-agent:image-test"
BASE_REPO = "localhost/flux-agent-test-base"
SUITE = "bookworm"
BASE_PACKAGES = ("usr-is-merged", "python3", "python3-pip", "python-is-python3",
                 "ca-certificates")
CA_BUNDLE = "/etc/ssl/certs/ca-certificates.crt"
BASE_HOOKS = (
    # Debian marks its Python externally managed; the official images do not.
    'rm -f "$1"/usr/lib/python3*/EXTERNALLY-MANAGED',
    # The official images ship the standard library without bytecode: so does the stand-in.
    'find "$1"/usr/lib/python3* -depth -type d -name __pycache__ -exec rm -rf {} +',
    # The host's CA bundle, so pip in the build trusts what the host's pip trusts.
    f"upload {CA_BUNDLE} {CA_BUNDLE}",
)
DPKG_OPTIONS = ("path-exclude=/usr/share/doc/*", "path-exclude=/usr/share/man/*",
                "path-exclude=/usr/share/info/*", "path-exclude=/usr/share/locale/*",
                "path-include=/usr/share/locale/locale.alias")
PG_SOCKET_DIR = "/var/run/postgresql"
ADMIN_URL = f"http://127.0.0.1:{ADMIN_PORT}"
MEMORY_LIMIT = "256m"  # the injector's default limit (InjectorConfig.memory_limit, 256Mi)
# Keys of the host's pip configuration that say how to reach an index.
PIP_KEYS = ("index-url", "extra-index-url", "find-links", "trusted-host", "cert",
            "client-cert", "proxy", "timeout", "default-timeout", "retries", "no-index")


class HarnessError(RuntimeError):
    pass


def run(args: Sequence[str], *, timeout: float = 120, check: bool = True,
        input_text: str | None = None) -> subprocess.CompletedProcess[str]:
    result = subprocess.run(list(args), capture_output=True, text=True, timeout=timeout,
                            input=input_text, check=False)
    if check and result.returncode != 0:
        raise HarnessError(f"{shlex.join(args)} exited {result.returncode}:\n"
                           f"{result.stdout[-3000:]}\n{result.stderr[-3000:]}")
    return result


def podman(*args: str, timeout: float = 120, check: bool = True
           ) -> subprocess.CompletedProcess[str]:
    return run(["podman", *args], timeout=timeout, check=check)


def ulimit_flags() -> list[str]:
    """Limits the sandbox allows: podman's defaults (nofile 1048576, a high nproc) are refused
    where the machine's hard limits are lower."""
    nofile = resource.getrlimit(resource.RLIMIT_NOFILE)[1]
    nofile = 1048576 if nofile == resource.RLIM_INFINITY else min(nofile, 1048576)
    return [f"--ulimit=nofile={nofile}:{nofile}", "--ulimit=nproc=4096:4096"]


# ------------------------------------------------------------------------------ the base


def host_apt_sources() -> list[Path]:
    found = [Path("/etc/apt/sources.list")]
    directory = Path("/etc/apt/sources.list.d")
    if directory.is_dir():
        found += sorted(p for p in directory.iterdir() if p.suffix in (".list", ".sources"))
    return [p for p in found if p.is_file() and any(
        line.strip() and not line.lstrip().startswith("#")
        for line in p.read_text().splitlines())]


def host_apt_options() -> list[str]:
    """The host's apt settings that decide how the archive is reached."""
    out = run(["apt-config", "dump"], check=False).stdout
    keep = re.compile(r"^(Acquire::(https?::Proxy|Check-Valid-Until|Retries|ftp::Proxy)"
                      r"(::[^ ]+)?) ")
    return [line.rstrip(";") for line in out.splitlines() if keep.match(line)]


def base_tag() -> str:
    digest = hashlib.sha256()
    for part in (SUITE, *BASE_PACKAGES, *BASE_HOOKS, *DPKG_OPTIONS, *host_apt_options()):
        digest.update(part.encode() + b"\0")
    for path in (*host_apt_sources(), Path(CA_BUNDLE)):
        digest.update(path.read_bytes())
    return f"{BASE_REPO}:{digest.hexdigest()[:16]}"


def ensure_base(workdir: Path) -> tuple[str, float]:
    """The stand-in base image and the seconds it took (0 when it was already there)."""
    tag = base_tag()
    if podman("image", "exists", tag, check=False).returncode == 0:
        return tag, 0.0
    sources = host_apt_sources()
    if not sources:
        raise HarnessError("the host has no apt sources for mmdebstrap")
    start = time.monotonic()
    tarball = workdir / "base.tar"
    args = ["mmdebstrap", "--variant=minbase", f"--include={','.join(BASE_PACKAGES)}",
            "--hook-dir=/usr/share/mmdebstrap/hooks/merged-usr"]
    args += [f"--dpkgopt={o}" for o in DPKG_OPTIONS]
    args += [f"--aptopt={o}" for o in host_apt_options()]
    args += [f"--customize-hook={h}" for h in BASE_HOOKS]
    args += [SUITE, str(tarball), *map(str, sources)]
    run(args, timeout=900)
    podman("import", "--change", "ENV LANG=C.UTF-8", "--change", 'CMD ["python3"]',
           str(tarball), tag, timeout=300)
    tarball.unlink()
    listed = podman("images", "--format", "{{.Repository}}:{{.Tag}}", BASE_REPO, check=False)
    for old in set(listed.stdout.split()) - {tag}:
        podman("rmi", old, check=False)  # a base made from other sources: not needed again
    return tag, time.monotonic() - start


# ----------------------------------------------------------------------------- the image


def host_pip_config() -> dict[str, str]:
    """The host's effective pip settings (files and PIP_* variables) for reaching an index."""
    out = run([sys.executable, "-m", "pip", "config", "list"], check=False).stdout
    settings: dict[str, str] = {}
    for line in out.splitlines():
        scope_key, _, value = line.partition("=")
        scope, _, key = scope_key.rpartition(".")
        if scope not in ("global", "wheel", ":env:") or key not in PIP_KEYS:
            continue
        with contextlib.suppress(ValueError, SyntaxError):
            value = str(ast.literal_eval(value))  # pip prints Python string literals
        settings[key] = value  # later lines (environment) win, as in pip
    return settings


def local_paths(settings: dict[str, str]) -> list[Path]:
    paths: set[Path] = set()
    for key in ("index-url", "extra-index-url", "find-links", "cert", "client-cert"):
        for item in settings.get(key, "").split():
            path = Path(item[len("file://"):]) if item.startswith("file://") else Path(item)
            if path.is_absolute() and path.exists():
                paths.add(path.parent if path.name == "simple" and key.endswith("url")
                          else path)
    return sorted(paths)


def build_image(base: str, workdir: Path) -> float:
    """``podman build`` the project's Dockerfile on ``base``; the seconds it took."""
    settings = host_pip_config()
    conf = configparser.ConfigParser(interpolation=None)
    conf["global"] = settings
    pip_conf = workdir / "pip.conf"
    with pip_conf.open("w") as handle:
        conf.write(handle)
    revision = run(["git", "-C", str(ROOT), "rev-parse", "HEAD"], check=False).stdout.strip()
    previous = podman("image", "inspect", "--format", "{{.Id}}", IMAGE, check=False)
    # No layer cache: buildah 1.28 (Debian 12) cannot mount a cached stage (RUN
    # --mount=from=build fails with "couldn't find ... to bind mount" when the build stage is
    # cached and the final stage is not), and a full build is about 20 s.
    args = ["build", "--format", "docker", "--no-cache", "--layers=false", "--force-rm",
            "--pull=never", "--network", "host",
            *ulimit_flags(), "--build-arg", f"PYTHON_IMAGE={base}",
            "--build-arg", f"REVISION={revision or 'unknown'}",
            "--secret", f"id=pip.conf,src={pip_conf}"]
    for path in local_paths(settings):
        args += ["--volume", f"{path}:{path}:ro"]
    args += ["--tag", IMAGE, "--file", str(ROOT / "Dockerfile"), str(ROOT)]
    start = time.monotonic()
    podman(*args, timeout=1200)
    seconds = time.monotonic() - start
    now = podman("image", "inspect", "--format", "{{.Id}}", IMAGE).stdout.strip()
    old = previous.stdout.strip()
    if previous.returncode == 0 and old and old != now:
        podman("rmi", old, check=False)  # the last run's image, if nothing uses it
    return seconds


def image_config(image: str = IMAGE) -> dict[str, Any]:
    data: list[dict[str, Any]] = json.loads(podman("image", "inspect", image).stdout)
    return data[0]


# ------------------------------------------------------------------------ the containers


def hardening() -> list[str]:
    """The injected container's securityContext and resources, as podman flags."""
    return ["--read-only", "--read-only-tmpfs=false", f"--user={AGENT_UID}:{AGENT_UID}",
            "--cap-drop=ALL", "--security-opt=no-new-privileges",
            f"--memory={MEMORY_LIMIT}", *ulimit_flags()]


@dataclass
class Dirs:
    state: Path
    socket: Path
    pg_socket: Path

    def mounts(self) -> list[str]:
        return [f"--volume={self.state}:{STATE_DIR}", f"--volume={self.socket}:{SOCKET_DIR}",
                f"--volume={self.pg_socket}:{PG_SOCKET_DIR}"]


def make_dirs(root: Path, pg_socket: Path) -> Dirs:
    state = root / f"state-{uuid.uuid4().hex[:6]}"
    state.mkdir()
    os.chown(state, AGENT_UID, AGENT_UID)
    state.chmod(0o750)
    socket_dir = root / f"sock-{uuid.uuid4().hex[:6]}"
    socket_dir.mkdir()
    socket_dir.chmod(0o777)  # an emptyDir: the socket's own mode and group are the gate
    return Dirs(state, socket_dir, pg_socket)


@dataclass
class Agent:
    name: str
    dirs: Dirs
    env: dict[str, str]
    started: float = 0.0
    ready_seconds: float = 0.0
    extra: list[str] = field(default_factory=list)

    @property
    def pid(self) -> int:
        return int(podman("inspect", "--format", "{{.State.Pid}}", self.name).stdout)

    def create(self) -> None:
        args = ["create", f"--name={self.name}", "--network=none", *hardening(),
                *self.dirs.mounts(), *self.extra]
        for key, value in self.env.items():
            args.append(f"--env={key}={value}")
        podman(*args, IMAGE)

    def start(self, ready_timeout: float = 30) -> float:
        """Start, wait for /health/ready; returns podman-start-to-ready seconds."""
        self.started = time.monotonic()
        podman("start", self.name)
        result = in_netns(self.pid, "ready", ADMIN_URL + "/health/ready", str(ready_timeout))
        if "seconds" not in result:
            raise HarnessError(f"not ready within {ready_timeout} s: {result}\n{self.logs()}")
        self.ready_seconds = time.monotonic() - self.started
        return self.ready_seconds

    def stop(self, timeout: int = 10) -> tuple[int, float]:
        """``podman stop -t timeout``: the exit code and the seconds it took."""
        start = time.monotonic()
        podman("stop", "-t", str(timeout), self.name, timeout=timeout + 60)
        seconds = time.monotonic() - start
        code = int(podman("inspect", "--format", "{{.State.ExitCode}}", self.name).stdout)
        return code, seconds

    def logs(self) -> str:
        result = podman("logs", self.name, check=False)
        return result.stdout + result.stderr

    def exec_python(self, code: str) -> subprocess.CompletedProcess[str]:
        return podman("exec", self.name, "python", "-c", code, check=False)

    def remove(self) -> None:
        podman("rm", "--force", "--volumes", "--time=0", self.name, check=False)


def in_netns(pid: int, *probe_args: str) -> dict[str, Any]:
    """Run the probe with the host's Python in the container's network namespace only."""
    result = run(["nsenter", f"--target={pid}", "--net", sys.executable, str(PROBE),
                  *probe_args], timeout=120)
    parsed: dict[str, Any] = json.loads(result.stdout)
    return parsed


def app_container(agent: Agent, *probe_args: str, user: str = "20001:20001"
                  ) -> dict[str, Any]:
    """The probe in a second container of the agent's "pod": its network namespace and the
    socket volume, the image's own Python, another uid."""
    result = podman("run", "--rm", f"--network=container:{agent.name}", "--read-only",
                    "--read-only-tmpfs=false", f"--user={user}", "--cap-drop=ALL",
                    "--security-opt=no-new-privileges", *ulimit_flags(),
                    f"--volume={agent.dirs.socket}:{SOCKET_DIR}",
                    f"--volume={PROBE}:/probe/probe.py:ro", "--entrypoint=python",
                    IMAGE, "/probe/probe.py", *probe_args, timeout=120)
    parsed: dict[str, Any] = json.loads(result.stdout.strip().splitlines()[-1])
    return parsed


def rss_kib(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    raise HarnessError(f"no VmRSS for {pid}")


def cgroup_memory_bytes(pid: int) -> int | None:
    """The memory the container's cgroup is charged (page cache included), v1 or v2."""
    for line in Path(f"/proc/{pid}/cgroup").read_text().splitlines():
        _, controllers, path = line.split(":", 2)
        if controllers == "memory":
            candidate = Path("/sys/fs/cgroup/memory") / path.lstrip("/") / "memory.usage_in_bytes"
        elif controllers == "":
            candidate = Path("/sys/fs/cgroup") / path.lstrip("/") / "memory.current"
        else:
            continue
        if candidate.exists():
            return int(candidate.read_text())
    return None


def can_run_containers() -> str | None:
    """None, or why this machine cannot run a container (the reason a test reports)."""
    if os.geteuid() != 0:
        return "the container test runs podman as root (PostgreSQL and volume ownership)"
    probe = run(["unshare", "--mount", "--uts", "--ipc", "--net", "--pid", "--fork", "true"],
                check=False)
    if probe.returncode != 0:
        return f"this machine cannot create namespaces: {probe.stderr.strip()}"
    return None
