"""The composition root: builds the pipeline in dependency order and runs its lifecycle.

Start downstream first (state dir, listeners bound, tracing, database, spool and its
recovery, flusher) and serve last, so every stage has a running consumer before anything
can reach it. Every stage registers its own stop on one exit stack as it starts, so teardown
is the reverse of startup by construction. ``stop()`` first finishes the work: refuse new
requests, finish those in flight, flush until the drain deadline; then the stack unwinds
(listeners, background tasks, flusher, spool, pool, embedded database, tracing, the lock).
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
import os
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from types import TracebackType
from typing import TYPE_CHECKING, Any

from aiohttp import web

from ..checkpoints.ledger import Checkpoints
from ..core.event import decode_record
from ..core.files import is_resource_error, reason
from ..core.settings import AgentConfig, redact_dsn
from ..flush.batch import Limits
from ..flush.flusher import Flusher
from ..forward import wire
from ..intake.admin import admin_app
from ..intake.answers import Answers
from ..intake.app import AggregatorApi, Authentication, EventApi
from ..intake.audit import Auditor
from ..intake.auth import Authenticator
from ..intake.body import BodyReader
from ..intake.memory import RequestMemory, records_cost
from ..intake.routes.checkpoint import CheckpointRoutes
from ..intake.routes.common import Commits, Gate, RequestAudit, Sealer
from ..intake.routes.drain import DrainRoutes
from ..intake.routes.ingest import Ingest
from ..intake.routes.lineage import LineageRoutes
from ..intake.routes.openapi import OpenAPIRoutes
from ..intake.routes.reads import ReadRoutes
from ..intake.routes.records import RecordsRoutes
from ..intake.runs import RunTracker
from ..intake.schemas import Contract
from ..intake.seen import SeenIndex
from ..intake.validate import EventChecker
from ..obs.metrics import Metrics
from ..obs.supervise import Supervisor, Task
from ..obs.tracing import Tracing, make_tracing
from ..spool import Recovery, Spool
from . import listeners, upstreams
from .listeners import Endpoints
from .probes import Probes, ProbeSettings
from .reload import JwksWatcher, Reloader
from .setup import bound_agencies, claim_state_dir, load_keys, preflight, record_endpoints
from .snapshots import Snapshots

if TYPE_CHECKING:
    from ..postgres.pool import Postgres
    from ..postgres.retention import Retention

log = logging.getLogger("flux_agent.agent")

DRAIN_IDLE_WAIT = 5.0  # seconds a drain waits for requests in flight


class Agent:
    """``async with Agent(config) as agent:`` runs the whole sidecar in the current loop."""

    def __init__(self, config: AgentConfig, *, authenticator: Authenticator | None = None,
                 span_exporter: Any = None) -> None:
        self.config = config
        self.metrics = Metrics()
        self.supervisor = Supervisor(
            on_failure=lambda task: self.metrics.task_failures.labels(task.value).inc(),
            dead_after=config.live_fail_after)
        self.endpoints = Endpoints()
        self.exit_requested = asyncio.Event()
        self.tracing = Tracing()
        self.seen = SeenIndex(config.dedupe_index_size)
        self.gate = Gate()
        self.runs = RunTracker()
        # The stages, built by start() in dependency order (None before).
        self.delivery: upstreams.Delivery | None = None
        self.spool: Spool | None = None
        self.recovery: Recovery | None = None
        self.flusher: Flusher | None = None
        self.checkpoints: Checkpoints | None = None
        self.snapshots: Snapshots | None = None
        self.api: EventApi | AggregatorApi | None = None
        self.probes: Probes | None = None
        self.authenticator: Authenticator | None = None
        self.contract: Contract | None = None  # the schemas in force (a reload swaps them)
        self.reloader: Reloader | None = None
        self.event_app: web.Application | None = None
        self.request_memory: RequestMemory | None = None
        self._authenticator = authenticator
        self._span_exporter = span_exporter
        self._stack = contextlib.AsyncExitStack()
        self._state = "new"  # new -> starting -> running -> draining -> stopped
        self._stop_lock = asyncio.Lock()

    # ---------------------------------------------------------------- lifecycle

    async def __aenter__(self) -> Agent:
        await self.start()
        return self

    async def __aexit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                        tb: TracebackType | None) -> None:
        await self.stop()

    @property
    def state(self) -> str:
        return self._state

    @property
    def pg(self) -> Postgres | None:
        """The PostgreSQL pool (None when the upstream is an aggregator)."""
        return self.delivery.pg if self.delivery is not None else None

    @property
    def retention(self) -> Retention | None:
        return self.delivery.retention if self.delivery is not None else None

    def abandon(self) -> None:
        """The process exits now, without its teardown (a second signal): the embedded
        PostgreSQL, its child, is asked to shut down on its own instead of being left running
        for the next start to find. The spool needs nothing: it is durable as it is."""
        embedded = self.delivery.embedded if self.delivery is not None else None
        if embedded is not None:
            embedded.request_stop()

    async def start(self) -> None:
        if self._state != "new":
            raise RuntimeError("an Agent starts once")
        self._state = "starting"
        try:
            await self._start()
        except BaseException:
            await self._teardown()
            self._state = "stopped"
            log.info("agent did not start; nothing was accepted")
            raise
        self._state = "running"
        config = self.config
        assert self.spool is not None
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

    async def _start(self) -> None:
        config, loop = self.config, asyncio.get_running_loop()
        # Schema, manifest and key files are read in a worker thread: a slow disk must not
        # stall the event loop (nothing else runs yet, but embedders' loops may).
        schemas, authenticator = await loop.run_in_executor(None, preflight, config,
                                                            self._authenticator)
        self.authenticator = authenticator
        contract = self.contract = Contract(schemas)
        for agency in (config.agency, *bound_agencies(config)):
            if agency:
                contract.serve(agency)
        # The state dir is this agent's alone, the embedded PostgreSQL under it included:
        # lock it before touching anything in it, so that a second agent started on the
        # same dir fails here instead of stopping the first one's database on its way out.
        lock = await loop.run_in_executor(None, claim_state_dir, config)
        self._on_stop("release the state dir", os.close, lock)
        sockets = await loop.run_in_executor(None, listeners.bind, config)
        self._on_stop("close the sockets", sockets.close)
        tls = await loop.run_in_executor(None, listeners.tls_context, config)
        self.endpoints = sockets.endpoints
        if self.endpoints.socket_path is not None:
            self._on_stop("remove the socket", functools.partial(
                self.endpoints.socket_path.unlink, missing_ok=True))
        endpoints = self.endpoints
        recorded = await loop.run_in_executor(None, record_endpoints, config,
                                              endpoints.event_url, endpoints.socket_path,
                                              endpoints.admin_url)
        self._on_stop("remove the endpoints file", functools.partial(recorded.unlink,
                                                                     missing_ok=True))
        self.tracing = make_tracing(config.tracing, self._span_exporter)
        self._on_stop("flush the traces", self.tracing.shutdown)
        if config.aggregators:
            delivery = upstreams.aggregators(config, self.supervisor, self._on_stop)
        else:
            delivery = await upstreams.database(config, contract, self.supervisor,
                                                self._on_stop)
        self.delivery = delivery
        spool = self.spool = Spool(
            config.spool_dir, max_bytes=config.spool_max_bytes,
            segment_bytes=config.spool_segment_bytes, fsync=config.spool_durability == "fsync",
            keep_committed=config.spool_keep_committed, supervisor=self.supervisor,
            sync_log=Path(config.spool_sync_log) if config.spool_sync_log else None)
        flusher = self.flusher = Flusher(
            spool, delivery.writer, limits=Limits(config.batch_max_events * config.flush_lanes,
                                                 config.batch_max_bytes, config.batch_max_age),
            lanes=config.flush_lanes, retry_max=config.flush_retry_max,
            memory_bytes=config.memory_queue_bytes, replay_window=config.spool_keep_committed,
            on_progress=functools.partial(self.supervisor.ok, Task.FLUSHER),
            observe=self.metrics.observe_flush, tracing=self.tracing)
        self.checkpoints = Checkpoints(spool, delivery.reader,
                                       functools.partial(schemas.explain_with, schemas.checkpoint),
                                       max_bytes=config.event_max_bytes,
                                       committed=lambda: flusher.committed_seq)
        self.snapshots = Snapshots(config.state_path, self.seen, self.checkpoints,
                                   on_progress=functools.partial(self.supervisor.ok,
                                                                 Task.SNAPSHOTS))
        await self.snapshots.restore()
        self._on_stop("save the snapshots", self.snapshots.save)
        self.recovery = await spool.open(on_record=self._recovered_record,
                                         on_durable=flusher.offer)
        self._on_stop("close the spool", spool.close)
        if self.recovery is not None:
            log.info("spool recovered", extra={"fields": {
                "directory": str(config.spool_dir), "segments": self.recovery.segments,
                "pending_records": self.recovery.pending_records,
                "torn_tails": self.recovery.torn_tails,
                "quarantined": self.recovery.quarantined}})
        self._supervise(Task.FLUSHER, flusher.run)
        self._on_stop("release waiters of commits", flusher.cancel_waiters)
        auditor = Auditor(spool, on_drop=lambda why: self.metrics.audit_dropped.labels(why).inc())
        self.probes = Probes(
            lifecycle=lambda: self._state,
            settings=ProbeSettings(config.ready_stall_after, config.request_max_bytes),
            supervisor=self.supervisor, spool=spool, flusher=flusher, upstream=delivery.health,
            checkpoints=self.checkpoints, runs=self.runs, extra_metrics=delivery.metrics)
        self.metrics.add_state(self.probes.metric_values)
        # The manifest's agencies, and those served for certain: the fixed one, the bound.
        self.metrics.known_labels(contract.retention_days())
        events = self._event_api(contract, authenticator, auditor)
        admin = admin_app(self.probes, self.metrics, authenticator)
        for server in await listeners.serve(config, sockets, events, admin, tls):
            self._on_stop("close a listener", server.close)
        if tls is not None:
            reloader = listeners.CertReloader(tls, config.tls_cert_file, config.tls_key_file)
            self._supervise(Task.TLS, reloader.run, critical=False)
        self._background(delivery, authenticator)
        auditor.record("agent.start", success=True, detail={
            "auth": config.auth, "agent_id": config.effective_agent_id})

    def _event_api(self, contract: Contract, authenticator: Authenticator,
                   auditor: Auditor) -> web.Application:
        config = self.config
        assert self.spool is not None
        assert self.flusher is not None
        assert self.checkpoints is not None
        assert self.delivery is not None
        reader = self.delivery.reader
        max_bytes = config.request_max_bytes
        if config.role == "aggregator":  # a window of a sidecar's flusher, whole
            max_bytes = max(max_bytes, wire.MAX_BYTES)
        largest = max(max_bytes, config.lineage_max_bytes)
        memory = RequestMemory(config.request_memory_bytes, largest,
                               timeout=config.request_body_timeout)
        self.request_memory = memory
        answers = Answers(memory, page_bytes=config.read_page_max_bytes,
                          send_timeout=config.request_body_timeout)
        bodies = BodyReader(memory, timeout=config.request_body_timeout, max_bytes=max_bytes,
                            cost=records_cost if config.role == "aggregator" else None)
        sealer = Sealer(contract.retention, config.effective_agent_id)
        commits = Commits(self.spool, self.flusher, timeout=config.commit_wait_timeout)
        audit = RequestAudit(auditor)
        auth = Authentication(authenticator, contract.knows, audit,
                              [int(u) for u in config.socket_allowed_uids])
        endpoints = self.endpoints
        openapi = OpenAPIRoutes([u for u in (endpoints.event_url,) if u],
                                [u for u in (endpoints.admin_url,) if u],
                                aggregator=config.role == "aggregator",
                                auth=config.auth != "none")
        checkpoint_routes = CheckpointRoutes(
            checkpoints=self.checkpoints, reader=reader, sealer=sealer, spool=self.spool,
            commits=commits, gate=self.gate, bodies=bodies, metrics=self.metrics, audit=audit,
            answers=answers)
        if config.role == "aggregator":
            api = AggregatorApi(
                records=RecordsRoutes(spool=self.spool, gate=self.gate, bodies=bodies,
                                      commits=commits, checkpoints=self.checkpoints,
                                      metrics=self.metrics, audit=audit),
                checkpoints=checkpoint_routes, reads=ReadRoutes(reader, commits, answers),
                openapi=openapi)
            self.api = api
            self.event_app = api.app(auth=auth, metrics=self.metrics, tracing=self.tracing,
                                     max_bytes=max_bytes)
            return self.event_app
        ingest = Ingest(checker=EventChecker(contract, config.event_max_bytes), sealer=sealer,
                        spool=self.spool, seen=self.seen, commits=commits, gate=self.gate,
                        bodies=bodies, metrics=self.metrics, runs=self.runs,
                        tracing=self.tracing)
        # OpenLineage has its own limit (RunEvents with Spark plans are large), in the same
        # request memory as every other route.
        lineage_ingest = ingest.with_limit(EventChecker(contract, config.lineage_max_bytes),
                                           bodies.with_limit(config.lineage_max_bytes,
                                                             copies=4))
        self.api = EventApi(
            ingest=ingest,
            lineage=LineageRoutes(lineage_ingest, lineage_ingest.bodies, contract),
            checkpoints=checkpoint_routes,
            reads=ReadRoutes(reader, commits, answers), openapi=openapi,
            drain=DrainRoutes(self._drain_request, audit))
        self.event_app = self.api.app(auth=auth, metrics=self.metrics, tracing=self.tracing,
                                      max_bytes=max_bytes)
        return self.event_app

    def _background(self, delivery: upstreams.Delivery, authenticator: Authenticator) -> None:
        """The supervised loops besides the flusher (each stops before the stages it uses)."""
        config = self.config
        assert self.snapshots is not None
        assert self.contract is not None
        self._supervise(Task.SNAPSHOTS, self.snapshots.run, critical=False)
        self.reloader = Reloader(config, self.contract, authenticator)
        if config.schema_dir or config.agency_manifest or config.api_keys_file:
            self._supervise(Task.RELOAD, self.reloader.run, critical=False)
        for task, run, critical in delivery.tasks:
            self._supervise(task, run, critical=critical)
        if config.auth in ("jwt", "kubernetes") and config.jwt_jwks_file:
            tokens = getattr(authenticator, "tokens", None) or authenticator
            watcher = JwksWatcher(tokens, Path(config.jwt_jwks_file),  # type: ignore[arg-type]
                                  functools.partial(load_keys, config))
            self._supervise(Task.JWKS, watcher.run, critical=False)

    def _supervise(self, task: Task, run: Callable[[], Awaitable[None]], *,
                   critical: bool = True) -> None:
        self.supervisor.start(task, run, critical=critical)
        self._on_stop(f"stop {task}", self.supervisor.stop, task)

    def _on_stop(self, what: str, action: Callable[..., Any], *args: Any) -> None:
        """Register a teardown step. Every step runs, whatever an earlier one raised: a
        failing snapshot must not leave the spool, the pool, the embedded database or the
        state-dir lock open."""

        async def step() -> None:
            try:
                result = action(*args)
                if asyncio.iscoroutine(result) or isinstance(result, asyncio.Future):
                    await result
            except Exception as exc:
                if is_resource_error(exc):  # a full disk at shutdown: expected, no traceback
                    log.warning("shutdown step failed: %s", what,
                                extra={"fields": {"error": reason(exc)}})
                else:
                    log.exception("shutdown step failed: %s", what)

        self._stack.push_async_callback(step)

    async def stop(self) -> bool:
        """Drain and stop; safe twice and without start. True if everything was flushed."""
        async with self._stop_lock:
            if self._state in ("new", "stopped"):
                self._state = "stopped"
                return True
            flushed = await self._drain(time.monotonic() + self.config.drain_timeout)
            await self._teardown()
            self._state = "stopped"
            log.info("agent stopped", extra={"fields": {"flushed_everything": flushed}})
            return flushed

    async def _drain(self, deadline: float) -> bool:
        """Upstream first: refuse new requests, finish those in flight, then deliver what is
        spooled until the deadline: to the upstream, and, when that is PostgreSQL and a
        handoff is configured, whatever PostgreSQL did not take by then to an aggregator (at
        once while PostgreSQL is down). False when something is left on the spool, which is
        then logged at ERROR with its runs: in Kubernetes there may be no next start."""
        self._state = "draining"
        self.gate.close()
        await self.gate.wait_idle(max(0.0, min(DRAIN_IDLE_WAIT, deadline - time.monotonic())))
        flusher, spool, config = self.flusher, self.spool, self.config
        if flusher is None or spool is None:
            return True
        handoff = bool(config.handoff_to) and not config.aggregators \
            and config.role == "agent"
        flush_until = deadline - (config.handoff_timeout if handoff else 0.0)
        flushed = False
        try:
            if not (handoff and self.delivery is not None
                    and self.delivery.health.state() == "down"):
                flushed = await flusher.drain(upstreams.deadline_left(flush_until))
            if not flushed and handoff:
                await self.supervisor.stop(Task.FLUSHER)  # one flusher on a spool at a time
                flushed = await upstreams.hand_off(config, spool,
                                                   upstreams.deadline_left(deadline))
        except Exception:
            log.exception("drain failed; the rest stays on the spool")
        if not flushed:
            left = await upstreams.leftovers(spool)
            if left["records"]:
                log.error("events acknowledged but not delivered are left on the spool: no "
                          "upstream took them before the drain deadline; they are delivered "
                          "only if this state dir is started again", extra={"fields": {
                              **left, "spool": str(spool.directory),
                              "upstream": "aggregators" if config.aggregators
                              else "postgresql", "handoff": list(config.handoff_to)}})
            else:
                flushed = True
        return flushed

    async def _teardown(self) -> None:
        stack, self._stack = self._stack, contextlib.AsyncExitStack()
        await stack.aclose()

    async def reload(self, config: AgentConfig | None = None, *, trigger: str = "SIGHUP",
                     also: dict[str, Any] | None = None) -> dict[str, Any]:
        """Re-read the payload schemas, the agency manifest and the API keys (from
        ``config``, default the one in force); what fails keeps what is in force. See
        :mod:`.reload`."""
        if self.reloader is None:
            raise RuntimeError("the agent is not running")
        return await self.reloader.reload(config, trigger=trigger, also=also)

    async def _drain_request(self) -> dict[str, Any]:
        """``POST /v1/drain``: flush now, then ask the process to exit."""
        assert self.flusher is not None
        flushed = await self._drain(time.monotonic() + self.config.drain_timeout)
        self.exit_requested.set()
        return {"drained": flushed, "backlog_records": self.flusher.backlog}

    def _recovered_record(self, seq: int, payload: bytes) -> None:
        record = decode_record(payload)
        if self.checkpoints is not None:
            for checkpoint in record.checkpoints():
                self.checkpoints.recovered(seq, checkpoint)
        for row in record.events():
            self.seen.add((row.agency_id, row.event_id),
                          (int(row.payload_sha256[:8], 16), seq, None))

    # ---------------------------------------------------------------- probes

    def readiness(self) -> tuple[bool, dict[str, Any]]:
        assert self.probes is not None
        return self.probes.readiness()
