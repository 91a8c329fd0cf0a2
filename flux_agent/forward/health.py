"""The aggregators as the probes see them: up, down or unknown from the last calls, a
diagnostic round trip, and a check of an idle sidecar's path once per interval."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Callable
from typing import Any

from ..core.errors import UpstreamError, describe
from . import wire
from .upstream import Upstream

log = logging.getLogger("flux_agent.forward")


class UpstreamHealth:
    key = "upstream"

    def __init__(self, upstream: Upstream, *, ping_interval: float,
                 on_progress: Callable[[], None]) -> None:
        self.upstream = upstream
        self.ping_interval = ping_interval
        self.on_progress = on_progress

    def window(self) -> float:
        return max(30.0, 2 * self.ping_interval)

    def state(self) -> str:
        return self.upstream.state(self.window())

    def up(self) -> bool:
        return self.upstream.state(float("inf")) == "up"

    def unready(self) -> list[str]:
        return []

    def reason(self) -> str | None:
        return None

    async def _ping(self) -> float:
        started = time.perf_counter()
        answer = await self.upstream.request("GET", wire.RECORDS_PATH)
        if answer.status != 200:
            raise UpstreamError(f"{self.upstream.current}{wire.RECORDS_PATH}: "
                                f"{answer.status}")
        return time.perf_counter() - started

    async def diagnostics(self) -> dict[str, Any]:
        out: dict[str, Any] = {"aggregators": list(self.upstream.urls),
                               "current": self.upstream.current}
        try:
            out["latency_ms"] = round(await self._ping() * 1000, 3)
            out["status"] = "up"
        except Exception as exc:  # noqa: BLE001 - a diagnostic reports any failure
            out["status"] = "down"
            out["error"] = describe(exc)
        return out

    async def run(self) -> None:
        """An idle sidecar still learns when its aggregators go away or come back."""
        interval = self.ping_interval
        was = self.upstream.state(interval * 2)
        while True:
            await asyncio.sleep(interval)
            last = self.upstream.last_ok
            if last is not None and time.monotonic() - last < interval \
                    and self.upstream.state(interval) == "up":
                continue
            with contextlib.suppress(UpstreamError):  # recorded by the client
                await self._ping()
            now = self.upstream.state(interval * 2)
            if now != was:
                if now == "down":
                    log.warning("aggregators unreachable", extra={"fields": {
                        "error": self.upstream.last_error}})
                elif was == "down":
                    log.info("aggregators reachable again")
                was = now
            self.on_progress()
