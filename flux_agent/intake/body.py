"""Request bodies: read within their deadline and request memory (:mod:`.memory`), their
media type checked, decoded as JSON or NDJSON with errors that name the byte or line at
fault."""

from __future__ import annotations

import asyncio
import contextlib
import functools
import re
from collections.abc import AsyncIterator, Callable
from typing import Any

import msgspec
from aiohttp import web

from ..core.digest import MAX_DEPTH
from ..core.errors import ValidationError, too_deep
from .memory import ByteBudget, RequestMemory, body_cost
from .responses import problem_response

_BYTE_POS = re.compile(r"\(byte (\d+)\)")
_ENCODINGS = frozenset({"", "identity", "gzip", "deflate"})  # what aiohttp decodes
_JSON_TYPES = frozenset({"application/json", "text/json"})
_NDJSON_TYPES = frozenset({"application/x-ndjson", "application/ndjson", "application/jsonl",
                           "application/x-jsonlines"})
_DECODE_ERRORS = (msgspec.DecodeError, msgspec.ValidationError, UnicodeDecodeError,
                  RecursionError)


class Admitted:
    """A request body read in full, and the working memory reserved for what it becomes;
    :meth:`release` (at the latest when the ``admit`` block ends) gives the memory back."""

    __slots__ = ("_memory", "body", "nbytes")

    def __init__(self, body: bytearray, memory: ByteBudget, nbytes: int) -> None:
        self.body = body
        self._memory = memory
        self.nbytes = nbytes

    def drop_body(self) -> None:
        """The body is decoded: let it go (its share of the estimate stays reserved)."""
        self.body = bytearray()

    def shrink_to(self, nbytes: int) -> None:
        """Hold only ``nbytes`` from now on (what is left of the request: its answer)."""
        if nbytes < self.nbytes:
            self._memory.release(self.nbytes - nbytes)
            self.nbytes = nbytes

    def release(self) -> None:
        self.body = bytearray()
        if self.nbytes:
            self._memory.release(self.nbytes)
            self.nbytes = 0


class BodyReader:
    """Every route that reads a body goes through here: a body is read within request
    memory (:mod:`.memory`: its reading share while it arrives, then the working share for
    all it will become) and within its deadline (``timeout``), and is at most ``max_bytes``
    once decoded from gzip. ``cost`` estimates the working memory of a body; ``copies`` is
    how many copies of its canonical form the route makes (rows, record, spool frame)."""

    def __init__(self, memory: RequestMemory, *, timeout: float, max_bytes: int,
                 copies: int = 3, cost: Callable[[bytearray], int] | None = None) -> None:
        self.memory = memory
        self.timeout = timeout
        self.max_bytes = max_bytes
        self.cost = cost or functools.partial(body_cost, copies=copies)
        decoder = msgspec.json.Decoder()
        self._decode_json = decoder.decode
        self._decode_lines = decoder.decode_lines

    @property
    def budget(self) -> ByteBudget:
        """The reading share (bodies arriving)."""
        return self.memory.reading

    def with_limit(self, max_bytes: int, copies: int = 3) -> BodyReader:
        """A reader of the same memory for a route with its own body limit."""
        return BodyReader(self.memory, timeout=self.timeout, max_bytes=max_bytes,
                          copies=copies)

    @contextlib.asynccontextmanager
    async def admit(self, request: web.Request) -> AsyncIterator[Admitted]:
        """The body, read, with working memory reserved for it until the block ends."""
        size = request.content_length
        if size is not None and size > self.max_bytes and \
                "Content-Encoding" not in request.headers:
            raise too_large(self.max_bytes)
        # A compressed or chunked body may decode to the largest one allowed.
        if size is None or "Content-Encoding" in request.headers:
            size = self.max_bytes
        reading = await self.memory.reserve_reading(size)
        try:
            body = await self._read_within_deadline(request)
            working = await self.memory.reserve_working(self.cost(body))
        finally:
            self.memory.reading.release(reading)
        admitted = Admitted(body, self.memory.working, working)
        try:
            yield admitted
        finally:
            admitted.release()

    async def _read_within_deadline(self, request: web.Request) -> bytearray:
        if request.content.is_eof():  # all of it arrived with the head: nothing to wait for
            return await self._read_body(request)
        try:
            async with asyncio.timeout(self.timeout):
                return await self._read_body(request)
        except TimeoutError:
            raise ValidationError("BODY_TIMEOUT", f"the request body did not arrive within "
                                  f"{self.timeout:g} s; nothing was accepted",
                                  status=408) from None

    async def _read_body(self, request: web.Request) -> bytearray:
        content, limit = request.content, self.max_bytes
        body = bytearray()
        while chunk := await content.readany():
            if len(body) + len(chunk) > limit:
                raise too_large(limit)
            body += chunk
        if not body and request.headers.get("Content-Encoding", "identity") != "identity":
            # A gzip stream cut short decodes to nothing: say that, not "the body is empty".
            raise ValidationError("INVALID_BODY", "the compressed body decodes to nothing "
                                  "(an incomplete or empty stream)", status=400)
        return body

    # ---------------------------------------------------------------- decoding

    def decode(self, body: bytes | bytearray, ndjson: bool) -> tuple[list[Any], bool]:
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
            for n, line in enumerate(bytes(body).split(b"\n"), start=1):  # errors only
                if line.strip():
                    events.append(self.decode_one(line, f" on line {n}", f"/{len(events)}"))
        if not events:
            raise ValidationError("EMPTY_REQUEST", "the body holds no events")
        return events, True

    def decode_one(self, data: bytes | bytearray, where: str, place: str = "") -> Any:
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


def too_large(limit: int) -> ValidationError:
    return ValidationError("REQUEST_TOO_LARGE", f"the request body is larger than {limit} "
                           "bytes (after decoding); nothing was accepted", status=413,
                           context={"limit_bytes": limit})
