"""The aggregators a sidecar talks to: one HTTP client over their replicas, every call within
a deadline, failures classified once as the domain errors the flusher and the routes obey.

A sidecar sticks to one replica while it answers and moves to the next one when it fails
(the first is chosen at random, so a fleet spreads). Connections idle for a few seconds are
closed: an idle sidecar holds none. TCP keepalives and ``TCP_USER_TIMEOUT`` find a
black-holed path; the deadline bounds every call whatever the path does.
"""

from __future__ import annotations

import asyncio
import logging
import random
import socket
import ssl
import time
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiohttp
import msgspec

from ..core.errors import PermissionDenied, StoreUnavailable, UpstreamError
from ..core.health import failed_at, path_state
from ..core.net import tune_socket

log = logging.getLogger("flux_agent.forward")

IDLE_CLOSE = 10.0  # seconds an unused connection to an aggregator stays open
_TRANSIENT_STATUS = frozenset({429, 502, 503, 504})


@dataclass(frozen=True, slots=True)
class Answer:
    status: int
    headers: Mapping[str, str]
    body: bytes


class Upstream:
    """Aggregators by URL (``https://host:8788``), their health, their deadlines."""

    def __init__(self, urls: tuple[str, ...], *, token_file: str = "", ca_file: str = "",
                 timeout: float = 10.0, connect_timeout: float = 5.0,
                 user_agent: str = "flux-agent") -> None:
        if not urls:
            raise ValueError("no aggregator URL")
        self.urls = tuple(u.rstrip("/") for u in urls)
        self.timeout = timeout
        self.connect_timeout = connect_timeout
        self.user_agent = user_agent
        self._token = _TokenFile(Path(token_file)) if token_file else None
        self._ca_file = ca_file
        self._next = random.randrange(len(self.urls))
        self._session: aiohttp.ClientSession | None = None
        # Health: the last call that worked, the last failure, calls under way.
        self.last_ok: float | None = None
        self.last_failure: float | None = None
        self.last_error: str | None = None
        self._inflight: dict[object, float] = {}

    @property
    def current(self) -> str:
        return self.urls[self._next % len(self.urls)]

    def _rotate(self) -> None:
        self._next = (self._next + 1) % len(self.urls)

    def _client(self) -> aiohttp.ClientSession:
        if self._session is None or self._session.closed:
            context: ssl.SSLContext | bool = True
            if self._ca_file:
                context = ssl.create_default_context(cafile=self._ca_file)
            user_timeout = self.timeout

            def tuned(addr_info: Any) -> socket.socket:
                family, kind, proto = addr_info[0], addr_info[1], addr_info[2]
                sock = socket.socket(family, kind, proto)
                tune_socket(sock, user_timeout)
                return sock

            connector = aiohttp.TCPConnector(ssl=context, keepalive_timeout=IDLE_CLOSE,
                                             limit=8, socket_factory=tuned)
            self._session = aiohttp.ClientSession(
                connector=connector,
                timeout=aiohttp.ClientTimeout(total=self.timeout, connect=self.connect_timeout),
                headers={"User-Agent": self.user_agent}, raise_for_status=False)
        return self._session

    async def request(self, method: str, path: str, *, body: bytes | None = None,
                      headers: Mapping[str, str] | None = None, timeout: float | None = None,
                      answer_codes: frozenset[str] = frozenset()) -> Answer:
        """One call to the current replica. An answer the caller must handle (2xx, 404, a
        4xx it can explain) comes back; the rest raises an :class:`UpstreamError`: the
        replica or the path away (StoreUnavailable, and the next replica is tried next),
        credentials refused (PermissionDenied), anything else (UpstreamError). A problem
        whose code is in ``answer_codes`` is an answer too. ``timeout``: this call's own
        deadline (a ``Prefer: wait=committed`` call waits for PostgreSQL as well)."""
        url = self.current + path
        sent = dict(headers or {})
        if self._token is not None:
            sent["Authorization"] = f"Bearer {await self._token.read()}"
        token = object()
        self._inflight[token] = started = time.monotonic()
        try:
            try:
                # aiohttp reads timeout=None as "no deadline": the session's is the default.
                extra: dict[str, Any] = {} if timeout is None else {
                    "timeout": aiohttp.ClientTimeout(total=timeout,
                                                     connect=self.connect_timeout)}
                async with self._client().request(method, url, data=body, headers=sent,
                                                  **extra) as resp:
                    data = await resp.read()
                    answer = Answer(resp.status, dict(resp.headers), data)
            except (aiohttp.ClientError, OSError, TimeoutError) as exc:
                err: UpstreamError = StoreUnavailable(f"{url}: {_why(exc)}",
                                                      code=type(exc).__name__)
                self._failed(err, started, rotate=True)
                raise err from exc
            if answer.status >= 400 and _code(answer) in answer_codes:
                self.last_ok = time.monotonic()
                return answer
            if answer.status in _TRANSIENT_STATUS:
                err = StoreUnavailable(f"{url}: {answer.status} {_code(answer)}",
                                       code=str(answer.status))
                self._failed(err, started, rotate=True)
                raise err
            if answer.status in (401, 403):
                err = PermissionDenied(f"{url}: {answer.status} {_code(answer)}",
                                       code=str(answer.status))
                self._failed(err, started, rotate=False)
                raise err
            if answer.status >= 500:
                err = UpstreamError(f"{url}: {answer.status} {_code(answer)}",
                                    code=str(answer.status))
                self._failed(err, started, rotate=True)
                raise err
            self.last_ok = time.monotonic()
            return answer
        finally:
            del self._inflight[token]

    def _failed(self, err: UpstreamError, started: float, *, rotate: bool) -> None:
        self.last_failure = failed_at(self.last_failure, started)
        self.last_error = err.detail
        if rotate:
            self._rotate()

    def state(self, window: float) -> str:
        """``up``, ``down`` or ``unknown``, by the rule PostgreSQL's pool follows too."""
        return path_state(self.last_ok, self.last_failure, self._inflight.values(),
                          connect_timeout=self.connect_timeout, window=window)

    async def close(self) -> None:
        if self._session is not None:
            session, self._session = self._session, None
            await session.close()


class _TokenFile:
    """A bearer token in a file (a projected service-account token is rotated by the
    kubelet): re-read when the file changes, off the event loop."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self._stamp: tuple[float, int] | None = None
        self._token = ""

    async def read(self) -> str:
        loop = asyncio.get_running_loop()
        try:
            stamp, token = await loop.run_in_executor(None, self._load, self._stamp)
        except OSError as exc:
            raise PermissionDenied(f"cannot read the upstream token file {self.path} "
                                   f"(FLUX_AGENT_UPSTREAM_TOKEN_FILE): {exc.strerror}") from None
        if token is not None:
            self._stamp, self._token = stamp, token
        return self._token

    def _load(self, known: tuple[float, int] | None) -> tuple[tuple[float, int], str | None]:
        st = self.path.stat()
        stamp = (st.st_mtime, st.st_size)
        if stamp == known:
            return stamp, None
        return stamp, self.path.read_text().strip()


def _why(exc: BaseException) -> str:
    if isinstance(exc, TimeoutError):
        return "no answer within the deadline"
    text = str(exc).splitlines()[0] if str(exc) else ""
    return f"{type(exc).__name__}: {text}" if text else type(exc).__name__


def _code(answer: Answer) -> str:
    """The problem code of an error answer, when it has one."""
    if answer.headers.get("Content-Type", "").startswith("application/problem+json"):
        try:
            problem = msgspec.json.decode(answer.body)
        except msgspec.DecodeError:
            return ""
        if isinstance(problem, dict):
            return str(problem.get("code", ""))
    return ""
