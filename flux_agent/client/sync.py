"""The blocking client (standard library only: ``http.client`` over the Unix socket or TCP)."""

from __future__ import annotations

import http.client
import os
import socket
import ssl
import threading
import time
from collections.abc import Callable, Iterable, Mapping
from datetime import datetime
from types import TracebackType
from typing import Any

from .core import (
    RUN_ID,
    Checkpoint,
    Endpoint,
    PostResult,
    RetryPolicy,
    _Core,
    _elapsed_ms,
    _error_payload,
    _json,
    _Pending,
    _retry_after,
    _started_payload,
    make_event,
)
from .errors import FluxClientError, FluxNotCommittedError, error_from
from .failopen import FailOpen, enabled, unavailable


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
                 sleep: Callable[[float], None] = time.sleep,
                 fail_open: bool | None = None) -> None:
        self._core = _Core(url, socket_path, token, token_file, timeout, retry,
                           wait_committed, environ, user_agent)
        # Events only: see flux_agent.client.failopen (FLUX_AGENT_CLIENT_FAIL_OPEN).
        self._fail_open = FailOpen(enabled(fail_open, environ))
        self._idle: list[http.client.HTTPConnection] = []
        self._lock = threading.Lock()
        self._sleep = sleep
        self._closed = False

    @property
    def endpoint(self) -> Endpoint:
        return self._core.endpoint

    @property
    def dropped(self) -> int:
        """Events dropped because the agent could not take them (``fail_open``)."""
        return self._fail_open.dropped

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
                    raise self._core.unreachable(exc) from exc
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
        return self._post_events(*self._core.events_request(events, wait_committed))

    def emit(self, kind: str, run_id: str, *, step: str | None = None,
             payload: Mapping[str, Any] | None = None, provider: str | None = None,
             model: str | None = None, occurred_at: str | datetime | None = None,
             event_id: str | None = None, wait_committed: bool | None = None) -> PostResult:
        event = make_event(kind, run_id, step=step, payload=payload, provider=provider,
                           model=model, occurred_at=occurred_at, event_id=event_id)
        return self._post_events(*self._core.events_request([event], wait_committed,
                                                            single=True))

    def _post_events(self, events: list[dict[str, Any]], body: bytes, extra: dict[str, str]
                     ) -> PostResult:
        ids = [str(e["event_id"]) for e in events]
        fail_open = self._fail_open
        if fail_open.skip():
            return fail_open.drop(ids, None)
        try:
            status, data, headers = self.request("POST", "/v1/events", body, extra)
            result = self._core.post_result(status, data, headers, ids)
        except FluxNotCommittedError as exc:
            if not fail_open.on:
                raise
            fail_open.delivered()  # accepted, durable on the spool: not dropped
            return PostResult(exc.accepted, exc.duplicates, ids, request_id=exc.request_id)
        except FluxClientError as exc:
            if not (fail_open.on and unavailable(exc)):
                raise
            return fail_open.drop(ids, exc)
        fail_open.delivered()
        return result

    def batch(self, *, max_events: int = 500, max_bytes: int = 1024**2,
              wait_committed: bool | None = None) -> EventBatch:
        return EventBatch(self, max_events=max_events, max_bytes=max_bytes,
                          wait_committed=wait_committed)

    def run(self, run_id: str, payload: Mapping[str, Any] | None = None,
            **fields: Any) -> Run:
        """``with client.run(run_id, ...) as run:``; ``payload`` and keyword ``fields`` make
        the run.started payload (what the agent's payload schema asks for, if anything)."""
        return Run(self, run_id, _started_payload(payload, fields))

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
    """``with client.run(...) as run:`` (see the :mod:`flux_agent.client` docstring)."""

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
