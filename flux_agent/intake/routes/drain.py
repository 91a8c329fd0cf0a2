"""``POST /v1/drain``: for Jobs on clusters without native sidecars: the workload's last
step asks the agent to deliver what it holds and exit."""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import Any

from aiohttp import web

from ..auth import require
from ..responses import CLAIMS, json_response
from .common import RequestAudit

Drain = Callable[[], Awaitable[dict[str, Any]]]


class DrainRoutes:
    def __init__(self, drain: Drain, audit: RequestAudit) -> None:
        self.drain = drain
        self.audit = audit

    async def post_drain(self, request: web.Request) -> web.Response:
        require(request[CLAIMS], "write")
        self.audit(request, "agent.drain", success=True, claims=request[CLAIMS])
        return json_response(await self.drain(), 200)
