"""Read answers that cannot hold the agent's memory: each is reserved in the answers share
of request memory (:mod:`.memory`) from the moment it is fetched until its client has taken
it, written within the handler (so the reservation ends when the bytes are in the kernel),
large ones streamed a slice at a time, and a client that stops taking them is cut off after
the send timeout.

What one unread answer holds is then at most its reservation plus the connection's write
buffer (one slice and the transport's high-water mark), whatever its size.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Iterator, Mapping
from typing import Any

import msgspec
from aiohttp import web

from .memory import Held, RequestMemory
from .responses import REQUEST_ID, json_bytes

log = logging.getLogger("flux_agent.intake")

SLICE = 64 * 1024  # bytes handed to the transport at a time; below it, pieces are gathered
WHOLE = 128 * 1024  # an answer up to this is encoded whole and sent with Content-Length
_encode = msgspec.json.encode


class Answers:
    """Reserve, write and release read answers (``send_timeout``: how long a client may
    take to accept each slice)."""

    def __init__(self, memory: RequestMemory, *, page_bytes: int, send_timeout: float) -> None:
        self.memory = memory
        self.page_bytes = page_bytes
        self.send_timeout = send_timeout

    def for_page(self) -> Held:
        """Memory for a page: up to the page budget, less when little is free (the page is
        then shorter), 503 ANSWERS_BUSY when even a small page does not fit."""
        return self.memory.reserve_answer(self.page_bytes)

    async def send(self, request: web.Request, held: Held, body: Any, *, status: int = 200,
                   headers: Mapping[str, str] | None = None) -> web.StreamResponse:
        """``body`` (JSON-encodable) as one answer; ``held`` is released once it is sent."""
        try:
            data = json_bytes(body)
            held.resize(2 * len(data))  # the objects and their encoding, until written
            del body
            return await self._write(request, [data], len(data), status, headers)
        finally:
            held.release()

    async def send_page(self, request: web.Request, held: Held, head: Mapping[str, Any],
                        items: list[Any], tail: Mapping[str, Any], nbytes: int
                        ) -> web.StreamResponse:
        """``{**head, "items": [...], **tail}`` (one key in ``head`` last, holding the list:
        ``head`` is written up to its last key), encoding one item at a time as the client
        takes the answer; ``nbytes`` is what the items make, ``held`` is released once the
        answer is sent."""
        try:
            if nbytes <= WHOLE:
                held.resize(2 * nbytes)  # the page and its encoding
                *keys, last = head
                data = json_bytes({**{k: head[k] for k in keys}, last: items, **tail})
                return await self._write(request, [data], len(data), 200, None)
            # Streamed: the page, each item's envelope encoded when it is next, its raw
            # payload written from where it lies.
            held.resize(nbytes)
            return await self._write(request, _page_pieces(head, items, tail), None, 200,
                                     None)
        finally:
            held.release()

    async def _write(self, request: web.Request,
                     pieces: list[bytes] | Iterator[bytes | msgspec.Raw],
                     length: int | None, status: int, headers: Mapping[str, str] | None
                     ) -> web.StreamResponse:
        return await write_answer(request, pieces, length, status, headers, self.send_timeout)


async def write_answer(request: web.Request, pieces: list[bytes] | Iterator[bytes | msgspec.Raw],
                       length: int | None, status: int, headers: Mapping[str, str] | None,
                       send_timeout: float) -> web.StreamResponse:
    """Write a JSON answer within the handler (``length``: its Content-Length, else chunked),
    a slice at a time, each within ``send_timeout``; a client that does not take one is cut
    off (its connection aborted, the buffer with it)."""
    if length is not None and length <= SLICE and isinstance(pieces, list):
        # One slice at most: the transport takes it whole without waiting (it is below its
        # high-water mark), so streaming it would bound nothing and only cost a timer and
        # a header write per answer (about 10% of a single event's CPU, bench.__main__'s
        # "single events" rows). aiohttp writes it as the handler returns.
        small = web.Response(body=b"".join(pieces), status=status, headers=headers,
                             content_type="application/json")
        small.headers["X-Request-ID"] = request[REQUEST_ID]
        return small
    response = web.StreamResponse(status=status, headers=headers)
    response.content_type = "application/json"
    response.headers["X-Request-ID"] = request[REQUEST_ID]
    if length is not None:
        response.content_length = length
    await response.prepare(request)
    gathered = bytearray()

    async def put(data: bytes | memoryview) -> None:
        async with asyncio.timeout(send_timeout):
            await response.write(data)

    try:
        for piece in pieces:
            if len(piece) < SLICE:
                gathered += memoryview(piece)
                if len(gathered) < SLICE:
                    continue
                piece, gathered = bytes(gathered), bytearray()
            elif gathered:
                await put(bytes(gathered))
                gathered = bytearray()
            view = memoryview(piece)
            for start in range(0, len(view), SLICE):
                await put(view[start:start + SLICE])
        if gathered:
            await put(bytes(gathered))
        await response.write_eof()
    except TimeoutError:
        log.info("a client did not take its answer within the send timeout; connection "
                 "closed", extra={"fields": {"path": request.path, "timeout_s": send_timeout}})
        if request.transport is not None:
            request.transport.abort()  # its buffer goes with it
    except ConnectionError:
        pass  # the client went away: nothing more to write
    return response


def _page_pieces(head: Mapping[str, Any], items: list[Any], tail: Mapping[str, Any]
                 ) -> Iterator[bytes | msgspec.Raw]:
    """The page's JSON in pieces; each item is encoded when it is next and then let go. A
    raw payload (an event's) is not copied: it goes out as it is, its envelope around it."""
    opening = _encode(dict(head))  # {"run_id":"r","events":[]} -> up to the list
    yield opening[:-3] + b"["
    for i in range(len(items)):
        item, items[i] = items[i], None
        if i:
            yield b","
        payload = item.pop("payload", None) if isinstance(item, dict) else None
        if isinstance(payload, msgspec.Raw):
            envelope = _encode(item)
            yield b'{"payload":'
            yield payload
            yield b"," + envelope[1:] if len(envelope) > 2 else b"}"
        else:
            if payload is not None:
                item["payload"] = payload
            yield _encode(item)
    closing = json_bytes(dict(tail))  # {"next_cursor":null}\n -> the rest of the page
    yield b"]," + closing[1:] if tail else b"]}\n"
