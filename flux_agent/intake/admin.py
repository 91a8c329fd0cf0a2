"""The admin listener: ``/health/live``, ``/health/ready``, ``/health/deep`` and ``/metrics``.

Readiness tells the truth: it fails while the agent drains, while the spool is full or
unwritable, and while events wait with no flush progress for longer than the threshold. A pod
that looks healthy but forwards nothing is the failure this exists to prevent.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from typing import Any, Protocol

from aiohttp import web

from ..core.timefmt import utc_now_text
from ..obs.metrics import CONTENT_TYPE, Metrics
from .auth import Authenticator, require
from .middleware import is_local, make_problem_middleware
from .responses import json_response


class Probe(Protocol):
    def readiness(self) -> tuple[bool, dict[str, Any]]: ...
    def liveness(self) -> tuple[bool, dict[str, Any]]: ...
    async def diagnostics(self) -> dict[str, Any]: ...


DEEP_BUDGET = 5.0  # /health/deep answers within this, whatever the database does


def may_see_diagnostics(request: web.Request, authenticator: Authenticator | None) -> bool:
    """Diagnostic detail (database error text naming roles and hosts, the background
    tasks' errors) is for loopback callers and operators holding a token whose role may
    ``admin``; the pod network (the chart listens on 0.0.0.0) gets the probes' summary.
    A token that does not verify is a 401, one whose role may not is a 403."""
    if is_local(request):
        return True
    if authenticator is None or "Authorization" not in request.headers:
        return False
    require(authenticator.authenticate(request.headers, False), "admin")
    return True


def admin_app(probe: Probe, metrics: Metrics, authenticator: Authenticator | None = None
              ) -> web.Application:
    app = web.Application(middlewares=[make_problem_middleware(metrics)])

    async def live(request: web.Request) -> web.Response:
        ok, body = probe.liveness()
        return json_response({"status": "alive" if ok else "failing", **body,
                              "timestamp": utc_now_text()}, 200 if ok else 503)

    async def ready(request: web.Request) -> web.Response:
        ok, body = probe.readiness()
        body = {"status": "ready" if ok else "not_ready", **body, "timestamp": utc_now_text()}
        return json_response(body, 200 if ok else 503)

    async def deep(request: web.Request) -> web.Response:
        ok, body = probe.readiness()
        if not may_see_diagnostics(request, authenticator):
            return json_response({"status": "ready" if ok else "not_ready", **body,
                                  "diagnostics": "served to loopback callers and admin tokens",
                                  "timestamp": utc_now_text()}, 200 if ok else 503)
        # Not asyncio.wait_for: on a black-holed database, cancelling the diagnostics takes
        # as long as the stuck call; the answer must not wait for that.
        task = asyncio.ensure_future(probe.diagnostics())
        done, _ = await asyncio.wait({task}, timeout=DEEP_BUDGET)
        if done:
            details = task.result()
        else:
            task.cancel()
            task.add_done_callback(lambda t: t.cancelled() or t.exception())
            details = {"database": {"status": "timeout",
                                    "error": f"no answer within {DEEP_BUDGET:g} s"}}
        return json_response({"status": "ready" if ok else "not_ready", **body, **details,
                              "timestamp": utc_now_text()}, 200 if ok else 503)

    async def scrape(request: web.Request) -> web.Response:
        # Collection reads in-memory state only; cheap enough to run on the loop.
        return web.Response(body=metrics.exposition(), headers={"Content-Type": CONTENT_TYPE})

    handlers: dict[str, Callable[[web.Request], Awaitable[web.Response]]] = {
        "/health/live": live,
        "/health/ready": ready,
        "/health/deep": deep,
        "/metrics": scrape,
    }
    for path, handler in handlers.items():
        app.router.add_get(path, handler)
    return app
