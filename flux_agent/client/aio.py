"""The asynchronous client: the same API as the blocking one, with ``await`` (aiohttp,
imported on first use)."""

from __future__ import annotations

import asyncio
import os
import time
from collections.abc import Iterable, Mapping
from datetime import datetime
from types import TracebackType
from typing import TYPE_CHECKING, Any

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

if TYPE_CHECKING:  # pragma: no cover
    import aiohttp


class AsyncFluxClient:
    """The same API as :class:`FluxClient`, with ``await`` (aiohttp, imported on first use).
    Use it as ``async with AsyncFluxClient() as flux:`` or call ``await flux.close()``."""

    def __init__(self, url: str | None = None, *,
                 socket_path: str | os.PathLike[str] | None = None, token: str | None = None,
                 token_file: str | os.PathLike[str] | None = None, timeout: float = 30.0,
                 retry: RetryPolicy | None = None, wait_committed: bool = False,
                 environ: Mapping[str, str] | None = None,
                 user_agent: str | None = None, fail_open: bool | None = None) -> None:
        _aiohttp()  # now, not at the first request: say what a client-only install lacks
        self._core = _Core(url, socket_path, token, token_file, timeout, retry,
                           wait_committed, environ, user_agent)
        self._fail_open = FailOpen(enabled(fail_open, environ))
        self._session: aiohttp.ClientSession | None = None
        self._closed = False

    @property
    def endpoint(self) -> Endpoint:
        return self._core.endpoint

    @property
    def dropped(self) -> int:
        """Events dropped because the agent could not take them (``fail_open``)."""
        return self._fail_open.dropped

    def __repr__(self) -> str:
        return f"AsyncFluxClient({self.endpoint.display!r})"

    def _get_session(self) -> aiohttp.ClientSession:
        if self._closed:
            raise FluxClientError("the client is closed", code="CLOSED")
        if self._session is None:
            lib = _aiohttp()
            ep = self._core.endpoint
            connector: aiohttp.BaseConnector
            if ep.socket_path:
                connector = lib.UnixConnector(path=ep.socket_path)
            else:
                connector = lib.TCPConnector(limit=32)
            self._session = lib.ClientSession(
                connector=connector, timeout=lib.ClientTimeout(total=self._core.timeout))
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
        lib = _aiohttp()
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
            except (lib.ClientError, OSError, TimeoutError) as exc:
                if last:
                    raise self._core.unreachable(exc) from exc
                await asyncio.sleep(policy.delay(attempt, None))
                continue
            if not last and self._core.should_retry(status, data):
                await asyncio.sleep(policy.delay(attempt, _retry_after(hdrs)))
                continue
            return status, data, hdrs
        raise AssertionError("unreachable")  # pragma: no cover

    async def post_events(self, events: Iterable[Mapping[str, Any]], *,
                          wait_committed: bool | None = None) -> PostResult:
        return await self._post_events(*self._core.events_request(events, wait_committed))

    async def emit(self, kind: str, run_id: str, *, step: str | None = None,
                   payload: Mapping[str, Any] | None = None, provider: str | None = None,
                   model: str | None = None, occurred_at: str | datetime | None = None,
                   event_id: str | None = None, wait_committed: bool | None = None
                   ) -> PostResult:
        event = make_event(kind, run_id, step=step, payload=payload, provider=provider,
                           model=model, occurred_at=occurred_at, event_id=event_id)
        return await self._post_events(*self._core.events_request([event], wait_committed,
                                                                  single=True))

    async def _post_events(self, events: list[dict[str, Any]], body: bytes,
                           extra: dict[str, str]) -> PostResult:
        ids = [str(e["event_id"]) for e in events]
        fail_open = self._fail_open
        if fail_open.skip():
            return fail_open.drop(ids, None)
        try:
            status, data, headers = await self.request("POST", "/v1/events", body, extra)
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
              wait_committed: bool | None = None) -> AsyncEventBatch:
        return AsyncEventBatch(self, max_events=max_events, max_bytes=max_bytes,
                               wait_committed=wait_committed)

    def run(self, run_id: str, payload: Mapping[str, Any] | None = None,
            **fields: Any) -> AsyncRun:
        """``async with client.run(run_id, ...) as run:``; ``payload`` and keyword ``fields``
        make the run.started payload."""
        return AsyncRun(self, run_id, _started_payload(payload, fields))

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


def _aiohttp() -> Any:
    """aiohttp, or an ImportError that says what to install: a client-only install (``pip
    install --no-deps``, as the README's ETL image does) has the standard-library
    FluxClient but not aiohttp."""
    try:
        import aiohttp
    except ImportError as exc:
        raise ImportError(
            "AsyncFluxClient needs aiohttp, which a client-only install (pip install "
            "--no-deps) leaves out: add it to the image with pip install 'aiohttp>=3.14' (or "
            "install the package with its dependencies); FluxClient needs nothing beyond the "
            "standard library", name="aiohttp") from exc
    return aiohttp


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
