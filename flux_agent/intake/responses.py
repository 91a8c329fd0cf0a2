"""What a request carries through the routes (its keys) and what it gets back: JSON and
problem+json answers, aiohttp's own HTTP errors as problems, and a whole problem+json answer
written straight to a transport (before, or instead of, a request aiohttp parsed)."""

from __future__ import annotations

import asyncio
from collections.abc import Mapping
from http import HTTPStatus
from typing import Any

import msgspec
from aiohttp import web

from ..core.errors import PROBLEM_CONTENT_TYPE, FluxError, TerminalError, ValidationError
from .auth import Claims

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


def json_bytes(body: Any) -> bytes:
    """A JSON answer's bytes, ending with a newline (as curl and shells expect a line)."""
    return msgspec.json.encode(body) + b"\n"


def json_response(body: Any, status: int = 200, headers: Mapping[str, str] | None = None
                  ) -> web.Response:
    return web.Response(body=json_bytes(body), status=status,
                        content_type="application/json", headers=headers)


def problem_response(request: web.Request, err: FluxError) -> web.Response:
    trace = request.get(TRACE, ("", ""))
    body = err.problem(instance=request.path, request_id=request.get(REQUEST_ID, ""),
                       trace_id=trace[0], span_id=trace[1])
    return web.Response(body=json_bytes(body), status=err.status,
                        content_type=PROBLEM_CONTENT_TYPE, headers=dict(err.headers))


def http_error(exc: web.HTTPException) -> FluxError:
    """aiohttp's 404, 405, 413, ... as a problem; ``Allow`` and such headers kept."""
    code = _HTTP_CODES.get(exc.status, "HTTP_ERROR")
    detail = exc.text if exc.text and not exc.text.startswith(f"{exc.status}:") else exc.reason
    kept = {k: v for k, v in exc.headers.items() if k.lower() in ("allow",)}
    if exc.status >= 500:
        return TerminalError(code, detail or exc.reason, status=exc.status, headers=kept)
    return ValidationError(code, detail or exc.reason, status=exc.status, headers=kept)


def problem_bytes(err: FluxError) -> bytes:
    """A whole HTTP/1.1 answer in problem+json that closes the connection (for answers
    written below aiohttp: a refused connection, a request that never reached it)."""
    body = json_bytes(err.problem(instance="", request_id="", trace_id="", span_id=""))
    extra = "".join(f"{k}: {v}\r\n" for k, v in err.headers.items())
    head = (f"HTTP/1.1 {err.status} {HTTPStatus(err.status).phrase}\r\n"
            f"Content-Type: {PROBLEM_CONTENT_TYPE}\r\nContent-Length: {len(body)}\r\n"
            f"{extra}Connection: close\r\n\r\n")
    return head.encode("latin-1") + body


def write_problem(transport: asyncio.Transport | None, err: FluxError) -> None:
    if transport is not None and not transport.is_closing():
        transport.write(problem_bytes(err))
