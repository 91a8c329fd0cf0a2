"""The composition root: builds the pipeline and runs its lifecycle.

Start downstream first (database, spool and its recovery, flusher) and the listeners last, so
every stage has a running consumer before anything can reach it. Stop upstream first: refuse
new requests, finish those in flight, flush until the deadline, then close the database pool
and the spool. What was not flushed stays on the spool for the next start.
"""

from __future__ import annotations

import asyncio
import dataclasses
import functools
import logging
import os
import resource
import socket
import time
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from types import TracebackType
from typing import TYPE_CHECKING, Any
from urllib.parse import urlsplit

from aiohttp import web

from . import logs
from ._files import is_resource_error, lock_exclusive, reason, write_atomic
from .audit import Auditor
from .auth import ApiKeyAuthenticator, Authenticator, FixedAgency, load_api_keys
from .batch import Limits
from .checkpoints import Checkpoints
from .config import KUBE_AUDIENCE, AgentConfig, env_name, redact_dsn, split_hostport
from .embedded import LocalPostgres
from .errors import ConfigError
from .event import CheckpointRecord, EventsRecord, decode_record
from .flush import Flusher
from .http.admin import admin_app
from .http.intake import Intake
from .http.server import AccessLogger, HttpLimits, ProblemAppRunner, tcp_port
from .metrics import Metrics
from .postgres import (
    Postgres,
    Timeouts,
    UnsafeRole,
    classify,
    describe,
    is_transient,
    sqlstate_of,
)
from .seen import SeenIndex
from .sink import PartitionStats, SchemaNotReady, Sink, bootstrap_database
from .spool import Recovery, Spool
from .store import Store
from .supervise import Supervisor
from .tracing import Tracing, make_tracing
from .validate import EventChecker, Schemas

if TYPE_CHECKING:
    from .tokens import KeySet

log = logging.getLogger("flux_agent.agent")

SEEN_SNAPSHOT_INTERVAL = 30.0
EMBEDDED_CHECK_INTERVAL = 5.0
EMBEDDED_LOGIN_ROLE = "flux_agent_local"
EMBEDDED_DATABASE = "flux"
# HTTP connections (see connection_caps).
ACCEPT_BACKLOG = 128  # aiohttp's own; a Unix socket refuses connects beyond it at once
DESCRIPTOR_SPARE = 64
MIN_CONNECTIONS = 4
ADMIN_MAX_CONNECTIONS = 64
AUTO_MAX_CONNECTIONS = 1024
SUPERUSER_NOTE = ("the superuser bypasses row-level security and can UPDATE and DELETE the "
                  "append-only tables")
PARTITION_STEPS_PER_ROUND = 200  # creations, then drops; the next round goes on


@dataclass(slots=True)
class Endpoints:
    event_url: str | None = None
    socket_path: Path | None = None
    admin_url: str | None = None


class Agent:
    """``async with Agent(config) as agent:`` runs the whole sidecar in the current loop."""

    def __init__(self, config: AgentConfig, *, authenticator: Authenticator | None = None,
                 span_exporter: Any = None) -> None:
        self.config = config
        self.metrics = Metrics()
        self.endpoints = Endpoints()
        self.exit_requested = asyncio.Event()
        self.recovery: Recovery | None = None
        self.started_at = 0.0
        self._authenticator = authenticator
        self._span_exporter = span_exporter
        self.tracing: Tracing = Tracing()
        self._embedded: LocalPostgres | None = None
        self._state_lock = -1  # fd holding <state dir>/agent.lock while the agent runs
        self._runners: list[web.AppRunner] = []
        self.supervisor = Supervisor(
            on_failure=lambda task: self.metrics.task_failures.labels(task).inc(),
            dead_after=config.live_fail_after)
        self._state = "new"  # new -> starting -> running -> draining -> stopped
        self._stop_lock = asyncio.Lock()
        self.spool: Spool | None = None
        self.pg: Postgres | None = None
        self.sink: Sink | None = None
        self.flusher: Flusher | None = None
        self.intake: Intake | None = None
        self.auditor: Auditor | None = None
        self.store: Store | None = None
        self.checkpoints: Checkpoints | None = None
        self.retention_rounds = 0
        self.purged: dict[str, int] = {}
        self.partition_counts = dict.fromkeys(("created", "dropped", "moved_rows",
                                               "lock_timeouts"), 0)
        self.partition_stats: PartitionStats | None = None
        self.partition_stats_at = 0.0
        self.embedded_restarts = 0
        self.seen = SeenIndex(config.dedupe_index_size)
        self._snapshot_warned = False

    # ---------------------------------------------------------------- lifecycle

    async def __aenter__(self) -> Agent:
        await self.start()
        return self

    async def __aexit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                        tb: TracebackType | None) -> None:
        await self.stop()

    async def start(self) -> None:
        if self._state != "new":
            raise RuntimeError("an Agent starts once")
        self._state = "starting"
        self.started_at = time.time()
        config = self.config
        loop = asyncio.get_running_loop()
        # Schema, manifest and key files are read in a worker thread: a slow disk must not
        # stall the event loop (nothing else runs yet, but embedders' loops may).
        schemas, authenticator = await loop.run_in_executor(None, preflight, config,
                                                            self._authenticator)
        self.tracing = make_tracing(config.tracing, self._span_exporter)
        try:
            # The state dir is this agent's alone, the embedded PostgreSQL under it included:
            # lock it before touching anything in it, so that a second agent started on the
            # same dir fails here instead of stopping the first one's database on its way out.
            state_dir = config.state_path
            self._state_lock = await loop.run_in_executor(None, _claim_state_dir, config)
            dsn = await self._database()
            self.pg = Postgres(
                dsn, max_connections=config.flush_lanes + 2, pgbouncer=config.database_pgbouncer,
                timeouts=Timeouts(connect=config.database_connect_timeout,
                                  statement=config.database_statement_timeout,
                                  flush=config.flush_timeout, idle=config.database_idle_timeout),
                identity_path=state_dir / "primary")
            self.sink = Sink(self.pg, migrate_on_connect=config.migrate)
            await self._check_database()
            self.store = Store(self.pg)

            await loop.run_in_executor(None, self._restore, state_dir / "seen.idx",
                                       self.seen.load)
            self.spool = Spool(config.spool_dir, max_bytes=config.spool_max_bytes,
                               segment_bytes=config.spool_segment_bytes,
                               fsync=config.spool_durability == "fsync",
                               on_recover_record=self._recovered_record,
                               keep_committed=config.spool_keep_committed,
                               supervisor=self.supervisor,
                               sync_log=Path(config.spool_sync_log)
                               if config.spool_sync_log else None)
            self.checkpoints = Checkpoints(
                self.spool, self.store, schemas, max_bytes=config.event_max_bytes,
                committed=lambda: self.flusher.committed_seq if self.flusher else 0)
            # Versions known before the restart first; saves still on the spool then
            # replace them as recovery finds them.
            await loop.run_in_executor(None, self._restore, state_dir / "checkpoints.idx",
                                       self.checkpoints.load_snapshot)
            self.recovery = await self.spool.open()
            if self.recovery is not None:
                log.info("spool recovered", extra={"fields": {
                    "directory": str(config.spool_dir),
                    "segments": self.recovery.segments,
                    "pending_records": self.recovery.pending_records,
                    "torn_tails": self.recovery.torn_tails,
                    "quarantined": self.recovery.quarantined,
                }})
            self.flusher = Flusher(
                self.spool, self.sink,
                limits=Limits(config.batch_max_events * config.flush_lanes,
                              config.batch_max_bytes, config.batch_max_age),
                lanes=config.flush_lanes, retry_max=config.flush_retry_max,
                memory_bytes=config.memory_queue_bytes, classify=classify,
                describe=describe, observe=self.metrics.observe_flush,
                tracing=self.tracing,
            )
            self.flusher.on_progress = lambda: self.supervisor.ok("flusher")
            self.pg.on_new_primary = self._new_primary
            self.supervisor.start("flusher", self.flusher.run)
            self.metrics.add_state(self._metric_state)
            self.metrics.known_labels(schemas.manifest.retention_days)
            self.auditor = Auditor(self.spool,
                                   on_drop=lambda reason: self.metrics.audit_dropped.labels(
                                       reason).inc())
            self.intake = Intake(
                config=config, checker=EventChecker(schemas, config.event_max_bytes),
                manifest=schemas.manifest, spool=self.spool, flusher=self.flusher,
                seen=self.seen, authenticator=authenticator, metrics=self.metrics,
                checkpoints=self.checkpoints, store=self.store, auditor=self.auditor,
                tracing=self.tracing, drain=self._drain_request,
            )
            await self._listen(self.intake.app(), admin_app(self, self.metrics, authenticator))
            self.intake.servers = [u for u in (self.endpoints.event_url,) if u]
            self.intake.admin_servers = [u for u in (self.endpoints.admin_url,) if u]
            sup = self.supervisor
            sup.start("snapshots", self._snapshot_loop, critical=False)
            if config.database_ping_interval > 0:
                sup.start("ping", self._ping_loop, critical=False)
            if config.retention_interval > 0:
                sup.start("retention", lambda: self._retention_loop(
                    schemas.manifest.retention_days), critical=False)
            if config.auth in ("jwt", "kubernetes") and config.jwt_jwks_file:
                jwt_auth = getattr(authenticator, "tokens", None) or authenticator
                sup.start("jwks", lambda: self._watch_jwks(
                    jwt_auth, Path(config.jwt_jwks_file)), critical=False)
            if self._embedded is not None:
                sup.start("embedded-db", self._watch_embedded)
            self.auditor.record("agent.start", success=True, detail={
                "auth": config.auth, "agent_id": config.effective_agent_id})
        except BaseException:
            await self._shutdown(drain=False)
            raise
        self._state = "running"
        log.info("agent ready", extra={"fields": {
            "event_url": self.endpoints.event_url,
            "socket": str(self.endpoints.socket_path) if self.endpoints.socket_path else None,
            "admin_url": self.endpoints.admin_url,
            "database": redact_dsn(config.database_url),
            "auth": config.auth,
            "durability": config.spool_durability,
            "spool_writable": self.spool.broken is None,
        }})
        if config.auth == "none":
            log.warning("AUTHENTICATION IS OFF: every local caller writes as agency %r",
                        config.agency)

    @staticmethod
    def _restore(path: Path, load: Any) -> int:
        """Read a snapshot file (worker thread); a missing or damaged one costs nothing."""
        try:
            data = path.read_bytes()
        except OSError:
            return 0
        try:
            return int(load(data))
        except ValueError:
            return 0

    async def stop(self) -> bool:
        """Drain and stop; safe twice and without start. True if everything was flushed."""
        async with self._stop_lock:
            if self._state in ("new", "stopped"):
                self._state = "stopped"
                return True
            return await self._shutdown(drain=True)

    async def _shutdown(self, *, drain: bool) -> bool:
        """Every step runs, whatever an earlier one raised: a failing snapshot must not
        leave the spool, the pool, the embedded database or the state-dir lock open."""
        config = self.config
        deadline = time.monotonic() + config.drain_timeout
        flushed = False
        stopping_early = self._state == "starting"
        self._state = "draining"

        async def step(what: str, action: Any) -> None:
            try:
                await action()
            except Exception as exc:
                if is_resource_error(exc):  # a full disk at shutdown: expected, no traceback
                    log.warning("shutdown step failed: %s", what,
                                extra={"fields": {"error": reason(exc)}})
                else:
                    log.exception("shutdown step failed: %s", what)

        if self.intake is not None:
            self.intake.draining = True
            intake = self.intake
            await step("finish requests", lambda: intake.wait_idle(
                max(0.0, min(5.0, deadline - time.monotonic()))))
        if self.flusher is not None:
            if drain:
                async def drain_flusher() -> None:
                    nonlocal flushed
                    assert self.flusher is not None
                    flushed = await self.flusher.drain(max(0.0, deadline - time.monotonic()))
                    if not flushed:
                        log.warning("drain deadline reached; the rest stays on the spool",
                                    extra={"fields": {"backlog_records": self.flusher.backlog}})
                await step("drain", drain_flusher)
            await step("stop the flusher", lambda: self.supervisor.stop("flusher"))
            self.flusher.cancel_waiters()
        for runner in reversed(self._runners):
            await step("close a listener", runner.cleanup)
        self._runners.clear()
        for name in ("snapshots", "ping", "retention", "jwks", "embedded-db"):
            await step(f"stop {name}", functools.partial(self.supervisor.stop, name))
        if self.pg is not None:
            await step("close the database pool", self.pg.close)
        if self.spool is not None:
            await step("close the spool", self.spool.close)
            await step("save the snapshots", self._save_snapshots)
        await step("stop the remaining tasks", self.supervisor.stop)
        if self.endpoints.socket_path is not None:
            await step("remove the socket", functools.partial(
                asyncio.get_running_loop().run_in_executor, None, functools.partial(
                    self.endpoints.socket_path.unlink, missing_ok=True)))
        self.tracing.shutdown()  # exports what is still buffered
        if self._embedded is not None:
            embedded, self._embedded = self._embedded, None
            await step("stop the embedded PostgreSQL", lambda: asyncio.get_running_loop()
                       .run_in_executor(None, embedded.stop))
        if self._state_lock >= 0:
            os.close(self._state_lock)
            self._state_lock = -1
        self._state = "stopped"
        if stopping_early:
            log.info("agent did not start; nothing was accepted")
        else:
            log.info("agent stopped", extra={"fields": {"flushed_everything": flushed}})
        return flushed

    async def _drain_request(self) -> dict[str, Any]:
        """``POST /v1/drain``: flush now, then ask the process to exit."""
        assert self.intake is not None
        assert self.flusher is not None
        self._state = "draining"
        self.intake.draining = True
        await self.intake.wait_idle(5.0)
        flushed = await self.flusher.drain(self.config.drain_timeout)
        self.exit_requested.set()
        return {"drained": flushed, "backlog_records": self.flusher.backlog}

    # ---------------------------------------------------------------- parts

    @staticmethod
    def _make_authenticator(config: AgentConfig, schemas: Schemas) -> Authenticator:
        if config.auth == "none":
            return FixedAgency(config.agency)
        tokens: Authenticator | None = None
        if config.auth == "kubernetes":
            from .tokens import JwtAuthenticator, ServiceAccountBindings

            try:
                bindings = ServiceAccountBindings(config.kube_bindings)
            except ValueError as exc:
                raise ConfigError(env_name("kube_bindings"), str(exc)) from None
            for agency, _ in bindings.bindings.values():
                if not schemas.manifest.knows(agency):
                    raise ConfigError(env_name("kube_bindings"),
                                      f"{agency!r} is not in the agency manifest")
            return JwtAuthenticator(
                _load_keys(config), algorithms=config.jwt_algorithms,
                issuers=config.jwt_issuers, audience=config.jwt_audience or KUBE_AUDIENCE,
                leeway=config.jwt_leeway, claims=bindings)
        if config.jwt_issuers:
            from .tokens import JwtAuthenticator  # only jwt mode pays for pyjwt + cryptography

            if config.jwt_hs256_secret:
                logs.register_secret(config.jwt_hs256_secret.reveal())
            tokens = JwtAuthenticator(
                _load_keys(config), algorithms=config.jwt_algorithms,
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

    async def _watch_jwks(self, authenticator: Authenticator, path: Path) -> None:
        """Key rotation: re-read the JWKS file when it changes (checked every 2 s)."""
        loop = asyncio.get_running_loop()
        last = _stamp(path)
        while True:
            await asyncio.sleep(2.0)
            stamp = await loop.run_in_executor(None, _stamp, path)
            if stamp == last:
                continue
            last = stamp
            try:
                keys = await loop.run_in_executor(None, _load_keys, self.config)
            except (OSError, ValueError) as exc:
                log.error("JWKS file unreadable; keeping the previous keys",
                          extra={"fields": {"path": str(path), "error": str(exc)}})
                continue
            authenticator.set_keys(keys)  # type: ignore[attr-defined]
            log.info("JWKS reloaded", extra={"fields": {"path": str(path),
                                                         "keys": len(keys.by_kid)}})

    async def _database(self) -> str:
        config = self.config
        if config.database_url:
            dsn = config.database_url.reveal()
            logs.register_secret(urlsplit(dsn).password)
            return dsn
        loop = asyncio.get_running_loop()
        pg = LocalPostgres(config.state_path / "postgres")
        self._embedded = pg
        await loop.run_in_executor(None, pg.start)
        await bootstrap_database(pg.dsn(), pg.dsn(database=EMBEDDED_DATABASE),
                                 EMBEDDED_DATABASE, EMBEDDED_LOGIN_ROLE)
        dsn = pg.dsn(user=EMBEDDED_LOGIN_ROLE, database=EMBEDDED_DATABASE)
        log.info("embedded PostgreSQL running", extra={"fields": {
            "data_dir": str(pg.data_dir), "binaries": str(pg.bin_dir),
            "url": pg.dsn(database=EMBEDDED_DATABASE),
            **embedded_connect(pg, config.agency if config.auth == "none" else ""),
            "warning": f"url and connect_superuser log in as postgres: {SUPERUSER_NOTE}; "
                       "connect is the agent's own role, under row-level security",
        }})
        return dsn

    async def _check_database(self) -> None:
        """Migrate and check the login role now if PostgreSQL is up; later if it is not.
        A login role that bypasses row-level security is refused in every mode."""
        assert self.sink is not None
        try:
            applied = await bounded(self.sink.ensure_schema(), 30)
        except UnsafeRole as exc:
            raise ConfigError(env_name("database_url"), str(exc)) from None
        except (SchemaNotReady, TimeoutError) as exc:
            log.warning("PostgreSQL schema not ready at start; events will be spooled",
                        extra={"fields": {"error": describe(exc)}})
            return
        except Exception as exc:
            if not is_transient(exc):
                log.error("PostgreSQL check failed at start; events will be spooled",
                          exc_info=exc, extra={"fields": {"error": describe(exc)}})
            else:
                log.warning("PostgreSQL not reachable at start; events will be spooled",
                            extra={"fields": {"error": describe(exc)}})
            return
        if applied:
            log.info("migrations applied", extra={"fields": {"versions": applied}})

    async def _listen(self, events: web.Application, admin: web.Application) -> None:
        config = self.config
        loop = asyncio.get_running_loop()
        caps = await loop.run_in_executor(None, connection_caps, config, config.flush_lanes + 2)
        limits = HttpLimits(idle_timeout=config.http_idle_timeout,
                            header_timeout=config.http_header_timeout,
                            max_connections={"tcp": caps["tcp"], "unix": caps["unix"]},
                            max_chunk=config.request_max_bytes)
        log.info("HTTP connection limits", extra={"fields": caps})
        runner = ProblemAppRunner(events, limits=limits,
                                  access_log=logging.getLogger("aiohttp.access"),
                                  access_log_class=AccessLogger, handle_signals=False)
        await runner.setup()
        self._runners.append(runner)
        if config.listen:
            host, port = split_hostport(config.listen)
            site = web.TCPSite(runner, host, port, reuse_address=True, backlog=ACCEPT_BACKLOG)
            await site.start()
            bound = tcp_port(runner)
            shown = f"[{host}]" if ":" in host else host
            self.endpoints.event_url = f"http://{shown}:{bound}"
        path = config.socket_path
        if path is not None:
            await loop.run_in_executor(None, _clear_stale_socket, path)
            usite = web.UnixSite(runner, str(path), backlog=ACCEPT_BACKLOG)
            await usite.start()
            await loop.run_in_executor(None, os.chmod, path, 0o660)
            self.endpoints.socket_path = path
        if config.admin_listen:
            admin_limits = dataclasses.replace(limits, max_connections={"tcp": caps["admin"]})
            admin_runner = ProblemAppRunner(admin, limits=admin_limits, access_log=None,
                                            handle_signals=False)
            await admin_runner.setup()
            self._runners.append(admin_runner)
            host, port = split_hostport(config.admin_listen)
            asite = web.TCPSite(admin_runner, host, port, reuse_address=True,
                                backlog=ACCEPT_BACKLOG)
            await asite.start()
            shown = f"[{host}]" if ":" in host else host
            self.endpoints.admin_url = f"http://{shown}:{tcp_port(admin_runner)}"

    def _recovered_record(self, seq: int, payload: bytes) -> None:
        record = decode_record(payload)
        if isinstance(record, CheckpointRecord) and self.checkpoints is not None:
            self.checkpoints.recovered(seq, record)
        if isinstance(record, EventsRecord | CheckpointRecord):
            for row in record.rows:
                self.seen.add((row.agency_id, row.event_id),
                              (int(row.payload_sha256[:8], 16), seq, None))

    def _new_primary(self, previous: tuple[str, str] | None, now: tuple[str, str]) -> None:
        """Connected to another primary than before: replay what it may lack."""
        if previous is None or self.spool is None or self.flusher is None:
            return
        window = self.config.spool_keep_committed
        if window <= 0:
            log.warning("new PostgreSQL primary, and no failover window is kept "
                        f"({env_name('spool_keep_committed')}=0): nothing is replayed")
            return
        self.flusher.replay(self.spool.replay_start(window))

    async def _save_snapshots(self) -> None:
        """What the agent remembers across restarts besides the spool: recently seen event
        ids (duplicate reporting) and checkpoint versions (version assignment). The copies
        are taken here, on the loop, where those indexes change; only the bytes go to a
        worker thread."""
        state = self.config.state_path
        files = [(state / "seen.idx", self.seen.dump())]
        if self.checkpoints is not None:
            files.append((state / "checkpoints.idx", self.checkpoints.dump()))
        loop = asyncio.get_running_loop()
        for path, data in files:
            await loop.run_in_executor(None, write_atomic, path, data)

    async def _snapshot_loop(self) -> None:
        while True:
            await asyncio.sleep(SEEN_SNAPSHOT_INTERVAL)
            try:
                await self._save_snapshots()
            except OSError as exc:
                if not is_resource_error(exc):
                    raise
                # A full disk: the snapshot only saves work at the next start. Say it once.
                if not self._snapshot_warned:
                    log.warning("could not save the agent's snapshots; retrying",
                                extra={"fields": {"error": reason(exc)}})
                self._snapshot_warned = True
            else:
                if self._snapshot_warned:
                    log.info("the agent's snapshots are saved again")
                self._snapshot_warned = False
                self.supervisor.ok("snapshots")

    async def _ping_loop(self) -> None:
        """An idle agent still learns when PostgreSQL goes away or comes back (readiness's
        ``database``, flux_postgres_up) with one query per interval, and none while flushes
        or reads prove it anyway."""
        assert self.pg is not None
        pg = self.pg
        interval = self.config.database_ping_interval
        was = pg.state(interval * 2)
        while True:
            await asyncio.sleep(interval)
            if pg.last_ok is not None and time.monotonic() - pg.last_ok < interval \
                    and pg.state(interval) == "up":
                continue  # something else talked to PostgreSQL recently
            try:
                await pg.ping()
            except Exception as exc:
                if not is_transient(exc) and not isinstance(exc, UnsafeRole):
                    raise
            now = pg.state(interval * 2)
            if now != was:
                if now == "down":
                    log.warning("PostgreSQL unreachable", extra={"fields": {
                        "error": pg.last_error}})
                elif was == "down":
                    log.info("PostgreSQL reachable again")
                was = now
            self.supervisor.ok("ping")

    async def _watch_embedded(self) -> None:
        """The embedded PostgreSQL is the agent's child: restart it when it stops."""
        loop = asyncio.get_running_loop()
        while True:
            await asyncio.sleep(EMBEDDED_CHECK_INTERVAL)
            embedded = self._embedded
            if embedded is None:
                return
            if await loop.run_in_executor(None, embedded.running_pid) is not None:
                continue
            log.error("the embedded PostgreSQL stopped; restarting it",
                      extra={"fields": {"data_dir": str(embedded.data_dir)}})
            await loop.run_in_executor(None, embedded.start)  # raises: supervisor retries
            self.embedded_restarts += 1
            log.info("the embedded PostgreSQL is running again",
                     extra={"fields": {"restarts": self.embedded_restarts}})
            self.supervisor.ok("embedded-db")

    async def _retention_loop(self, agencies: Mapping[str, int]) -> None:
        """Retention, in one agent at a time (a lease): keep the time partitions of
        ``flux.events`` ahead and drop those whose rows have all expired, then delete what
        expires row by row (events outside the time partitions, checkpoints, dead letters,
        audit entries past the database's policy) in small batches."""
        assert self.sink is not None
        sink = self.sink
        interval = self.config.retention_interval
        holder = f"{self.config.effective_agent_id}/{os.getpid()}/{os.urandom(4).hex()}"
        # The lease outlives a round and the pause before the next one, so the holder keeps
        # it; if the holder dies, another agent takes over once it expires.
        lease = interval * 3 + 30
        while True:
            await asyncio.sleep(interval)
            try:
                if not await sink.claim_lease("retention", holder, lease):
                    continue
                self.retention_rounds += 1
                await self._maintain_partitions(agencies)
                # Renewed between the phases: a first round after an upgrade may be long.
                if not await sink.claim_lease("retention", holder, lease):
                    continue
                await self._purge_expired(agencies)
            except Exception as exc:
                if not is_transient(exc):
                    raise  # the supervisor logs it with its traceback and restarts the loop
                log.warning("retention round failed; retrying next round",
                            extra={"fields": {"error": describe(exc)}})
            else:
                self.supervisor.ok("retention")

    async def _maintain_partitions(self, agencies: Mapping[str, int]) -> None:
        """Partitions of ``flux.events`` (sql/007): create the missing ones up to the premake
        horizon, then drop the expired ones, one short step (one transaction) at a time."""
        assert self.sink is not None
        sink, config, counts = self.sink, self.config, self.partition_counts
        try:
            for _ in range(PARTITION_STEPS_PER_ROUND):
                made = await sink.prepare_partition(
                    sorted(agencies), config.partition_interval, config.partition_premake,
                    config.partition_lock_timeout)
                if made is None:
                    break
                counts["created"] += 1
                counts["moved_rows"] += made[1]
                log.info("partition created", extra={"fields": {
                    "partition": made[0], "moved_rows": made[1]}})
            for _ in range(PARTITION_STEPS_PER_ROUND):
                gone = await sink.drop_expired_partition(agencies, config.partition_lock_timeout)
                if gone is None:
                    break
                counts["dropped"] += 1
                log.info("expired partition dropped", extra={"fields": {
                    "partition": gone[0], "level": gone[1]}})
                await asyncio.sleep(0.05)  # let ingestion have the lock in between
        except Exception as exc:
            if sqlstate_of(exc) != "55P03":  # lock_not_available: busy now, next round
                raise
            counts["lock_timeouts"] += 1
            log.warning("partition maintenance did not get its lock in time; next round",
                        extra={"fields": {"error": describe(exc),
                                          "lock_timeout_s": config.partition_lock_timeout}})
        self.partition_stats = await sink.partition_stats()
        self.partition_stats_at = time.monotonic()

    async def _purge_expired(self, agencies: Mapping[str, int]) -> None:
        """Expired rows that do not leave with a partition, in small batches per agency."""
        assert self.sink is not None
        sink, batch = self.sink, self.config.retention_batch
        for agency, days in agencies.items():
            await self._purge_batches(functools.partial(sink.purge, agency, batch),
                                      ("events", "checkpoint_history", "checkpoints"))
            keep = self.config.dead_letter_retention or days * 86400.0
            await self._purge_batches(
                functools.partial(sink.purge_dead_letters, agency, keep, batch),
                ("dead_letters",))
        await self._purge_batches(functools.partial(sink.purge_audit_log, batch), ("audit_log",))

    async def _purge_batches(self, purge: Callable[[], Awaitable[int | tuple[int, ...]]],
                             tables: tuple[str, ...]) -> None:
        batch = self.config.retention_batch
        while True:
            got = await purge()
            counts = (got,) if isinstance(got, int) else got
            for table, n in zip(tables, counts, strict=True):
                self.purged[table] = self.purged.get(table, 0) + n
            if max(counts) < batch:
                return
            await asyncio.sleep(0.05)  # let ingestion have the database

    # ---------------------------------------------------------------- health and metrics

    def _db_window(self) -> float:
        return max(30.0, 2 * self.config.database_ping_interval)

    def readiness(self) -> tuple[bool, dict[str, Any]]:
        reasons = []
        spool, flusher = self.spool, self.flusher
        if self._state != "running":
            reasons.append(self._state)
        body: dict[str, Any] = {"database": "unknown", "spool": {}}
        if self.pg is not None:
            body["database"] = self.pg.state(self._db_window())
            role = self.pg.role
            if role is not None and role.privileged:
                reasons.append("database_role_unsafe")
        if flusher is not None:
            stalled = flusher.stalled_for()
            if stalled > self.config.ready_stall_after:
                reasons.append("flush_stalled")
        for task in self.supervisor.failing():
            reasons.append(f"task_failing:{task}")
        if spool is not None:
            used = spool.bytes_used
            body["spool"] = {
                "bytes": used, "max_bytes": spool.max_bytes,
                "backlog_records": flusher.backlog if flusher else 0,
                "writable": spool.broken is None,
            }
            if spool.broken is not None:
                reasons.append("spool_unwritable")
                body["spool"]["error"] = spool.broken
            if used + self.config.request_max_bytes > spool.max_bytes:
                reasons.append("spool_full")
        if reasons:
            body["reasons"] = reasons
        return not reasons, body

    def liveness(self) -> tuple[bool, dict[str, Any]]:
        """Fails only for what a restart can fix: a background task failing for longer
        than ``live_fail_after``."""
        dead = self.supervisor.dead()
        return not dead, ({"failing_tasks": dead} if dead else {})

    async def diagnostics(self) -> dict[str, Any]:
        out: dict[str, Any] = {"uptime_s": round(time.time() - self.started_at, 3)}
        database: dict[str, Any] = {}
        if self.sink is not None:
            try:
                database["latency_ms"] = round(await self.sink.ping() * 1000, 3)
                database["schema_version"] = await self.sink.schema_version()
                database["status"] = "up"
            except Exception as exc:  # noqa: BLE001 - a diagnostic reports any failure
                database["status"] = "down"
                database["error"] = logs.scrub(describe(exc))
        out["database"] = database
        if self.spool is not None and self.flusher is not None:
            out["spool"] = {
                "bytes": self.spool.bytes_used,
                "max_bytes": self.spool.max_bytes,
                "writable": self.spool.broken is None,
                "segments": len(self.spool.segments),
                "backlog_records": self.flusher.backlog,
                "oldest_unflushed_age_s": round(self.spool.oldest_unflushed_age(), 3),
                "retained_bytes": self.spool.retained_bytes,
            }
            out["flush"] = {
                "last_flush_at": _rfc3339(self.flusher.last_flush_at),
                "last_error": logs.scrub(self.flusher.last_error or "") or None,
                "stalled_s": round(self.flusher.stalled_for(), 3),
            }
        out["tasks"] = {name: {**info, "last_error": logs.scrub(str(info["last_error"]))
                               if info["last_error"] else None}
                        for name, info in self.supervisor.describe().items()}
        return out

    def _metric_state(self) -> dict[str, Any]:
        spool, flusher = self.spool, self.flusher
        if spool is None or flusher is None:
            return {}
        rec = spool.recovery or Recovery()
        stats = flusher.stats
        pg_up = self.pg is not None and self.pg.state(float("inf")) == "up"
        return {
            "flux_events_flushed": stats.events_inserted,
            "flux_events_dead_lettered": stats.events_dead,
            "flux_flush_batches": stats.batches,
            "flux_flush_retries": stats.retries,
            "flux_spool_bytes": spool.bytes_used,
            "flux_spool_max_bytes": spool.max_bytes,
            "flux_spool_segments": len(spool.segments),
            "flux_spool_backlog_records": flusher.backlog,
            "flux_spool_oldest_unflushed_age_seconds": spool.oldest_unflushed_age(),
            "flux_spool_memory_queue_bytes": flusher.ring_bytes,
            "flux_spool_quarantined_segments": len(rec.quarantined),
            "flux_spool_torn_tails": rec.torn_tails,
            "flux_spool_corrupt_records": spool.corrupt_records,
            "flux_spool_write_errors": spool.write_errors,
            "flux_spool_cursor_errors": spool.cursor_errors,
            "flux_spool_read_errors": stats.read_errors,
            "flux_spool_writable": 0.0 if spool.broken else 1.0,
            "flux_spool_retained_bytes": spool.retained_bytes,
            "flux_spool_retained_evicted": spool.evicted_retained,
            "flux_failover_replays": stats.replays,
            "flux_failover_restored_events": stats.events_restored,
            "flux_postgres_up": 1.0 if pg_up else 0.0,
            "flux_flush_stalled_seconds": flusher.stalled_for(),
            "flux_ready": 1.0 if self.readiness()[0] else 0.0,
            "flux_checkpoint_queue_depth": self.checkpoints.pending() if self.checkpoints
            else 0,
            "flux_active_runs": self.intake.runs.counts() if self.intake else {},
            "flux_retention_purged_rows": dict(self.purged),
            **self._partition_metrics(),
        }

    def _partition_metrics(self) -> dict[str, Any]:
        counts = self.partition_counts
        out: dict[str, Any] = {
            "flux_event_partitions_created": counts["created"],
            "flux_event_partitions_dropped": counts["dropped"],
            "flux_event_partition_moved_rows": counts["moved_rows"],
            "flux_event_partition_lock_timeouts": counts["lock_timeouts"],
        }
        stats = self.partition_stats
        # Only the lease holder's view is current: another agent's would go stale.
        if stats is None or time.monotonic() - self.partition_stats_at > \
                3 * self.config.retention_interval + 60:
            return out
        out["flux_event_partitions"] = stats.ranges
        if stats.newest is not None:
            out["flux_event_partitions_ahead_seconds"] = stats.newest.timestamp() - time.time()
        out["flux_event_partition_rows_outside"] = {"default": stats.default_rows,
                                                    "unkeyed": stats.unkeyed_rows}
        return out


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


def preflight(config: AgentConfig, authenticator: Authenticator | None = None
              ) -> tuple[Schemas, Authenticator]:
    """What the agent checks before it touches its state dir, and all that ``flux-agent
    validate`` checks without a database: the agency manifest, the fixed agency, the keys.
    Reads files (call it from a worker thread); raises :class:`ConfigError`."""
    try:
        schemas = Schemas(manifest_path=Path(config.agency_manifest) if config.agency_manifest
                          else None)
    except ValueError as exc:
        raise ConfigError(env_name("agency_manifest"), str(exc)) from None
    if config.auth == "none" and not schemas.manifest.knows(config.agency):
        raise ConfigError(env_name("agency"), f"{config.agency!r} is not in the agency manifest")
    if authenticator is None:
        authenticator = Agent._make_authenticator(config, schemas)
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


def _rfc3339(epoch: float | None) -> str | None:
    if epoch is None:
        return None
    return datetime.fromtimestamp(epoch, UTC).isoformat(timespec="milliseconds").replace(
        "+00:00", "Z")


def _stamp(path: Path) -> tuple[float, int]:
    try:
        st = path.stat()
    except OSError:
        return (0.0, -1)
    return (st.st_mtime, st.st_size)


def _load_keys(config: AgentConfig) -> KeySet:
    """Read the configured verification keys (a ConfigError names the bad setting)."""
    from .tokens import KeySet

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


def _claim_state_dir(config: AgentConfig) -> int:
    """Worker thread: create (or tighten) the state dir and lock it for this agent."""
    state_dir = config.state_path
    _private_dir(state_dir, state_dir_mode(config))
    try:
        return lock_exclusive(state_dir / "agent.lock",
                              f"the state dir {state_dir} ({env_name('state_dir')})")
    except RuntimeError as exc:
        raise ConfigError(env_name("state_dir"), str(exc)) from None


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


def _clear_stale_socket(path: Path) -> None:
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
