"""Read routes, own agency only: ``GET /v1/runs/{run_id}``, ``GET /v1/runs/{run_id}/events``
(paginated), ``GET /v1/events/{event_id}``."""

from __future__ import annotations

from collections.abc import Awaitable
from typing import TypeVar

from aiohttp import web

from ...core.errors import UpstreamError, ValidationError
from ...core.event import KINDS
from ...core.ids import UUID_TEXT
from ...core.reads import BadCursor, Reader
from ..auth import Claims, require
from ..responses import CLAIMS, json_response
from .common import Commits, known_run_id, limit_param, not_found, read_error

T = TypeVar("T")


class ReadRoutes:
    """Runs and events as stored upstream, own agency only; this agent's own writes first."""

    def __init__(self, reader: Reader, commits: Commits) -> None:
        self.reader = reader
        self.commits = commits

    async def _read(self, query: Awaitable[T]) -> T:
        await self.commits.own_writes()
        try:
            return await query
        except UpstreamError as exc:
            raise read_error(exc) from None
        except BadCursor as exc:
            raise ValidationError("INVALID_CURSOR", str(exc), status=400) from None

    async def get_run(self, request: web.Request) -> web.Response:
        claims: Claims = request[CLAIMS]
        require(claims, "read")
        run_id = known_run_id(request, "RUN_NOT_FOUND")
        summary = await self._read(self.reader.run_summary(claims.agency, run_id))
        if summary is None:
            raise not_found("RUN_NOT_FOUND", f"no events of run {run_id}")
        return json_response(summary)

    async def get_run_events(self, request: web.Request) -> web.Response:
        claims: Claims = request[CLAIMS]
        require(claims, "read")
        run_id = known_run_id(request, "RUN_NOT_FOUND")
        query = request.query
        cursor = query.get("cursor") or None
        kind = query.get("kind")
        if kind is not None and kind not in KINDS:
            raise ValidationError("INVALID_KIND", f"unknown kind {kind!r}", status=400)
        step = query.get("step")
        if step is not None and (not 1 <= len(step) <= 128 or "\x00" in step):
            raise ValidationError("INVALID_STEP", "step must be 1 to 128 characters, no NUL",
                                  status=400)
        limit = limit_param(request, default=100)
        events, next_cursor = await self._read(self.reader.run_events(
            claims.agency, run_id, kind=kind, step=step, cursor=cursor, limit=limit))
        if not events and cursor is None and kind is None and step is None:
            raise not_found("RUN_NOT_FOUND", f"no events of run {run_id}")
        return json_response({"run_id": run_id, "events": events, "next_cursor": next_cursor})

    async def get_event(self, request: web.Request) -> web.Response:
        claims: Claims = request[CLAIMS]
        require(claims, "read")
        event_id = request.match_info["event_id"].lower()
        if not UUID_TEXT.fullmatch(event_id):
            raise not_found("EVENT_NOT_FOUND", "no such event")
        event = await self._read(self.reader.event(claims.agency, event_id))
        if event is None:
            raise not_found("EVENT_NOT_FOUND", "no such event (an event just accepted may "
                            "take a moment to reach PostgreSQL)")
        return json_response(event)
