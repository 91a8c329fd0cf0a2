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
import time
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType
from typing import TYPE_CHECKING, Any
from urllib.parse import urlsplit

from aiohttp import web

from ..checkpoints.ledger import Checkpoints
from ..core.errors import ConfigError
from ..core.event import CheckpointRecord, EventsRecord, decode_record
from ..core.files import is_resource_error, reason
from ..core.settings import AgentConfig, env_name, redact_dsn, split_hostport
from ..flush.batch import Limits
from ..flush.flusher import Flusher
from ..intake.admin import admin_app
from ..intake.app import Intake
from ..intake.audit import Auditor
from ..intake.auth import Authenticator
from ..intake.seen import SeenIndex
from ..intake.server import AccessLogger, HttpLimits, ProblemAppRunner, tcp_port
from ..intake.validate import EventChecker
from ..obs import logs
from ..obs.metrics import Metrics
from ..obs.supervise import Supervisor
from ..obs.tracing import Tracing, make_tracing
from ..postgres.embedded import LocalPostgres
from ..postgres.pool import Postgres, Timeouts, UnsafeRole, classify, describe, is_transient
from ..postgres.sink import PartitionStats, SchemaNotReady, Sink, bootstrap_database
from ..postgres.store import Store
from ..spool import Recovery, Spool
from .background import Background
from .probes import Probes
from .setup import (
    ACCEPT_BACKLOG,
    EMBEDDED_DATABASE,
    EMBEDDED_LOGIN_ROLE,
    SUPERUSER_NOTE,
    bounded,
    claim_state_dir,
    clear_stale_socket,
    connection_caps,
    embedded_connect,
    preflight,
)

if TYPE_CHECKING:
    pass


log = logging.getLogger("flux_agent.agent")


@dataclass(slots=True)
class Endpoints:
    event_url: str | None = None
    socket_path: Path | None = None
    admin_url: str | None = None


class Agent(Background, Probes):
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
            self._state_lock = await loop.run_in_executor(None, claim_state_dir, config)
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
            await loop.run_in_executor(None, clear_stale_socket, path)
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
