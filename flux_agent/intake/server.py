"""What every route and both listeners share: the request keys, JSON and problem+json
answers, the outermost middleware (request id, trace context, every error as problem+json),
the runner that answers unparseable HTTP in problem+json too, and where a request came from."""

from __future__ import annotations

import asyncio
import itertools
import logging
import random
import re
import socket as _socket
import struct
import time
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass, field
from http import HTTPStatus
from typing import Any

import msgspec
from aiohttp import web
from aiohttp.abc import AbstractAccessLogger
from aiohttp.http_exceptions import ContentEncodingError, HttpProcessingError
from aiohttp.typedefs import Middleware
from aiohttp.web_protocol import RequestHandler, RequestPayloadError

from ..core.errors import (
    PROBLEM_CONTENT_TYPE,
    FluxError,
    TerminalError,
    TransientError,
    ValidationError,
)
from ..obs import logs
from ..obs.metrics import Metrics
from ..obs.tracing import Tracing
from .auth import Claims
from .framing import Framing, Refusal

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

CLAIMS = web.RequestKey("flux.claims", Claims)
REQUEST_ID = web.RequestKey("flux.request_id", str)
TRACE = web.RequestKey("flux.trace", tuple[str, str])

# aiohttp's own HTTP errors, as problem codes.
_HTTP_CODES: Mapping[int, str] = {
    400: "BAD_REQUEST",
    404: "NOT_FOUND",
    405: "METHOD_NOT_ALLOWED",
    413: "REQUEST_TOO_LARGE",
    415: "UNSUPPORTED_MEDIA_TYPE",
}


class AccessLogger(AbstractAccessLogger):
    """One structured line per request, at info level (``logs.setup`` turns the logger on
    or off), tagged with the request's ids."""

    def log(self, request: web.BaseRequest, response: web.StreamResponse, time: float) -> None:
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
        return self.logger.isEnabledFor(logging.INFO)


def json_response(body: Any, status: int = 200, headers: Mapping[str, str] | None = None
                  ) -> web.Response:
    return web.Response(body=msgspec.json.encode(body), status=status,
                        content_type="application/json", headers=headers)


def problem_response(request: web.Request, err: FluxError) -> web.Response:
    trace = request.get(TRACE, ("", ""))
    body = err.problem(
        instance=request.path,
        request_id=request.get(REQUEST_ID, ""),
        trace_id=trace[0],
        span_id=trace[1],
    )
    headers = dict(err.headers)
    return web.Response(body=msgspec.json.encode(body), status=err.status,
                        content_type=PROBLEM_CONTENT_TYPE, headers=headers)


@dataclass(frozen=True, slots=True)
class HttpLimits:
    """What one runner's connections may hold: how long a connection may idle between
    requests (``idle_timeout``, before its first one too) and take to send a request head
    (``header_timeout``), how many may be open at once on each kind of listener
    (``max_connections``: ``tcp``, ``unix``; beyond it a new one gets a 503 and is closed),
    and the largest chunk of a chunked body (``max_chunk``)."""

    idle_timeout: float = 75.0
    header_timeout: float = 10.0
    max_connections: Mapping[str, int] = field(default_factory=lambda: {"tcp": 1024,
                                                                        "unix": 1024})
    max_chunk: int = 4 * 1024**2


# A caller's mistake that aiohttp reports through log_exception (a body it cannot decode
# or that ends early, found while draining it after the answer): not the agent's failure.
_CLIENT_FAULTS = (HttpProcessingError, RequestPayloadError, ConnectionError)
_CAP_LOG_INTERVAL = 60.0


class _ProblemRequestHandler(RequestHandler):
    """aiohttp answers what it cannot parse (control bytes in a header, an oversized line,
    an unknown method or Content-Encoding) before any middleware runs, in text/plain that
    quotes the offending bytes: a caller's bearer token included. Answer problem+json
    that quotes nothing instead.

    Below the parser it also keeps each connection honest (:class:`HttpLimits`): a request
    line that is not HTTP/1.x and a chunk larger than a request are refused before the
    parser sees them (:mod:`.framing`), a head must arrive within the header timeout, and a
    listener takes no more connections than its cap."""

    def __init__(self, manager: _ProblemServer, **kwargs: Any) -> None:
        super().__init__(manager, **kwargs)
        self._limits = manager.limits
        self._framing = Framing(self._limits.max_chunk)
        self._head_timer: asyncio.TimerHandle | None = None
        self._listener = ""  # tcp or unix, once admitted

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        manager = self._manager
        assert isinstance(manager, _ProblemServer)
        sockname = transport.get_extra_info("sockname")
        listener = "unix" if isinstance(sockname, str | bytes) else "tcp"
        if not manager.admit(listener):
            err = TransientError("TOO_MANY_CONNECTIONS", "this listener has as many "
                                 "connections as it takes; retry shortly", retry_after=1)
            _write_problem(transport, err)  # type: ignore[arg-type]
            transport.close()
            return
        self._listener = listener
        super().connection_made(transport)

    def connection_lost(self, exc: BaseException | None) -> None:
        if not self._listener:
            return  # refused at the door: aiohttp never knew it
        manager = self._manager
        if isinstance(manager, _ProblemServer):
            manager.release(self._listener)
        self._cancel_head_timer()
        super().connection_lost(exc)

    def data_received(self, data: bytes) -> None:
        if data and not (self._force_close or self._close or self._upgraded):
            refusal = self._framing.feed(data)
            if refusal is not None:
                self._refuse(refusal)
                return
        super().data_received(data)
        if self._framing.in_head:
            if self._head_timer is None and not self._force_close:
                self._head_timer = self._loop.call_later(self._limits.header_timeout,
                                                         self._head_timed_out)
        else:
            self._cancel_head_timer()

    def _cancel_head_timer(self) -> None:
        if self._head_timer is not None:
            self._head_timer.cancel()
            self._head_timer = None

    def _head_timed_out(self) -> None:
        self._head_timer = None
        if not self._framing.in_head or self._force_close:
            return
        if self._current_request is not None or self._messages:
            self.close()  # pipelined behind a request still being answered: finish that one
            return
        self._refuse(Refusal(408, "HEADER_TIMEOUT", f"the request head did not arrive within "
                             f"{self._limits.header_timeout:g} s"))

    def _refuse(self, refusal: Refusal) -> None:
        """Answer in problem+json, unless an answer has begun already, and close."""
        log.warning("HTTP request refused", extra={"fields": {
            "status": refusal.status, "code": refusal.code, "listener": self._listener}})
        current = self._current_request
        transport = self.transport
        if transport is not None and (current is None or current.writer.output_size == 0):
            _write_problem(transport, ValidationError(refusal.code, refusal.detail,
                                                      status=refusal.status))
        self._cancel_head_timer()
        self.force_close()

    def log_exception(self, *args: Any, **kw: Any) -> None:
        exc = kw.get("exc_info")
        if isinstance(exc, _CLIENT_FAULTS):
            log.warning("request body refused after the answer", extra={"fields": {
                "error": type(exc).__name__}})
            return
        super().log_exception(*args, **kw)

    def handle_error(self, request: Any, status: int = 500, exc: BaseException | None = None,
                     message: str | None = None) -> web.StreamResponse:
        what = type(exc).__name__ if exc is not None else "HTTP error"
        err: FluxError
        if status >= 500:
            super().handle_error(request, status, exc, message)  # logs the traceback
            err = TerminalError("INTERNAL_ERROR", "the agent failed to handle this request; "
                                "nothing from it was accepted", status=status)
        else:
            # The caller's mistake: one line, without the bytes (they may hold a token).
            log.warning("unparseable HTTP request refused",
                        extra={"fields": {"status": status, "error": what}})
            if request.writer.output_size > 0:
                raise ConnectionError("response already started; cannot answer the error")
            if isinstance(exc, ContentEncodingError):  # br or zstd without their codec
                status = 415
                err = ValidationError("UNSUPPORTED_MEDIA_TYPE", "this Content-Encoding is not "
                                      "accepted; send gzip, deflate or none", status=415)
            else:
                err = ValidationError("BAD_REQUEST", f"the request is not valid HTTP ({what})",
                                      status=status)
        body = err.problem(instance="", request_id="", trace_id="", span_id="")
        response = web.Response(body=msgspec.json.encode(body), status=status,
                                content_type=PROBLEM_CONTENT_TYPE)
        response.force_close()
        return response


def _write_problem(transport: asyncio.Transport, err: FluxError) -> None:
    """A whole problem+json answer, written below aiohttp (before or instead of a request)."""
    body = msgspec.json.encode(err.problem(instance="", request_id="", trace_id="",
                                           span_id=""))
    extra = "".join(f"{k}: {v}\r\n" for k, v in err.headers.items())
    head = (f"HTTP/1.1 {err.status} {HTTPStatus(err.status).phrase}\r\n"
            f"Content-Type: {PROBLEM_CONTENT_TYPE}\r\nContent-Length: {len(body)}\r\n"
            f"{extra}Connection: close\r\n\r\n")
    transport.write(head.encode("latin-1") + body)


class _ProblemServer(web.Server):
    limits: HttpLimits
    open: dict[str, int]
    refused: int
    _warned_at: float

    def __call__(self) -> RequestHandler:
        return _ProblemRequestHandler(self, loop=self._loop, **self._kwargs)

    def admit(self, listener: str) -> bool:
        if self.open.get(listener, 0) < self.limits.max_connections.get(listener, 0):
            self.open[listener] = self.open.get(listener, 0) + 1
            return True
        self.refused += 1
        now = time.monotonic()
        if now - self._warned_at >= _CAP_LOG_INTERVAL:  # a flood is said once a minute
            self._warned_at = now
            log.warning("connection limit reached; refusing new connections", extra={
                "fields": {"listener": listener, "open": self.open.get(listener, 0),
                           "refused_so_far": self.refused}})
        return False

    def release(self, listener: str) -> None:
        self.open[listener] -= 1


class ProblemAppRunner(web.AppRunner):
    """An AppRunner whose connections answer unparseable requests in problem+json and keep
    to :class:`HttpLimits`."""

    def __init__(self, app: web.Application, *, limits: HttpLimits | None = None,
                 **kwargs: Any) -> None:
        self.limits = limits or HttpLimits()
        kwargs.setdefault("keepalive_timeout", self.limits.idle_timeout)
        super().__init__(app, **kwargs)

    async def _make_server(self) -> web.Server:
        server = await super()._make_server()
        server.__class__ = _ProblemServer  # same state; only the handler factory differs
        assert isinstance(server, _ProblemServer)
        server.limits = self.limits
        server.open = {}
        server.refused = 0
        server._warned_at = -_CAP_LOG_INTERVAL
        return server

    def connections(self) -> dict[str, int]:
        """Open connections by listener kind (tcp, unix)."""
        server = self.server
        return dict(server.open) if isinstance(server, _ProblemServer) else {}


def http_error(exc: web.HTTPException) -> FluxError:
    code = _HTTP_CODES.get(exc.status, "HTTP_ERROR")
    detail = exc.text if exc.text and not exc.text.startswith(f"{exc.status}:") else exc.reason
    if exc.status >= 500:
        return TerminalError(code, detail or exc.reason, status=exc.status)
    return ValidationError(code, detail or exc.reason, status=exc.status)


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
    if sock is None or sock.family != _socket.AF_UNIX:
        return None
    creds = sock.getsockopt(_socket.SOL_SOCKET, _socket.SO_PEERCRED, _PEERCRED.size)
    return int(_PEERCRED.unpack(creds)[1])


def endpoint_of(request: web.Request) -> str:
    route = request.match_info.route
    resource = route.resource
    return resource.canonical if resource is not None else "unmatched"


Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


def make_problem_middleware(metrics: Metrics, tracing: Tracing | None = None) -> Middleware:
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
            with tracing.request(f"{request.method} {endpoint_of(request)}",
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
            if err.status == 408:
                response.force_close()  # the rest of that body is not worth waiting for
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
            metrics.errors.labels(internal.error_class, "").inc()
        finally:
            logs.request_context.reset(token)
        response.headers["X-Request-ID"] = rid
        claims = request.get(CLAIMS)
        metrics.answered(endpoint_of(request), response.status,
                         claims.agency if claims else agency, time.perf_counter() - started)
        return response

    return problem_middleware


def tcp_port(runner: web.BaseRunner) -> int:
    """The TCP port a runner's site is bound to (ports may be ephemeral), by public API."""
    for address in runner.addresses:
        if isinstance(address, tuple):
            return int(address[1])
    raise RuntimeError("the runner has no TCP site")
