"""``POST /api/v1/lineage``: an OpenLineage RunEvent, mapped to flux events
(:mod:`flux_agent.lineage`) and then taken in as ``POST /v1/events`` takes events."""

from __future__ import annotations

from typing import Any

from aiohttp import web

from .ingest import EventRoutes


class LineageRoutes(EventRoutes):
    """``POST /api/v1/lineage``: event intake with another reader."""

    async def post_lineage(self, request: web.Request) -> web.Response:
        """``POST /api/v1/lineage``: an OpenLineage RunEvent, as its HTTP transport sends it."""
        lineage = await self.lineage()

        def read(request: web.Request, body: bytes) -> tuple[list[Any], bool]:
            self._media_type(request)
            return lineage.to_events(self._decode_one(body, "")), False

        return await self._ingest(request, read, created=201)
