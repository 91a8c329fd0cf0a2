"""What the route families share: the state every route reads (:class:`Routes`, the base
of each family's class), reading and decoding request bodies, auditing, database reads, and
the bounds on request memory and on the active-runs gauge."""

from __future__ import annotations

import asyncio
import contextlib
import re
from collections import OrderedDict, deque
from collections.abc import AsyncIterator, Awaitable, Callable
from datetime import datetime
from typing import Any, TypeVar

import msgspec
from aiohttp import web

from ...checkpoints.ledger import RUN_ID as RUN_ID_PATTERN
from ...checkpoints.ledger import Checkpoints
from ...core.errors import FluxError, TransientError, ValidationError
from ...core.event import Row
from ...core.settings import AgentConfig
from ...flush.flusher import Flusher
from ...obs.metrics import Metrics
from ...obs.tracing import Tracing
from ...postgres.pool import UnsafeRole, is_transient
from ...postgres.store import Store
from ...spool import Spool
from ..audit import Auditor
from ..auth import Authenticator, Claims
from ..openlineage import Lineage
from ..seen import SeenIndex
from ..server import REQUEST_ID, TRACE, problem_response, source_of
from ..validate import EventChecker, Manifest, Seal, utcnow

_BYTE_POS = re.compile(r"\(byte (\d+)\)")
READ_YOUR_WRITES_WAIT = 2.0  # seconds a read waits for the agent's own pending writes
_ENCODINGS = frozenset({"", "identity", "gzip", "deflate"})  # what aiohttp decodes
_SMALL_INT = re.compile(r"[0-9]{1,9}")  # ASCII digits only: "²".isdigit() is True
_JSON_TYPES = frozenset({"application/json", "text/json"})
_NDJSON_TYPES = frozenset({"application/x-ndjson", "application/ndjson", "application/jsonl",
                           "application/x-jsonlines"})


T = TypeVar("T")


class Routes:
    """The state of the event API and the helpers its route families share."""

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
        # The agent fills in its URLs once it listens (none for a listener that is off).
        self.servers: list[str] = []
        self.admin_servers: list[str] = []
        self._openapi: bytes | None = None
        self.checkpoints = checkpoints
        self.store = store
        # Built on the first OpenLineage request, in a worker thread (its schemas are files):
        # an agent that never sees one never pays for them.
        self._lineage: Lineage | None = None
        self._lineage_lock = asyncio.Lock()
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

    async def lineage(self) -> Lineage:
        if self._lineage is None:
            async with self._lineage_lock:
                if self._lineage is None:
                    self._lineage = await asyncio.get_running_loop().run_in_executor(
                        None, Lineage)
        return self._lineage

    async def _read(self, query: Awaitable[T]) -> T:
        """Run a read; classify what goes wrong once. The database being away (or a login
        role refused for bypassing row-level security) is "not now": 503, retryable. A
        value PostgreSQL refused is the request's fault: 400. Anything else is a bug:
        logged with its traceback, answered 500 with the error id.

        Reads see this agent's own writes: what it acknowledged before the read is flushed
        first (now, not at the window's age), waiting at most READ_YOUR_WRITES_WAIT; when
        PostgreSQL cannot take it that fast, the read answers with what PostgreSQL has."""
        target = self.spool.written_seq
        if target > self.flusher.committed_seq:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self.flusher.wait_committed(target),
                                       min(READ_YOUR_WRITES_WAIT,
                                           self.config.commit_wait_timeout))
        try:
            return await query
        except FluxError:
            raise
        except UnsafeRole:
            raise TransientError("DATABASE_UNAVAILABLE", "reads are refused: the database "
                                 "login role bypasses row-level security", retry_after=30,
                                 context={"reason": "UnsafeRole"}) from None
        except Exception as exc:
            if str(getattr(exc, "sqlstate", "")).startswith("22"):
                # A data exception is a parameter PostgreSQL refused: retrying the same
                # request cannot help. Input checks should have caught it first.
                raise ValidationError("INVALID_PARAMETER", "PostgreSQL refused a value of "
                                      "this request", status=400,
                                      context={"reason": type(exc).__name__}) from None
            if is_transient(exc):
                raise TransientError("DATABASE_UNAVAILABLE", "PostgreSQL is unreachable; "
                                     "reads need it (events are still accepted)",
                                     retry_after=2,
                                     context={"reason": type(exc).__name__}) from None
            raise  # the problem middleware logs it once and answers 500 with its error id

    @contextlib.asynccontextmanager
    async def _body(self, request: web.Request) -> AsyncIterator[bytes]:
        """The request body, read within FLUX_AGENT_REQUEST_BODY_TIMEOUT and counted against
        FLUX_AGENT_REQUEST_MEMORY_BYTES until the block ends. Every route that reads a body
        goes through here: a stalled upload can neither hold memory nor wait forever."""
        reserved = await self._reserve(request)
        try:
            yield await self._read_within_deadline(request)
        finally:
            self.bodies.release(reserved)

    async def _reserve(self, request: web.Request) -> int:
        # A compressed or chunked body may decode to the largest request allowed.
        size = request.content_length
        if size is None or "Content-Encoding" in request.headers:
            size = self.config.request_max_bytes
        reserved = self.bodies.try_acquire(size)  # the common case: no wait, no timer
        if reserved:
            return reserved
        # The budget is taken by the declared size before the body arrives, so a body that
        # stalls must give it back: every wait here is bounded.
        try:
            async with asyncio.timeout(self.config.request_body_timeout):
                return await self.bodies.acquire(size)
        except TimeoutError:
            raise TransientError("INTAKE_BUSY", "request memory is held by requests still "
                                 "being read; retry shortly", retry_after=1) from None

    async def _read_within_deadline(self, request: web.Request) -> bytes:
        if request.content.is_eof():  # all of it arrived with the head: nothing to wait for
            return await _read_body(request)
        limit = self.config.request_body_timeout
        try:
            async with asyncio.timeout(limit):
                return await _read_body(request)
        except TimeoutError:
            raise ValidationError("BODY_TIMEOUT", f"the request body did not arrive within "
                                  f"{limit:g} s; nothing was accepted", status=408) from None


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
    try:
        body = await request.read()
    except web.HTTPRequestEntityTooLarge:
        limit = request.client_max_size
        raise ValidationError("REQUEST_TOO_LARGE", f"the request body is larger than {limit} "
                              "bytes (after decoding); nothing was accepted", status=413,
                              context={"limit_bytes": limit}) from None
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


# --------------------------------------------------------------------------- bounds


class RunTracker:
    """Runs started and not yet ended, per agency (for flux_active_runs). Bounded: a run
    that never reports its end is forgotten after ``capacity`` newer ones."""

    TERMINAL = frozenset({"run.completed", "run.failed", "run.aborted"})

    def __init__(self, capacity: int = 10_000) -> None:
        self.capacity = capacity
        self.active: dict[str, OrderedDict[str, None]] = {}

    def observe(self, rows: list[Row]) -> None:
        for row in rows:
            kind = row.kind
            if kind == "run.started":
                runs = self.active.setdefault(row.agency_id, OrderedDict())
                runs[row.run_id] = None
                if len(runs) > self.capacity:
                    runs.popitem(last=False)
            elif kind in self.TERMINAL and row.agency_id in self.active:
                self.active[row.agency_id].pop(row.run_id, None)

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

    def try_acquire(self, nbytes: int) -> int:
        """Take ``nbytes`` now if they are free and nobody waits; 0 otherwise."""
        nbytes = min(nbytes, self.total)
        if self.free >= nbytes and not self._waiters:
            self.free -= nbytes
            return nbytes
        return 0

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
