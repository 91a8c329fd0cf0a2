"""``POST /api/v1/lineage``: an OpenLineage RunEvent, mapped to flux events
(:mod:`flux_agent.intake.openlineage`) and then taken in as ``POST /v1/events`` takes events."""

from __future__ import annotations

import asyncio
from typing import Any

from aiohttp import web

from ...core.digest import MAX_DEPTH
from ..body import BodyReader, media_type
from ..openlineage import FLUX_STARTED_DEFAULTS, Lineage
from ..schemas import Contract
from .ingest import Ingest


class LineageRoutes:
    """``POST /api/v1/lineage``: the intake path of events, with another reader."""

    def __init__(self, ingest: Ingest, bodies: BodyReader, contract: Contract | None = None
                 ) -> None:
        self.ingest = ingest
        self.bodies = bodies
        self.contract = contract  # the profile in force decides run.started's defaults
        # Built on the first OpenLineage request, in a worker thread (its schemas are files):
        # an agent that never sees one never pays for them.
        self.lineage: Lineage | None = None
        self._lock = asyncio.Lock()

    async def _mapping(self) -> Lineage:
        if self.lineage is None:
            async with self._lock:
                if self.lineage is None:
                    self.lineage = await asyncio.get_running_loop().run_in_executor(
                        None, Lineage)
        return self.lineage

    async def post_lineage(self, request: web.Request) -> web.StreamResponse:
        """An OpenLineage RunEvent, as its HTTP transport sends it."""
        lineage = await self._mapping()

        flux = self.contract is not None and self.contract.schemas.profile == "flux"
        defaults = FLUX_STARTED_DEFAULTS if flux else None

        def read(request: web.Request, body: bytearray) -> tuple[list[Any], bool]:
            media_type(request)
            return lineage.to_events(self.bodies.decode_one(body, ""), defaults), False

        # The RunEvent (at most MAX_DEPTH levels) is stored one level down in the payload.
        return await self.ingest.ingest(request, read, created=201,
                                        payload_depth=MAX_DEPTH + 1)
