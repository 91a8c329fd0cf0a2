"""The composition root: builds the pipeline and runs its lifecycle.

Start downstream first (database, spool and its recovery, flusher) and the listeners last, so
every stage has a running consumer before anything can reach it. Stop upstream first: refuse
new requests, finish those in flight, flush until the deadline, then close the database pool
and the spool. What was not flushed stays on the spool for the next start.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import socket
import time
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType
from typing import TYPE_CHECKING, Any
from urllib.parse import urlsplit

from aiohttp import web

from . import logs
from ._files import lock_exclusive
from .audit import Auditor
from .auth import ApiKeyAuthenticator, Authenticator, FixedAgency, load_api_keys
from .batch import Limits
from .checkpoints import Checkpoints
from .config import AgentConfig, env_name, redact_dsn, split_hostport
from .embedded import LocalPostgres
from .errors import ConfigError
from .event import (
    AGENCY,
    EVENT_ID,
    PAYLOAD_SHA256,
    CheckpointRecord,
    EventsRecord,
    record_decoder,
)
from .flush import Flusher
from .http.admin import admin_app
from .http.intake import Intake
from .http.server import AccessLogger, ProblemAppRunner
from .metrics import Metrics
from .seen import SeenIndex
from .sink import Sink, UnsafeRole, bootstrap_database, classify, describe
from .spool import Recovery, Spool
from .store import Store
from .tracing import Tracing, make_tracing
from .validate import EventChecker, Schemas

if TYPE_CHECKING:
    from .tokens import KeySet

log = logging.getLogger("flux_agent.agent")

SEEN_SNAPSHOT_INTERVAL = 30.0
PING_INTERVAL = 15.0
EMBEDDED_LOGIN_ROLE = "flux_agent_local"
EMBEDDED_DATABASE = "flux"


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
        self._tasks: list[asyncio.Task[None]] = []
        self._state = "new"  # new -> starting -> running -> draining -> stopped
        self._stop_lock = asyncio.Lock()
        self.spool: Spool | None = None
        self.sink: Sink | None = None
        self.flusher: Flusher | None = None
        self.intake: Intake | None = None
        self.auditor: Auditor | None = None
        self.store: Store | None = None
        self.checkpoints: Checkpoints | None = None
        self.retention_rounds = 0
        self.purged: dict[str, int] = {}
        self.seen = SeenIndex(config.dedupe_index_size)

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
        try:
            schemas = Schemas(manifest_path=Path(config.agency_manifest)
                              if config.agency_manifest else None)
        except ValueError as exc:
            raise ConfigError(env_name("agency_manifest"), str(exc)) from None
        if config.auth == "none" and not schemas.manifest.knows(config.agency):
            raise ConfigError(env_name("agency"),
                              f"{config.agency!r} is not in the agency manifest")
        authenticator = self._authenticator or self._make_authenticator(schemas)
        self.tracing = make_tracing(config.tracing, self._span_exporter)
        try:
            # The state dir is this agent's alone, the embedded PostgreSQL under it included:
            # lock it before touching anything in it, so that a second agent started on the
            # same dir fails here instead of stopping the first one's database on its way out.
            state_dir = config.state_path
            state_dir.mkdir(parents=True, exist_ok=True)
            self._state_lock = lock_exclusive(state_dir / "agent.lock",
                                              f"the state dir {state_dir}")
            dsn = await self._database()
            self.sink = Sink(dsn, max_connections=config.flush_lanes + 2,
                             pgbouncer=config.database_pgbouncer,
                             migrate_on_connect=config.migrate,
                             refuse_privileged=config.auth == "jwt")
            await self._check_database()
            self.store = Store(dsn, pgbouncer=config.database_pgbouncer)

            loop = asyncio.get_running_loop()
            await loop.run_in_executor(None, self.seen.restore, state_dir / "seen.idx")
            self.spool = Spool(config.spool_dir, max_bytes=config.spool_max_bytes,
                               segment_bytes=config.spool_segment_bytes,
                               fsync=config.spool_durability == "fsync",
                               on_recover_record=self._recovered_record)
            self.checkpoints = Checkpoints(
                self.spool, self.store, schemas, max_bytes=config.event_max_bytes,
                committed=lambda: self.flusher.committed_seq if self.flusher else 0)
            # Versions known before the restart first; saves still on the spool then
            # replace them as recovery finds them.
            await loop.run_in_executor(None, self.checkpoints.restore,
                                       state_dir / "checkpoints.idx")
            self.recovery = await self.spool.open()
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
            self.flusher.start()
            self.metrics.add_state(self._metric_state)
            self.metrics.known_labels(schemas.manifest.retention_days)
            if self.sink.role is not None:  # reached PostgreSQL at start
                self.flusher.db_up = True
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
            await self._listen(self.intake.app(), admin_app(self, self.metrics))
            self.intake.servers = [u for u in (self.endpoints.event_url,) if u]
            self._tasks.append(asyncio.create_task(self._snapshot_loop(), name="flux-seen"))
            self._tasks.append(asyncio.create_task(self._ping_loop(), name="flux-ping"))
            if config.retention_interval > 0:
                self._tasks.append(asyncio.create_task(
                    self._retention_loop(schemas.manifest.retention_days), name="flux-retention"))
            if config.auth == "jwt" and config.jwt_jwks_file:
                jwt_auth = getattr(authenticator, "tokens", None) or authenticator
                self._tasks.append(asyncio.create_task(
                    self._watch_jwks(jwt_auth, Path(config.jwt_jwks_file)), name="flux-jwks"))
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
        }})
        if config.auth == "none":
            log.warning("AUTHENTICATION IS OFF: every local caller writes as agency %r",
                        config.agency)

    async def stop(self) -> bool:
        """Drain and stop; safe twice and without start. True if everything was flushed."""
        async with self._stop_lock:
            if self._state in ("new", "stopped"):
                self._state = "stopped"
                return True
            return await self._shutdown(drain=True)

    async def _shutdown(self, *, drain: bool) -> bool:
        config = self.config
        deadline = time.monotonic() + config.drain_timeout
        flushed = False
        self._state = "draining"
        if self.intake is not None:
            self.intake.draining = True
            await self.intake.wait_idle(max(0.0, min(5.0, deadline - time.monotonic())))
        if self.flusher is not None:
            if drain:
                flushed = await self.flusher.drain(max(0.0, deadline - time.monotonic()))
                if not flushed:
                    log.warning("drain deadline reached; the rest stays on the spool",
                                extra={"fields": {"backlog_records": self.flusher.backlog}})
            await self.flusher.stop()
        for runner in reversed(self._runners):
            await runner.cleanup()
        self._runners.clear()
        for task in self._tasks:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
        self._tasks.clear()
        if self.sink is not None:
            await self.sink.close()
        if self.store is not None:
            await self.store.close()
        if self.spool is not None:
            await self.spool.close()
            loop = asyncio.get_running_loop()
            with contextlib.suppress(OSError):
                await loop.run_in_executor(None, self._save_snapshots)
        if self.endpoints.socket_path is not None:
            with contextlib.suppress(OSError):
                self.endpoints.socket_path.unlink()
        self.tracing.shutdown()  # exports what is still buffered
        if self._embedded is not None:
            embedded, self._embedded = self._embedded, None
            await asyncio.get_running_loop().run_in_executor(None, embedded.stop)
        if self._state_lock >= 0:
            os.close(self._state_lock)
            self._state_lock = -1
        self._state = "stopped"
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

    def _make_authenticator(self, schemas: Schemas) -> Authenticator:
        config = self.config
        if config.auth == "none":
            return FixedAgency(config.agency)
        tokens: Authenticator | None = None
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
            "connect": f"{pg.bin_dir / 'psql'} '{pg.dsn(database=EMBEDDED_DATABASE)}'",
        }})
        return dsn

    async def _check_database(self) -> None:
        """Migrate and check the login role now if PostgreSQL is up; later if it is not."""
        assert self.sink is not None
        try:
            applied = await asyncio.wait_for(self.sink.ensure_schema(), 15)
        except UnsafeRole as exc:
            raise ConfigError(env_name("database_url"), str(exc)) from None
        except Exception as exc:  # noqa: BLE001 - PostgreSQL being down at start is not fatal
            log.warning("PostgreSQL not ready at start; events will be spooled",
                        extra={"fields": {"error": describe(exc)}})
            return
        if applied:
            log.info("migrations applied", extra={"fields": {"versions": applied}})
        role = self.sink.role
        if role is not None and (role.superuser or role.bypassrls):
            log.warning("the database login role %r bypasses row-level security; grant "
                        "flux_agent to an unprivileged role instead", role.name)

    async def _listen(self, events: web.Application, admin: web.Application) -> None:
        config = self.config
        runner = ProblemAppRunner(events, access_log=logging.getLogger("aiohttp.access"),
                               access_log_class=AccessLogger, handle_signals=False)
        await runner.setup()
        self._runners.append(runner)
        if config.listen:
            host, port = split_hostport(config.listen)
            site = web.TCPSite(runner, host, port, reuse_address=True)
            await site.start()
            bound = _bound_port(site)
            shown = f"[{host}]" if ":" in host else host
            self.endpoints.event_url = f"http://{shown}:{bound}"
        path = config.socket_path
        if path is not None:
            path.parent.mkdir(parents=True, exist_ok=True)
            _clear_stale_socket(path)
            usite = web.UnixSite(runner, str(path))
            await usite.start()
            os.chmod(path, 0o660)
            self.endpoints.socket_path = path
        if config.admin_listen:
            admin_runner = ProblemAppRunner(admin, access_log=None, handle_signals=False)
            await admin_runner.setup()
            self._runners.append(admin_runner)
            host, port = split_hostport(config.admin_listen)
            asite = web.TCPSite(admin_runner, host, port, reuse_address=True)
            await asite.start()
            shown = f"[{host}]" if ":" in host else host
            self.endpoints.admin_url = f"http://{shown}:{_bound_port(asite)}"

    def _recovered_record(self, seq: int, payload: bytes) -> None:
        record = record_decoder.decode(payload)
        if isinstance(record, CheckpointRecord) and self.checkpoints is not None:
            self.checkpoints.recovered(seq, record)
        if isinstance(record, EventsRecord | CheckpointRecord):
            for row in record.rows:
                self.seen.add((row[AGENCY], row[EVENT_ID]),
                              (int(row[PAYLOAD_SHA256][:8], 16), seq, None))

    def _save_snapshots(self) -> None:
        """What the agent remembers across restarts besides the spool: recently seen event
        ids (duplicate reporting) and checkpoint versions (version assignment)."""
        state = self.config.state_path
        self.seen.save(state / "seen.idx")
        if self.checkpoints is not None:
            self.checkpoints.save_snapshot(state / "checkpoints.idx")

    async def _snapshot_loop(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            await asyncio.sleep(SEEN_SNAPSHOT_INTERVAL)
            try:
                await loop.run_in_executor(None, self._save_snapshots)
            except OSError as exc:
                log.warning("could not save the agent's snapshots",
                            extra={"fields": {"error": exc.strerror}})

    async def _ping_loop(self) -> None:
        """An idle agent still learns when PostgreSQL goes away or comes back
        (flux_postgres_up, readiness's "database"); a flushing one learns it from the flush."""
        assert self.sink is not None
        assert self.flusher is not None
        while True:
            await asyncio.sleep(PING_INTERVAL)
            if self.flusher.backlog:
                continue
            try:
                await asyncio.wait_for(self.sink.ping(), 5)
            except Exception:  # noqa: BLE001 - any failure means down
                self.flusher.db_up = False
            else:
                self.flusher.db_up = True

    async def _retention_loop(self, agencies: Mapping[str, int]) -> None:
        """Delete expired rows in small batches, in one agent at a time (a lease)."""
        assert self.sink is not None
        interval = self.config.retention_interval
        batch = self.config.retention_batch
        holder = f"{self.config.effective_agent_id}/{os.getpid()}/{os.urandom(4).hex()}"
        while True:
            await asyncio.sleep(interval)
            try:
                # The lease outlives a round and the pause before the next one, so the holder
                # keeps it; if the holder dies, another agent takes over once it expires.
                if not await self.sink.claim_lease("retention", holder, interval * 3 + 30):
                    continue
                self.retention_rounds += 1
                for agency in agencies:
                    while True:
                        counts = await self.sink.purge(agency, batch)
                        for table, n in zip(("events", "checkpoint_history", "checkpoints"),
                                            counts, strict=True):
                            self.purged[table] = self.purged.get(table, 0) + n
                        if max(counts) < batch:
                            break
                        await asyncio.sleep(0.05)  # let ingestion have the database
            except Exception as exc:  # noqa: BLE001 - retention retries next round
                log.warning("retention round failed", extra={"fields": {
                    "error": describe(exc)}})

    # ---------------------------------------------------------------- health and metrics

    def readiness(self) -> tuple[bool, dict[str, Any]]:
        reasons = []
        spool, flusher = self.spool, self.flusher
        if self._state != "running":
            reasons.append(self._state)
        body: dict[str, Any] = {"database": "unknown", "spool": {}}
        if flusher is not None:
            body["database"] = {None: "unknown", True: "up", False: "down"}[flusher.db_up]
            stalled = flusher.stalled_for()
            if stalled > self.config.ready_stall_after:
                reasons.append("flush_stalled")
        if spool is not None:
            used = spool.bytes_used
            body["spool"] = {
                "bytes": used, "max_bytes": spool.max_bytes,
                "backlog_records": flusher.backlog if flusher else 0,
                "writable": spool.broken is None,
            }
            if spool.broken is not None:
                reasons.append("spool_unwritable")
            if used + self.config.request_max_bytes > spool.max_bytes:
                reasons.append("spool_full")
        if reasons:
            body["reasons"] = reasons
        return not reasons, body

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
                "segments": len(self.spool.segments),
                "backlog_records": self.flusher.backlog,
                "oldest_unflushed_age_s": round(self.spool.oldest_unflushed_age(), 3),
            }
            out["flush"] = {
                "last_flush_at": self.flusher.last_flush_at,
                "last_error": logs.scrub(self.flusher.last_error or "") or None,
                "stalled_s": round(self.flusher.stalled_for(), 3),
            }
        return out

    def _metric_state(self) -> dict[str, Any]:
        spool, flusher = self.spool, self.flusher
        if spool is None or flusher is None:
            return {}
        rec = self.recovery or Recovery()
        stats = flusher.stats
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
            "flux_postgres_up": 1.0 if flusher.db_up else 0.0,
            "flux_flush_stalled_seconds": flusher.stalled_for(),
            "flux_ready": 1.0 if self.readiness()[0] else 0.0,
            "flux_checkpoint_queue_depth": self.checkpoints.pending() if self.checkpoints
            else 0,
            "flux_active_runs": self.intake.runs.counts() if self.intake else {},
            "flux_retention_purged_rows": dict(self.purged),
        }


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


def _bound_port(site: web.TCPSite) -> int:
    server = site._server  # aiohttp keeps the asyncio server here; ports may be ephemeral
    assert server is not None
    sockets = getattr(server, "sockets", None) or []
    return int(sockets[0].getsockname()[1])


def _clear_stale_socket(path: Path) -> None:
    """Remove a socket file left by a dead agent; refuse if a live one answers on it."""
    if not path.exists() and not path.is_symlink():
        return
    if not path.is_socket():
        raise ConfigError(env_name("socket"), f"{path} exists and is not a socket")
    probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        probe.settimeout(1)
        probe.connect(str(path))
    except (ConnectionRefusedError, FileNotFoundError):
        path.unlink(missing_ok=True)
        return
    except OSError:
        path.unlink(missing_ok=True)
        return
    finally:
        probe.close()
    raise ConfigError(env_name("socket"), f"another process is listening on {path}")
