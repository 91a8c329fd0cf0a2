"""Retention, in one agent at a time (a lease): keep the time partitions of ``flux.events``
ahead and drop those whose rows have all expired, then delete what expires row by row
(events outside the time partitions, checkpoints, dead letters, audit entries past the
database's policy) in small batches. Run under the supervisor."""

from __future__ import annotations

import asyncio
import functools
import logging
import os
import time
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass
from typing import Any

from ..core.errors import Fault, describe, fault_of
from .errors import LockTimeout
from .sink import PartitionStats, Sink

log = logging.getLogger("flux_agent.agent")

PARTITION_STEPS_PER_ROUND = 200  # creations, then drops; the next round goes on


@dataclass(frozen=True, slots=True)
class RetentionSettings:
    interval: float  # seconds between rounds
    batch: int  # rows per delete
    partition_interval: float
    partition_premake: float
    partition_lock_timeout: float
    dead_letter_retention: float  # 0: the agency's own retention


class Retention:
    def __init__(self, sink: Sink, settings: RetentionSettings,
                 agencies: Callable[[], Mapping[str, int]], *, holder: str,
                 on_progress: Callable[[], None]) -> None:
        self.sink = sink
        self.settings = settings
        # agency -> retention days: the manifest's agencies and those served (asked each
        # round: a reload of the manifest changes them)
        self.agencies = agencies
        self.holder = f"{holder}/{os.getpid()}/{os.urandom(4).hex()}"
        self.on_progress = on_progress
        self.rounds = 0
        self.purged: dict[str, int] = {}
        self.counts = dict.fromkeys(("created", "dropped", "moved_rows", "lock_timeouts"), 0)
        self.stats: PartitionStats | None = None
        self.stats_at = 0.0

    async def run(self) -> None:
        interval = self.settings.interval
        # The lease outlives a round and the pause before the next one, so the holder keeps
        # it; if the holder dies, another agent takes over once it expires.
        lease = interval * 3 + 30
        while True:
            await asyncio.sleep(interval)
            try:
                if not await self.sink.claim_lease("retention", self.holder, lease):
                    continue
                self.rounds += 1
                await self._maintain_partitions()
                # Renewed between the phases: a first round after an upgrade may be long.
                if not await self.sink.claim_lease("retention", self.holder, lease):
                    continue
                await self._purge_expired()
            except Exception as exc:
                if fault_of(exc) is not Fault.TRANSIENT:
                    raise  # the supervisor logs it with its traceback and restarts the loop
                log.warning("retention round failed; retrying next round",
                            extra={"fields": {"error": describe(exc)}})
            else:
                self.on_progress()

    async def _maintain_partitions(self) -> None:
        """Partitions of ``flux.events`` (sql/007): create the missing ones up to the premake
        horizon, then drop the expired ones, one short step (one transaction) at a time."""
        sink, settings, counts = self.sink, self.settings, self.counts
        agencies = self.agencies()
        try:
            for _ in range(PARTITION_STEPS_PER_ROUND):
                made = await sink.prepare_partition(
                    sorted(agencies), settings.partition_interval,
                    settings.partition_premake, settings.partition_lock_timeout)
                if made is None:
                    break
                counts["created"] += 1
                counts["moved_rows"] += made[1]
                log.info("partition created", extra={"fields": {
                    "partition": made[0], "moved_rows": made[1]}})
            for _ in range(PARTITION_STEPS_PER_ROUND):
                gone = await sink.drop_expired_partition(agencies,
                                                         settings.partition_lock_timeout)
                if gone is None:
                    break
                counts["dropped"] += 1
                log.info("expired partition dropped", extra={"fields": {
                    "partition": gone[0], "level": gone[1]}})
                await asyncio.sleep(0.05)  # let ingestion have the lock in between
        except LockTimeout as exc:  # busy now: next round
            counts["lock_timeouts"] += 1
            log.warning("partition maintenance did not get its lock in time; next round",
                        extra={"fields": {"error": describe(exc),
                                          "lock_timeout_s": settings.partition_lock_timeout}})
        self.stats = await sink.partition_stats()
        self.stats_at = time.monotonic()

    async def _purge_expired(self) -> None:
        """Expired rows that do not leave with a partition, in small batches per agency."""
        sink, batch = self.sink, self.settings.batch
        for agency, days in self.agencies().items():
            await self._purge_batches(functools.partial(sink.purge, agency, batch),
                                      ("events", "checkpoint_history", "checkpoints"))
            keep = self.settings.dead_letter_retention or days * 86400.0
            await self._purge_batches(
                functools.partial(sink.purge_dead_letters, agency, keep, batch),
                ("dead_letters",))
        await self._purge_batches(functools.partial(sink.purge_audit_log, batch), ("audit_log",))

    async def _purge_batches(self, purge: Callable[[], Awaitable[int | tuple[int, ...]]],
                             tables: tuple[str, ...]) -> None:
        while True:
            got = await purge()
            counts = (got,) if isinstance(got, int) else got
            for table, n in zip(tables, counts, strict=True):
                self.purged[table] = self.purged.get(table, 0) + n
            if max(counts) < self.settings.batch:
                return
            await asyncio.sleep(0.05)  # let ingestion have the database

    def metric_values(self) -> dict[str, Any]:
        counts = self.counts
        out: dict[str, Any] = {
            "flux_retention_purged_rows": dict(self.purged),
            "flux_event_partitions_created": counts["created"],
            "flux_event_partitions_dropped": counts["dropped"],
            "flux_event_partition_moved_rows": counts["moved_rows"],
            "flux_event_partition_lock_timeouts": counts["lock_timeouts"],
        }
        stats = self.stats
        # Only the lease holder's view is current: another agent's would go stale.
        if stats is None or time.monotonic() - self.stats_at > 3 * self.settings.interval + 60:
            return out
        out["flux_event_partitions"] = stats.ranges
        if stats.newest is not None:
            out["flux_event_partitions_ahead_seconds"] = stats.newest.timestamp() - time.time()
        out["flux_event_partition_rows_outside"] = {"default": stats.default_rows,
                                                    "unkeyed": stats.unkeyed_rows}
        return out
