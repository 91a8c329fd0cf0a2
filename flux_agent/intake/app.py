"""The event API: its route table over the route families (one module each in ``routes/``),
the problem middleware (:mod:`.middleware`) and the authentication middleware.

A request is atomic: its events are validated together, spooled as one record, and
acknowledged only once that record is durable. Nothing about a request is half-accepted.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Collection
from dataclasses import dataclass

from aiohttp import web

from ..core.errors import AuthenticationError, DataIsolationError, FluxError, ValidationError
from ..forward.wire import AGENCY_HEADER, RECORDS_PATH
from ..obs.metrics import Metrics
from ..obs.tracing import Tracing
from .auth import Authenticator, check_agency
from .body import expect_continue
from .middleware import Handler, is_local, make_problem_middleware, peer_uid, source_of
from .responses import CLAIMS
from .routes.checkpoint import CheckpointRoutes
from .routes.common import RequestAudit
from .routes.drain import DrainRoutes
from .routes.ingest import Ingest
from .routes.lineage import LineageRoutes
from .routes.openapi import OpenAPIRoutes
from .routes.reads import ReadRoutes
from .routes.records import RecordsRoutes

_PUBLIC = frozenset({"/openapi.json"})  # served without credentials


class Authentication:
    """The middleware that names the caller (its claims) before any route runs, and audits
    refusals: bad credentials, a peer uid not allowed on the socket, a crossed agency."""

    def __init__(self, authenticator: Authenticator, knows: Callable[[str], bool],
                 audit: RequestAudit, allowed_uids: Collection[int] = ()) -> None:
        self.authenticator = authenticator
        self.knows = knows
        self.audit = audit
        self.allowed_uids = frozenset(allowed_uids)

    @web.middleware
    async def middleware(self, request: web.Request, handler: Handler) -> web.StreamResponse:
        if request.match_info.http_exception is not None or request.path in _PUBLIC:
            return await handler(request)
        try:
            if self.allowed_uids and source_of(request) == "socket":
                uid = peer_uid(request)
                if uid not in self.allowed_uids:
                    raise AuthenticationError("PEER_NOT_ALLOWED",
                                              f"uid {uid} may not use this socket")
            claims = self.authenticator.authenticate(request.headers, is_local(request))
            chosen = request.headers.get(AGENCY_HEADER)
            if chosen is not None and chosen != claims.agency:
                if not claims.may_act_for(chosen):
                    raise DataIsolationError(
                        "AGENCY_NOT_ALLOWED", f"this caller may not act for agency {chosen!r} "
                        f"({AGENCY_HEADER})", context={"agency": chosen})
                claims = dataclasses.replace(claims, agency=chosen)
            check_agency(claims, self.knows)
        except FluxError as err:
            self.audit(request, "auth.failed", success=False, claims=None,
                       detail={"code": err.code, "status": err.status})
            raise
        request[CLAIMS] = claims
        try:
            return await handler(request)
        except DataIsolationError as err:
            self.audit(request, "isolation.violation", success=False, claims=claims,
                       detail={"code": err.code, "errors": err.errors[:20]})
            raise
        except ValidationError as err:
            if err.code == "FORBIDDEN":
                self.audit(request, "authz.denied", success=False, claims=claims,
                           detail={"role": claims.role})
            raise


@dataclass(frozen=True, slots=True)
class EventApi:
    """The route families of the event API, each built with what it uses."""

    ingest: Ingest
    lineage: LineageRoutes
    checkpoints: CheckpointRoutes
    reads: ReadRoutes
    openapi: OpenAPIRoutes
    drain: DrainRoutes

    def app(self, *, auth: Authentication, metrics: Metrics, tracing: Tracing,
            max_bytes: int) -> web.Application:
        app = _application(auth, metrics, tracing, max_bytes)
        router = app.router
        router.add_post("/v1/events", self.ingest.post_events, expect_handler=expect_continue)
        router.add_post("/api/v1/lineage", self.lineage.post_lineage,
                        expect_handler=expect_continue)
        router.add_put("/v1/runs/{run_id}/checkpoint", self.checkpoints.put_checkpoint,
                       expect_handler=expect_continue)
        _add_reads(router, self.checkpoints, self.reads, self.openapi)
        router.add_post("/v1/drain", self.drain.post_drain)
        return app


@dataclass(frozen=True, slots=True)
class AggregatorApi:
    """An aggregator's API: sealed records from sidecars, and the reads they make for the
    agencies they are bound to."""

    records: RecordsRoutes
    checkpoints: CheckpointRoutes
    reads: ReadRoutes
    openapi: OpenAPIRoutes

    def app(self, *, auth: Authentication, metrics: Metrics, tracing: Tracing,
            max_bytes: int) -> web.Application:
        app = _application(auth, metrics, tracing, max_bytes)
        router = app.router
        router.add_post(RECORDS_PATH, self.records.post_records, expect_handler=expect_continue)
        router.add_get(RECORDS_PATH, self.records.get_records)
        _add_reads(router, self.checkpoints, self.reads, self.openapi)
        return app


def _application(auth: Authentication, metrics: Metrics, tracing: Tracing,
                 max_bytes: int) -> web.Application:
    return web.Application(
        client_max_size=max_bytes,
        middlewares=[make_problem_middleware(metrics, tracing, max_drain_bytes=max_bytes),
                     auth.middleware])


def _add_reads(router: web.UrlDispatcher, checkpoints: CheckpointRoutes, reads: ReadRoutes,
               openapi: OpenAPIRoutes) -> None:
    """The read routes both roles serve (an aggregator's for the sidecars it serves)."""
    router.add_get("/v1/runs/{run_id}/checkpoint", checkpoints.get_checkpoint)
    router.add_get("/v1/runs/{run_id}/checkpoints", checkpoints.get_checkpoint_history)
    router.add_get("/v1/runs", reads.get_runs)
    router.add_get("/v1/runs/{run_id}", reads.get_run)
    router.add_get("/v1/runs/{run_id}/events", reads.get_run_events)
    router.add_get("/v1/events/{event_id}", reads.get_event)
    router.add_get("/openapi.json", openapi.get_openapi)
