"""What workloads import to talk to their flux-agent sidecar.

The synchronous :class:`FluxClient` uses only the standard library (``http.client``, over the
agent's Unix socket or TCP), so an ETL script needs nothing else installed. The asynchronous
:class:`AsyncFluxClient` has the same API with ``await``; it imports aiohttp when it is first
used.

Quick start::

    from flux_agent.client import FluxClient

    with FluxClient() as flux:
        with flux.run("nightly-2026-11-23", content_type="images", use_case="research") as run:
            with run.step("extract") as step:
                rows = extract()
                step.payload["items_processed"] = len(rows)
            run.checkpoint("extract", {"offset": len(rows)})

    # async
    async with AsyncFluxClient() as flux:
        async with flux.run("nightly", content_type="text", use_case="search") as run:
            async with run.step("index"):
                ...

Where the agent is (first that applies):

1. ``FluxClient(url=...)``: ``http://host:port`` (TCP), ``https://...``, or ``unix:///path``;
   ``FluxClient(socket_path=...)``: a Unix socket;
2. ``FLUX_AGENT_SOCKET``: the Unix socket (the sidecar injector sets it);
3. ``FLUX_AGENT_URL``: TCP (the injector sets it too: ``http://127.0.0.1:8787``);
4. ``http://127.0.0.1:8787``.

Authentication: a bearer token from ``token=...``, else ``FLUX_AGENT_TOKEN``, else the file
named by ``token_file=...`` or ``FLUX_AGENT_TOKEN_FILE`` (re-read when it changes, as a
projected service-account token is). No token: no ``Authorization`` header (agents running
with ``FLUX_AGENT_AUTH=none``).

Events
    ``emit(kind, run_id, step=..., payload=...)`` posts one event; ``post_events([...])``
    posts several atomically (all accepted or none). Each event gets a UUIDv7 ``event_id``
    and an RFC 3339 ``occurred_at`` here, before the first attempt, so every retry carries
    the same ids and the agent stores each event once (a re-post counts as a duplicate).
    Both return a :class:`PostResult` (``accepted``, ``duplicates``, ``event_ids``,
    ``committed``). ``wait_committed=True`` asks for ``Prefer: wait=committed``: the answer
    comes once the events are in PostgreSQL.

Runs
    ``with client.run(run_id, content_type=..., use_case=...) as run:`` emits ``run.started``;
    on normal exit ``run.completed`` (payload: ``duration_ms`` plus whatever was put in
    ``run.payload``), on an exception ``run.failed`` (payload ``error``: ``{"type",
    "message"}``) and the exception propagates; on KeyboardInterrupt, SystemExit or
    cancellation ``run.aborted``. ``run.step(name)`` does the same for ``step.started`` /
    ``step.completed`` / ``step.failed``; ``run.emit(kind, ...)`` anything else.

Batching
    ``with client.batch(max_events=500) as batch: batch.add(kind, run_id, ...)`` collects
    events and posts them as one JSON array when ``max_events`` or ``max_bytes`` is reached,
    on ``flush()`` and on ``close()`` (or leaving the ``with``). ``batch.results`` lists the
    answers.

Checkpoints
    ``client.checkpoint(run_id, step, state)`` is ``PUT /v1/runs/{run_id}/checkpoint`` with
    ``{"step", "state"}`` and returns the agent's answer (``{"version": N, ...}``);
    ``client.resume(run_id)`` is ``GET`` of the same path and returns a :class:`Checkpoint`
    (``step``, ``state``, ``version``, ``checkpoint_hash``) or None when there is none (404).

Retries
    Connection failures and answers 429/502/503/504 (or any problem with ``retryable:
    true``) are retried with exponential backoff and jitter, waiting at least the agent's
    ``Retry-After``; :class:`RetryPolicy` sets the attempts and delays. Other errors are not
    retried.

Errors (all carry ``status``, ``code``, ``retryable``, ``problem`` - the problem+json body -
``errors`` and ``request_id``)::

    FluxClientError
    +-- FluxConnectionError      the agent could not be reached (after retries)
    +-- FluxHTTPError            the agent answered with an error
        +-- FluxRequestError     4xx: the request is wrong (validation, conflict, too large)
        |   +-- FluxAuthError    401, 403
        |   +-- FluxNotFoundError 404
        +-- FluxUnavailableError 503 still after the retries (spool full, draining)
        +-- FluxServerError      other 5xx

Events are checked here for what makes them unacceptable whatever the payload (kind,
``run_id`` pattern, ``step`` presence); the agent validates the rest and answers 422 with
pointers.
"""

from __future__ import annotations

import asyncio
import email.utils
import http.client
import json
import os
import random
import re
import socket
import ssl
import threading
import time
import uuid
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from types import TracebackType
from typing import TYPE_CHECKING, Any
from urllib.parse import quote, urlsplit

try:
    from ._version import __version__
except ImportError:  # loaded as a single file, outside the package
    __version__ = "0"

if TYPE_CHECKING:  # pragma: no cover
    import aiohttp

__all__ = [
    "AsyncEventBatch",
    "AsyncFluxClient",
    "AsyncRun",
    "AsyncStep",
    "Checkpoint",
    "EventBatch",
    "FluxAuthError",
    "FluxClient",
    "FluxClientError",
    "FluxConnectionError",
    "FluxHTTPError",
    "FluxNotFoundError",
    "FluxRequestError",
    "FluxServerError",
    "FluxUnavailableError",
    "PostResult",
    "RetryPolicy",
    "Run",
    "Step",
    "make_event",
    "uuid7",
]

DEFAULT_URL = "http://127.0.0.1:8787"
USER_AGENT = f"flux-agent-client/{__version__}"

KINDS = frozenset({"run.started", "step.started", "step.completed", "step.failed",
                   "checkpoint.saved", "run.completed", "run.failed", "run.aborted"})
STEP_KINDS = frozenset({"step.started", "step.completed", "step.failed", "checkpoint.saved"})
CONTENT_TYPES = ("images", "documents", "text", "mixed")
USE_CASES = ("vr", "ai-training", "research", "archival", "search", "analytics")
RUN_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._:-]{0,63}\Z")  # \Z: "$" allows a final "\n"
RETRY_STATUSES = frozenset({429, 502, 503, 504})


# --------------------------------------------------------------------------- ids and events

_uuid_lock = threading.Lock()
_uuid_last_ms = 0
_uuid_counter = 0


def uuid7() -> str:
    """A UUIDv7 (RFC 9562): 48-bit Unix milliseconds, a 12-bit counter seeded at random each
    millisecond (so ids made in one process sort in creation order), then random bits."""
    global _uuid_last_ms, _uuid_counter
    with _uuid_lock:
        ms = time.time_ns() // 1_000_000
        if ms > _uuid_last_ms:
            _uuid_last_ms = ms
            _uuid_counter = random.getrandbits(11)  # leaves room to count up
        else:
            _uuid_counter += 1
            if _uuid_counter > 0xFFF:  # more than ~2000 ids in one millisecond
                _uuid_last_ms += 1
                _uuid_counter = 0
            ms = _uuid_last_ms
        counter = _uuid_counter
    value = (ms & ((1 << 48) - 1)) << 80
    value |= 0x7 << 76
    value |= counter << 64
    value |= 0b10 << 62
    value |= int.from_bytes(os.urandom(8), "big") & ((1 << 62) - 1)
    return str(uuid.UUID(int=value))


def now_rfc3339() -> str:
    return datetime.now(UTC).isoformat(timespec="microseconds").replace("+00:00", "Z")


def make_event(kind: str, run_id: str, *, step: str | None = None,
               payload: Mapping[str, Any] | None = None, provider: str | None = None,
               model: str | None = None, occurred_at: str | datetime | None = None,
               event_id: str | None = None) -> dict[str, Any]:
    """One event, with a fresh UUIDv7 id and the current time unless given.
    Raises ValueError for what the agent would refuse whatever the payload."""
    if kind not in KINDS:
        raise ValueError(f"kind must be one of {', '.join(sorted(KINDS))}, got {kind!r}")
    if not isinstance(run_id, str) or not RUN_ID.match(run_id):
        raise ValueError(f"run_id {run_id!r} does not match {RUN_ID.pattern}")
    if kind in STEP_KINDS and not step:
        raise ValueError(f"{kind} needs a step")
    if step is not None and (not isinstance(step, str) or not 1 <= len(step) <= 128):
        raise ValueError("step must be a string of 1 to 128 characters")
    if payload is not None and not isinstance(payload, Mapping):
        raise ValueError("payload must be a mapping")
    if isinstance(occurred_at, datetime):
        if occurred_at.tzinfo is None:
            raise ValueError("occurred_at needs a timezone")
        occurred_at = occurred_at.isoformat()
    event: dict[str, Any] = {
        "event_id": event_id or uuid7(),
        "run_id": run_id,
        "kind": kind,
        "occurred_at": occurred_at or now_rfc3339(),
        "payload": dict(payload or {}),
    }
    if step is not None:
        event["step"] = step
    if provider is not None:
        event["provider"] = provider
    if model is not None:
        event["model"] = model
    return event


def _complete(events: Iterable[Mapping[str, Any]]) -> list[dict[str, Any]]:
    """Copies of ``events`` with an id and a time each, fixed before the first attempt."""
    out = []
    for event in events:
        if not isinstance(event, Mapping):
            raise ValueError("each event must be a mapping")
        item = dict(event)
        item.setdefault("event_id", uuid7())
        item.setdefault("occurred_at", now_rfc3339())
        item.setdefault("payload", {})
        out.append(item)
    if not out:
        raise ValueError("no events to post")
    return out


def _started_payload(content_type: str, use_case: str, payload: Mapping[str, Any] | None
                     ) -> dict[str, Any]:
    if content_type not in CONTENT_TYPES:
        raise ValueError(f"content_type must be one of {', '.join(CONTENT_TYPES)}")
    if use_case not in USE_CASES:
        raise ValueError(f"use_case must be one of {', '.join(USE_CASES)}")
    return {**(payload or {}), "content_type": content_type, "use_case": use_case}


def _error_payload(exc: BaseException, started: float) -> dict[str, Any]:
    return {"error": {"type": type(exc).__name__, "message": str(exc)[:4000]},
            "duration_ms": _elapsed_ms(started)}


def _elapsed_ms(started: float) -> float:
    return round((time.monotonic() - started) * 1000, 3)


# --------------------------------------------------------------------------- results, errors


@dataclass(frozen=True, slots=True)
class PostResult:
    accepted: int
    duplicates: int
    event_ids: list[str]
    committed: bool = False
    request_id: str = ""


@dataclass(frozen=True, slots=True)
class Checkpoint:
    run_id: str
    step: str
    state: Any
    version: int
    checkpoint_hash: str
    raw: dict[str, Any] = field(default_factory=dict)


class FluxClientError(Exception):
    """Base of the client's errors."""

    def __init__(self, message: str, *, status: int | None = None, code: str = "",
                 retryable: bool = False, problem: Mapping[str, Any] | None = None,
                 request_id: str = "") -> None:
        super().__init__(message)
        self.status = status
        self.code = code
        self.retryable = retryable
        self.problem: dict[str, Any] = dict(problem or {})
        self.errors: list[Any] = list(self.problem.get("errors") or [])
        self.request_id = request_id


class FluxConnectionError(FluxClientError):
    """The agent could not be reached (socket missing, connection refused or cut)."""


class FluxHTTPError(FluxClientError):
    """The agent answered with an error status."""


class FluxRequestError(FluxHTTPError):
    """4xx: the request is wrong; sending it again unchanged fails again."""


class FluxAuthError(FluxRequestError):
    """401 or 403: missing or invalid token, role or agency."""


class FluxNotFoundError(FluxRequestError):
    """404."""


class FluxUnavailableError(FluxHTTPError):
    """503 (spool full, draining, commit timeout) still after the retries."""


class FluxServerError(FluxHTTPError):
    """Any other 5xx."""


def error_from(status: int, body: bytes, headers: Mapping[str, str]) -> FluxHTTPError:
    """The exception for an error answer, carrying its problem+json body."""
    problem: dict[str, Any] = {}
    try:
        decoded = json.loads(body) if body else {}
        if isinstance(decoded, dict):
            problem = decoded
    except ValueError:
        problem = {"detail": body[:500].decode(errors="replace")}
    code = str(problem.get("code") or f"HTTP_{status}")
    detail = str(problem.get("detail") or problem.get("title") or f"HTTP {status}")
    retryable = bool(problem.get("retryable", status in RETRY_STATUSES))
    request_id = _header(headers, "X-Request-ID")
    cls: type[FluxHTTPError]
    if status in (401, 403):
        cls = FluxAuthError
    elif status == 404:
        cls = FluxNotFoundError
    elif 400 <= status < 500:
        cls = FluxRequestError
    elif status == 503:
        cls = FluxUnavailableError
    else:
        cls = FluxServerError
    return cls(f"{status} {code}: {detail}", status=status, code=code, retryable=retryable,
               problem=problem, request_id=request_id)


def _header(headers: Mapping[str, str], name: str) -> str:
    for key, value in headers.items():
        if key.lower() == name.lower():
            return value
    return ""


def _retry_after(headers: Mapping[str, str]) -> float | None:
    """Seconds from a ``Retry-After`` header (delta-seconds or an HTTP date)."""
    raw = _header(headers, "Retry-After").strip()
    if not raw:
        return None
    try:
        return max(0.0, float(raw))
    except ValueError:
        pass
    try:
        when = email.utils.parsedate_to_datetime(raw)
    except (TypeError, ValueError):
        return None
    if when.tzinfo is None:
        when = when.replace(tzinfo=UTC)
    return max(0.0, (when - datetime.now(UTC)).total_seconds())


@dataclass(frozen=True, slots=True)
class RetryPolicy:
    """``attempts`` in all (1 = no retry); the n-th retry waits ``min(backoff_max,
    backoff * 2**n)`` scaled by a random 50-100%, and at least ``Retry-After`` (capped by
    ``retry_after_max``)."""

    attempts: int = 6
    backoff: float = 0.1
    backoff_max: float = 5.0
    retry_after_max: float = 30.0

    def delay(self, retry: int, retry_after: float | None) -> float:
        computed = min(self.backoff_max, self.backoff * (2.0 ** retry)) * random.uniform(0.5, 1.0)
        if retry_after is not None:
            return max(computed, min(retry_after, self.retry_after_max))
        return computed


# --------------------------------------------------------------------------- where and who


@dataclass(frozen=True, slots=True)
class Endpoint:
    """Where the agent listens: a Unix socket path, or a TCP host and port."""

    socket_path: str | None = None
    host: str = "127.0.0.1"
    port: int = 8787
    tls: bool = False
    base_path: str = ""

    @property
    def display(self) -> str:
        if self.socket_path:
            return f"unix://{self.socket_path}"
        return f"{'https' if self.tls else 'http'}://{self.host}:{self.port}{self.base_path}"


def resolve_endpoint(url: str | None = None, socket_path: str | os.PathLike[str] | None = None,
                     environ: Mapping[str, str] | None = None) -> Endpoint:
    """The agent's address: arguments, then FLUX_AGENT_SOCKET, FLUX_AGENT_URL, default."""
    environ = os.environ if environ is None else environ
    if url and socket_path:
        raise ValueError("give url or socket_path, not both")
    if socket_path:
        return Endpoint(socket_path=os.fspath(socket_path))
    if url:
        return _parse_url(url)
    env_socket = environ.get("FLUX_AGENT_SOCKET", "").strip()
    if env_socket and env_socket.lower() not in ("off", "auto"):
        return Endpoint(socket_path=env_socket)
    return _parse_url(environ.get("FLUX_AGENT_URL", "").strip() or DEFAULT_URL)


def _parse_url(url: str) -> Endpoint:
    parts = urlsplit(url)
    if parts.scheme == "unix":
        path = parts.path or parts.netloc
        if not path:
            raise ValueError(f"no socket path in {url!r}")
        return Endpoint(socket_path=path)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise ValueError(f"expected http://host:port, https://... or unix:///path, got {url!r}")
    tls = parts.scheme == "https"
    return Endpoint(host=parts.hostname, port=parts.port or (443 if tls else 80), tls=tls,
                    base_path=parts.path.rstrip("/"))


class TokenSource:
    """The bearer token: given, from FLUX_AGENT_TOKEN, or from a file re-read on change."""

    def __init__(self, token: str | None = None, token_file: str | os.PathLike[str] | None = None,
                 environ: Mapping[str, str] | None = None) -> None:
        environ = os.environ if environ is None else environ
        self._token = token or environ.get("FLUX_AGENT_TOKEN") or None
        file = token_file or environ.get("FLUX_AGENT_TOKEN_FILE") or None
        self._file = Path(file) if file and not self._token else None
        self._stamp: tuple[float, int] | None = None
        self._cached: str | None = None
        self._lock = threading.Lock()

    def get(self) -> str | None:
        if self._token or self._file is None:
            return self._token
        with self._lock:
            try:
                st = self._file.stat()
                stamp = (st.st_mtime, st.st_size)
                if stamp != self._stamp:
                    self._cached = self._file.read_text().strip() or None
                    self._stamp = stamp
            except OSError as exc:
                raise FluxClientError(f"cannot read the token file {self._file}: "
                                      f"{exc.strerror}", code="TOKEN_FILE") from None
            return self._cached


class _Core:
    """What both clients share: address, credentials, retry policy, encoding, decoding."""

    def __init__(self, url: str | None, socket_path: str | os.PathLike[str] | None,
                 token: str | None, token_file: str | os.PathLike[str] | None,
                 timeout: float, retry: RetryPolicy | None, wait_committed: bool,
                 environ: Mapping[str, str] | None, user_agent: str | None) -> None:
        self.endpoint = resolve_endpoint(url, socket_path, environ)
        self.tokens = TokenSource(token, token_file, environ)
        self.timeout = timeout
        self.retry = retry or RetryPolicy()
        self.wait_committed = wait_committed
        self.user_agent = user_agent or USER_AGENT

    def path(self, path: str) -> str:
        return self.endpoint.base_path + path

    def headers(self, body: bool, extra: Mapping[str, str] | None = None) -> dict[str, str]:
        headers = {"Accept": "application/json", "User-Agent": self.user_agent}
        if body:
            headers["Content-Type"] = "application/json"
        token = self.tokens.get()
        if token:
            headers["Authorization"] = f"Bearer {token}"
        headers.update(extra or {})
        return headers

    def events_request(self, events: Iterable[Mapping[str, Any]], wait_committed: bool | None,
                       *, single: bool = False
                       ) -> tuple[list[dict[str, Any]], bytes, dict[str, str]]:
        """The body: a JSON array, or the object itself for ``single`` (then the agent's
        error pointers name ``/payload/...`` rather than ``/0/payload/...``)."""
        complete = _complete(events)
        doc: Any = complete[0] if single and len(complete) == 1 else complete
        body = json.dumps(doc, separators=(",", ":"), ensure_ascii=False).encode()
        extra = {}
        if self.wait_committed if wait_committed is None else wait_committed:
            extra["Prefer"] = "wait=committed"
        return complete, body, extra

    @staticmethod
    def should_retry(status: int, body: bytes) -> bool:
        if status in RETRY_STATUSES:
            return True
        if status >= 400 and body[:1] == b"{":
            try:
                return bool(json.loads(body).get("retryable") is True)
            except (ValueError, AttributeError):
                return False
        return False

    @staticmethod
    def post_result(status: int, body: bytes, headers: Mapping[str, str]) -> PostResult:
        if status >= 400:
            raise error_from(status, body, headers)
        data = _json(body)
        return PostResult(int(data.get("accepted", 0)), int(data.get("duplicates", 0)),
                          list(data.get("event_ids", [])), bool(data.get("committed", False)),
                          _header(headers, "X-Request-ID"))

    @staticmethod
    def checkpoint_result(run_id: str, status: int, body: bytes, headers: Mapping[str, str]
                          ) -> Checkpoint | None:
        if status == 404:
            return None
        if status >= 400:
            raise error_from(status, body, headers)
        data = _json(body)
        return Checkpoint(run_id, str(data.get("step", "")), data.get("state"),
                          int(data.get("version", 0)), str(data.get("checkpoint_hash", "")),
                          data)

    @staticmethod
    def checkpoint_body(step: str, state: Any) -> bytes:
        if not isinstance(step, str) or not 1 <= len(step) <= 128:
            raise ValueError("step must be a string of 1 to 128 characters")
        return json.dumps({"step": step, "state": state}, separators=(",", ":"),
                          ensure_ascii=False).encode()

    @staticmethod
    def run_path(run_id: str) -> str:
        if not RUN_ID.match(run_id):
            raise ValueError(f"run_id {run_id!r} does not match {RUN_ID.pattern}")
        return f"/v1/runs/{quote(run_id, safe='')}/checkpoint"


def _json(body: bytes) -> dict[str, Any]:
    if not body:
        return {}
    data = json.loads(body)
    if not isinstance(data, dict):
        raise FluxClientError("the agent answered with something other than a JSON object",
                              code="UNEXPECTED_ANSWER")
    return data


# --------------------------------------------------------------------------- sync transport


class UnixHTTPConnection(http.client.HTTPConnection):
    """``http.client`` over a Unix domain socket."""

    def __init__(self, path: str, timeout: float | None = None) -> None:
        super().__init__("localhost", timeout=timeout)
        self.socket_path = path

    def connect(self) -> None:
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            sock.settimeout(self.timeout)
            sock.connect(self.socket_path)
        except OSError:
            sock.close()
            raise
        self.sock = sock


_STALE = (http.client.RemoteDisconnected, ConnectionResetError, BrokenPipeError)


class FluxClient:
    """Blocking client (standard library only). Thread-safe; keeps connections alive."""

    def __init__(self, url: str | None = None, *,
                 socket_path: str | os.PathLike[str] | None = None, token: str | None = None,
                 token_file: str | os.PathLike[str] | None = None, timeout: float = 30.0,
                 retry: RetryPolicy | None = None, wait_committed: bool = False,
                 environ: Mapping[str, str] | None = None, user_agent: str | None = None,
                 sleep: Callable[[float], None] = time.sleep) -> None:
        self._core = _Core(url, socket_path, token, token_file, timeout, retry,
                           wait_committed, environ, user_agent)
        self._idle: list[http.client.HTTPConnection] = []
        self._lock = threading.Lock()
        self._sleep = sleep
        self._closed = False

    @property
    def endpoint(self) -> Endpoint:
        return self._core.endpoint

    def __repr__(self) -> str:
        return f"FluxClient({self.endpoint.display!r})"

    # ------------------------------------------------------------- connections

    def _connection(self) -> tuple[http.client.HTTPConnection, bool]:
        if self._closed:
            raise FluxClientError("the client is closed", code="CLOSED")
        with self._lock:
            if self._idle:
                return self._idle.pop(), True
        ep = self._core.endpoint
        if ep.socket_path:
            return UnixHTTPConnection(ep.socket_path, timeout=self._core.timeout), False
        if ep.tls:
            return http.client.HTTPSConnection(ep.host, ep.port, timeout=self._core.timeout,
                                               context=ssl.create_default_context()), False
        return http.client.HTTPConnection(ep.host, ep.port, timeout=self._core.timeout), False

    def _release(self, conn: http.client.HTTPConnection, keep: bool) -> None:
        if keep and not self._closed:
            with self._lock:
                if len(self._idle) < 8:
                    self._idle.append(conn)
                    return
        conn.close()

    def _once(self, method: str, path: str, body: bytes | None, headers: dict[str, str]
              ) -> tuple[int, bytes, dict[str, str]]:
        while True:
            conn, reused = self._connection()
            try:
                conn.request(method, path, body=body, headers=headers)
                response = conn.getresponse()
                data = response.read()
            except _STALE:
                conn.close()
                if reused:
                    continue  # the agent closed an idle keep-alive connection: not a failure
                raise
            except BaseException:
                conn.close()
                raise
            keep = not response.will_close
            self._release(conn, keep)
            return response.status, data, {k: v for k, v in response.getheaders()}

    def request(self, method: str, path: str, body: bytes | None = None,
                headers: Mapping[str, str] | None = None) -> tuple[int, bytes, dict[str, str]]:
        """One HTTP exchange with retries; returns (status, body, headers) of the last."""
        policy = self._core.retry
        all_headers = self._core.headers(body is not None, headers)
        full = self._core.path(path)
        for attempt in range(policy.attempts):
            last = attempt + 1 >= policy.attempts
            try:
                status, data, hdrs = self._once(method, full, body, all_headers)
            except (OSError, http.client.HTTPException) as exc:
                if last:
                    raise FluxConnectionError(
                        f"cannot reach the agent at {self.endpoint.display} after "
                        f"{policy.attempts} attempts: {exc or type(exc).__name__}",
                        code="CONNECTION_FAILED", retryable=True) from exc
                self._sleep(policy.delay(attempt, None))
                continue
            if not last and self._core.should_retry(status, data):
                self._sleep(policy.delay(attempt, _retry_after(hdrs)))
                continue
            return status, data, hdrs
        raise AssertionError("unreachable")  # pragma: no cover

    # ------------------------------------------------------------- API

    def post_events(self, events: Iterable[Mapping[str, Any]], *,
                    wait_committed: bool | None = None) -> PostResult:
        """Post events atomically (ids fixed before the first attempt)."""
        _, body, extra = self._core.events_request(events, wait_committed)
        status, data, headers = self.request("POST", "/v1/events", body, extra)
        return self._core.post_result(status, data, headers)

    def emit(self, kind: str, run_id: str, *, step: str | None = None,
             payload: Mapping[str, Any] | None = None, provider: str | None = None,
             model: str | None = None, occurred_at: str | datetime | None = None,
             event_id: str | None = None, wait_committed: bool | None = None) -> PostResult:
        event = make_event(kind, run_id, step=step, payload=payload, provider=provider,
                           model=model, occurred_at=occurred_at, event_id=event_id)
        _, body, extra = self._core.events_request([event], wait_committed, single=True)
        status, data, headers = self.request("POST", "/v1/events", body, extra)
        return self._core.post_result(status, data, headers)

    def batch(self, *, max_events: int = 500, max_bytes: int = 1024**2,
              wait_committed: bool | None = None) -> EventBatch:
        return EventBatch(self, max_events=max_events, max_bytes=max_bytes,
                          wait_committed=wait_committed)

    def run(self, run_id: str, *, content_type: str, use_case: str,
            payload: Mapping[str, Any] | None = None) -> Run:
        return Run(self, run_id, _started_payload(content_type, use_case, payload))

    def checkpoint(self, run_id: str, step: str, state: Any) -> dict[str, Any]:
        """Save the run's checkpoint; the agent's answer (``{"version": N, ...}``)."""
        body = self._core.checkpoint_body(step, state)
        status, data, headers = self.request("PUT", self._core.run_path(run_id), body)
        if status >= 400:
            raise error_from(status, data, headers)
        return _json(data)

    def resume(self, run_id: str) -> Checkpoint | None:
        """The run's last checkpoint, or None."""
        status, data, headers = self.request("GET", self._core.run_path(run_id))
        return self._core.checkpoint_result(run_id, status, data, headers)

    def drain(self) -> dict[str, Any]:
        """``POST /v1/drain``: flush, then the agent exits (legacy sidecars in Jobs)."""
        status, data, headers = self.request("POST", "/v1/drain", b"{}")
        if status >= 400:
            raise error_from(status, data, headers)
        return _json(data)

    def close(self) -> None:
        self._closed = True
        with self._lock:
            idle, self._idle = self._idle, []
        for conn in idle:
            conn.close()

    def __enter__(self) -> FluxClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class _Pending:
    """What the sync and async batches share: the queue, its limits, and when to flush."""

    def __init__(self, *, max_events: int, max_bytes: int,
                 wait_committed: bool | None) -> None:
        if max_events < 1 or max_bytes < 1:
            raise ValueError("max_events and max_bytes must be positive")
        self.max_events = max_events
        self.max_bytes = max_bytes
        self.wait_committed = wait_committed
        self.results: list[PostResult] = []
        self._pending: list[dict[str, Any]] = []
        self._bytes = 0
        self._closed = False

    def __len__(self) -> int:
        return len(self._pending)

    def _prepare(self, event: Mapping[str, Any]) -> tuple[dict[str, Any], int]:
        """The event with its id, and its size in the array body."""
        if self._closed:
            raise FluxClientError("the batch is closed", code="CLOSED")
        item = _complete([event])[0]
        return item, len(json.dumps(item, separators=(",", ":")).encode()) + 1

    def _full_before(self, size: int) -> bool:
        return bool(self._pending) and self._bytes + size > self.max_bytes

    def _push(self, item: dict[str, Any], size: int) -> bool:
        """Queue ``item``; True when the batch is now full."""
        self._pending.append(item)
        self._bytes += size
        return len(self._pending) >= self.max_events

    def _posted(self, result: PostResult) -> PostResult:
        # Cleared only once accepted: a failed flush keeps the events (same ids) for the next.
        self._pending = []
        self._bytes = 0
        self.results.append(result)
        return result


class EventBatch(_Pending):
    """Collects events and posts them as one JSON array per flush."""

    def __init__(self, client: FluxClient, *, max_events: int, max_bytes: int,
                 wait_committed: bool | None = None) -> None:
        super().__init__(max_events=max_events, max_bytes=max_bytes,
                         wait_committed=wait_committed)
        self.client = client
        self._lock = threading.Lock()

    def add(self, kind: str, run_id: str, **fields: Any) -> str:
        """Queue one event (``make_event`` arguments); returns its id. May flush."""
        return self.add_event(make_event(kind, run_id, **fields))

    def add_event(self, event: Mapping[str, Any]) -> str:
        item, size = self._prepare(event)
        with self._lock:
            if self._full_before(size):
                self._flush_locked()
            if self._push(item, size):
                self._flush_locked()
        return str(item["event_id"])

    def flush(self) -> PostResult | None:
        with self._lock:
            return self._flush_locked()

    def _flush_locked(self) -> PostResult | None:
        if not self._pending:
            return None
        return self._posted(self.client.post_events(self._pending,
                                                    wait_committed=self.wait_committed))

    def close(self) -> None:
        if not self._closed:
            self.flush()
            self._closed = True

    def __enter__(self) -> EventBatch:
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.close()


class Step:
    """``with run.step("extract") as step:``; ``step.payload`` goes into step.completed."""

    def __init__(self, run: Run, name: str, payload: Mapping[str, Any] | None) -> None:
        self.run = run
        self.name = name
        self.payload: dict[str, Any] = dict(payload or {})
        self._started = 0.0

    def __enter__(self) -> Step:
        self.run.emit("step.started", step=self.name)
        self._started = time.monotonic()
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        if exc is None:
            self.run.emit("step.completed", step=self.name,
                          payload={**self.payload, "duration_ms": _elapsed_ms(self._started)})
            return
        _report(lambda: self.run.emit("step.failed", step=self.name,
                                      payload={**self.payload,
                                               **_error_payload(exc, self._started)}), exc)


class Run:
    """``with client.run(...) as run:`` (see the module docstring)."""

    def __init__(self, client: FluxClient, run_id: str, started_payload: dict[str, Any]) -> None:
        if not RUN_ID.match(run_id):
            raise ValueError(f"run_id {run_id!r} does not match {RUN_ID.pattern}")
        self.client = client
        self.run_id = run_id
        self.payload: dict[str, Any] = {}
        self._started_payload = started_payload
        self._started = 0.0

    def emit(self, kind: str, *, step: str | None = None,
             payload: Mapping[str, Any] | None = None, **fields: Any) -> PostResult:
        return self.client.emit(kind, self.run_id, step=step, payload=payload, **fields)

    def step(self, name: str, payload: Mapping[str, Any] | None = None) -> Step:
        return Step(self, name, payload)

    def checkpoint(self, step: str, state: Any) -> dict[str, Any]:
        return self.client.checkpoint(self.run_id, step, state)

    def resume(self) -> Checkpoint | None:
        return self.client.resume(self.run_id)

    def __enter__(self) -> Run:
        self.emit("run.started", payload=self._started_payload)
        self._started = time.monotonic()
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        if exc is None:
            self.emit("run.completed",
                      payload={**self.payload, "duration_ms": _elapsed_ms(self._started)})
            return
        if isinstance(exc, Exception):
            _report(lambda: self.emit("run.failed", payload={
                **self.payload, **_error_payload(exc, self._started)}), exc)
        else:
            _report(lambda: self.emit("run.aborted", payload={
                **self.payload, "reason": type(exc).__name__,
                "duration_ms": _elapsed_ms(self._started)}), exc)


def _report(send: Callable[[], object], exc: BaseException) -> None:
    """Send a failure event without hiding the exception that caused it."""
    try:
        send()
    except FluxClientError as err:
        exc.add_note(f"flux-agent: the failure could not be reported: {err}")


# --------------------------------------------------------------------------- async client


class AsyncFluxClient:
    """The same API as :class:`FluxClient`, with ``await`` (aiohttp, imported on first use).
    Use it as ``async with AsyncFluxClient() as flux:`` or call ``await flux.close()``."""

    def __init__(self, url: str | None = None, *,
                 socket_path: str | os.PathLike[str] | None = None, token: str | None = None,
                 token_file: str | os.PathLike[str] | None = None, timeout: float = 30.0,
                 retry: RetryPolicy | None = None, wait_committed: bool = False,
                 environ: Mapping[str, str] | None = None,
                 user_agent: str | None = None) -> None:
        self._core = _Core(url, socket_path, token, token_file, timeout, retry,
                           wait_committed, environ, user_agent)
        self._session: aiohttp.ClientSession | None = None
        self._closed = False

    @property
    def endpoint(self) -> Endpoint:
        return self._core.endpoint

    def __repr__(self) -> str:
        return f"AsyncFluxClient({self.endpoint.display!r})"

    def _get_session(self) -> aiohttp.ClientSession:
        if self._closed:
            raise FluxClientError("the client is closed", code="CLOSED")
        if self._session is None:
            import aiohttp

            ep = self._core.endpoint
            connector: aiohttp.BaseConnector
            if ep.socket_path:
                connector = aiohttp.UnixConnector(path=ep.socket_path)
            else:
                connector = aiohttp.TCPConnector(limit=32)
            self._session = aiohttp.ClientSession(
                connector=connector, timeout=aiohttp.ClientTimeout(total=self._core.timeout))
        return self._session

    def _url(self, path: str) -> str:
        ep = self._core.endpoint
        if ep.socket_path:
            return "http://localhost" + self._core.path(path)
        host = f"[{ep.host}]" if ":" in ep.host else ep.host
        return f"{'https' if ep.tls else 'http'}://{host}:{ep.port}{self._core.path(path)}"

    async def request(self, method: str, path: str, body: bytes | None = None,
                      headers: Mapping[str, str] | None = None
                      ) -> tuple[int, bytes, dict[str, str]]:
        import aiohttp

        policy = self._core.retry
        session = self._get_session()
        all_headers = self._core.headers(body is not None, headers)
        url = self._url(path)
        for attempt in range(policy.attempts):
            last = attempt + 1 >= policy.attempts
            try:
                async with session.request(method, url, data=body, headers=all_headers) as resp:
                    data = await resp.read()
                    status, hdrs = resp.status, dict(resp.headers)
            except (aiohttp.ClientError, OSError, TimeoutError) as exc:
                if last:
                    raise FluxConnectionError(
                        f"cannot reach the agent at {self.endpoint.display} after "
                        f"{policy.attempts} attempts: {exc or type(exc).__name__}",
                        code="CONNECTION_FAILED", retryable=True) from exc
                await asyncio.sleep(policy.delay(attempt, None))
                continue
            if not last and self._core.should_retry(status, data):
                await asyncio.sleep(policy.delay(attempt, _retry_after(hdrs)))
                continue
            return status, data, hdrs
        raise AssertionError("unreachable")  # pragma: no cover

    async def post_events(self, events: Iterable[Mapping[str, Any]], *,
                          wait_committed: bool | None = None) -> PostResult:
        _, body, extra = self._core.events_request(events, wait_committed)
        status, data, headers = await self.request("POST", "/v1/events", body, extra)
        return self._core.post_result(status, data, headers)

    async def emit(self, kind: str, run_id: str, *, step: str | None = None,
                   payload: Mapping[str, Any] | None = None, provider: str | None = None,
                   model: str | None = None, occurred_at: str | datetime | None = None,
                   event_id: str | None = None, wait_committed: bool | None = None
                   ) -> PostResult:
        event = make_event(kind, run_id, step=step, payload=payload, provider=provider,
                           model=model, occurred_at=occurred_at, event_id=event_id)
        _, body, extra = self._core.events_request([event], wait_committed, single=True)
        status, data, headers = await self.request("POST", "/v1/events", body, extra)
        return self._core.post_result(status, data, headers)

    def batch(self, *, max_events: int = 500, max_bytes: int = 1024**2,
              wait_committed: bool | None = None) -> AsyncEventBatch:
        return AsyncEventBatch(self, max_events=max_events, max_bytes=max_bytes,
                               wait_committed=wait_committed)

    def run(self, run_id: str, *, content_type: str, use_case: str,
            payload: Mapping[str, Any] | None = None) -> AsyncRun:
        return AsyncRun(self, run_id, _started_payload(content_type, use_case, payload))

    async def checkpoint(self, run_id: str, step: str, state: Any) -> dict[str, Any]:
        body = self._core.checkpoint_body(step, state)
        status, data, headers = await self.request("PUT", self._core.run_path(run_id), body)
        if status >= 400:
            raise error_from(status, data, headers)
        return _json(data)

    async def resume(self, run_id: str) -> Checkpoint | None:
        status, data, headers = await self.request("GET", self._core.run_path(run_id))
        return self._core.checkpoint_result(run_id, status, data, headers)

    async def drain(self) -> dict[str, Any]:
        status, data, headers = await self.request("POST", "/v1/drain", b"{}")
        if status >= 400:
            raise error_from(status, data, headers)
        return _json(data)

    async def close(self) -> None:
        self._closed = True
        if self._session is not None:
            session, self._session = self._session, None
            await session.close()

    async def __aenter__(self) -> AsyncFluxClient:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()


class AsyncEventBatch(_Pending):
    """:class:`EventBatch` for the async client (``await batch.add(...)``)."""

    def __init__(self, client: AsyncFluxClient, *, max_events: int, max_bytes: int,
                 wait_committed: bool | None = None) -> None:
        super().__init__(max_events=max_events, max_bytes=max_bytes,
                         wait_committed=wait_committed)
        self.client = client
        self._lock = asyncio.Lock()

    async def add(self, kind: str, run_id: str, **fields: Any) -> str:
        return await self.add_event(make_event(kind, run_id, **fields))

    async def add_event(self, event: Mapping[str, Any]) -> str:
        item, size = self._prepare(event)
        async with self._lock:
            if self._full_before(size):
                await self._flush_locked()
            if self._push(item, size):
                await self._flush_locked()
        return str(item["event_id"])

    async def flush(self) -> PostResult | None:
        async with self._lock:
            return await self._flush_locked()

    async def _flush_locked(self) -> PostResult | None:
        if not self._pending:
            return None
        return self._posted(await self.client.post_events(self._pending,
                                                          wait_committed=self.wait_committed))

    async def close(self) -> None:
        if not self._closed:
            await self.flush()
            self._closed = True

    async def __aenter__(self) -> AsyncEventBatch:
        return self

    async def __aexit__(self, exc_type: type[BaseException] | None,
                        exc: BaseException | None, tb: TracebackType | None) -> None:
        await self.close()


class AsyncStep:
    def __init__(self, run: AsyncRun, name: str, payload: Mapping[str, Any] | None) -> None:
        self.run = run
        self.name = name
        self.payload: dict[str, Any] = dict(payload or {})
        self._started = 0.0

    async def __aenter__(self) -> AsyncStep:
        await self.run.emit("step.started", step=self.name)
        self._started = time.monotonic()
        return self

    async def __aexit__(self, exc_type: type[BaseException] | None,
                        exc: BaseException | None, tb: TracebackType | None) -> None:
        if exc is None:
            await self.run.emit("step.completed", step=self.name, payload={
                **self.payload, "duration_ms": _elapsed_ms(self._started)})
            return
        await _areport(self.run.emit("step.failed", step=self.name, payload={
            **self.payload, **_error_payload(exc, self._started)}), exc)


class AsyncRun:
    def __init__(self, client: AsyncFluxClient, run_id: str, started_payload: dict[str, Any]
                 ) -> None:
        if not RUN_ID.match(run_id):
            raise ValueError(f"run_id {run_id!r} does not match {RUN_ID.pattern}")
        self.client = client
        self.run_id = run_id
        self.payload: dict[str, Any] = {}
        self._started_payload = started_payload
        self._started = 0.0

    async def emit(self, kind: str, *, step: str | None = None,
                   payload: Mapping[str, Any] | None = None, **fields: Any) -> PostResult:
        return await self.client.emit(kind, self.run_id, step=step, payload=payload, **fields)

    def step(self, name: str, payload: Mapping[str, Any] | None = None) -> AsyncStep:
        return AsyncStep(self, name, payload)

    async def checkpoint(self, step: str, state: Any) -> dict[str, Any]:
        return await self.client.checkpoint(self.run_id, step, state)

    async def resume(self) -> Checkpoint | None:
        return await self.client.resume(self.run_id)

    async def __aenter__(self) -> AsyncRun:
        await self.emit("run.started", payload=self._started_payload)
        self._started = time.monotonic()
        return self

    async def __aexit__(self, exc_type: type[BaseException] | None,
                        exc: BaseException | None, tb: TracebackType | None) -> None:
        if exc is None:
            await self.emit("run.completed", payload={
                **self.payload, "duration_ms": _elapsed_ms(self._started)})
            return
        if isinstance(exc, Exception):
            await _areport(self.emit("run.failed", payload={
                **self.payload, **_error_payload(exc, self._started)}), exc)
        else:
            # Cancelled or interrupted: report it, but never block the cancellation for long.
            await _areport(asyncio.wait_for(self.emit("run.aborted", payload={
                **self.payload, "reason": type(exc).__name__,
                "duration_ms": _elapsed_ms(self._started)}), 5.0), exc)


async def _areport(send: Any, exc: BaseException) -> None:
    try:
        await send
    except (FluxClientError, TimeoutError) as err:
        exc.add_note(f"flux-agent: the failure could not be reported: {err}")
