"""The listeners: aiohttp applications served on sockets the agent binds itself, each
connection behind a guard, with aiohttp's public API only.

aiohttp's protocol (:class:`aiohttp.web.RequestHandler`) parses and answers requests; in
front of it, one :class:`Guard` per connection (a plain :class:`asyncio.Protocol` that
forwards to it) keeps the connection honest (:class:`HttpLimits`):

- a listener takes at most its cap of connections; at the cap, the longest-idle keep-alive
  connection, or a connection whose request head is overdue, is closed to admit the new one
  (as nginx reuses keep-alive connections), and only when every connection is busy with a
  request is the new one refused (503 ``TOO_MANY_CONNECTIONS``);
- a request line that is not HTTP/1.x, and a chunk larger than a request may be, are
  refused before aiohttp's parser sees them (:mod:`.framing`);
- a request head must arrive within the header timeout of its first byte (else 408).

The guard learns that a request is over from the access logger, which aiohttp calls once
the response is written; what aiohttp's parser refuses is answered in problem+json by
:class:`ProblemRequestHandler`, which overrides two public methods of aiohttp's protocol.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import socket
import ssl
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, cast

from aiohttp import web
from aiohttp.http import HttpProcessingError
from aiohttp.http_exceptions import ContentEncodingError
from aiohttp.web import RequestPayloadError

from ..core.errors import (
    PROBLEM_CONTENT_TYPE,
    FluxError,
    TerminalError,
    TransientError,
    ValidationError,
)
from .framing import Framing, Refusal
from .middleware import AccessLogger
from .responses import json_bytes, write_problem

log = logging.getLogger("flux_agent.intake")

ACCEPT_BACKLOG = 128  # aiohttp's own; a Unix socket refuses connects beyond it at once
_LOG_INTERVAL = 60.0  # a flood of refusals or evictions is said once a minute
_LINGER = 0.5  # seconds a refused connection is read (and dropped) before it is closed
SEND_BUFFER = 64 * 1024  # SO_SNDBUF of a TCP connection (the kernel doubles it)
# What aiohttp reads ahead of a body nobody reads yet (a request waiting for memory): it
# stops reading the socket at twice this. Its default, 256 KiB, let every connection hold
# half a MiB of a body before the agent admitted it.
READ_BUFFER = 64 * 1024
# A caller's mistake that aiohttp reports through log_exception (a body it cannot decode
# or that ends early, found while draining it after the answer): not the agent's failure.
_CLIENT_FAULTS = (HttpProcessingError, RequestPayloadError, ConnectionError)


@dataclass(frozen=True, slots=True)
class HttpLimits:
    """What one server's connections may hold: how long a connection may idle between
    requests (``idle_timeout``, before its first one too) and take to send a request head
    (``header_timeout``), how many may be open at once on each kind of listener
    (``max_connections``: ``tcp``, ``unix``), how long a head may be under way before its
    connection may be closed to admit another at the cap (``header_grace``), and the
    largest chunk of a chunked body (``max_chunk``)."""

    idle_timeout: float = 75.0
    header_timeout: float = 10.0
    max_connections: Mapping[str, int] = field(default_factory=lambda: {"tcp": 1024,
                                                                        "unix": 1024})
    header_grace: float = 2.0
    max_chunk: int = 4 * 1024**2


class ProblemRequestHandler(web.RequestHandler):
    """aiohttp's protocol, answering what its parser refuses (control bytes in a header, an
    oversized line, an unknown method or Content-Encoding) in problem+json that quotes
    nothing (aiohttp's own text/plain answer quotes the offending bytes: a caller's bearer
    token included), and logging a body refused after the answer as the caller's mistake."""

    def log_exception(self, *args: Any, **kw: Any) -> None:
        exc = kw.get("exc_info")
        if isinstance(exc, _CLIENT_FAULTS):
            log.info("request body refused after the answer", extra={"fields": {
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
            if isinstance(exc, ContentEncodingError) and "install" in str(exc):
                status = 415  # br or zstd without their codec
                err = ValidationError("UNSUPPORTED_MEDIA_TYPE", "this Content-Encoding is not "
                                      "accepted; send gzip, deflate or none", status=415)
            elif isinstance(exc, ContentEncodingError):  # gzip or deflate that does not decode
                status = 400
                err = ValidationError("INVALID_BODY", "the request body could not be read: "
                                      f"{exc.message}", status=400)
            else:
                err = ValidationError("BAD_REQUEST", f"the request is not valid HTTP ({what})",
                                      status=status)
        body = err.problem(instance="", request_id="", trace_id="", span_id="")
        response = web.Response(body=json_bytes(body), status=status,
                                content_type=PROBLEM_CONTENT_TYPE)
        response.force_close()
        # Said in words too: the answer to a request aiohttp could not parse is HTTP/1.0,
        # where closing is only implied (RFC 9112 section 9.6).
        response.headers["Connection"] = "close"
        return response


class Guard(asyncio.Protocol):
    """One connection, in front of aiohttp's protocol (see the module doc)."""

    def __init__(self, pool: Connections, inner: web.RequestHandler) -> None:
        self.pool = pool
        self.inner = inner
        self.framing = Framing(pool.limits.max_chunk)
        self.transport: asyncio.Transport | None = None
        self.listener = ""  # tcp or unix, once admitted
        self.finished = 0  # requests answered (the access logger tells)
        self.idle_since = time.monotonic()
        self.head_since = 0.0  # when the head under way began
        self._head_timer: asyncio.TimerHandle | None = None
        self._refusal: Refusal | None = None  # to answer once the requests ahead are done
        self._refused_counted = False
        self._closed = False

    # ------------------------------------------------------------------ asyncio.Protocol

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # uvloop's transports are not asyncio.Transport subclasses: duck-typed.
        conn = cast(asyncio.Transport, transport)
        self.transport = conn
        sockname = conn.get_extra_info("sockname")
        listener = "unix" if isinstance(sockname, str | bytes) else "tcp"
        if not self.pool.admit(self, listener):
            write_problem(conn, TransientError(
                "TOO_MANY_CONNECTIONS", "every connection this listener takes is busy with a "
                "request; retry shortly", retry_after=1))
            self._closed = True
            # A lingering close: the request the client sends meanwhile is read and dropped,
            # so that its arrival does not reset the connection before the answer is read.
            if conn.can_write_eof():
                conn.write_eof()
                asyncio.get_running_loop().call_later(_LINGER, conn.close)
            else:
                conn.close()
            return
        self.listener = listener
        if listener == "tcp":
            # The kernel's send buffer of a TCP connection grows to 4 MiB (tcp_wmem) when a
            # client stops reading: memory the agent cannot account for. A fixed size keeps
            # what a connection holds small; on a local network it costs no speed.
            sock = conn.get_extra_info("socket")
            with contextlib.suppress(OSError, AttributeError):
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, SEND_BUFFER)
        self.inner.connection_made(transport)

    def connection_lost(self, exc: BaseException | None) -> None:
        self._closed = True
        self._cancel_head_timer()
        if not self.listener:
            return  # refused at the door: aiohttp never knew it
        self.pool.release(self)
        self.inner.connection_lost(exc)

    def data_received(self, data: bytes) -> None:
        if self._closed or self._refusal is not None:
            return  # refused: the rest is not the parser's to see
        framing = self.framing
        refusal = framing.feed(data)
        if refusal is not None:
            self.refuse(refusal)
            return
        self.inner.data_received(data)
        if framing.in_head:
            if self._head_timer is None:
                self.head_since = time.monotonic()
                self._head_timer = asyncio.get_running_loop().call_later(
                    self.pool.limits.header_timeout, self._head_timed_out)
        else:
            self._cancel_head_timer()

    def eof_received(self) -> None:
        self.inner.eof_received()

    def pause_writing(self) -> None:
        self.inner.pause_writing()

    def resume_writing(self) -> None:
        self.inner.resume_writing()

    # ------------------------------------------------------------------ requests

    @property
    def busy(self) -> bool:
        """A request has begun (its first byte arrived) and is not answered yet."""
        return not self.framing.at_rest or self.framing.requests > self.finished

    def request_finished(self) -> None:
        """aiohttp wrote a response (called by the access logger)."""
        self.finished += 1
        if self._refusal is not None:
            if self._ahead() <= self.finished:
                self._answer_refusal()
        elif not self.busy:
            self.idle_since = time.monotonic()

    def _cancel_head_timer(self) -> None:
        if self._head_timer is not None:
            self._head_timer.cancel()
            self._head_timer = None

    def _head_timed_out(self) -> None:
        self._head_timer = None
        if self._closed or not self.framing.in_head:
            return
        if self.framing.requests > self.finished:
            self.inner.close()  # pipelined behind a request still being answered: finish it
            return
        self.refuse(Refusal(408, "HEADER_TIMEOUT", "the request head did not arrive within "
                             f"{self.pool.limits.header_timeout:g} s"))

    def refuse(self, refusal: Refusal) -> None:
        """Answer in problem+json and close: now, or once the request ahead is answered."""
        log.warning("HTTP request refused", extra={"fields": {
            "status": refusal.status, "code": refusal.code, "listener": self.listener}})
        self._cancel_head_timer()
        self._refusal = refusal
        self._refused_counted = refusal.counted
        if self._ahead() <= self.finished:
            self._answer_refusal()

    def _ahead(self) -> int:
        """Requests before the refused one (answered or not)."""
        return self.framing.requests - (1 if self._refused_counted else 0)

    def _answer_refusal(self) -> None:
        refusal, transport = self._refusal, self.transport
        if refusal is None or transport is None or self._closed:
            return
        write_problem(transport, ValidationError(refusal.code, refusal.detail,
                                                 status=refusal.status))
        self.close()

    def close(self) -> None:
        """Close now (what is written is still sent first)."""
        self._closed = True
        self._cancel_head_timer()
        if self.transport is not None:
            self.transport.close()

    def overdue(self, now: float) -> bool:
        """Its head has been under way past the grace, with no request ahead of it."""
        return (self.framing.in_head and self.framing.requests <= self.finished
                and now - self.head_since >= self.pool.limits.header_grace)


class Connections:
    """The connections of one server, by listener kind, within their caps."""

    def __init__(self, limits: HttpLimits) -> None:
        self.limits = limits
        self.open: dict[str, dict[Guard, None]] = {}  # insertion order: oldest first
        self.refused = 0
        self.evicted = 0
        self._said_at: dict[str, float] = {}

    def admit(self, guard: Guard, listener: str) -> bool:
        conns = self.open.setdefault(listener, {})
        if len(conns) >= self.limits.max_connections.get(listener, 0):
            victim = self._victim(conns)
            if victim is None:
                self.refused += 1
                self._say("connection limit reached and every connection is busy; refusing "
                          "new connections", listener, refused_so_far=self.refused)
                return False
            del conns[victim]
            self.evicted += 1
            self._say("connection limit reached; closing idle connections to admit new "
                      "ones", listener, evicted_so_far=self.evicted)
            if victim.framing.in_head:
                victim.refuse(Refusal(408, "HEADER_TIMEOUT", "the request head was not "
                                       "complete when the connection was needed"))
            else:
                victim.close()
        conns[guard] = None
        return True

    def _victim(self, conns: dict[Guard, None]) -> Guard | None:
        """The longest-idle keep-alive connection, else one whose head is overdue."""
        idle = [g for g in conns if not g.busy]
        if idle:
            return min(idle, key=lambda g: g.idle_since)
        now = time.monotonic()
        return next((g for g in conns if g.overdue(now)), None)

    def release(self, guard: Guard) -> None:
        self.open.get(guard.listener, {}).pop(guard, None)

    def counts(self) -> dict[str, int]:
        return {listener: len(conns) for listener, conns in self.open.items()}

    def _say(self, message: str, listener: str, **fields: int) -> None:
        now = time.monotonic()
        if now - self._said_at.get(message, -_LOG_INTERVAL) >= _LOG_INTERVAL:
            self._said_at[message] = now
            log.warning(message, extra={"fields": {
                "listener": listener, "open": len(self.open.get(listener, {})), **fields}})


# --------------------------------------------------------------------------- sockets


def bind_tcp(host: str, port: int) -> socket.socket:
    """A TCP socket bound (not yet listening) to host:port; raises OSError (EADDRINUSE)."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind((host, port))
    except BaseException:
        sock.close()
        raise
    return sock


def bind_unix(path: str) -> socket.socket:
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        sock.bind(path)
        os.chmod(path, 0o660)
    except BaseException:
        sock.close()
        raise
    return sock


def address_of(sock: socket.socket) -> str:
    """``http://host:port`` for a TCP socket (its bound port: it may be ephemeral)."""
    host, port = sock.getsockname()[:2]
    shown = f"[{host}]" if ":" in host else host
    return f"http://{shown}:{port}"


class HttpServer:
    """One aiohttp application served on sockets bound beforehand (:func:`bind_tcp`,
    :func:`bind_unix`), every connection behind a :class:`Guard`."""

    def __init__(self, app: web.Application, *, limits: HttpLimits,
                 access_log: logging.Logger, shutdown_timeout: float = 5.0) -> None:
        self.limits = limits
        self.connections = Connections(limits)
        self._runner = web.AppRunner(app, handle_signals=False,
                                     shutdown_timeout=shutdown_timeout)
        self._handler_kwargs: dict[str, Any] = {
            "keepalive_timeout": limits.idle_timeout, "access_log_class": AccessLogger,
            "access_log": access_log, "read_bufsize": READ_BUFFER}
        self._servers: list[asyncio.AbstractServer] = []
        self._started = False

    async def start(self, sockets: list[socket.socket], *,
                    tls: ssl.SSLContext | None = None) -> None:
        await self._runner.setup()
        self._started = True
        loop = asyncio.get_running_loop()
        server = self._runner.server
        assert server is not None
        kwargs = self._handler_kwargs

        def protocol() -> Guard:
            return Guard(self.connections, ProblemRequestHandler(server, loop=loop, **kwargs))

        for sock in sockets:
            # TLS on TCP only: the Unix socket's peers are the pod's own containers.
            context = tls if sock.family != socket.AF_UNIX else None
            self._servers.append(await loop.create_server(protocol, sock=sock, ssl=context,
                                                          backlog=ACCEPT_BACKLOG))

    async def close(self) -> None:
        """Stop accepting, then let aiohttp finish the requests under way and close."""
        for server in self._servers:
            server.close()
        if self._started:
            await self._runner.cleanup()
        self._servers.clear()
