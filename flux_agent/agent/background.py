"""The agent's background work, each loop supervised (see :mod:`flux_agent.supervise`):
snapshots of its indexes, pings of an idle database, the embedded database's watcher, key
reloads, and retention (partition maintenance and purges) under the lease."""

from __future__ import annotations

import asyncio
import functools
import logging
import os
import time
from collections.abc import Awaitable, Callable, Mapping
from pathlib import Path

from ..core.files import is_resource_error, reason, write_atomic
from ..intake.auth import Authenticator
from ..postgres.pool import UnsafeRole, describe, is_transient, sqlstate_of
from .setup import file_stamp, load_keys
from .state import AgentState

log = logging.getLogger("flux_agent.agent")

SEEN_SNAPSHOT_INTERVAL = 30.0
EMBEDDED_CHECK_INTERVAL = 5.0
PARTITION_STEPS_PER_ROUND = 200  # creations, then drops; the next round goes on


class Background(AgentState):
    """Mixed into :class:`~flux_agent.agent.Agent`: the loops it supervises."""

    async def _watch_jwks(self, authenticator: Authenticator, path: Path) -> None:
        """Key rotation: re-read the JWKS file when it changes (checked every 2 s)."""
        loop = asyncio.get_running_loop()
        last = file_stamp(path)
        while True:
            await asyncio.sleep(2.0)
            stamp = await loop.run_in_executor(None, file_stamp, path)
            if stamp == last:
                continue
            last = stamp
            try:
                keys = await loop.run_in_executor(None, load_keys, self.config)
            except (OSError, ValueError) as exc:
                log.error("JWKS file unreadable; keeping the previous keys",
                          extra={"fields": {"path": str(path), "error": str(exc)}})
                continue
            authenticator.set_keys(keys)  # type: ignore[attr-defined]
            log.info("JWKS reloaded", extra={"fields": {"path": str(path),
                                                         "keys": len(keys.by_kid)}})

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
