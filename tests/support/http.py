"""HTTP helpers: requests that record every answer (for the secret check), raw HTTP, and
problem+json checks."""

from __future__ import annotations

import asyncio
import gzip
import json
from pathlib import Path
from typing import Any

import aiohttp
from multidict import CIMultiDict

from .capture import CAPTURED

PROBLEM = "application/problem+json"


def _connector(socket: Path | None) -> aiohttp.UnixConnector | None:
    return aiohttp.UnixConnector(path=str(socket)) if socket else None


async def post(url: str, body: Any, *, headers: dict[str, str] | None = None,
               raw: bytes | None = None, socket: Path | None = None,
               compress: bool = False) -> tuple[int, dict[str, Any], dict[str, str]]:
    """POST JSON (or raw bytes) and return (status, decoded body, headers)."""
    data = raw if raw is not None else json.dumps(body).encode()
    hdrs = {"Content-Type": "application/json"}
    if compress:
        data = gzip.compress(data)
        hdrs["Content-Encoding"] = "gzip"
    hdrs.update(headers or {})
    async with aiohttp.ClientSession(connector=_connector(socket)) as session, session.post(
            url, data=data, headers=hdrs) as resp:
        text = await resp.read()
        CAPTURED.append(text.decode(errors="replace"))
        decoded = json.loads(text) if text else {}
        return resp.status, decoded, CIMultiDict(resp.headers)


async def put(url: str, body: Any, headers: dict[str, str] | None = None,
              socket: Path | None = None) -> tuple[int, dict[str, Any], dict[str, str]]:
    """PUT JSON (a checkpoint) and return (status, decoded body, headers)."""
    async with aiohttp.ClientSession(connector=_connector(socket)) as session, session.put(
            url, data=json.dumps(body), headers={"Content-Type": "application/json",
                                                 **(headers or {})}) as resp:
        text = await resp.read()
        CAPTURED.append(text.decode(errors="replace"))
        return resp.status, json.loads(text) if text else {}, CIMultiDict(resp.headers)


async def get(url: str, *, headers: dict[str, str] | None = None,
              socket: Path | None = None) -> tuple[int, Any, dict[str, str]]:
    async with aiohttp.ClientSession(connector=_connector(socket)) as session, session.get(
            url, headers=headers or {}) as resp:
        text = await resp.read()
        CAPTURED.append(text.decode(errors="replace"))
        ctype = resp.headers.get("Content-Type", "")
        decoded = json.loads(text) if text and "json" in ctype else text.decode()
        return resp.status, decoded, CIMultiDict(resp.headers)


async def raw_http(host: str, port: int, request: bytes, timeout: float = 10.0, *,
                   unix: Path | None = None) -> bytes:
    """Send raw bytes (to ``unix``, a socket path, if given) and read the answer until the
    agent closes or ``timeout`` passes."""
    reader, writer = await (asyncio.open_unix_connection(str(unix)) if unix is not None
                            else asyncio.open_connection(host, port))
    try:
        writer.write(request)
        await writer.drain()
        chunks = []
        async with asyncio.timeout(timeout):
            while chunk := await reader.read(65536):
                chunks.append(chunk)
    finally:
        writer.close()
    answer = b"".join(chunks)
    CAPTURED.append(answer.decode(errors="replace"))
    return answer


def split_answer(answer: bytes) -> tuple[int, dict[str, str], bytes]:
    """(status, headers with lower-case names, body) of a raw HTTP/1.x answer."""
    head, _, body = answer.partition(b"\r\n\r\n")
    lines = head.decode("latin-1").split("\r\n")
    headers = {}
    for line in lines[1:]:
        name, _, value = line.partition(":")
        headers[name.strip().lower()] = value.strip()
    return int(lines[0].split()[1]), headers, body


def assert_problem(status: int, body: dict[str, Any], headers: dict[str, str],
                   expect_status: int, code: str | None = None) -> None:
    assert status == expect_status, body
    assert headers["Content-Type"].startswith(PROBLEM), headers
    for member in ("type", "title", "status", "detail", "instance", "error_id", "timestamp",
                   "class", "code", "context", "trace_id", "span_id", "request_id",
                   "retryable"):
        assert member in body, member
    assert body["status"] == expect_status
    assert body["request_id"] == headers["X-Request-ID"]
    if code is not None:
        assert body["code"] == code, body
