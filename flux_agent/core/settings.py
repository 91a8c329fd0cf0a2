"""One frozen, typed configuration object and the only code that reads env and files for it.

Precedence: command-line flag > ``FLUX_AGENT_*`` environment > TOML file (``--config``) >
default. Secrets may also come from ``<NAME>_FILE`` paths (Kubernetes Secret volumes). Every
setting is declared once, in ``AgentConfig``; flags, environment names, the table of
docs/configuration.md and error messages are all derived from that declaration, so they cannot
drift apart.
"""

from __future__ import annotations

import argparse
import dataclasses
import ipaddress
import json
import os
import re
import socket as _socket
import tomllib
from collections.abc import Callable, Collection, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit, urlunsplit

from .errors import ConfigError

ENV_PREFIX = "FLUX_AGENT_"
AGGREGATOR_BATCH_MAX_AGE = 0.5  # seconds: see batch_max_age
AGENCY_SLUG = re.compile(r"^[a-z0-9]+(-[a-z0-9]+)*$")


class Secret(str):
    """A string that never shows itself in ``repr()``, logs or tracebacks."""

    __slots__ = ()

    def __repr__(self) -> str:
        return "'***'"

    def reveal(self) -> str:
        return str.__str__(self)


def redact_dsn(dsn: str | None) -> str:
    """``postgresql://flux:***@db:5432/flux`` - the password (and any query secrets) hidden."""
    if not dsn:
        return "<embedded>"
    try:
        parts = urlsplit(str.__str__(dsn))
    except ValueError:
        return "<unparseable dsn>"
    netloc = parts.netloc
    if "@" in netloc:
        userinfo, host = netloc.rsplit("@", 1)
        user = userinfo.split(":", 1)[0]
        netloc = f"{user}:***@{host}" if ":" in userinfo else f"{user}@{host}"
    query = re.sub(r"(?i)(password|sslpassword|passfile)=[^&]*", r"\1=***", parts.query)
    return urlunsplit((parts.scheme, netloc, parts.path, query, ""))


# --------------------------------------------------------------------------- value parsers

_SIZE = re.compile(r"^\s*(\d+)\s*([kmgt]i?b?|b)?\s*$", re.IGNORECASE)
_SIZE_UNITS = {"": 1, "b": 1, "k": 1024, "m": 1024**2, "g": 1024**3, "t": 1024**4}
_DURATION = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*(ms|s|m|h)?\s*$")
_DURATION_UNITS = {"ms": 0.001, "s": 1.0, "": 1.0, "m": 60.0, "h": 3600.0}


def parse_bytes(raw: Any) -> int:
    if isinstance(raw, int) and not isinstance(raw, bool):
        value = raw
    else:
        m = _SIZE.match(str(raw))
        if not m:
            raise ValueError(f"expected a size such as 512MiB or 1048576, got {raw!r}")
        value = int(m.group(1)) * _SIZE_UNITS[(m.group(2) or "").lower()[:1]]
    if value <= 0:
        raise ValueError("must be positive")
    return value


def parse_duration(raw: Any) -> float:
    if isinstance(raw, int | float) and not isinstance(raw, bool):
        value = float(raw)
    else:
        m = _DURATION.match(str(raw))
        if not m:
            raise ValueError(f"expected a duration such as 25s or 500ms, got {raw!r}")
        value = float(m.group(1)) * _DURATION_UNITS[m.group(2) or ""]
    if value < 0:
        raise ValueError("must not be negative")
    return value


def parse_timeout(raw: Any) -> float:
    value = parse_duration(raw)
    if value <= 0:
        raise ValueError("must be positive")
    return value


def parse_bool(raw: Any) -> bool:
    if isinstance(raw, bool):
        return raw
    text = str(raw).strip().lower()
    if text in {"1", "true", "yes", "on"}:
        return True
    if text in {"0", "false", "no", "off"}:
        return False
    raise ValueError(f"expected true or false, got {raw!r}")


def parse_partition_interval(raw: Any) -> float:
    value = parse_duration(raw)
    if value < 3600 or value > 366 * 86400 or value % 3600:
        raise ValueError("must be whole hours, from 1h to 8784h (366 days)")
    return value


def parse_int(raw: Any) -> int:
    if isinstance(raw, bool):
        raise ValueError("expected an integer")
    value = int(raw)
    if value < 1:
        raise ValueError("must be at least 1")
    return value


def parse_auto_int(raw: Any) -> int:
    """``auto`` (0: derived at start) or a positive integer."""
    if str(raw).strip().lower() == "auto":
        return 0
    return parse_int(raw)


# NAMESPACE[/SERVICEACCOUNT]=AGENCY[:ROLE] (Kubernetes names, an agency slug).
KUBE_BINDING = re.compile(r"^([a-z0-9][a-z0-9-]{0,62})(?:/([a-z0-9][a-z0-9.-]{0,252}))?="
                          r"([a-z0-9]+(?:-[a-z0-9]+)*)(?::([a-z]+))?$")


def parse_bindings(raw: Any) -> tuple[str, ...]:
    entries = parse_list(raw)
    for entry in entries:
        if not KUBE_BINDING.match(entry):
            raise ValueError(f"{entry!r} is not NAMESPACE[/SERVICEACCOUNT]=AGENCY[:ROLE]")
    return entries


def parse_upstreams(raw: Any) -> tuple[str, ...]:
    """A comma list of ``http(s)://host[:port]`` URLs, or one ``postgresql://`` URL."""
    entries = parse_list(raw)
    for entry in entries:
        scheme = urlsplit(entry).scheme
        if scheme in ("postgres", "postgresql"):
            if len(entries) > 1:
                raise ValueError("a postgresql:// URL stands alone")
            continue
        if scheme not in ("http", "https") or not urlsplit(entry).hostname:
            raise ValueError(f"{redact_dsn(entry)!r} is not an http(s):// URL of an aggregator "
                             "or a postgresql:// URL")
    return entries


def parse_str(raw: Any) -> str:
    if not isinstance(raw, str | int | float) or isinstance(raw, bool):
        raise ValueError(f"expected a string, got {type(raw).__name__}")
    return str(raw).strip()


def parse_list(raw: Any) -> tuple[str, ...]:
    if isinstance(raw, list | tuple):
        items = [str(x).strip() for x in raw]
    else:
        items = [x.strip() for x in str(raw).split(",")]
    return tuple(x for x in items if x)


class Choice:
    """Parses one of a few words; ``options`` are also what help and shell completion show."""

    def __init__(self, *options: str) -> None:
        self.options = options

    def __call__(self, raw: Any) -> str:
        text = str(raw).strip().lower()
        if text not in self.options:
            raise ValueError(f"expected one of {', '.join(self.options)}, got {raw!r}")
        return text


def choice(*options: str) -> Choice:
    return Choice(*options)


def parse_listen(raw: Any) -> str:
    """``host:port`` (``[::1]:8787`` for IPv6), or ``off``."""
    text = str(raw).strip()
    if text.lower() in {"off", "none", ""}:
        return ""
    host, port = split_hostport(text)
    if not host:
        raise ValueError(f"expected host:port, got {raw!r}")
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


def split_hostport(text: str) -> tuple[str, int]:
    m = re.match(r"^\[([0-9a-fA-F:.]+)\]:(\d+)$", text) or re.match(r"^([^:\[\]]*):(\d+)$", text)
    if not m:
        raise ValueError(f"expected host:port, got {text!r}")
    port = int(m.group(2))
    if not 0 <= port <= 65535:
        raise ValueError(f"port out of range in {text!r}")
    return m.group(1), port


def _default_state_dir() -> str:
    # Root (containers, system services) keeps state under /var/lib, where an unprivileged
    # embedded PostgreSQL can still traverse the path; users keep it in their XDG state home.
    if hasattr(os, "geteuid") and os.geteuid() == 0:
        return "/var/lib/flux-agent"
    base = os.environ.get("XDG_STATE_HOME") or os.path.join(os.path.expanduser("~"), ".local/state")
    return os.path.join(base, "flux-agent")


# --------------------------------------------------------------------------- the settings


def setting(
    default: Any,
    doc: str,
    parse: Callable[[Any], Any] = parse_str,
    *,
    secret: bool = False,
    shown_default: str | None = None,
) -> Any:
    return field(
        default=default,
        metadata={"doc": doc, "parse": parse, "secret": secret, "shown": shown_default},
    )


@dataclass(frozen=True, slots=True)
class AgentConfig:
    """Every knob of the agent. Build it with :func:`load_config` (or directly in tests)."""

    database_url: Secret | None = setting(
        None,
        "PostgreSQL URL. Unset: a private embedded PostgreSQL under the state dir.",
        secret=True,
        shown_default="unset (embedded)",
    )
    listen: str = setting(
        "127.0.0.1:8787", "Event API TCP address (`host:port`, `off` to disable).", parse_listen
    )
    socket: str = setting(
        "auto",
        "Event API Unix socket path (mode 0660); `auto` is `<state dir>/agent.sock`, "
        "`off` disables.",
    )
    admin_listen: str = setting(
        "127.0.0.1:9464",
        "Admin listener for `/health/*` and `/metrics` (`off` to disable).",
        parse_listen,
    )
    state_dir: str = setting(
        "",
        "Spool, embedded database and default socket live here.",
        shown_default="/var/lib/flux-agent (root), else ~/.local/state/flux-agent",
    )
    spool_max_bytes: int = setting(
        1024**3, "Spool capacity; beyond it intake answers 503 SPOOL_FULL.", parse_bytes,
        shown_default="1GiB",
    )
    spool_segment_bytes: int = setting(
        16 * 1024**2, "Spool segment file size before rotation.", parse_bytes,
        shown_default="16MiB",
    )
    spool_durability: str = setting(
        "fsync",
        "`fsync`: acknowledge after fdatasync. `none`: acknowledge after the write is queued "
        "(a crash of the agent can lose the last few milliseconds, a crash of the machine the "
        "data the kernel has not yet written back, typically up to 30 s).",
        choice("fsync", "none"),
    )
    memory_queue_bytes: int = setting(
        4 * 1024**2,
        "Memory for events on their way from intake to the flusher; beyond it the flusher "
        "reads them back from the spool.",
        parse_bytes,
        shown_default="4MiB",
    )
    request_memory_bytes: int = setting(
        64 * 1024**2,
        "Memory for everything requests hold: an eighth for bodies being read, an eighth "
        "for read answers not yet taken by their clients, the rest for the work on admitted "
        "requests (body, decoded objects, sealed rows, spool record; estimated from the "
        "body before it is decoded). A request that does not fit waits (TCP backpressure; "
        "503 `INTAKE_BUSY` after `FLUX_AGENT_REQUEST_BODY_TIMEOUT`), a read gets a shorter "
        "page or 503 `ANSWERS_BUSY`, a body estimated beyond the working share 413 "
        "`REQUEST_TOO_COMPLEX`. At least four largest request bodies.",
        parse_bytes,
        shown_default="64MiB",
    )
    request_body_timeout: float = setting(
        30.0,
        "A request body must arrive within this (else 408), a request waits at most this "
        "long for request memory (else 503), and a client must take each part of an answer "
        "within this (else the connection is closed): a stalled upload or a client that "
        "does not read cannot hold the agent's memory.",
        parse_duration,
        shown_default="30s",
    )
    auth: str = setting(
        "jwt", "`jwt` (Bearer tokens), `kubernetes` (Kubernetes service-account tokens, "
        "mapped by `FLUX_AGENT_KUBE_BINDINGS`) or `none` (fixed agency; loopback and socket "
        "only).",
        choice("jwt", "none", "kubernetes"),
    )
    agency: str = setting("", "The fixed agency when `auth` is `none`.", shown_default="unset")
    jwt_algorithms: tuple[str, ...] = setting(
        ("RS256", "ES256"), "Accepted signature algorithms (comma list); never `none`, never "
        "HMAC and public-key algorithms together.", parse_list, shown_default="`RS256,ES256`",
    )
    jwt_issuers: tuple[str, ...] = setting(
        (), "Trusted `iss` values (comma list); required with `jwt`.", parse_list,
        shown_default="unset",
    )
    jwt_audience: str = setting("", "Required `aud`, if set.", shown_default="unset")
    jwt_public_key_file: str = setting(
        "", "PEM public key that verifies tokens.", shown_default="unset"
    )
    jwt_jwks_file: str = setting(
        "", "JWKS file of verification keys (by `kid`); re-read when it changes.",
        shown_default="unset",
    )
    jwt_hs256_secret: Secret | None = setting(
        None, "HMAC secret (development only).", secret=True, shown_default="unset"
    )
    api_keys_file: str = setting(
        "", "JSON file of API keys (their SHA-256, agency and role) for clients that cannot "
        "mint JWTs; used with `auth` `jwt`.", shown_default="unset",
    )
    jwt_leeway: float = setting(
        30.0, "Clock skew tolerated on `exp`, `iat` and `nbf`.", parse_duration,
        shown_default="30s",
    )
    socket_allowed_uids: tuple[str, ...] = setting(
        (), "Peer uids allowed on the Unix socket (SO_PEERCRED); empty allows any.",
        parse_list, shown_default="unset",
    )
    http_idle_timeout: float = setting(
        75.0, "An HTTP connection that sends no request this long (before its first one too) "
        "is closed.", parse_timeout, shown_default="75s",
    )
    http_header_timeout: float = setting(
        10.0, "A request head (request line and headers) must arrive within this of its "
        "first byte, else 408 and the connection is closed.", parse_timeout,
        shown_default="10s",
    )
    http_max_connections: int = setting(
        0, "Open connections each listener takes (the event API's TCP address and socket, "
        "and the admin listener, at most 64 there); beyond it a new connection gets 503 "
        "TOO_MANY_CONNECTIONS and is closed. `auto`: what the descriptor limit "
        "(RLIMIT_NOFILE) leaves after a reserve for the spool, the database pool and files, "
        "at most 1024.", parse_auto_int, shown_default="`auto`",
    )
    kube_bindings: tuple[str, ...] = setting(
        (), "With `auth` `kubernetes`: which service accounts write as which agency, "
        "`NAMESPACE[/SERVICEACCOUNT]=AGENCY[:ROLE]` (comma list; role `operator` unless "
        "given; a service account's own entry wins over its namespace's).", parse_bindings,
        shown_default="unset",
    )
    agency_manifest: str = setting(
        "", "JSON file of the agencies this agent serves, and their retention (others are "
        "refused, 403 UNKNOWN_AGENCY); unset: the profile's (`neutral`: every agency, 30 "
        "days). Reloaded when it changes and on SIGHUP.", shown_default="the profile's",
    )
    schema_profile: str = setting(
        "neutral", "`neutral`: any agency slug, any JSON object as payload (unless "
        "`FLUX_AGENT_AGENCY_MANIFEST` and `FLUX_AGENT_SCHEMA_DIR` say otherwise). `flux`: the "
        "Flux contract the project grew from (five agencies, `run.started` declares "
        "`content_type` and `use_case`).", choice("neutral", "flux"),
    )
    schema_dir: str = setting(
        "", "Directory of payload schemas (JSON Schema 2020-12), one per event kind: "
        "`<kind>.json` (e.g. `run.started.json`), else `payload.json`; other `.json` files "
        "may be referenced. Replaces the profile's; checked at start, reloaded when a file "
        "changes and on SIGHUP.", shown_default="the profile's",
    )
    agent_id: str = setting("", "Identifies this agent in stored rows.", shown_default="hostname")
    tracing: str = setting(
        "auto", "OpenTelemetry traces: `off`, `otlp`, `console`, or `auto` (OTLP when "
        "OpenTelemetry's `OTEL_EXPORTER_OTLP_*ENDPOINT` or `OTEL_TRACES_EXPORTER` is set).",
        choice("auto", "on", "off", "otlp", "console"),
    )
    log_level: str = setting(
        "info", "`debug`, `info`, `warning` or `error`.",
        choice("debug", "info", "warning", "error"),
    )
    log_format: str = setting(
        "auto", "`json` (one object per line), `console` (for people), or `auto`: `console` "
        "when stdout is a terminal, else `json`.", choice("auto", "json", "console"),
    )
    access_log: bool = setting(
        False, "One log line per request at `info` (method, path, status, duration); always "
        "on at log level `debug`.", parse_bool,
    )
    request_max_bytes: int = setting(
        4 * 1024**2, "Largest request body (after gzip decoding).", parse_bytes,
        shown_default="4MiB",
    )
    event_max_bytes: int = setting(
        256 * 1024, "Largest payload of one event (canonical JSON).", parse_bytes,
        shown_default="256KiB",
    )
    lineage_max_bytes: int = setting(
        4 * 1024**2, "Largest OpenLineage RunEvent on `POST /api/v1/lineage`: the request "
        "body (after gzip decoding) and the stored payload (canonical JSON) it becomes; "
        "beyond it 413 (the RunEvent is not stored).", parse_bytes, shown_default="4MiB",
    )
    read_page_max_bytes: int = setting(
        1024**2, "A page of `GET /v1/runs/{run_id}/events` (and `GET /v1/runs`) ends before "
        "it would exceed this many bytes of JSON (it always holds at least one item); its "
        "`next_cursor` continues where it stopped.", parse_bytes, shown_default="1MiB",
    )
    batch_max_events: int = setting(
        500, "A flush transaction closes at this many events (per lane): as fast as larger "
        "ones on PostgreSQL's side, with less held in memory.", parse_int
    )
    batch_max_bytes: int = setting(
        8 * 1024**2, "... or at this many bytes.", parse_bytes, shown_default="8MiB"
    )
    batch_max_age: float = setting(
        1.0, "... or when its oldest event is this old: how long an acknowledged event may "
        "wait to be visible in PostgreSQL (it is durable on the spool meanwhile). Waits for "
        "`Prefer: wait=committed`, drains and reads of the agent's own writes flush at once. "
        "An aggregator's windows carry many sidecars' events, so it waits half as long "
        "(an event's two hops stay within two seconds).",
        parse_duration, shown_default="1s (an aggregator: 500ms)",
    )
    flush_lanes: int = setting(
        2, "Parallel PostgreSQL connections for flushing (one run always uses one lane).",
        parse_int,
    )
    flush_retry_max: float = setting(
        10.0, "Longest backoff between flush retries while PostgreSQL is away (with jitter: "
        "a fleet does not reconnect in step).", parse_duration, shown_default="10s",
    )
    drain_timeout: float = setting(
        25.0, "On SIGTERM, flush for at most this long, then exit (rest stays spooled).",
        parse_duration, shown_default="25s",
    )
    ready_stall_after: float = setting(
        60.0, "Readiness fails when events have waited this long with no flush progress.",
        parse_duration, shown_default="60s",
    )
    commit_wait_timeout: float = setting(
        10.0, "How long `Prefer: wait=committed` waits for PostgreSQL.", parse_duration,
        shown_default="10s",
    )
    database_connect_timeout: float = setting(
        5.0, "Connecting to PostgreSQL must succeed within this.", parse_timeout,
        shown_default="5s",
    )
    database_statement_timeout: float = setting(
        10.0, "Each statement (reads, pings, checks) must finish within this; a connection "
        "that times out is discarded, never reused.", parse_timeout, shown_default="10s",
    )
    flush_timeout: float = setting(
        15.0, "A flush must commit within this, else it is retried on a new connection.",
        parse_timeout, shown_default="15s",
    )
    database_idle_timeout: float = setting(
        60.0, "A PostgreSQL connection unused this long is closed: an idle sidecar holds "
        "none.", parse_timeout, shown_default="60s",
    )
    database_ping_interval: float = setting(
        60.0, "An idle agent checks PostgreSQL this often (readiness's `database`, "
        "`flux_postgres_up`); `0` disables.", parse_duration, shown_default="60s",
    )
    spool_keep_committed: float = setting(
        300.0, "Committed spool segments are kept this long and replayed when the agent finds "
        "itself on a different PostgreSQL primary (failover to an asynchronous standby); "
        "`0` disables.", parse_duration, shown_default="5m",
    )
    live_fail_after: float = setting(
        120.0, "Liveness fails when a background task has kept failing this long, so that "
        "the container is restarted.", parse_timeout, shown_default="2m",
    )
    spool_sync_log: str = setting(
        "", "Testing only: append each synced segment size to this file (what a power loss "
        "would keep).", shown_default="unset",
    )
    migrate: bool = setting(True, "Apply pending schema migrations at start.", parse_bool)
    retention_interval: float = setting(
        300.0, "How often one agent (holding a lease) keeps `flux.events`'s time partitions "
        "ahead, drops expired ones and deletes other expired rows; `0` disables.",
        parse_duration, shown_default="5m",
    )
    retention_batch: int = setting(
        1000, "Rows deleted per retention transaction (small: never blocks ingestion).",
        parse_int,
    )
    partition_interval: float = setting(
        86400.0, "Length of one time partition of `flux.events` (whole hours; each holds one "
        "partition per agency, dropped once all its rows have expired).",
        parse_partition_interval, shown_default="24h",
    )
    partition_premake: float = setting(
        172800.0, "Time partitions are created this far ahead by the agent holding the "
        "retention lease; events with later ids wait in the default partition.",
        parse_duration, shown_default="48h",
    )
    partition_lock_timeout: float = setting(
        2.0, "How long one partition change waits for its lock on `flux.events` (it holds "
        "writes back while it waits); then it is tried again next round.", parse_timeout,
        shown_default="2s",
    )
    dead_letter_retention: float = setting(
        0.0, "Dead letters are deleted this long after they were stored (at least a day); "
        "`0`: after the agency's event retention from the manifest.", parse_duration,
        shown_default="`0` (the agency's retention)",
    )
    dedupe_index_size: int = setting(
        20_000, "Recently seen event ids remembered for duplicate reporting (about 300 bytes "
        "each).", parse_int
    )
    database_pgbouncer: bool = setting(
        False, "PgBouncer in transaction pooling mode: no server-side prepared statements.",
        parse_bool,
    )
    role: str = setting(
        "agent", "`agent`: a sidecar, taking events from its pod. `aggregator`: takes sealed "
        "records from sidecars and writes them to PostgreSQL (`flux-agent aggregate` sets it).",
        choice("agent", "aggregator"),
    )
    upstream: tuple[str, ...] = setting(
        (), "Where a sidecar delivers: unset (PostgreSQL, `FLUX_AGENT_DATABASE_URL` or the "
        "embedded default), a `postgresql://` URL (the same as `FLUX_AGENT_DATABASE_URL`), or "
        "aggregator URLs (`https://host:8788`, comma list, or one Service's): the sidecar then "
        "holds no database credentials and imports no database client.", parse_upstreams,
        shown_default="unset (PostgreSQL)",
    )
    upstream_token_file: str = setting(
        "", "File holding the bearer token sent to aggregators (a projected service-account "
        "token, or a static development token); re-read when it changes.",
        shown_default="unset",
    )
    upstream_ca_file: str = setting(
        "", "CA bundle that verifies aggregators' TLS certificates.",
        shown_default="the system's CAs",
    )
    upstream_timeout: float = setting(
        10.0, "Each call to an aggregator must be answered within this (else it counts as "
        "down and the next replica is tried, with backoff).", parse_timeout,
        shown_default="10s",
    )
    handoff: tuple[str, ...] = setting(
        (), "Aggregator URLs that take what a draining sidecar could not deliver to "
        "PostgreSQL by its deadline (the pod's end). With aggregators as the upstream they "
        "are the handoff too.", parse_upstreams, shown_default="unset",
    )
    handoff_timeout: float = setting(
        10.0, "The part of `FLUX_AGENT_DRAIN_TIMEOUT` kept for the handoff: a drain flushes "
        "to PostgreSQL until this much is left (or at once while PostgreSQL is down), then "
        "hands the rest to an aggregator.", parse_duration, shown_default="10s",
    )
    tls_cert_file: str = setting(
        "", "PEM certificate (chain) of the event listener: HTTPS (an aggregator's network "
        "listener); re-read when it changes.", shown_default="unset",
    )
    tls_key_file: str = setting(
        "", "PEM private key of `FLUX_AGENT_TLS_CERT_FILE`.", shown_default="unset",
    )
    allow_plaintext: bool = setting(
        False, "Let an aggregator serve plain HTTP on an address that is not loopback (inside "
        "a trusted network only).", parse_bool,
    )

    def __repr__(self) -> str:
        parts = []
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            if f.name == "database_url":
                parts.append(f"database_url={redact_dsn(value)!r}")
            elif f.metadata.get("secret") and value:
                parts.append(f"{f.name}='***'")
            else:
                parts.append(f"{f.name}={value!r}")
        return f"AgentConfig({', '.join(parts)})"

    # Derived values: computed, never configured twice.

    @property
    def state_path(self) -> Path:
        return Path(self.state_dir or _default_state_dir())

    @property
    def spool_dir(self) -> Path:
        return self.state_path / "spool"

    @property
    def socket_path(self) -> Path | None:
        if self.socket.lower() in {"off", "none", ""}:
            return None
        if self.socket == "auto":
            return self.state_path / "agent.sock"
        return Path(self.socket)

    @property
    def aggregators(self) -> tuple[str, ...]:
        """The aggregator URLs a sidecar delivers to (none: PostgreSQL)."""
        return tuple(u for u in self.upstream if u.startswith(("http://", "https://")))

    @property
    def handoff_to(self) -> tuple[str, ...]:
        """Where a draining sidecar hands what it could not deliver."""
        return self.handoff or self.aggregators

    @property
    def effective_agent_id(self) -> str:
        return self.agent_id or _socket.gethostname()

    def replace(self, **changes: Any) -> AgentConfig:
        return dataclasses.replace(self, **changes)


SETTINGS: tuple[dataclasses.Field[Any], ...] = tuple(dataclasses.fields(AgentConfig))


def env_name(name: str) -> str:
    return ENV_PREFIX + name.upper()


def flag_name(name: str) -> str:
    return "--" + name.replace("_", "-")


# --------------------------------------------------------------------------- loading


def add_flags(parser: argparse.ArgumentParser, names: Iterable[str] | None = None,
              docs: Mapping[str, tuple[str, str]] | None = None) -> None:
    """Add one ``--kebab-name`` flag per setting (and ``--x-file`` for secrets): all of them,
    or only ``names``. Each flag's help shows its default and environment variable; ``docs``
    gives (description, default) where a command uses a setting in its own way."""
    parser.add_argument("--config", dest="config", default=None, metavar="FILE",
                        help=_help("TOML configuration file.", "unset", ENV_PREFIX + "CONFIG"))
    wanted = None if names is None else set(names)
    for f in SETTINGS:
        if wanted is not None and f.name not in wanted:
            continue
        doc, default = (docs or {}).get(f.name, (f.metadata["doc"], shown_default(f)))
        parse = f.metadata["parse"]
        metavar = ("{" + ",".join(parse.options) + "}" if isinstance(parse, Choice)
                   else "{true,false}" if parse is parse_bool else None)
        parser.add_argument(flag_name(f.name), dest=f.name, default=None, metavar=metavar,
                            help=_help(doc, default, env_name(f.name)))
        if f.metadata["secret"]:
            parser.add_argument(
                flag_name(f.name) + "-file", dest=f.name + "_file", default=None,
                metavar="FILE", help=_help(f"Read {flag_name(f.name)} from this file.",
                                           "unset", env_name(f.name) + "_FILE"),
            )


def _help(doc: str, default: str, env: str) -> str:
    """Help text for a terminal: the docs' Markdown without backticks, then where the
    value comes from when the flag is not given."""
    return f"{doc} [default: {default}; env {env}]".replace("`", "").replace("%", "%%")


def load_config(
    argv: Sequence[str] | argparse.Namespace = (),
    environ: Mapping[str, str] | None = None,
    file: str | Path | None = None,
    *,
    serving: bool = True,
) -> AgentConfig:
    """Build the configuration from flags, environment and an optional TOML file.

    ``argv`` holds setting flags only (the CLI has already taken the sub-command), or a
    namespace parsed with :func:`add_flags`. Raises :class:`ConfigError` naming the setting.
    ``serving=False`` (``migrate``, ``spool``) skips the rules that only matter to a running
    agent, such as authentication.
    """
    environ = os.environ if environ is None else environ
    if isinstance(argv, argparse.Namespace):
        flags = vars(argv)
    else:
        parser = argparse.ArgumentParser(add_help=False, exit_on_error=False,
                                         allow_abbrev=False)
        add_flags(parser)
        try:
            ns, unknown = parser.parse_known_args(list(argv))
        except argparse.ArgumentError as exc:
            raise ConfigError("flags", str(exc)) from None
        if unknown:
            raise ConfigError(unknown[0], "unknown flag")
        flags = vars(ns)

    config_file = file or flags.get("config") or environ.get(ENV_PREFIX + "CONFIG")
    from_file: dict[str, Any] = {}
    if config_file:
        from_file = _read_toml(Path(config_file))
        known = {f.name for f in SETTINGS} | {f.name + "_file" for f in SETTINGS}
        for key in from_file:
            if key not in known:
                raise ConfigError(f"{config_file}: {key}", "unknown setting")

    values: dict[str, Any] = {}
    for f in SETTINGS:
        raw, source = _pick(f, flags, environ, from_file)
        if raw is None:
            continue
        try:
            value = f.metadata["parse"](raw)
        except (ValueError, TypeError) as exc:
            raise ConfigError(source, str(exc)) from None
        if f.metadata["secret"]:
            value = Secret(value) if value else None
        values[f.name] = value
    values["tracing"] = _resolve_tracing(values.get("tracing", "auto"), environ)
    if values.get("role") == "aggregator":
        values.setdefault("batch_max_age", AGGREGATOR_BATCH_MAX_AGE)
    upstream = values.get("upstream", ())
    if upstream and urlsplit(upstream[0]).scheme in ("postgres", "postgresql"):
        if values.get("database_url") and values["database_url"] != upstream[0]:
            raise ConfigError(env_name("upstream"), "names another PostgreSQL than "
                              "FLUX_AGENT_DATABASE_URL; set one of them")
        values["database_url"] = Secret(upstream[0])
        values["upstream"] = ()
    config = AgentConfig(**values)
    _check(config, serving)
    return config


def _resolve_tracing(mode: str, environ: Mapping[str, str]) -> str:
    """``auto`` follows OpenTelemetry's own variables; the result is off, otlp or console."""
    if mode == "on":
        return "otlp"
    if mode != "auto":
        return mode
    if environ.get("OTEL_SDK_DISABLED", "").lower() == "true":
        return "off"
    exporter = environ.get("OTEL_TRACES_EXPORTER", "").split(",")[0].strip().lower()
    if exporter in {"otlp", "console"}:
        return exporter
    if exporter == "none":
        return "off"
    if environ.get("OTEL_EXPORTER_OTLP_ENDPOINT") or environ.get(
            "OTEL_EXPORTER_OTLP_TRACES_ENDPOINT"):
        return "otlp"
    return "off"


def _pick(
    f: dataclasses.Field[Any],
    flags: Mapping[str, Any],
    environ: Mapping[str, str],
    from_file: Mapping[str, Any],
) -> tuple[Any, str]:
    """The raw value of one setting and the name of where it came from (for errors)."""
    name, env = f.name, env_name(f.name)
    secret = f.metadata["secret"]
    candidates: list[tuple[Any, str, bool]] = [
        (flags.get(name), flag_name(name), False),
        (flags.get(name + "_file") if secret else None, flag_name(name) + "-file", True),
        (environ.get(env), env, False),
        (environ.get(env + "_FILE") if secret else None, env + "_FILE", True),
        (from_file.get(name), f"{name} (config file)", False),
        (from_file.get(name + "_file") if secret else None, f"{name}_file (config file)", True),
    ]
    for raw, source, is_path in candidates:
        if raw is None:
            continue
        if is_path:
            try:
                return Path(str(raw)).read_text().strip(), source
            except OSError as exc:
                raise ConfigError(source, f"cannot read {raw}: {exc.strerror}") from None
        return raw, source
    return None, env


def _read_toml(path: Path) -> dict[str, Any]:
    try:
        with path.open("rb") as fh:
            data = tomllib.load(fh)
    except OSError as exc:
        raise ConfigError("--config", f"cannot read {path}: {exc.strerror}") from None
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError("--config", f"{path} is not valid TOML: {exc}") from None
    # Allow both a flat file and a [flux-agent] table.
    section = data.get("flux-agent", data)
    if not isinstance(section, dict):
        raise ConfigError("--config", f"{path}: [flux-agent] must be a table")
    return {k.replace("-", "_"): v for k, v in section.items()}


def _check(config: AgentConfig, serving: bool = True) -> None:
    """Cross-setting rules; single values were checked by their parsers."""
    if config.database_url and not str.__str__(config.database_url).startswith(
        ("postgres://", "postgresql://")
    ):
        raise ConfigError(env_name("database_url"), "must be a postgresql:// URL")
    _check_upstream(config)
    if not serving:
        return
    if config.agency and not AGENCY_SLUG.match(config.agency):
        raise ConfigError(env_name("agency"), f"{config.agency!r} is not an agency slug")
    if config.auth == "none":
        if not config.agency:
            raise ConfigError(env_name("agency"), "required when FLUX_AGENT_AUTH is none")
        if config.listen and not _is_loopback(split_hostport(config.listen)[0]):
            raise ConfigError(
                env_name("listen"),
                "FLUX_AGENT_AUTH=none is allowed only on loopback addresses and the Unix socket",
            )
    if config.auth == "jwt":
        _check_jwt(config)
    if config.auth == "kubernetes":
        _check_kubernetes(config)
    for uid in config.socket_allowed_uids:
        if not uid.isdigit():
            raise ConfigError(env_name("socket_allowed_uids"), f"{uid!r} is not a numeric uid")
    if not (config.listen or config.socket_path):
        raise ConfigError(env_name("listen"), "the event API needs a TCP address or a socket")
    sock = config.socket_path
    if sock is not None and len(os.fsencode(sock)) > 100:
        raise ConfigError(env_name("socket"), f"path too long for a Unix socket: {sock}")
    largest = max(config.request_max_bytes, config.lineage_max_bytes)
    if config.request_memory_bytes < 4 * largest:
        raise ConfigError(env_name("request_memory_bytes"),
                          "must hold at least four largest request bodies "
                          "(FLUX_AGENT_REQUEST_MAX_BYTES, FLUX_AGENT_LINEAGE_MAX_BYTES)")
    if config.event_max_bytes > config.request_max_bytes:
        raise ConfigError(env_name("event_max_bytes"),
                          "must not exceed FLUX_AGENT_REQUEST_MAX_BYTES")
    if config.spool_segment_bytes > config.spool_max_bytes:
        raise ConfigError(env_name("spool_segment_bytes"),
                          "must not exceed FLUX_AGENT_SPOOL_MAX_BYTES")
    if config.retention_interval and config.partition_premake < 2 * config.retention_interval:
        raise ConfigError(env_name("partition_premake"),
                          "must be at least two FLUX_AGENT_RETENTION_INTERVALs, so that the "
                          "next time partition exists before events need it")
    if config.spool_segment_bytes < config.request_max_bytes + 64:
        raise ConfigError(
            env_name("spool_segment_bytes"), "must hold at least one largest request"
        )


def _check_upstream(config: AgentConfig) -> None:
    if config.aggregators and config.database_url:
        raise ConfigError(env_name("upstream"), "a sidecar delivers to aggregators or to "
                          "PostgreSQL (FLUX_AGENT_DATABASE_URL), not both")
    if config.role == "aggregator" and config.aggregators:
        raise ConfigError(env_name("upstream"), "an aggregator writes to PostgreSQL "
                          "(FLUX_AGENT_DATABASE_URL), not to another aggregator")
    if bool(config.tls_cert_file) != bool(config.tls_key_file):
        raise ConfigError(env_name("tls_key_file" if config.tls_cert_file else "tls_cert_file"),
                          "FLUX_AGENT_TLS_CERT_FILE and FLUX_AGENT_TLS_KEY_FILE go together")
    for name in ("handoff",):
        if any(not u.startswith(("http://", "https://")) for u in getattr(config, name)):
            raise ConfigError(env_name(name), "aggregator URLs (http(s)://) only")
    if config.role == "aggregator" and config.listen and not config.tls_cert_file \
            and not config.allow_plaintext \
            and not _is_loopback(split_hostport(config.listen)[0]):
        raise ConfigError(env_name("tls_cert_file"), f"an aggregator listening on "
                          f"{config.listen} needs TLS (FLUX_AGENT_TLS_CERT_FILE and "
                          "FLUX_AGENT_TLS_KEY_FILE), or FLUX_AGENT_ALLOW_PLAINTEXT=true inside "
                          "a trusted network")


_HMAC = {"HS256", "HS384", "HS512"}
_PUBLIC = {"RS256", "RS384", "RS512", "PS256", "PS384", "PS512", "ES256", "ES384", "ES512",
           "EdDSA"}


def _check_jwt(config: AgentConfig) -> None:
    algs = set(config.jwt_algorithms)
    name = env_name("jwt_algorithms")
    if not algs:
        raise ConfigError(name, "list at least one algorithm")
    unknown = algs - _HMAC - _PUBLIC
    if unknown:
        raise ConfigError(name, f"not allowed: {', '.join(sorted(unknown))}")
    if algs & _HMAC and algs & _PUBLIC:
        raise ConfigError(name, "HMAC and public-key algorithms must not be mixed")
    jwt_keys = config.jwt_public_key_file or config.jwt_jwks_file or config.jwt_hs256_secret
    if config.api_keys_file and not (config.jwt_issuers or jwt_keys):
        return  # API keys only
    if not config.jwt_issuers:
        raise ConfigError(env_name("jwt_issuers"), "required when FLUX_AGENT_AUTH is jwt "
                          "(or use FLUX_AGENT_API_KEYS_FILE alone)")
    if algs & _HMAC:
        if not config.jwt_hs256_secret:
            raise ConfigError(env_name("jwt_hs256_secret"),
                              f"required by {', '.join(sorted(algs))}")
        if len(config.jwt_hs256_secret) < 32:
            raise ConfigError(env_name("jwt_hs256_secret"), "use at least 32 characters")
        if config.jwt_public_key_file or config.jwt_jwks_file:
            raise ConfigError(name, "HMAC tokens cannot be verified with public keys")
    else:
        sources = [s for s in (config.jwt_public_key_file, config.jwt_jwks_file) if s]
        if len(sources) != 1:
            raise ConfigError(env_name("jwt_public_key_file"),
                              "set exactly one of FLUX_AGENT_JWT_PUBLIC_KEY_FILE and "
                              "FLUX_AGENT_JWT_JWKS_FILE")


KUBE_AUDIENCE = "flux-agent"  # the audience of the tokens the injector projects


def _check_kubernetes(config: AgentConfig) -> None:
    if config.api_keys_file or config.jwt_hs256_secret:
        raise ConfigError(env_name("auth"), "kubernetes takes service-account tokens only")
    if not config.kube_bindings:
        raise ConfigError(env_name("kube_bindings"), "required when FLUX_AGENT_AUTH is "
                          "kubernetes (NAMESPACE[/SERVICEACCOUNT]=AGENCY[:ROLE], ...)")
    _check_jwt(config)


def _is_loopback(host: str) -> bool:
    """Decided by address, never by name: a literal address must be loopback; a name must
    resolve, and every address it resolves to must be (``127.example.com`` is no loopback)."""
    try:
        addresses = [ipaddress.ip_address(host)]
    except ValueError:
        try:
            infos = _socket.getaddrinfo(host, None, proto=_socket.IPPROTO_TCP)
        except (OSError, UnicodeError):
            return False
        addresses = [ipaddress.ip_address(str(info[4][0]).split("%", 1)[0]) for info in infos]
    return bool(addresses) and all(
        a.is_loopback or (isinstance(a, ipaddress.IPv6Address) and a.ipv4_mapped is not None
                          and a.ipv4_mapped.is_loopback)
        for a in addresses)


def settings_table() -> str:
    """The configuration table of docs/configuration.md, generated from the declarations above."""
    rows = ["| environment | flag | default | meaning |", "|---|---|---|---|"]
    for f in SETTINGS:
        env = f"`{env_name(f.name)}`"
        if f.metadata["secret"]:
            env += f" (or `{env_name(f.name)}_FILE`)"
        rows.append(f"| {env} | `{flag_name(f.name)}` | {shown_default(f)} | "
                    f"{f.metadata['doc']} |")
    return "\n".join(rows)


def shown_default(f: dataclasses.Field[Any]) -> str:
    """A setting's default as docs/configuration.md and ``--help`` show it."""
    shown: str | None = f.metadata["shown"]
    if shown:
        return shown
    return "`" + str(f.default).lower() + "`" if isinstance(f.default, bool) else f"`{f.default}`"


def effective_settings(config: AgentConfig) -> dict[str, Any]:
    """Every setting as the agent will use it (derived defaults filled in), secrets redacted:
    what ``flux-agent validate`` prints. ``None`` for an unset secret."""
    out: dict[str, Any] = {}
    for f in SETTINGS:
        value = getattr(config, f.name)
        if f.name == "database_url":
            value = redact_dsn(value) if value else None
        elif f.metadata["secret"]:
            value = "***" if value else None
        elif f.name == "state_dir":
            value = str(config.state_path)
        elif f.name == "socket":
            value = str(config.socket_path) if config.socket_path else "off"
        elif f.name == "agent_id":
            value = config.effective_agent_id
        elif f.name in ("listen", "admin_listen") and not value:
            value = "off"
        elif isinstance(value, tuple):
            value = list(value)
        out[f.name] = value
    return out


def defaulted(config: AgentConfig) -> set[str]:
    """The settings ``config`` leaves at their declared default."""
    return {f.name for f in SETTINGS if getattr(config, f.name) == f.default}


def to_toml(values: Mapping[str, Any], defaults: Collection[str] = ()) -> str:
    """``values`` as a flat TOML file that ``--config`` reads back. Settings named in
    ``defaults`` are shown as comments, so that reading the file back leaves them to their
    default (which a parser may not accept spelled out); ``None`` is a comment too (TOML has
    no null)."""
    lines = []
    for key, value in values.items():
        if value is None:
            lines.append(f"# {key}: unset")
            continue
        if isinstance(value, bool):
            text = "true" if value else "false"
        elif isinstance(value, int | float):
            text = repr(value)
        elif isinstance(value, list):
            text = f"[{', '.join(_toml_string(v) for v in value)}]"
        else:
            text = _toml_string(str(value))
        lines.append(f"# {key} = {text}  (default)" if key in defaults else f"{key} = {text}")
    return "\n".join(lines) + "\n"


def _toml_string(text: str) -> str:
    return json.dumps(text, ensure_ascii=False)  # every JSON string escape is TOML's too
