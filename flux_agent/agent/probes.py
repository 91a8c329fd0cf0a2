"""What the agent says about itself: readiness, liveness, diagnostics (``/health/*``) and
the values its metrics collector reads at scrape time, over the stages it reads.

Readiness tells the truth: it fails while the agent is not running (starting, draining),
while the spool is full or unwritable, while events wait with no flush progress for longer
than the threshold, and while a critical background task keeps failing. A pod that looks
healthy but forwards nothing is the failure this exists to prevent.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Protocol

from ..checkpoints.ledger import Checkpoints
from ..core.timefmt import rfc3339_ms
from ..flush.flusher import Flusher
from ..intake.runs import RunTracker
from ..obs import logs
from ..obs.supervise import Supervisor
from ..spool import Recovery, Spool


class UpstreamHealth(Protocol):
    """Where the flusher delivers (PostgreSQL, an aggregator), as the probes see it."""

    key: str  # its name in the readiness answer: ``database`` or ``upstream``

    def state(self) -> str: ...  # up | down | unknown
    def up(self) -> bool: ...
    def unready(self) -> list[str]: ...
    def reason(self) -> str | None: ...  # why it is down, when an operator must act
    async def diagnostics(self) -> dict[str, Any]: ...


class MetricSource(Protocol):
    def metric_values(self) -> dict[str, Any]: ...


@dataclass(frozen=True, slots=True)
class ProbeSettings:
    ready_stall_after: float
    request_max_bytes: int


class Probes:
    def __init__(self, *, lifecycle: Callable[[], str], settings: ProbeSettings,
                 supervisor: Supervisor, spool: Spool, flusher: Flusher,
                 upstream: UpstreamHealth, checkpoints: Checkpoints | None = None,
                 runs: RunTracker | None = None,
                 extra_metrics: tuple[MetricSource, ...] = ()) -> None:
        self.lifecycle = lifecycle
        self.settings = settings
        self.supervisor = supervisor
        self.spool = spool
        self.flusher = flusher
        self.upstream = upstream
        self.checkpoints = checkpoints
        self.runs = runs
        self.extra_metrics = extra_metrics
        self.started_at = time.time()

    def readiness(self) -> tuple[bool, dict[str, Any]]:
        reasons: list[str] = []
        state = self.lifecycle()
        if state != "running":
            reasons.append(state)
        spool, flusher = self.spool, self.flusher
        body: dict[str, Any] = {self.upstream.key: self.upstream.state()}
        # Down because PostgreSQL refuses the login or a privilege: said here, though the
        # agent stays ready (it still takes events onto the spool), and listed among the
        # reasons once it is not ready for another (events waiting with no progress).
        why = self.upstream.reason()
        if why is not None:
            body[f"{self.upstream.key}_reason"] = why
        reasons += self.upstream.unready()
        if flusher.stalled_for() > self.settings.ready_stall_after:
            reasons.append("flush_stalled")
        for task in self.supervisor.failing():
            reasons.append(f"task_failing:{task}")
        used = spool.bytes_used
        body["spool"] = {"bytes": used, "max_bytes": spool.max_bytes,
                         "backlog_records": flusher.backlog,
                         "writable": spool.broken is None}
        if spool.broken is not None:
            reasons.append("spool_unwritable")
            body["spool"]["error"] = spool.broken
        if used + self.settings.request_max_bytes > spool.max_bytes:
            reasons.append("spool_full")
        if reasons and why is not None:
            reasons.append(why)
        if reasons:
            body["reasons"] = reasons
        return not reasons, body

    def liveness(self) -> tuple[bool, dict[str, Any]]:
        """Fails only for what a restart can fix: a background task failing for longer
        than ``live_fail_after``."""
        dead = self.supervisor.dead()
        return not dead, ({"failing_tasks": list(dead)} if dead else {})

    async def diagnostics(self) -> dict[str, Any]:
        spool, flusher = self.spool, self.flusher
        upstream = await self.upstream.diagnostics()
        why = self.upstream.reason()
        if why is not None:
            upstream["reason"] = why
        if "error" in upstream:
            upstream["error"] = logs.scrub(str(upstream["error"]))
        return {
            "uptime_s": round(time.time() - self.started_at, 3),
            self.upstream.key: upstream,
            "spool": {
                "bytes": spool.bytes_used,
                "max_bytes": spool.max_bytes,
                "writable": spool.broken is None,
                "segments": len(spool.segments),
                "backlog_records": flusher.backlog,
                "oldest_unflushed_age_s": round(spool.oldest_unflushed_age(), 3),
                "retained_bytes": spool.retained_bytes,
            },
            "flush": {
                "last_flush_at": rfc3339_ms(flusher.last_flush_at),
                "last_error": logs.scrub(flusher.last_error or "") or None,
                "stalled_s": round(flusher.stalled_for(), 3),
            },
            "tasks": {name: {**info, "last_error": logs.scrub(str(info["last_error"]))
                             if info["last_error"] else None}
                      for name, info in self.supervisor.describe().items()},
        }

    def metric_values(self) -> dict[str, Any]:
        spool, flusher = self.spool, self.flusher
        rec = spool.recovery or Recovery()
        stats = flusher.stats
        values: dict[str, Any] = {
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
            "flux_flush_stalled_seconds": flusher.stalled_for(),
            "flux_ready": 1.0 if self.readiness()[0] else 0.0,
        }
        up_gauge = "flux_postgres_up" if self.upstream.key == "database" else "flux_upstream_up"
        values[up_gauge] = 1.0 if self.upstream.up() else 0.0
        if self.checkpoints is not None:
            values["flux_checkpoint_queue_depth"] = self.checkpoints.pending()
        if self.runs is not None:
            values["flux_active_runs"] = self.runs.counts()
        for source in self.extra_metrics:
            values.update(source.metric_values())
        return values
