"""Keep-alive honesty on every listener: an answer after which the agent closes the
connection says ``Connection: close`` (RFC 9112 §9.6), so a keep-alive client's next request
never meets a dead connection; and every 405 names the methods allowed (``Allow``, RFC 9110
§15.5.6)."""

from __future__ import annotations

import asyncio
import contextlib
import gzip
import json
from collections.abc import Callable
from pathlib import Path

import pytest

from flux_agent import Agent
from flux_agent.testing import make_event

from .support.capture import CAPTURED

PROBLEM = "application/problem+json"


class Connection:
    """One raw keep-alive connection that reads whole answers (Content-Length or chunked)."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader = reader
        self.writer = writer

    @classmethod
    async def open(cls, target: tuple[str, int] | Path) -> Connection:
        if isinstance(target, Path):
            reader, writer = await asyncio.open_unix_connection(str(target))
        else:
            reader, writer = await asyncio.open_connection(*target)
        return cls(reader, writer)

    async def send(self, data: bytes) -> None:
        self.writer.write(data)
        await self.writer.drain()

    async def answer(self, timeout: float = 15.0, *, to_head: bool = False
                     ) -> tuple[int, dict[str, str], bytes] | None:
        """The next whole answer (``to_head``: to a HEAD request, so without a body), or None
        when the agent closed the connection first."""
        async with asyncio.timeout(timeout):
            try:
                head = await self.reader.readuntil(b"\r\n\r\n")
            except (asyncio.IncompleteReadError, ConnectionError):
                return None
            lines = head.decode("latin-1").split("\r\n")
            headers = {}
            for line in lines[1:]:
                if line:
                    name, _, value = line.partition(":")
                    headers[name.strip().lower()] = value.strip()
            if to_head:
                body = b""
            elif "content-length" in headers:
                body = await self.reader.readexactly(int(headers["content-length"]))
            elif headers.get("transfer-encoding", "").lower() == "chunked":
                parts = []
                while size := int((await self.reader.readuntil(b"\r\n")).split(b";")[0], 16):
                    parts.append(await self.reader.readexactly(size))
                    await self.reader.readexactly(2)
                await self.reader.readuntil(b"\r\n")
                body = b"".join(parts)
            else:
                body = await self.reader.read()
        CAPTURED.append(body.decode(errors="replace"))
        return int(lines[0].split()[1]), headers, body

    async def after_close(self, timeout: float = 10.0) -> bytes:
        """What the agent sends after an answer that said close: nothing, then EOF."""
        async with asyncio.timeout(timeout):
            try:
                return await self.reader.read()
            except ConnectionError:
                return b""

    def close(self) -> None:
        self.writer.close()


def post(path: str, body: bytes, headers: bytes = b"") -> bytes:
    return (f"POST {path} HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n".encode()
            + headers + b"Content-Length: %d\r\n\r\n" % len(body) + body)


def chunked(path: str, chunks: bytes, headers: bytes = b"") -> bytes:
    return (f"POST {path} HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n".encode()
            + headers + b"Transfer-Encoding: chunked\r\n\r\n" + chunks)


def event_mistakes() -> list[tuple[str, bytes]]:
    """Requests a client gets wrong, none asking to close: (name, raw request)."""
    event = json.dumps(make_event()).encode()
    zipped = gzip.compress(event)
    gz = b"Content-Encoding: gzip\r\n"
    return [
        ("bad gzip", post("/v1/events", b"\x1f\x8b\x08\x00garbage-not-deflate", gz)),
        ("gzip that is not gzip", post("/v1/events", b"this is not gzip", gz)),
        ("truncated gzip", post("/v1/events", zipped[:-12], gz)),
        ("truncated gzip, chunked", chunked("/v1/events", b"%x\r\n%s\r\n0\r\n\r\n" % (
            len(zipped) - 12, zipped[:-12]), gz)),
        ("bad deflate", post("/v1/events", b"\x00\x01\x02", b"Content-Encoding: deflate\r\n")),
        ("bad gzip to lineage", post("/api/v1/lineage", b"not gzip at all", gz)),
        ("bad gzip to a checkpoint", post("/v1/runs/r1/checkpoint", b"not gzip", gz)
         .replace(b"POST", b"PUT", 1)),
        ("bad chunk size", chunked("/v1/events", b"zz\r\nabc\r\n0\r\n\r\n")),
        ("chunk longer than declared", chunked("/v1/events", b"2\r\nabcdef\r\n0\r\n\r\n")),
        ("invalid JSON", post("/v1/events", b'{"event_id": ')),
        ("schema violation", post("/v1/events", b'{"kind": "nope"}')),
        ("oversize body", post("/v1/events", b"[" + b" " * (4 * 1024**2) + b"]")),
        ("two Content-Lengths", post("/v1/events", b"{}", b"Content-Length: 3\r\n")),
        ("control byte in a header", post("/v1/events", b"{}", b"X-Bad: a\x01b\r\n")),
        ("header line too long", post("/v1/events", b"{}", b"X-Long: " + b"a" * 9000
                                      + b"\r\n")),
        ("unknown Content-Encoding", post("/v1/events", b"{}", b"Content-Encoding: snappy\r\n")),
        ("Expect magic", post("/v1/events", b"{}", b"Expect: magic\r\n")),
        ("unknown method", b"FROB /v1/events HTTP/1.1\r\nHost: x\r\n\r\n"),
        ("HTTP/0.9", b"GET /v1/runs/r\r\n\r\n"),
        ("raw garbage", b"\x00\xff garbage \r\n\r\n"),
        ("wrong method", post("/v1/runs/r1", b"{}")),
        ("no such route", b"GET /v1/nothing HTTP/1.1\r\nHost: x\r\n\r\n"),
        ("bad cursor", b"GET /v1/runs/r1/events?cursor=zz HTTP/1.1\r\nHost: x\r\n\r\n"),
    ]


def admin_mistakes() -> list[tuple[str, bytes]]:
    gz = b"Content-Encoding: gzip\r\n"
    return [
        ("bad gzip", post("/health/ready", b"\x1f\x8b\x08\x00garbage", gz)),
        ("body to a GET route", post("/metrics", b"x" * 70_000)),
        ("bad chunk size", chunked("/health/live", b"zz\r\nabc\r\n0\r\n\r\n")),
        ("unknown method", b"FROB /metrics HTTP/1.1\r\nHost: x\r\n\r\n"),
        ("control byte in a header", b"GET /metrics HTTP/1.1\r\nHost: x\r\nX-Bad: a\x01b\r\n\r\n"),
        ("no such route", b"GET /nothing HTTP/1.1\r\nHost: x\r\n\r\n"),
        ("raw garbage", b"\x00\xff garbage \r\n\r\n"),
    ]


GOOD_EVENT_REQUEST = b"GET /openapi.json HTTP/1.1\r\nHost: x\r\n\r\n"
GOOD_ADMIN_REQUEST = b"GET /health/live HTTP/1.1\r\nHost: x\r\n\r\n"


async def check_keep_alive(target: tuple[str, int] | Path, name: str, request: bytes,
                           follow_up: bytes) -> str:
    """After the answer to ``request``, either the answer said close (and the agent did
    close), or the same connection serves ``follow_up``. Returns the problem's code."""
    conn = await Connection.open(target)
    try:
        with contextlib.suppress(ConnectionError):
            await conn.send(request)
        first = await conn.answer()
        assert first is not None, f"{name}: the connection closed without an answer"
        status, headers, body = first
        assert status >= 400, (name, status, body[:200])
        assert headers.get("content-type", "").startswith(PROBLEM), (name, headers)
        code = str(json.loads(body)["code"])
        if headers.get("connection", "").lower() == "close":
            extra = await conn.after_close()
            assert not extra, f"{name}: said close, then sent {extra[:300]!r}"
            return code
        try:
            await conn.send(follow_up)
        except ConnectionError:
            pytest.fail(f"{name}: {status} kept the connection alive in words, then closed it")
        second = await conn.answer()
        assert second is not None, (
            f"{name}: {status} {json.loads(body).get('code')} did not say Connection: close, "
            "but the agent closed the connection before the next request was answered")
        assert second[0] == 200, (name, second[0], second[2][:200])
        return code
    finally:
        conn.close()


async def test_every_close_is_announced_on_the_event_api_over_tcp(agent: Agent):
    host, port = agent.endpoints.event_url.removeprefix("http://").rsplit(":", 1)
    codes = {name: await check_keep_alive((host, int(port)), name, request,
                                          GOOD_EVENT_REQUEST)
             for name, request in event_mistakes()}
    # A body that does not decode is the body's fault, whichever layer finds it.
    assert codes["bad deflate"] == codes["bad gzip"] == "INVALID_BODY", codes
    assert codes["unknown Content-Encoding"] == "UNSUPPORTED_MEDIA_TYPE"


async def test_every_close_is_announced_on_the_event_api_socket(agent: Agent):
    assert agent.endpoints.socket_path is not None
    for name, request in event_mistakes():
        await check_keep_alive(agent.endpoints.socket_path, name, request, GOOD_EVENT_REQUEST)


async def test_every_close_is_announced_on_the_admin_listener(agent: Agent):
    host, port = agent.endpoints.admin_url.removeprefix("http://").rsplit(":", 1)
    for name, request in admin_mistakes():
        await check_keep_alive((host, int(port)), name, request, GOOD_ADMIN_REQUEST)


# --------------------------------------------------------------------------- 405 and Allow


def _routes(app: object) -> dict[str, set[str]]:
    """path template -> the methods it answers (HEAD comes with GET)."""
    out: dict[str, set[str]] = {}
    for resource in app.router.resources():  # type: ignore[attr-defined]
        out.setdefault(resource.canonical, set()).update(
            route.method for route in resource)
    return out


def _concrete(template: str) -> str:
    return (template.replace("{run_id}", "r1")
            .replace("{event_id}", "0190f0b2-2f6c-7c3e-9d4a-000000000000"))


async def _check_allow(target: tuple[str, int] | Path, routes: dict[str, set[str]],
                       extra: Callable[[str], bool] = lambda _: True) -> int:
    checked = 0
    for template, methods in routes.items():
        for method in ("GET", "POST", "PUT", "DELETE", "PATCH", "OPTIONS", "HEAD"):
            if method in methods or (method == "HEAD" and "GET" in methods):
                continue
            if not extra(method):
                continue
            conn = await Connection.open(target)
            try:
                await conn.send(f"{method} {_concrete(template)} HTTP/1.1\r\nHost: x\r\n"
                                "Content-Length: 0\r\n\r\n".encode())
                answer = await conn.answer(to_head=method == "HEAD")
            finally:
                conn.close()
            assert answer is not None, (method, template)
            status, headers, body = answer
            assert status == 405, (method, template, status)
            allowed = {m.strip() for m in headers.get("allow", "").split(",") if m.strip()}
            assert allowed, f"405 for {method} {template} without Allow"
            assert allowed == methods, (method, template, allowed, methods)
            if method != "HEAD":
                assert headers["content-type"].startswith(PROBLEM), (method, template)
                assert json.loads(body)["code"] == "METHOD_NOT_ALLOWED"
            checked += 1
    return checked


async def test_every_405_names_the_allowed_methods_on_both_listeners(agent: Agent):
    assert agent.event_app is not None
    host, port = agent.endpoints.event_url.removeprefix("http://").rsplit(":", 1)
    event_routes = _routes(agent.event_app)
    assert await _check_allow((host, int(port)), event_routes) > 30
    assert agent.endpoints.socket_path is not None
    assert await _check_allow(agent.endpoints.socket_path, event_routes) > 30
    admin_routes = {path: {"GET", "HEAD"} for path in
                    ("/health/live", "/health/ready", "/health/deep", "/metrics")}
    host, port = agent.endpoints.admin_url.removeprefix("http://").rsplit(":", 1)
    assert await _check_allow((host, int(port)), admin_routes) == 4 * 5
