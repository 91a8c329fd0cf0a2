"""Where the pipeline delivers: PostgreSQL (the configured URL or the embedded default) or
aggregators, as one :class:`Delivery` (the flusher's writer, the reader behind the read
routes and checkpoints, what the probes see, the loops it needs); the handoff of a drain's
leftovers to an aggregator; and the count of what is left when nothing took it.

The database side is imported only when it is used: a sidecar forwarding to aggregators
loads no database client (and holds no database credentials)."""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from .._version import __version__
from ..core.event import decode_record
from ..core.reads import Reader
from ..core.settings import AgentConfig
from ..flush.batch import Limits
from ..flush.flusher import Flusher
from ..flush.writer import Writer
from ..forward.health import UpstreamHealth
from ..forward.reader import UpstreamReader
from ..forward.upstream import Upstream
from ..forward.writer import Forwarder
from ..intake.schemas import Contract
from ..obs.supervise import Supervisor, Task
from ..spool import Spool
from .probes import MetricSource
from .probes import UpstreamHealth as Health

if TYPE_CHECKING:
    from ..postgres.embedded import LocalPostgres
    from ..postgres.pool import Postgres
    from ..postgres.retention import Retention

log = logging.getLogger("flux_agent.agent")

OnStop = Callable[..., None]  # Agent._on_stop(what, action, *args)
LEFTOVER_RUNS_LISTED = 50


@dataclass(slots=True)
class Delivery:
    writer: Writer
    reader: Reader
    health: Health
    tasks: list[tuple[Task, Callable[[], Awaitable[None]], bool]] = field(default_factory=list)
    metrics: tuple[MetricSource, ...] = ()
    pg: Postgres | None = None
    embedded: LocalPostgres | None = None
    retention: Retention | None = None


def aggregators(config: AgentConfig, supervisor: Supervisor, on_stop: OnStop) -> Delivery:
    upstream = _upstream(config, config.aggregators)
    on_stop("close the connections to aggregators", upstream.close)
    health = UpstreamHealth(upstream, ping_interval=config.database_ping_interval,
                            on_progress=functools.partial(supervisor.ok, Task.PING))
    delivery = Delivery(Forwarder(upstream, commit_wait=config.commit_wait_timeout),
                        UpstreamReader(upstream), health)
    if config.database_ping_interval > 0:
        delivery.tasks.append((Task.PING, health.run, False))
    return delivery


def _upstream(config: AgentConfig, urls: tuple[str, ...]) -> Upstream:
    return Upstream(urls, token_file=config.upstream_token_file,
                    ca_file=config.upstream_ca_file, timeout=config.upstream_timeout,
                    connect_timeout=config.database_connect_timeout,
                    user_agent=f"flux-agent/{__version__} ({config.effective_agent_id})")


async def database(config: AgentConfig, contract: Contract, supervisor: Supervisor,
                   on_stop: OnStop) -> Delivery:
    from ..postgres.health import DatabaseHealth
    from ..postgres.pool import Postgres, Timeouts
    from ..postgres.retention import Retention, RetentionSettings
    from ..postgres.sink import Sink
    from ..postgres.store import Store
    from . import database as db

    embedded = None
    if config.database_url:
        dsn = db.configured_dsn(config)
    else:
        embedded, dsn = await db.start_embedded(config)
        on_stop("stop the embedded PostgreSQL", functools.partial(
            asyncio.get_running_loop().run_in_executor, None, embedded.stop))
    pg = Postgres(
        dsn, max_connections=config.flush_lanes + 2, pgbouncer=config.database_pgbouncer,
        timeouts=Timeouts(connect=config.database_connect_timeout,
                          statement=config.database_statement_timeout,
                          flush=config.flush_timeout, idle=config.database_idle_timeout),
        identity_path=config.state_path / "primary",
        setting="FLUX_AGENT_DATABASE_URL" if config.database_url
        else f"the embedded PostgreSQL under {config.state_path / 'postgres'}")
    on_stop("close the database pool", pg.close)
    sink = Sink(pg, migrate_on_connect=config.migrate)
    await db.check_schema(sink)
    health = DatabaseHealth(pg, sink, ping_interval=config.database_ping_interval,
                            on_progress=functools.partial(supervisor.ok, Task.PING))
    delivery = Delivery(sink, Store(pg), health, pg=pg, embedded=embedded)
    if config.database_ping_interval > 0:
        delivery.tasks.append((Task.PING, health.run, False))
    if config.retention_interval > 0:
        retention = Retention(sink, RetentionSettings(
            interval=config.retention_interval, batch=config.retention_batch,
            partition_interval=config.partition_interval,
            partition_premake=config.partition_premake,
            partition_lock_timeout=config.partition_lock_timeout,
            dead_letter_retention=config.dead_letter_retention),
            contract.retention_days, holder=config.effective_agent_id,
            on_progress=functools.partial(supervisor.ok, Task.RETENTION))
        delivery.tasks.append((Task.RETENTION, retention.run, False))
        delivery.metrics = (retention,)
        delivery.retention = retention
    if embedded is not None:
        watcher = db.EmbeddedWatcher(embedded, functools.partial(supervisor.ok,
                                                                 Task.EMBEDDED_DB))
        delivery.tasks.append((Task.EMBEDDED_DB, watcher.run, True))
    return delivery


async def hand_off(config: AgentConfig, spool: Spool, seconds: float) -> bool:
    """Deliver what is left on the spool to an aggregator within ``seconds``: a flusher of
    its own, from the spool's cursor (a window PostgreSQL may already have taken is sent
    again; its keys absorb it). True when nothing is left."""
    urls = config.handoff_to
    if not urls or seconds <= 0:
        return False
    upstream = _upstream(config, urls)
    flusher = Flusher(spool, Forwarder(upstream),
                      limits=Limits(config.batch_max_events, config.batch_max_bytes, 0.0),
                      lanes=1, retry_max=1.0, memory_bytes=0)
    log.warning("handing what is left on the spool to an aggregator", extra={"fields": {
        "aggregators": list(urls), "backlog_records": flusher.backlog,
        "within_s": round(seconds, 1)}})
    task = asyncio.create_task(flusher.run(), name="flux-handoff")
    try:
        done = await flusher.drain(seconds)
    finally:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task
        flusher.cancel_waiters()
        await upstream.close()
    if done:
        log.info("handoff complete: an aggregator holds everything this agent acknowledged")
    return done


async def leftovers(spool: Spool) -> dict[str, Any]:
    """What is acknowledged and undelivered: records, events, checkpoints, and the runs."""
    records = events = checkpoints = 0
    runs: set[tuple[str, str]] = set()
    seq, last = spool.cursor + 1, spool.written_seq
    while seq <= last:
        batch = await spool.read(seq, 4 * 1024 * 1024)
        if not batch:
            break
        for got, payload in batch:
            record = decode_record(payload)
            records += 1
            events += len(record.events())
            checkpoints += len(record.checkpoints())
            runs.update((row.agency_id, row.run_id) for row in record.events())
            seq = got + 1
    listed = sorted(f"{agency}/{run}" for agency, run in runs)
    return {"records": records, "events": events, "checkpoints": checkpoints,
            "runs": listed[:LEFTOVER_RUNS_LISTED], "runs_total": len(listed)}


def deadline_left(deadline: float) -> float:
    return max(0.0, deadline - time.monotonic())
