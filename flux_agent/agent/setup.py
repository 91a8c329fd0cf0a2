"""What the agent prepares before it runs, as functions: the configuration's checks, the
authenticator, the state dir (private, locked), the socket file, the listeners' connection
caps, the embedded database's connect lines, and a deadline that does not wait for a stuck
cancellation."""

from __future__ import annotations

import asyncio
import json
import logging
import os
import resource
import socket
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ..core.errors import ConfigError
from ..core.files import lock_exclusive, reason, write_atomic
from ..core.settings import KUBE_AUDIENCE, KUBE_BINDING, AgentConfig, env_name
from ..intake.auth import ApiKeyAuthenticator, Authenticator, FixedAgency, load_api_keys
from ..intake.schemas import SchemaError, Schemas
from ..obs import logs

if TYPE_CHECKING:
    from ..intake.tokens import KeySet
    from ..postgres.embedded import LocalPostgres


log = logging.getLogger("flux_agent.agent")

EMBEDDED_LOGIN_ROLE = "flux_agent_local"
EMBEDDED_DATABASE = "flux"
# HTTP connections (see connection_caps).
ACCEPT_BACKLOG = 128  # aiohttp's own; a Unix socket refuses connects beyond it at once
DESCRIPTOR_SPARE = 64
MIN_CONNECTIONS = 4
ADMIN_MAX_CONNECTIONS = 64
AUTO_MAX_CONNECTIONS = 1024
AGENT_FILE = "agent.json"  # where a running agent says where it listens (flux-agent status)
SUPERUSER_NOTE = ("the superuser bypasses row-level security and can UPDATE and DELETE the "
                  "append-only tables")




def make_authenticator(config: AgentConfig, schemas: Schemas) -> Authenticator:
    """The authenticator the configuration asks for (reads key files: call it off the
    loop); a ConfigError names the setting at fault."""
    if config.auth == "none":
        return FixedAgency(config.agency)
    tokens: Authenticator | None = None
    if config.auth == "kubernetes":
        from ..intake.tokens import JwtAuthenticator, ServiceAccountBindings

        try:
            bindings = ServiceAccountBindings(config.kube_bindings)
        except ValueError as exc:
            raise ConfigError(env_name("kube_bindings"), str(exc)) from None
        for agency in sorted(bindings.agencies()):
            if not schemas.manifest.knows(agency):
                raise ConfigError(env_name("kube_bindings"), schemas.manifest.refusal(agency))
        return JwtAuthenticator(
            load_keys(config), algorithms=config.jwt_algorithms,
            issuers=config.jwt_issuers, audience=config.jwt_audience or KUBE_AUDIENCE,
            leeway=config.jwt_leeway, claims=bindings)
    if config.jwt_issuers:
        from ..intake.tokens import JwtAuthenticator

        if config.jwt_hs256_secret:
            logs.register_secret(config.jwt_hs256_secret.reveal())
        tokens = JwtAuthenticator(
            load_keys(config), algorithms=config.jwt_algorithms,
            issuers=config.jwt_issuers, audience=config.jwt_audience or None,
            leeway=config.jwt_leeway,
        )
    if not config.api_keys_file:
        assert tokens is not None
        return tokens
    try:
        keys = load_api_keys(Path(config.api_keys_file).read_text())
    except (OSError, ValueError) as exc:
        raise ConfigError(env_name("api_keys_file"), f"cannot load API keys: {exc}") from None
    return ApiKeyAuthenticator(keys, tokens)


def embedded_connect(pg: LocalPostgres, agency: str) -> dict[str, str]:
    """psql commands for the embedded database: ``connect`` as the agent's own role (under
    row-level security, for ``agency`` when given; it cannot change the append-only tables),
    ``connect_superuser`` as ``postgres`` (see :data:`SUPERUSER_NOTE`)."""
    psql = pg.bin_dir / "psql"
    options = f"-c flux.current_agency_id={agency}" if agency else ""
    return {
        "connect": f"{psql} '{pg.dsn(EMBEDDED_LOGIN_ROLE, EMBEDDED_DATABASE, options=options)}'",
        "connect_superuser": f"{psql} '{pg.dsn(database=EMBEDDED_DATABASE)}'",
    }


def bound_agencies(config: AgentConfig) -> list[str]:
    """The agencies ``FLUX_AGENT_KUBE_BINDINGS`` names."""
    return [m.group(3) for entry in config.kube_bindings if (m := KUBE_BINDING.match(entry))]


def load_schemas(config: AgentConfig) -> Schemas:
    """The schemas and agency manifest the configuration names (reads files: call it off
    the loop), checked against what must stay served: the fixed agency, the bound ones. A
    ConfigError names the setting and the file at fault."""
    try:
        schemas = Schemas(Path(config.schema_dir) if config.schema_dir else None,
                          Path(config.agency_manifest) if config.agency_manifest else None,
                          profile=config.schema_profile)
    except SchemaError as exc:
        raise ConfigError(exc.setting, exc.message) from None
    if config.auth == "none" and not schemas.manifest.knows(config.agency):
        raise ConfigError(env_name("agency"), schemas.manifest.refusal(config.agency))
    return schemas


def preflight(config: AgentConfig, authenticator: Authenticator | None = None
              ) -> tuple[Schemas, Authenticator]:
    """What the agent checks before it touches its state dir, and all that ``flux-agent
    validate`` checks without a database: the payload schemas, the agency manifest, the
    fixed agency, the keys. Reads files (call it from a worker thread); raises
    :class:`ConfigError`."""
    schemas = load_schemas(config)
    if authenticator is None:
        authenticator = make_authenticator(config, schemas)
    return schemas, authenticator


async def bounded(coro: Any, timeout: float) -> Any:
    """Await ``coro`` for at most ``timeout`` seconds, *not* counting the time its
    cancellation takes: a call stuck on a black-holed socket may take long to unwind, and
    whoever waits (a probe, the start) must not wait for that too."""
    task = asyncio.ensure_future(coro)
    done, _ = await asyncio.wait({task}, timeout=timeout)
    if not done:
        task.cancel()
        task.add_done_callback(_consume)
        raise TimeoutError(f"no answer within {timeout:g} s")
    return task.result()


def _consume(task: asyncio.Future[Any]) -> None:
    if not task.cancelled():
        task.exception()


def file_stamp(path: Path) -> tuple[float, int]:
    try:
        st = path.stat()
    except OSError:
        return (0.0, -1)
    return (st.st_mtime, st.st_size)


def load_keys(config: AgentConfig) -> KeySet:
    """Read the configured verification keys (a ConfigError names the bad setting)."""
    from ..intake.tokens import KeySet

    try:
        if config.jwt_hs256_secret:
            return KeySet(secret=config.jwt_hs256_secret.reveal())
        if config.jwt_jwks_file:
            return KeySet(jwks=Path(config.jwt_jwks_file).read_text())
        return KeySet(pem=Path(config.jwt_public_key_file).read_bytes())
    except (OSError, ValueError, TypeError) as exc:
        setting = "jwt_jwks_file" if config.jwt_jwks_file else "jwt_public_key_file"
        raise ConfigError(env_name(setting), f"cannot load the key: {exc}") from None


def connection_caps(config: AgentConfig, pool: int) -> dict[str, int]:
    """Connections each listener takes (``tcp``, ``unix``, ``admin``). ``auto`` shares what
    the descriptor limit leaves after a reserve: the descriptors open now, the database
    pool, spare ones for the spool, snapshots and key files, and per listener the sockets
    an accept burst holds before they are refused. A flood of connections then cannot
    take the descriptors the flusher needs."""
    listeners = [name for name, on in (("tcp", config.listen), ("unix", config.socket_path),
                                       ("admin", config.admin_listen)) if on]
    if config.http_max_connections:
        cap = config.http_max_connections
        return {"tcp": cap, "unix": cap, "admin": min(cap, ADMIN_MAX_CONNECTIONS)}
    soft = resource.getrlimit(resource.RLIMIT_NOFILE)[0]
    if soft == resource.RLIM_INFINITY:
        soft = 1 << 20
    try:
        open_now = len(os.listdir("/proc/self/fd"))
    except OSError:
        open_now = DESCRIPTOR_SPARE
    free = soft - open_now - pool - DESCRIPTOR_SPARE - ACCEPT_BACKLOG * len(listeners)
    admin = max(MIN_CONNECTIONS, min(ADMIN_MAX_CONNECTIONS, free // 4))
    events = [n for n in listeners if n != "admin"]
    share = (free - (admin if "admin" in listeners else 0)) // max(1, len(events))
    cap = max(MIN_CONNECTIONS, min(AUTO_MAX_CONNECTIONS, share))
    return {"tcp": cap, "unix": cap, "admin": admin}


def state_dir_mode(config: AgentConfig) -> int:
    """0700, plus search (never read) permission for who must pass through: the socket's
    group when the socket lives in the state dir, and everyone when the embedded PostgreSQL
    runs as its own user (root's agent). Every file in it is 0600: the spool and the
    indexes hold every agency's event ids and run and step names."""
    mode = 0o700
    sock = config.socket_path
    if sock is not None and sock.parent == config.state_path:
        mode |= 0o010
    if not config.database_url and hasattr(os, "geteuid") and os.geteuid() == 0:
        mode |= 0o001
    return mode


def claim_state_dir(config: AgentConfig) -> int:
    """Worker thread: create (or tighten) the state dir and lock it for this agent."""
    state_dir = config.state_path
    _private_dir(state_dir, state_dir_mode(config))
    try:
        lock = lock_exclusive(state_dir / "agent.lock",
                              f"the state dir {state_dir} ({env_name('state_dir')})")
    except RuntimeError as exc:
        raise ConfigError(env_name("state_dir"), str(exc)) from None
    for path in unrelated_files(config):
        log.warning("state dir: a file that is not the agent's is ignored",
                    extra={"fields": {"path": str(path)}})
    return lock


# What the agent keeps in its state dir (and the temporary copies of the files it rewrites
# atomically); the spool checks its own directory.
STATE_FILES = frozenset({"agent.lock", AGENT_FILE, "spool", "postgres", "seen.idx",
                         "checkpoints.idx", "primary"})


def unrelated_files(config: AgentConfig) -> list[Path]:
    """Entries of the state dir the agent neither made nor uses (each is left alone)."""
    own = set(STATE_FILES) | {name + ".tmp" for name in STATE_FILES}
    for path in (config.socket_path, config.spool_sync_log):
        if path:
            own.add(Path(path).name if Path(path).parent == config.state_path else "")
    try:
        entries = sorted(config.state_path.iterdir())
    except OSError:
        return []
    return [p for p in entries if p.name not in own]


def record_endpoints(config: AgentConfig, event_url: str | None, socket_path: Path | None,
                     admin_url: str | None) -> Path:
    """Worker thread: say in the state dir where this agent listens and whom it writes as,
    so that ``flux-agent status`` finds it wherever it listens. Returns the file. A disk
    that refuses it (full) does not stop the agent: status then needs its listen address."""
    path = config.state_path / AGENT_FILE
    try:
        write_atomic(path, json.dumps({
            "pid": os.getpid(), "admin_url": admin_url, "event_url": event_url,
            "socket": str(socket_path) if socket_path else None, "role": config.role,
            "auth": config.auth, "agency": config.agency if config.auth == "none" else None,
            "embedded_database": not config.database_url and not config.aggregators,
        }).encode())
    except OSError as exc:
        log.warning("cannot record where the agent listens; flux-agent status needs "
                    "FLUX_AGENT_ADMIN_LISTEN or --url", extra={"fields": {
                        "path": str(path), "error": reason(exc)}})
        path.unlink(missing_ok=True)
    return path


def _private_dir(path: Path, mode: int) -> None:
    """Create ``path`` with ``mode``; an existing one more open than that is tightened, with
    a warning, or (when this process may not change it, e.g. a Kubernetes volume) kept
    with a warning: its files are 0600 whatever the directory allows."""
    try:
        path.mkdir(parents=True, mode=mode)
        os.chmod(path, mode)  # exactly this, whatever the umask
        return
    except FileExistsError:
        pass
    current = path.stat().st_mode & 0o777
    if not current & ~mode:
        return
    try:
        os.chmod(path, mode)
    except OSError as exc:
        log.warning("the state dir is more open than it should be and cannot be changed; "
                    "its files stay private (0600)", extra={"fields": {
                        "path": str(path), "mode": oct(current), "wanted": oct(mode),
                        "error": reason(exc)}})
        return
    log.warning("the state dir was more open than it should be; tightened", extra={
        "fields": {"path": str(path), "was": oct(current), "now": oct(mode)}})


def clear_stale_socket(path: Path) -> None:
    """Worker thread: make the socket's directory; remove a socket file left by a dead
    agent; refuse if a live one answers on it (or might: a peer too slow to answer within a
    second is alive, and its socket is kept)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    if not path.exists() and not path.is_symlink():
        return
    if not path.is_socket():
        raise ConfigError(env_name("socket"), f"{path} exists and is not a socket")
    probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        probe.settimeout(1)
        probe.connect(str(path))
    except ConnectionRefusedError:  # nobody listens: a dead agent's leftover
        path.unlink(missing_ok=True)
        return
    except FileNotFoundError:
        return
    except OSError as exc:
        raise ConfigError(env_name("socket"), f"cannot tell whether {path} is in use "
                          f"({exc.strerror or type(exc).__name__}); remove it if no agent "
                          "runs") from None
    finally:
        probe.close()
    raise ConfigError(env_name("socket"), f"another process is listening on {path}")
