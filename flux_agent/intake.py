"""The event API: aiohttp middlewares (problem, correlation, auth) and routes.

A request is atomic: its events are validated together, spooled as one record, and
acknowledged only once that record is durable. Nothing about a request is half-accepted.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import random
import re
import socket as _socket
import struct
import time
from collections import OrderedDict, deque
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass
from datetime import datetime
from typing import Any, TypeVar

import msgspec
from aiohttp import web
from aiohttp.abc import AbstractAccessLogger
from aiohttp.http_exceptions import ContentEncodingError, HttpProcessingError
from aiohttp.typedefs import Middleware
from aiohttp.web_protocol import RequestHandler, RequestPayloadError

from . import logs
from .audit import Auditor
from .auth import Authenticator, Claims, check_agency, require
from .checkpoints import RUN_ID as RUN_ID_PATTERN
from .checkpoints import Checkpoints, Known, parse_if_match
from .config import AgentConfig
from .errors import (
    PROBLEM_CONTENT_TYPE,
    AuthenticationError,
    CheckpointError,
    DataIsolationError,
    FluxError,
    TerminalError,
    TransientError,
    ValidationError,
)
from .event import (
    EVENT_ID,
    KIND,
    KINDS,
    PAYLOAD_SHA256,
    RUN_ID,
    EventsRecord,
    Row,
    record_encoder,
)
from .flush import Flusher
from .lineage import Lineage
from .metrics import Metrics
from .seen import Key, SeenIndex
from .spool import Spool
from .store import UUID_TEXT, BadCursor, Store, decode_cursor
from .tracing import Tracing
from .validate import EventChecker, Manifest, Seal, utcnow

log = logging.getLogger("flux_agent.intake")

_REQUEST_ID = re.compile(r"^[A-Za-z0-9._:/+=@-]{1,128}$")
_TRACEPARENT = re.compile(r"^[0-9a-f]{2}-([0-9a-f]{32})-([0-9a-f]{16})-[0-9a-f]{2}")
_BYTE_POS = re.compile(r"\(byte (\d+)\)")
_ENCODINGS = frozenset({"", "identity", "gzip", "deflate"})  # what aiohttp decodes
_SMALL_INT = re.compile(r"[0-9]{1,9}")  # ASCII digits only: "²".isdigit() is True
_PEERCRED = struct.Struct("3i")  # pid, uid, gid
# Request and trace ids must be unique, not secret: the Mersenne Twister is far cheaper than
# uuid4's system call per id. Generated request ids are this process's random prefix and a
# counter.
_random_bits = random.Random().getrandbits
_ID_PREFIX = f"{_random_bits(48):012x}"
_ids = itertools.count(1)
_JSON_TYPES = frozenset({"application/json", "text/json"})
_NDJSON_TYPES = frozenset({"application/x-ndjson", "application/ndjson", "application/jsonl",
                           "application/x-jsonlines"})

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
    """One structured line per request, at debug level, tagged with the request's ids."""

    def log(self, request: web.BaseRequest, response: web.StreamResponse, time: float) -> None:
        if not self.logger.isEnabledFor(logging.DEBUG):
            return
        trace = request.get(TRACE, ("", ""))
        self.logger.debug(
            "%s %s %s", request.method, request.path, response.status,
            extra={"fields": {"method": request.method, "path": request.path,
                              "status": response.status,
                              "duration_ms": round(time * 1000, 3),
                              "bytes": response.body_length},
                   "trace_id": trace[0], "span_id": trace[1],
                   "correlation_id": request.get(REQUEST_ID, "")})

    @property
    def enabled(self) -> bool:
        return self.logger.isEnabledFor(logging.DEBUG)


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


class _ProblemRequestHandler(RequestHandler):
    """aiohttp answers what it cannot parse (control bytes in a header, an oversized line,
    an unknown method or Content-Encoding) before any middleware runs, in text/plain that
    quotes the offending bytes: a caller's bearer token included. Answer problem+json
    that quotes nothing instead."""

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


class _ProblemServer(web.Server):
    def __call__(self) -> RequestHandler:
        return _ProblemRequestHandler(self, loop=self._loop, **self._kwargs)


class ProblemAppRunner(web.AppRunner):
    """An AppRunner whose connections answer unparseable requests in problem+json."""

    async def _make_server(self) -> web.Server:
        server = await super()._make_server()
        server.__class__ = _ProblemServer  # same state; only the handler factory differs
        return server


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


class RunTracker:
    """Runs started and not yet ended, per agency (for flux_active_runs). Bounded: a run
    that never reports its end is forgotten after ``capacity`` newer ones."""

    TERMINAL = frozenset({"run.completed", "run.failed", "run.aborted"})

    def __init__(self, capacity: int = 10_000) -> None:
        self.capacity = capacity
        self.active: dict[str, OrderedDict[str, None]] = {}

    def observe(self, rows: list[Row]) -> None:
        for row in rows:
            kind = row[KIND]
            if kind == "run.started":
                runs = self.active.setdefault(row[0], OrderedDict())
                runs[row[RUN_ID]] = None
                if len(runs) > self.capacity:
                    runs.popitem(last=False)
            elif kind in self.TERMINAL and row[0] in self.active:
                self.active[row[0]].pop(row[RUN_ID], None)

    def counts(self) -> dict[str, int]:
        return {agency: len(runs) for agency, runs in self.active.items()}


class ByteBudget:
    """Bounds the request bodies processed at once. A request that does not fit waits, in
    arrival order; while it waits its body stays in the kernel's socket buffers (TCP
    backpressure)."""

    def __init__(self, total: int) -> None:
        self.total = total
        self.free = total
        self._waiters: deque[tuple[int, asyncio.Future[None]]] = deque()

    async def acquire(self, nbytes: int) -> int:
        nbytes = min(nbytes, self.total)
        if self.free >= nbytes and not self._waiters:
            self.free -= nbytes
            return nbytes
        fut: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._waiters.append((nbytes, fut))
        try:
            await fut
        except BaseException:
            if fut.done() and not fut.cancelled():
                self.release(nbytes)  # granted just as we were cancelled: give it back
            else:
                self._waiters.remove((nbytes, fut))
            raise
        return nbytes

    def release(self, nbytes: int) -> None:
        self.free += nbytes
        while self._waiters and self._waiters[0][0] <= self.free:
            wanted, fut = self._waiters.popleft()
            if not fut.done():
                self.free -= wanted
                fut.set_result(None)


@dataclass(slots=True)
class Accepted:
    accepted: int
    duplicates: int  # all of them (with wait=committed, also those PostgreSQL found)
    event_ids: list[str]
    committed: bool
    known_duplicates: int = 0  # those the duplicate index found (metrics: detected_by=intake)


class Intake:
    """Routes of the event API and what they need from the pipeline."""

    def __init__(
        self,
        *,
        config: AgentConfig,
        checker: EventChecker,
        manifest: Manifest,
        spool: Spool,
        flusher: Flusher,
        seen: SeenIndex,
        authenticator: Authenticator,
        metrics: Metrics,
        checkpoints: Checkpoints,
        store: Store,
        auditor: Auditor | None = None,
        tracing: Tracing | None = None,
        drain: Callable[[], Awaitable[dict[str, Any]]] | None = None,
    ) -> None:
        self.config = config
        self.checker = checker
        self.manifest = manifest
        self.spool = spool
        self.flusher = flusher
        self.seen = seen
        self.authenticator = authenticator
        self.metrics = metrics
        self.drain_hook = drain
        self.auditor = auditor
        self.tracing = tracing or Tracing()
        self.servers: list[str] = []  # the agent fills in its URLs once it listens
        self._openapi: bytes | None = None
        self.checkpoints = checkpoints
        self.store = store
        self.lineage = Lineage()
        self.allowed_uids = frozenset(int(u) for u in config.socket_allowed_uids)
        decoder = msgspec.json.Decoder()
        self._decode_json = decoder.decode
        self._decode_lines = decoder.decode_lines
        self.draining = False
        self.inflight = 0
        self.bodies = ByteBudget(config.request_memory_bytes)
        self.runs = RunTracker()
        self._idle = asyncio.Event()
        self._idle.set()
        self.agent_id = config.effective_agent_id

    # ---------------------------------------------------------------- application

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

    def audit(self, request: web.Request, action: str, *, success: bool,
              claims: Claims | None, detail: dict[str, Any] | None = None,
              before: Any = None, after: Any = None, target: str | None = None) -> None:
        if self.auditor is None:
            return
        self.auditor.record(
            action,
            agency=claims.agency if claims else "-",
            actor=claims.sub if claims else "-",
            target=target or f"{request.method} {request.path}",
            success=success,
            correlation_id=request.get(REQUEST_ID),
            source=source_of(request),
            before=before, after=after, detail=detail,
        )

    async def wait_idle(self, timeout: float) -> bool:
        try:
            await asyncio.wait_for(self._idle.wait(), timeout)
        except TimeoutError:
            return False
        return True

    # ---------------------------------------------------------------- POST /v1/events

    async def post_events(self, request: web.Request) -> web.Response:
        return await self._ingest(request, self._read_events)

    async def post_lineage(self, request: web.Request) -> web.Response:
        """``POST /api/v1/lineage``: an OpenLineage RunEvent, as its HTTP transport sends it."""
        return await self._ingest(request, self._read_lineage, created=201)

    async def _read_events(self, request: web.Request) -> tuple[list[Any], bool]:
        ndjson = self._media_type(request)
        return self._decode(await _read_body(request), ndjson)

    async def _read_lineage(self, request: web.Request) -> tuple[list[Any], bool]:
        self._media_type(request)
        doc = self._decode_one(await _read_body(request), "")
        return self.lineage.to_events(doc), False

    async def _ingest(
        self,
        request: web.Request,
        read: Callable[[web.Request], Awaitable[tuple[list[Any], bool]]],
        created: int = 202,
    ) -> web.Response:
        claims: Claims = request[CLAIMS]
        require(claims, "write")
        self.inflight += 1
        self._idle.clear()
        # A compressed or chunked body may decode to the largest request allowed.
        size = request.content_length
        if size is None or "Content-Encoding" in request.headers:
            size = self.config.request_max_bytes
        reserved = 0
        try:
            if self.draining:
                raise TransientError("DRAINING", "the agent is shutting down; retry against "
                                     "its successor", retry_after=1)
            # Refuse early when the spool is full, before reading a large body.
            self.spool.check_room(request.content_length or 0)
            # The budget is taken by the declared size before the body arrives, so a body
            # that stalls must give it back: every wait here is bounded.
            limit = self.config.request_body_timeout
            try:
                async with asyncio.timeout(limit):
                    reserved = await self.bodies.acquire(size)
            except TimeoutError:
                raise TransientError("INTAKE_BUSY", "request memory is held by requests still "
                                     "being read; retry shortly", retry_after=1) from None
            try:
                async with asyncio.timeout(limit):
                    events, batch = await read(request)
            except TimeoutError:
                raise ValidationError("BODY_TIMEOUT", f"the request body did not arrive within "
                                      f"{limit:g} s; nothing was accepted", status=408) from None
            rows = self._seal(request, claims, events, batch)
            del events
            wait = _prefers_committed(request.headers.get("Prefer", ""))
            result = await self.accept(rows, claims.agency, wait=wait)
        except FluxError as err:
            # Every refusal of an ingest request, whatever its cause (bad JSON, schema,
            # conflict, full spool, draining), counted by its code.
            self.metrics.events_rejected.labels(err.code).inc()
            raise
        finally:
            if reserved:
                self.bodies.release(reserved)
            self.inflight -= 1
            if self.inflight == 0:
                self._idle.set()
        self.metrics.events_accepted.labels(claims.agency).inc(result.accepted)
        self.runs.observe(rows)
        if result.known_duplicates:
            # PostgreSQL's own finds are counted by the flusher (detected_by=database).
            self.metrics.events_duplicate.labels("intake").inc(result.known_duplicates)
        body_out = {"accepted": result.accepted, "duplicates": result.duplicates,
                    "event_ids": result.event_ids}
        if wait:
            body_out["committed"] = True
            return json_response(body_out, 200, {"Preference-Applied": "wait=committed"})
        return json_response(body_out, created)

    def _seal(self, request: web.Request, claims: Claims, events: list[Any], batch: bool
              ) -> list[Row]:
        return self.checker.rows(events, self._sealer(request, claims), batch=batch)

    def _sealer(self, request: web.Request, claims: Claims) -> Seal:
        received = utcnow()
        trace_id, span_id = request[TRACE]
        return Seal(
            agency=claims.agency,
            received_at=received,
            correlation_id=request[REQUEST_ID],
            agent_id=self.agent_id,
            trace_id=trace_id,
            span_id=span_id,
            expires_at=received + self.manifest.retention(claims.agency),
        )

    def _media_type(self, request: web.Request) -> bool:
        """True for NDJSON, False for JSON; 415 for anything else."""
        encoding = request.headers.get("Content-Encoding", "").strip().lower()
        if encoding not in _ENCODINGS:
            # aiohttp passes an encoding it does not know through as is: say so, rather
            # than parse compressed bytes as JSON.
            raise ValidationError(
                "UNSUPPORTED_MEDIA_TYPE",
                f"Content-Encoding {encoding[:40]!r} is not accepted; send gzip, deflate or none",
                status=415)
        raw = request.headers.get("Content-Type")
        if raw is None:
            return False
        media = raw.split(";", 1)[0].strip().lower()
        if media in _JSON_TYPES or media.endswith("+json"):
            return False
        if media in _NDJSON_TYPES:
            return True
        raise ValidationError(
            "UNSUPPORTED_MEDIA_TYPE",
            f"Content-Type {media!r} is not accepted; send application/json "
            "(an object or an array) or application/x-ndjson",
            status=415,
        )

    def _decode(self, body: bytes, ndjson: bool) -> tuple[list[Any], bool]:
        if not ndjson:
            doc = self._decode_one(body, "")
            if isinstance(doc, list):
                if not doc:
                    raise ValidationError("EMPTY_REQUEST", "the array holds no events")
                return doc, True
            return [doc], False
        try:
            events: list[Any] = self._decode_lines(body)  # all lines at once, in C
        except (msgspec.DecodeError, msgspec.ValidationError, UnicodeDecodeError,
                RecursionError):
            events = []  # find the bad line, to name it
            for n, line in enumerate(body.split(b"\n"), start=1):
                if line.strip():
                    events.append(self._decode_one(line, f" on line {n}"))
        if not events:
            raise ValidationError("EMPTY_REQUEST", "the body holds no events")
        return events, True

    def _decode_one(self, data: bytes, where: str) -> Any:
        try:
            return self._decode_json(data)
        except (msgspec.DecodeError, msgspec.ValidationError, UnicodeDecodeError,
                RecursionError) as exc:
            context: dict[str, Any] = {}
            if isinstance(exc, UnicodeDecodeError):
                # msgspec's offset is within the string; find the offset in the body.
                try:
                    data.decode()
                    at = exc.start
                except UnicodeDecodeError as whole:
                    at = whole.start
                text = f"invalid UTF-8 at byte {at}"
                context["position"] = at
            elif isinstance(exc, RecursionError):
                text = "nested deeper than the decoder allows (about 1,000 levels)"
            else:
                text = str(exc)
            m = _BYTE_POS.search(text)
            if m:
                context["position"] = int(m.group(1))
            elif "truncated" in text:  # msgspec names no byte: the JSON stops at the end
                context["position"] = len(data)
            if not data.strip():
                text = "the body is empty"
            raise ValidationError(
                "MALFORMED_JSON", f"the body is not valid JSON{where}: {text}", status=400,
                context=context,
            ) from None

    # ---------------------------------------------------------------- acceptance

    async def accept(self, rows: list[Row], agency: str, *, wait: bool) -> Accepted:
        """Spool new rows as one record; report known ones as duplicates.

        The answer comes only after the record (and any duplicate's original) is durable.
        """
        seen = self.seen
        fresh: list[Row] = []
        fresh_keys: list[tuple[Key, int]] = []
        ids: list[str] = []
        waits: list[asyncio.Future[int]] = []
        dup_seqs: list[int] = []
        conflicts: list[dict[str, str]] = []
        in_request: dict[Key, int] = {}
        duplicates = 0
        for i, row in enumerate(rows):
            event_id = row[EVENT_ID]
            ids.append(event_id)
            key = (agency, event_id)
            sha32 = int(row[PAYLOAD_SHA256][:8], 16)
            earlier = in_request.get(key)
            entry = None
            if earlier is None:
                entry = seen.get(key)
                if entry is None:
                    in_request[key] = sha32
                    fresh.append(row)
                    fresh_keys.append((key, sha32))
                    continue
                earlier = entry[0]
            if earlier != sha32:
                conflicts.append({"pointer": f"/{i}/event_id" if len(rows) > 1 else "/event_id",
                                  "message": f"event_id {event_id} was already used for a "
                                             "different payload", "code": "EVENT_ID_CONFLICT"})
                continue
            duplicates += 1
            if entry is not None:
                _, dup_seq, durable = entry
                dup_seqs.append(dup_seq)
                if durable is not None:
                    if not durable.done():
                        waits.append(durable)
                    elif durable.exception() is not None:
                        raise durable.exception()  # type: ignore[misc]
        if conflicts:
            raise ValidationError(
                "EVENT_ID_CONFLICT", "an event id is reused with a different payload; "
                "nothing from this request was accepted", status=409, errors=conflicts,
            )
        seq = 0
        if fresh:
            record = EventsRecord(fresh)
            payload = record_encoder.encode(record)
            self.spool.check_room(len(payload))
            seq, durable = self.spool.append(payload, record)
            for key, sha32 in fresh_keys:
                seen.add(key, (sha32, seq, durable))
            waits.append(durable)
        try:
            if self.tracing.enabled:
                with self.tracing.span("flux.spool.append", **{"flux.events": len(fresh)}):
                    await _all_durable(waits)
            else:
                await _all_durable(waits)
        except BaseException:
            for key, _ in fresh_keys:
                seen.discard(key)
            raise
        accepted = len(fresh)
        if wait:
            target = max([seq, *dup_seqs])
            try:
                new_ids = await asyncio.wait_for(self.flusher.wait_committed(target),
                                                 self.config.commit_wait_timeout)
            except TimeoutError:
                raise TransientError(
                    "COMMIT_TIMEOUT",
                    "the events are durably spooled but not yet in PostgreSQL; a retry with "
                    "the same event ids is safe",
                    retry_after=max(1, int(self.config.commit_wait_timeout)),
                    context={"accepted": accepted, "duplicates": duplicates},
                ) from None
            if new_ids is not None:
                really_new = sum(1 for row in fresh if row[EVENT_ID] in new_ids)
                return Accepted(really_new, duplicates + accepted - really_new, ids, wait,
                                duplicates)
        return Accepted(accepted, duplicates, ids, wait, duplicates)

    # ---------------------------------------------------------------- checkpoints

    async def put_checkpoint(self, request: web.Request) -> web.Response:
        claims: Claims = request[CLAIMS]
        require(claims, "write")
        if self.draining:
            raise TransientError("DRAINING", "the agent is shutting down", retry_after=1)
        run_id = request.match_info["run_id"]
        if_match = parse_if_match(request.headers.get("If-Match"))
        self._media_type(request)
        self.spool.check_room(request.content_length or 0)
        body = self._decode_one(await _read_body(request), "")
        self.inflight += 1
        self._idle.clear()
        try:
            try:
                known, previous, durable, seq = await self.checkpoints.save(
                    claims.agency, run_id, body, self._sealer(request, claims), if_match)
            except FluxError:
                self.metrics.checkpoints_saved.labels("false").inc()
                raise
            try:
                await asyncio.shield(durable)
            except BaseException:
                self.checkpoints.forget(claims.agency, run_id, previous)
                self.metrics.checkpoints_saved.labels("false").inc()
                raise
            if _prefers_committed(request.headers.get("Prefer", "")):
                await self._wait_committed(seq)
        finally:
            self.inflight -= 1
            if self.inflight == 0:
                self._idle.set()
        self.metrics.checkpoints_saved.labels("true").inc()
        assert known.state is not None
        self.metrics.checkpoint_size.observe(len(known.state))
        self.audit(request, "checkpoint.saved", success=True, claims=claims,
                   target=f"run {run_id}",
                   before={"version": previous.version,
                           "checkpoint_hash": previous.checkpoint_hash} if previous else None,
                   after={"version": known.version, "checkpoint_hash": known.checkpoint_hash,
                          "step": known.step})
        headers = {"ETag": f'"{known.version}"',
                   "Location": f"/v1/runs/{run_id}/checkpoint"}
        return json_response(_checkpoint_json(run_id, known, with_state=False), 201, headers)

    async def get_checkpoint(self, request: web.Request) -> web.Response:
        claims: Claims = request[CLAIMS]
        require(claims, "read")
        run_id = _known_run_id(request, "CHECKPOINT_NOT_FOUND")
        try:
            known = await self.checkpoints.load(claims.agency, run_id)
        except CheckpointError as err:
            if err.code == "CHECKPOINT_INTEGRITY_FAILED":
                self.metrics.checkpoint_integrity_failures.inc()
                self.audit(request, "checkpoint.integrity_failed", success=False,
                           claims=claims, target=f"run {run_id}", detail=err.context)
            raise
        if known is None:
            raise _not_found("CHECKPOINT_NOT_FOUND", f"run {run_id} has no checkpoint")
        return json_response(_checkpoint_json(run_id, known, with_state=True), 200,
                             {"ETag": f'"{known.version}"'})

    async def get_checkpoint_history(self, request: web.Request) -> web.Response:
        claims: Claims = request[CLAIMS]
        require(claims, "read")
        run_id = _known_run_id(request, "CHECKPOINT_NOT_FOUND")
        limit = _limit(request, default=100)
        versions = await self._read(self.store.checkpoint_history(claims.agency, run_id,
                                                                  limit))
        pending = self.checkpoints.known.get((claims.agency, run_id))
        if pending is not None and (not versions or versions[0]["version"] < pending.version):
            versions.insert(0, {"version": pending.version,
                                "checkpoint_hash": pending.checkpoint_hash,
                                "step": pending.step, "status": pending.status,
                                "saved_at": _iso(pending.saved_at),
                                "event_id": pending.event_id, "pending": True})
        if not versions:
            raise _not_found("CHECKPOINT_NOT_FOUND", f"run {run_id} has no checkpoint")
        return json_response({"run_id": run_id, "versions": versions[:limit]})

    # ---------------------------------------------------------------- reads

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

    async def _read(self, query: Awaitable[T]) -> T:
        try:
            return await query
        except FluxError:
            raise
        except Exception as exc:  # noqa: BLE001 - every database failure is "not now"...
            if str(getattr(exc, "sqlstate", "")).startswith("22"):
                # ...but a data exception is a parameter PostgreSQL refused: retrying the
                # same request cannot help. Input checks should have caught it first.
                raise ValidationError("INVALID_PARAMETER", "PostgreSQL refused a value of "
                                      "this request", status=400,
                                      context={"reason": type(exc).__name__}) from None
            raise TransientError("DATABASE_UNAVAILABLE", "PostgreSQL is unreachable; reads "
                                 "need it (events are still accepted)", retry_after=2,
                                 context={"reason": type(exc).__name__}) from None

    async def _wait_committed(self, seq: int) -> None:
        try:
            await asyncio.wait_for(self.flusher.wait_committed(seq),
                                   self.config.commit_wait_timeout)
        except TimeoutError:
            raise TransientError(
                "COMMIT_TIMEOUT", "durably spooled but not yet in PostgreSQL; a retry is safe",
                retry_after=max(1, int(self.config.commit_wait_timeout))) from None

    async def get_openapi(self, request: web.Request) -> web.Response:
        if self._openapi is None:
            from .openapi import document

            self._openapi = msgspec.json.encode(document(self.servers))
        return web.Response(body=self._openapi, content_type="application/json")

    # ---------------------------------------------------------------- POST /v1/drain

    async def post_drain(self, request: web.Request) -> web.Response:
        require(request[CLAIMS], "write")
        if self.drain_hook is None:
            raise ValidationError("NOT_SUPPORTED", "this agent cannot be drained over HTTP",
                                  status=404)
        self.audit(request, "agent.drain", success=True, claims=request[CLAIMS])
        result = await self.drain_hook()
        return json_response(result, 200)


T = TypeVar("T")
_PUBLIC = frozenset({"/openapi.json"})  # served without credentials


async def _all_durable(waits: list[asyncio.Future[int]]) -> None:
    for fut in waits:
        # shield: the future is shared by every request of the commit group, and a client
        # that hangs up must not cancel it for the others.
        await asyncio.shield(fut)


def _not_found(code: str, detail: str) -> ValidationError:
    return ValidationError(code, detail, status=404)


def _known_run_id(request: web.Request, code: str) -> str:
    """The path's run id; one that breaks the run id rule was never stored: 404."""
    run_id = request.match_info["run_id"]
    if not RUN_ID_PATTERN.match(run_id):
        raise _not_found(code, "no such run (not a valid run id)")
    return run_id


def _limit(request: web.Request, default: int) -> int:
    raw = request.query.get("limit")
    if raw is None:
        return default
    if not _SMALL_INT.fullmatch(raw) or not 1 <= int(raw) <= 1000:
        raise ValidationError("INVALID_LIMIT", "limit must be an integer from 1 to 1000",
                              status=400)
    return int(raw)


def _iso(value: datetime | None) -> str | None:
    return value.isoformat().replace("+00:00", "Z") if value is not None else None


def _checkpoint_json(run_id: str, known: Known, *, with_state: bool) -> dict[str, Any]:
    out: dict[str, Any] = {
        "run_id": run_id, "version": known.version, "step": known.step,
        "checkpoint_hash": known.checkpoint_hash, "saved_at": _iso(known.saved_at),
        "provider": known.provider, "model": known.model, "status": known.status,
        "expires_at": _iso(known.expires_at), "event_id": known.event_id,
    }
    if with_state:
        assert known.state is not None
        out["state"] = msgspec.Raw(known.state.encode())
    return out


async def _expect(request: web.Request) -> web.StreamResponse | None:
    """``Expect: 100-continue`` as aiohttp does it; any other expectation is a 417 in
    problem+json (aiohttp's own answer, text/plain, comes before any middleware)."""
    if request.headers.get("Expect", "").lower() == "100-continue":
        if request.version < (1, 1):
            return None  # HTTP/1.0 has no 100 Continue; the body simply follows
        await request.writer.write(b"HTTP/1.1 100 Continue\r\n\r\n")
        request.writer.output_size = 0  # as aiohttp's: the real answer has not started
        return None
    err = ValidationError("EXPECTATION_FAILED", "only Expect: 100-continue is supported",
                          status=417)
    response = problem_response(request, err)
    response.force_close()
    return response


async def _read_body(request: web.Request) -> bytes:
    body = await request.read()
    if not body and request.headers.get("Content-Encoding", "identity") != "identity":
        # A gzip stream cut short decodes to nothing: say that, not "the body is empty".
        raise ValidationError("INVALID_BODY", "the compressed body decodes to nothing "
                              "(an incomplete or empty stream)", status=400)
    return body


def _prefers_committed(prefer: str) -> bool:
    for item in prefer.split(","):
        # RFC 7240: a preference may carry parameters (wait=committed; x=y).
        name, _, value = item.split(";", 1)[0].strip().partition("=")
        if name.strip().lower() == "wait" and value.strip().strip('"').lower() == "committed":
            return True
    return False
