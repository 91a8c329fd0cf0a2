"""Read routes, own agency only: ``GET /v1/runs/{run_id}``, ``GET /v1/runs/{run_id}/events``
(paginated), ``GET /v1/events/{event_id}``."""

from __future__ import annotations

from aiohttp import web

from ...core.errors import ValidationError
from ...core.event import KINDS
from ...postgres.store import UUID_TEXT, BadCursor, decode_cursor
from ..auth import Claims, require
from ..server import CLAIMS, json_response
from .common import Routes, _known_run_id, _limit, _not_found


class ReadRoutes(Routes):
    """Runs and events as stored in PostgreSQL, own agency only."""

    async def get_run(self, request: web.Request) -> web.Response:
        claims: Claims = request[CLAIMS]
        require(claims, "read")
        run_id = _known_run_id(request, "RUN_NOT_FOUND")
        summary = await self._read(self.store.run_summary(claims.agency, run_id))
        if summary is None:
            raise _not_found("RUN_NOT_FOUND", f"no events of run {run_id}")
        return json_response(summary)

    async def get_run_events(self, request: web.Request) -> web.Response:
        claims: Claims = request[CLAIMS]
        require(claims, "read")
        run_id = _known_run_id(request, "RUN_NOT_FOUND")
        query = request.query
        cursor = query.get("cursor")
        after = None
        if cursor:
            try:
                after = decode_cursor(cursor)
            except BadCursor as exc:
                raise ValidationError("INVALID_CURSOR", str(exc), status=400) from None
        kind = query.get("kind")
        if kind is not None and kind not in KINDS:
            raise ValidationError("INVALID_KIND", f"unknown kind {kind!r}", status=400)
        step = query.get("step")
        if step is not None and (not 1 <= len(step) <= 128 or "\x00" in step):
            raise ValidationError("INVALID_STEP", "step must be 1 to 128 characters, no NUL",
                                  status=400)
        events, next_cursor = await self._read(self.store.run_events(
            claims.agency, run_id, kind=kind, step=step, after=after,
            limit=_limit(request, default=100)))
        if not events and after is None and kind is None and step is None:
            raise _not_found("RUN_NOT_FOUND", f"no events of run {run_id}")
        return json_response({"run_id": run_id, "events": events, "next_cursor": next_cursor})

    async def get_event(self, request: web.Request) -> web.Response:
        claims: Claims = request[CLAIMS]
        require(claims, "read")
        event_id = request.match_info["event_id"].lower()
        if not UUID_TEXT.fullmatch(event_id):
            raise _not_found("EVENT_NOT_FOUND", "no such event")
        event = await self._read(self.store.event(claims.agency, event_id))
        if event is None:
            raise _not_found("EVENT_NOT_FOUND", "no such event (an event just accepted may "
                             "take a moment to reach PostgreSQL)")
        return json_response(event)
