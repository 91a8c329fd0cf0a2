"""Request bodies: read within their deadline and the request-memory budget, their media
type checked, decoded as JSON or NDJSON with errors that name the byte or line at fault."""

from __future__ import annotations

import asyncio
import contextlib
import re
from collections import deque
from collections.abc import AsyncIterator
from typing import Any

import msgspec
from aiohttp import web

from ..core.digest import MAX_DEPTH
from ..core.errors import TransientError, ValidationError, too_deep
from .responses import problem_response

_BYTE_POS = re.compile(r"\(byte (\d+)\)")
_ENCODINGS = frozenset({"", "identity", "gzip", "deflate"})  # what aiohttp decodes
_JSON_TYPES = frozenset({"application/json", "text/json"})
_NDJSON_TYPES = frozenset({"application/x-ndjson", "application/ndjson", "application/jsonl",
                           "application/x-jsonlines"})
_DECODE_ERRORS = (msgspec.DecodeError, msgspec.ValidationError, UnicodeDecodeError,
                  RecursionError)


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


class BodyReader:
    """Every route that reads a body goes through here: a stalled upload can neither hold
    memory (``memory_bytes``, shared by the bodies in process) nor wait forever
    (``timeout``)."""

    def __init__(self, *, memory_bytes: int, timeout: float, max_bytes: int) -> None:
        self.budget = ByteBudget(memory_bytes)
        self.timeout = timeout
        self.max_bytes = max_bytes
        decoder = msgspec.json.Decoder()
        self._decode_json = decoder.decode
        self._decode_lines = decoder.decode_lines

    @contextlib.asynccontextmanager
    async def read(self, request: web.Request) -> AsyncIterator[bytes]:
        """The body, counted against the memory budget until the block ends."""
        reserved = await self.reserve(request)
        try:
            yield await self._read_within_deadline(request)
        finally:
            self.budget.release(reserved)

    async def reserve(self, request: web.Request) -> int:
        # A compressed or chunked body may decode to the largest request allowed.
        size = request.content_length
        if size is None or "Content-Encoding" in request.headers:
            size = self.max_bytes
        reserved = self.budget.try_acquire(size)  # the common case: no wait, no timer
        if reserved:
            return reserved
        # The budget is taken by the declared size before the body arrives, so a body that
        # stalls must give it back: every wait here is bounded.
        try:
            async with asyncio.timeout(self.timeout):
                return await self.budget.acquire(size)
        except TimeoutError:
            raise TransientError("INTAKE_BUSY", "request memory is held by requests still "
                                 "being read; retry shortly", retry_after=1) from None

    async def _read_within_deadline(self, request: web.Request) -> bytes:
        if request.content.is_eof():  # all of it arrived with the head: nothing to wait for
            return await _read_body(request)
        try:
            async with asyncio.timeout(self.timeout):
                return await _read_body(request)
        except TimeoutError:
            raise ValidationError("BODY_TIMEOUT", f"the request body did not arrive within "
                                  f"{self.timeout:g} s; nothing was accepted",
                                  status=408) from None

    # ---------------------------------------------------------------- decoding

    def decode(self, body: bytes, ndjson: bool) -> tuple[list[Any], bool]:
        """The events of a body: ``(events, batch)``, batch False for a single object."""
        if not ndjson:
            doc = self.decode_one(body, "")
            if isinstance(doc, list):
                if not doc:
                    raise ValidationError("EMPTY_REQUEST", "the array holds no events")
                return doc, True
            return [doc], False
        try:
            events: list[Any] = self._decode_lines(body)  # all lines at once, in C
        except _DECODE_ERRORS:
            events = []  # find the bad line, to name it
            for n, line in enumerate(body.split(b"\n"), start=1):
                if line.strip():
                    events.append(self.decode_one(line, f" on line {n}", f"/{len(events)}"))
        if not events:
            raise ValidationError("EMPTY_REQUEST", "the body holds no events")
        return events, True

    def decode_one(self, data: bytes, where: str, place: str = "") -> Any:
        """``place``: the JSON pointer of this document in the request (an NDJSON line's)."""
        try:
            return self._decode_json(data)
        except _DECODE_ERRORS as exc:
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
                # Far beyond the limit on nesting: the same answer as just beyond it.
                raise too_deep(place, MAX_DEPTH) from None
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


def media_type(request: web.Request) -> bool:
    """True for NDJSON, False for JSON; 415 for anything else."""
    encoding = request.headers.get("Content-Encoding", "").strip().lower()
    if encoding not in _ENCODINGS:
        # aiohttp passes an encoding it does not know through as is: say so, rather than
        # parse compressed bytes as JSON.
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


async def expect_continue(request: web.Request) -> web.StreamResponse | None:
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


def prefers_committed(request: web.Request) -> bool:
    """``Prefer: wait=committed`` (RFC 7240; parameters after ``;`` are allowed)."""
    for item in request.headers.get("Prefer", "").split(","):
        name, _, value = item.split(";", 1)[0].strip().partition("=")
        if name.strip().lower() == "wait" and value.strip().strip('"').lower() == "committed":
            return True
    return False


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
