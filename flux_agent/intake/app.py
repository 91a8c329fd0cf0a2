"""The event API: its route table and the auth middleware, over the route families (events,
lineage, checkpoints, reads, OpenAPI, drain: one module each) and the problem middleware
(``server``).

A request is atomic: its events are validated together, spooled as one record, and
acknowledged only once that record is durable. Nothing about a request is half-accepted.
"""

from __future__ import annotations

from aiohttp import web

from ..core.errors import AuthenticationError, DataIsolationError, FluxError, ValidationError
from .admin import DrainRoutes
from .auth import check_agency
from .routes.checkpoint import CheckpointRoutes
from .routes.common import _expect
from .routes.lineage import LineageRoutes
from .routes.openapi import OpenAPIRoutes
from .routes.reads import ReadRoutes
from .server import CLAIMS, Handler, is_local, make_problem_middleware, peer_uid, source_of

_PUBLIC = frozenset({"/openapi.json"})  # served without credentials


class Intake(LineageRoutes, CheckpointRoutes, ReadRoutes, OpenAPIRoutes, DrainRoutes):
    """Routes of the event API and what they need from the pipeline (each family in its own
    module; LineageRoutes brings EventRoutes)."""

    def app(self) -> web.Application:
        app = web.Application(
            client_max_size=self.config.request_max_bytes,
            middlewares=[make_problem_middleware(self.metrics, self.tracing),
                         self._auth_middleware],
        )
        app.router.add_post("/v1/events", self.post_events, expect_handler=_expect)
        app.router.add_post("/api/v1/lineage", self.post_lineage, expect_handler=_expect)
        app.router.add_put("/v1/runs/{run_id}/checkpoint", self.put_checkpoint,
                           expect_handler=_expect)
        app.router.add_get("/v1/runs/{run_id}/checkpoint", self.get_checkpoint)
        app.router.add_get("/v1/runs/{run_id}/checkpoints", self.get_checkpoint_history)
        app.router.add_get("/v1/runs/{run_id}", self.get_run)
        app.router.add_get("/v1/runs/{run_id}/events", self.get_run_events)
        app.router.add_get("/v1/events/{event_id}", self.get_event)
        app.router.add_get("/openapi.json", self.get_openapi)
        app.router.add_post("/v1/drain", self.post_drain)
        return app

    @web.middleware
    async def _auth_middleware(self, request: web.Request, handler: Handler
                               ) -> web.StreamResponse:
        if request.match_info.http_exception is not None or request.path in _PUBLIC:
            return await handler(request)
        source = source_of(request)
        try:
            if self.allowed_uids and source == "socket":
                uid = peer_uid(request)
                if uid not in self.allowed_uids:
                    raise AuthenticationError("PEER_NOT_ALLOWED",
                                              f"uid {uid} may not use this socket")
            claims = self.authenticator.authenticate(request.headers, is_local(request))
            check_agency(claims, self.manifest.knows)
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
