"""What the agent says about itself: readiness, liveness, diagnostics (``/health/*``) and
the values its metrics collector reads at scrape time."""

from __future__ import annotations

import logging
import time
from typing import Any

from ..obs import logs
from ..postgres.pool import describe
from ..spool import Recovery
from .setup import rfc3339
from .state import AgentState

log = logging.getLogger("flux_agent.agent")


class Probes(AgentState):
    """Mixed into :class:`~flux_agent.agent.Agent`: its probes and scrape-time state."""

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
                "last_flush_at": rfc3339(self.flusher.last_flush_at),
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
