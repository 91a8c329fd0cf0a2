"""The outermost middleware of both listeners (request id, trace context, problem+json for
every error, the request's metrics), the access log, and where a request came from."""

from __future__ import annotations

import asyncio
import itertools
import logging
import random
import re
import socket
import struct
import time
from collections.abc import Awaitable, Callable

from aiohttp import web
from aiohttp.abc import AbstractAccessLogger
from aiohttp.http import HttpProcessingError
from aiohttp.typedefs import Middleware
from aiohttp.web import RequestPayloadError

from ..core.errors import FluxError, TerminalError, ValidationError
from ..obs import logs
from ..obs.metrics import Metrics
from ..obs.tracing import Tracing
from .responses import CLAIMS, REQUEST_ID, TRACE, http_error, problem_response

log = logging.getLogger("flux_agent.intake")  # the logger name of the event API, as before

_REQUEST_ID = re.compile(r"^[A-Za-z0-9._:/+=@-]{1,128}$")
_TRACEPARENT = re.compile(r"^[0-9a-f]{2}-([0-9a-f]{32})-([0-9a-f]{16})-[0-9a-f]{2}")
_PEERCRED = struct.Struct("3i")  # pid, uid, gid
# Request and trace ids must be unique, not secret: the Mersenne Twister is far cheaper than
# uuid4's system call per id. Generated request ids are this process's random prefix and a
# counter.
_random_bits = random.Random().getrandbits
_ID_PREFIX = f"{_random_bits(48):012x}"
_ids = itertools.count(1)
# An error answered before the request body was read: the rest of the body is read (and
# dropped) within these bounds so that the connection can serve the next request; a body
# that does not end within them, or cannot be decoded, closes the connection, and the
# answer says so (``Connection: close``) instead of the connection dying after it.
_DRAIN_SECONDS = 2.0

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


class AccessLogger(AbstractAccessLogger):
    """One structured line per request, at info level, tagged with the request's ids, when
    the ``aiohttp.access`` logger is on (``logs.setup``). aiohttp calls it once a response
    is written, which is also when a connection's request is over: the connection guard
    (:mod:`.server`) learns it here."""

    def log(self, request: web.BaseRequest, response: web.StreamResponse, time: float) -> None:
        transport = request.transport
        if transport is not None:
            finished = getattr(transport.get_protocol(), "request_finished", None)
            if finished is not None:
                finished()
        if not self.logger.isEnabledFor(logging.INFO):
            return
        trace = request.get(TRACE, ("", ""))
        self.logger.info(
            "%s %s %s", request.method, request.path, response.status,
            extra={"fields": {"method": request.method, "path": request.path,
                              "status": response.status,
                              "duration_ms": round(time * 1000, 3),
                              "bytes": response.body_length},
                   "trace_id": trace[0], "span_id": trace[1],
                   "correlation_id": request.get(REQUEST_ID, "")})

    @property
    def enabled(self) -> bool:
        return True  # the guard needs every call; log() decides whether to write a line


def source_of(request: web.Request) -> str:
    """``socket`` for the Unix socket, else ``tcp``."""
    transport = request.transport
    sockname = transport.get_extra_info("sockname") if transport is not None else None
    return "socket" if isinstance(sockname, str | bytes) else "tcp"


def is_local(request: web.Request) -> bool:
    """True on the Unix socket and for loopback peers."""
    transport = request.transport
    if transport is None:
        return False
    if source_of(request) == "socket":
        return True
    peer = transport.get_extra_info("peername")
    host = peer[0] if isinstance(peer, tuple) and peer else ""
    return host == "::1" or host.startswith("127.") or host == "::ffff:127.0.0.1"


def peer_uid(request: web.Request) -> int | None:
    """The connecting process's uid on the Unix socket (SO_PEERCRED), else None."""
    transport = request.transport
    sock = transport.get_extra_info("socket") if transport is not None else None
    if sock is None or sock.family != socket.AF_UNIX:
        return None
    creds = sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, _PEERCRED.size)
    return int(_PEERCRED.unpack(creds)[1])


def route_of(request: web.Request) -> str:
    """The route template (``/v1/runs/{run_id}``): a bounded metric label."""
    resource = request.match_info.route.resource
    return resource.canonical if resource is not None else "unmatched"


def make_problem_middleware(metrics: Metrics, tracing: Tracing | None = None, *,
                            max_drain_bytes: int = 4 * 1024**2) -> Middleware:
    """Outermost middleware: request id, trace context, problem+json for every error."""

    @web.middleware
    async def problem_middleware(request: web.Request, handler: Handler) -> web.StreamResponse:
        started = time.perf_counter()
        headers = request.headers
        rid = headers.get("X-Request-ID") or headers.get("X-Correlation-ID")
        if not rid or not _REQUEST_ID.match(rid):
            rid = f"{_ID_PREFIX}-{next(_ids):x}"
        request[REQUEST_ID] = rid
        traceparent = headers.get("traceparent")
        m = _TRACEPARENT.match(traceparent) if traceparent else None
        trace = (m.group(1), m.group(2)) if m else (f"{_random_bits(128):032x}",
                                                     f"{_random_bits(64):016x}")
        if tracing is not None and tracing.enabled:
            with tracing.request(f"{request.method} {route_of(request)}",
                                 traceparent if m else None, trace) as trace:
                return await answer(request, handler, rid, trace, started)
        return await answer(request, handler, rid, trace, started)

    async def answer(request: web.Request, handler: Handler, rid: str,
                     trace: tuple[str, str], started: float) -> web.StreamResponse:
        request[TRACE] = trace
        token = logs.request_context.set((rid, trace[0], trace[1]))
        agency = ""
        try:
            try:
                response = await handler(request)
            except web.HTTPException as exc:
                if exc.status < 400:
                    raise
                raise http_error(exc) from None
            except HttpProcessingError as exc:
                raise ValidationError("BAD_REQUEST", exc.message or "malformed request",
                                      status=400) from None
            except RequestPayloadError as exc:
                # Undecodable Content-Encoding, or a body cut short by the client.
                raise ValidationError("INVALID_BODY", f"the request body could not be read: "
                                      f"{str(exc).splitlines()[-1].strip()}", status=400) from None
            except ConnectionResetError:
                # The caller hung up mid-body: its mistake (or its crash), not ours; nothing
                # was accepted, and the answer most likely reaches no one.
                raise ValidationError("INVALID_BODY", "the connection closed before the "
                                      "request body was complete", status=400) from None
        except FluxError as err:
            response = problem_response(request, err)
            # 408 (a stalled body) and 413 (too large) are not worth reading on.
            if err.status in (408, 413) or not await _body_consumed(request, max_drain_bytes):
                response.force_close()  # said in the answer: Connection: close
            claims = request.get(CLAIMS)
            agency = claims.agency if claims else ""
            metrics.errors.labels(err.error_class, agency).inc()
            if err.status >= 500 and not err.retryable:
                log.error("request failed: %s", err.detail,
                          extra={"fields": {"code": err.code, "path": request.path}})
        except (asyncio.CancelledError, KeyboardInterrupt):
            raise
        except Exception:
            log.exception("unexpected error while handling a request",
                          extra={"fields": {"path": request.path}})
            internal = TerminalError("INTERNAL_ERROR", "the agent failed to handle this "
                                     "request; nothing from it was accepted")
            response = problem_response(request, internal)
            response.force_close()
            metrics.errors.labels(internal.error_class, "").inc()
        finally:
            logs.request_context.reset(token)
        response.headers["X-Request-ID"] = rid
        claims = request.get(CLAIMS)
        metrics.answered(route_of(request), response.status,
                         claims.agency if claims else agency, time.perf_counter() - started)
        return response

    return problem_middleware


async def _body_consumed(request: web.Request, limit: int) -> bool:
    """True when the request body has been read to its end (reading what is left, within
    bounds): the connection may then serve another request after this answer."""
    content = request.content
    if content.is_eof():
        return True
    if content.exception() is not None:
        return False
    left = limit
    try:
        async with asyncio.timeout(_DRAIN_SECONDS):
            while not content.is_eof():
                chunk = await content.readany()
                left -= len(chunk)
                if left < 0 or (not chunk and not content.is_eof()):
                    return False
    except (TimeoutError, RequestPayloadError, HttpProcessingError, ConnectionError):
        return False
    return True
