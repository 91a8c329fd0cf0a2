"""Read routes, own agency only: ``GET /v1/runs`` (the caller's runs, newest first),
``GET /v1/runs/{run_id}``, ``GET /v1/runs/{run_id}/events`` (paginated by rows and bytes),
``GET /v1/events/{event_id}``. Answers are reserved in request memory and streamed
(:mod:`..answers`)."""

from __future__ import annotations

from collections.abc import Awaitable
from typing import TypeVar

from aiohttp import web

from ...core.errors import UpstreamError, ValidationError
from ...core.event import KINDS
from ...core.ids import UUID_TEXT
from ...core.reads import BadCursor, Reader
from ..answers import Answers
from ..auth import Claims, require
from ..memory import Held
from ..responses import CLAIMS
from .common import Commits, known_run_id, limit_param, not_found, read_error

T = TypeVar("T")


class ReadRoutes:
    """Runs and events as stored upstream, own agency only; this agent's own writes first."""

    def __init__(self, reader: Reader, commits: Commits, answers: Answers) -> None:
        self.reader = reader
        self.commits = commits
        self.answers = answers

    async def _read(self, query: Awaitable[T], held: Held) -> T:
        try:
            await self.commits.own_writes()
            return await query
        except BaseException as exc:
            held.release()
            if isinstance(exc, UpstreamError):
                raise read_error(exc) from None
            if isinstance(exc, BadCursor):
                raise ValidationError("INVALID_CURSOR", str(exc), status=400) from None
            raise

    async def get_runs(self, request: web.Request) -> web.StreamResponse:
        claims: Claims = request[CLAIMS]
        require(claims, "read")
        cursor = request.query.get("cursor") or None
        limit = limit_param(request, default=100)
        held = self.answers.for_page()
        page = await self._read(self.reader.runs(
            claims.agency, cursor=cursor, limit=limit, max_bytes=held.nbytes), held)
        return await self.answers.send_page(request, held, {"runs": []}, page.items,
                                            {"next_cursor": page.next_cursor}, page.nbytes)

    async def get_run(self, request: web.Request) -> web.StreamResponse:
        claims: Claims = request[CLAIMS]
        require(claims, "read")
        run_id = known_run_id(request, "RUN_NOT_FOUND")
        held = self.answers.for_page()
        summary = await self._read(self.reader.run_summary(claims.agency, run_id), held)
        if summary is None:
            held.release()
            raise not_found("RUN_NOT_FOUND", f"no events of run {run_id}")
        return await self.answers.send(request, held, summary)

    async def get_run_events(self, request: web.Request) -> web.StreamResponse:
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
        held = self.answers.for_page()
        page = await self._read(self.reader.run_events(
            claims.agency, run_id, kind=kind, step=step, cursor=cursor, limit=limit,
            max_bytes=held.nbytes), held)
        if not page.items and cursor is None and kind is None and step is None:
            held.release()
            raise not_found("RUN_NOT_FOUND", f"no events of run {run_id}")
        return await self.answers.send_page(
            request, held, {"run_id": run_id, "events": []}, page.items,
            {"next_cursor": page.next_cursor}, page.nbytes)

    async def get_event(self, request: web.Request) -> web.StreamResponse:
        claims: Claims = request[CLAIMS]
        require(claims, "read")
        event_id = request.match_info["event_id"].lower()
        if not UUID_TEXT.fullmatch(event_id):
            raise not_found("EVENT_NOT_FOUND", "no such event")
        held = self.answers.for_page()
        event = await self._read(self.reader.event(claims.agency, event_id), held)
        if event is None:
            held.release()
            raise not_found("EVENT_NOT_FOUND", "no such event (an event just accepted may "
                            "take a moment to reach PostgreSQL)")
        return await self.answers.send(request, held, event)
