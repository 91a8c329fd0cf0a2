"""``POST /api/v1/lineage``: an OpenLineage RunEvent, mapped to flux events
(:mod:`flux_agent.lineage`) and then taken in as ``POST /v1/events`` takes events."""

from __future__ import annotations

from typing import Any

from aiohttp import web

from .common import _read_body
from .events import EventRoutes


class LineageRoutes(EventRoutes):
    """``POST /api/v1/lineage``: event intake with another reader."""

    async def post_lineage(self, request: web.Request) -> web.Response:
        """``POST /api/v1/lineage``: an OpenLineage RunEvent, as its HTTP transport sends it."""
        return await self._ingest(request, self._read_lineage, created=201)

    async def _read_lineage(self, request: web.Request) -> tuple[list[Any], bool]:
        self._media_type(request)
        doc = self._decode_one(await _read_body(request), "")
        return self.lineage.to_events(doc), False
