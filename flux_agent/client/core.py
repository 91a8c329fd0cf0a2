"""What the sync and async clients share: events and their ids, results, retries, where the
agent is and who calls it, request building and answer decoding, batching."""

from __future__ import annotations

import contextlib
import email.utils
import json
import os
import random
import re
import threading
import time
import uuid
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any
from urllib.parse import quote, urlsplit

from .errors import RETRY_STATUSES, FluxClientError, FluxConnectionError, _header, error_from

try:
    from .._version import __version__
except ImportError:  # loaded on its own, outside the flux_agent package
    __version__ = "0"

DEFAULT_URL = "http://127.0.0.1:8787"
NOT_COMMITTED = b"COMMIT_TIMEOUT"
USER_AGENT = f"flux-agent-client/{__version__}"

KINDS = frozenset({"run.started", "step.started", "step.completed", "step.failed",
                   "checkpoint.saved", "run.completed", "run.failed", "run.aborted"})
STEP_KINDS = frozenset({"step.started", "step.completed", "step.failed", "checkpoint.saved"})
RUN_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._:-]{0,63}\Z")  # \Z: "$" allows a final "\n"


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


def _started_payload(payload: Mapping[str, Any] | None, fields: Mapping[str, Any]
                     ) -> dict[str, Any]:
    """The run.started payload: ``payload`` and keyword fields, whatever the agent's payload
    schema asks for (it checks them; the client knows no schema)."""
    if payload is not None and not isinstance(payload, Mapping):
        raise ValueError("payload must be a mapping")
    return {**(payload or {}), **fields}


def _error_payload(exc: BaseException, started: float) -> dict[str, Any]:
    return {"error": {"type": type(exc).__name__, "message": str(exc)[:4000]},
            "duration_ms": _elapsed_ms(started)}


def _elapsed_ms(started: float) -> float:
    return round((time.monotonic() - started) * 1000, 3)


# --------------------------------------------------------------------------- results, retries


@dataclass(frozen=True, slots=True)
class PostResult:
    accepted: int
    duplicates: int
    event_ids: list[str]
    committed: bool = False
    request_id: str = ""
    dropped: bool = False  # fail_open: the agent could not take them, and they were dropped


@dataclass(frozen=True, slots=True)
class Checkpoint:
    run_id: str
    step: str
    state: Any
    version: int
    checkpoint_hash: str
    raw: dict[str, Any] = field(default_factory=dict)


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

    def unreachable(self, exc: BaseException) -> FluxConnectionError:
        """The error when no attempt reached the agent: where it was looked for, and the
        settings that say where it is."""
        why = exc.strerror if isinstance(exc, OSError) and exc.strerror else str(exc)
        return FluxConnectionError(
            f"cannot reach the agent at {self.endpoint.display} after {self.retry.attempts} "
            f"attempts: {why or type(exc).__name__} (where it listens: FLUX_AGENT_SOCKET or "
            "FLUX_AGENT_URL, or the client's socket_path / url)",
            code="CONNECTION_FAILED", retryable=True)

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
        if status == 503 and NOT_COMMITTED in body:
            # Durable on the spool, not yet in PostgreSQL: asking again waits again. The
            # caller decides (FluxNotCommittedError).
            with contextlib.suppress(ValueError, AttributeError):
                if json.loads(body).get("code") == "COMMIT_TIMEOUT":
                    return False
        if status in RETRY_STATUSES:
            return True
        if status >= 400 and body[:1] == b"{":
            try:
                return bool(json.loads(body).get("retryable") is True)
            except (ValueError, AttributeError):
                return False
        return False

    @staticmethod
    def post_result(status: int, body: bytes, headers: Mapping[str, str],
                    event_ids: Sequence[str] = ()) -> PostResult:
        if status >= 400:
            raise error_from(status, body, headers, event_ids)
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


# --------------------------------------------------------------------------- batching


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
