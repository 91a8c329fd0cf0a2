"""PostgreSQL as the probes see it: up, down or unknown from the last operations (whatever
failed them: an unreachable server, a refused login, a missing privilege), a login role
that would bypass row-level security, and a bounded diagnostic round trip. An idle agent
checks it once per interval (:meth:`DatabaseHealth.run`)."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Callable
from typing import Any

from ..core.errors import UpstreamError, describe
from .pool import Postgres
from .sink import Sink

log = logging.getLogger("flux_agent.agent")


class DatabaseHealth:
    key = "database"  # its name in the readiness answer

    def __init__(self, pg: Postgres, sink: Sink, *, ping_interval: float,
                 on_progress: Callable[[], None]) -> None:
        self.pg = pg
        self.sink = sink
        self.ping_interval = ping_interval
        self.on_progress = on_progress

    def window(self) -> float:
        return max(30.0, 2 * self.ping_interval)

    def state(self) -> str:
        return self.pg.state(self.window())

    def up(self) -> bool:
        return self.pg.state(float("inf")) == "up"

    def unready(self) -> list[str]:
        """Readiness reasons of its own: a login role that bypasses row-level security."""
        role = self.pg.role
        return ["database_role_unsafe"] if role is not None and role.privileged else []

    def reason(self) -> str | None:
        """Why PostgreSQL is down, when an operator must act (``database_login_refused``,
        ``database_permission_denied``); None otherwise."""
        return self.pg.refusal if self.state() == "down" else None

    def last_error(self) -> str | None:
        return self.pg.last_error if self.state() == "down" else None

    async def diagnostics(self) -> dict[str, Any]:
        database: dict[str, Any] = {}
        try:
            database["latency_ms"] = round(await self.sink.ping() * 1000, 3)
            database["schema_version"] = await self.sink.schema_version()
            database["status"] = "up"
        except Exception as exc:  # noqa: BLE001 - a diagnostic reports any failure
            database["status"] = "down"
            database["error"] = describe(exc)
        return database

    async def run(self) -> None:
        """An idle agent still learns when PostgreSQL goes away or comes back (readiness's
        ``database``, flux_postgres_up) with one query per interval, and none while flushes
        or reads prove it anyway."""
        pg, interval = self.pg, self.ping_interval
        was = pg.state(interval * 2)
        while True:
            await asyncio.sleep(interval)
            if pg.last_ok is not None and time.monotonic() - pg.last_ok < interval \
                    and pg.state(interval) == "up":
                continue  # something else talked to PostgreSQL recently
            with contextlib.suppress(UpstreamError):  # recorded by the pool: probes say so
                if pg.refusal is not None:
                    await self.sink.schema_version()  # needs the privileges a ping does not
                else:
                    await pg.ping()
            now = pg.state(interval * 2)
            if now != was:
                if now == "down":
                    log.warning("PostgreSQL unreachable", extra={"fields": {
                        "error": pg.last_error}})
                elif was == "down":
                    log.info("PostgreSQL reachable again")
                was = now
            self.on_progress()
