"""What several route families use, each piece built once by the agent and handed to the
families that need it: the in-flight gate, the sealer, the wait for commits, the audit of a
request, and the mapping of upstream failures to answers."""

from __future__ import annotations

import asyncio
import contextlib
import re
from collections.abc import Callable, Iterator
from datetime import timedelta
from typing import Any

from aiohttp import web

from ...checkpoints.ledger import RUN_ID
from ...core.errors import (
    BadParameter,
    FluxError,
    PermissionDenied,
    StoreUnavailable,
    TransientError,
    UnsafeRole,
    UpstreamError,
    ValidationError,
)
from ...core.event import Seal
from ...flush.flusher import CommitPending, Flusher
from ...spool import Spool
from ..audit import Auditor
from ..auth import Claims
from ..middleware import source_of
from ..responses import REQUEST_ID, TRACE
from ..validate import utcnow

READ_YOUR_WRITES_WAIT = 2.0  # seconds a read waits for the agent's own pending writes
_SMALL_INT = re.compile(r"[0-9]{1,9}")  # ASCII digits only: "²".isdigit() is True


class Gate:
    """Every request that may write passes here: refused while the agent drains, counted
    while under way, so that a drain waits for those already in."""

    def __init__(self) -> None:
        self.draining = False
        self.inflight = 0
        self._idle = asyncio.Event()
        self._idle.set()

    @contextlib.contextmanager
    def enter(self) -> Iterator[None]:
        if self.draining:
            raise TransientError("DRAINING", "the agent is shutting down; retry against its "
                                 "successor", retry_after=1)
        self.inflight += 1
        self._idle.clear()
        try:
            yield
        finally:
            self.inflight -= 1
            if self.inflight == 0:
                self._idle.set()

    def close(self) -> None:
        """From now on, new requests are refused (503 DRAINING)."""
        self.draining = True

    async def wait_idle(self, timeout: float) -> bool:
        try:
            await asyncio.wait_for(self._idle.wait(), timeout)
        except TimeoutError:
            return False
        return True


class Sealer:
    """What the agent adds to every event of a request: agency, times, ids, trace."""

    def __init__(self, retention: Callable[[str], timedelta], agent_id: str) -> None:
        self.retention = retention  # agency -> how long its rows are kept (the manifest's)
        self.agent_id = agent_id

    def seal(self, request: web.Request, claims: Claims) -> Seal:
        received = utcnow()
        trace_id, span_id = request[TRACE]
        return Seal(agency=claims.agency, received_at=received,
                    correlation_id=request[REQUEST_ID], agent_id=self.agent_id,
                    trace_id=trace_id, span_id=span_id,
                    expires_at=received + self.retention(claims.agency))


class Commits:
    """Intake's view of the flusher: wait until spooled records are upstream."""

    def __init__(self, spool: Spool, flusher: Flusher, *, timeout: float) -> None:
        self.spool = spool
        self.flusher = flusher
        self.timeout = timeout

    async def wait(self, seq: int, context: dict[str, Any] | None = None) -> set[str] | None:
        """``Prefer: wait=committed``: flush now and wait for ``seq``; 503 COMMIT_TIMEOUT
        when it takes longer than the timeout (it is durably spooled all the same). Returns
        the ids new in the window, when the flusher knew them."""
        try:
            return await asyncio.wait_for(
                self.flusher.wait_committed(seq, in_database=True), self.timeout)
        except (TimeoutError, CommitPending):
            raise TransientError(
                "COMMIT_TIMEOUT", "durably spooled but not yet in PostgreSQL; a retry with the "
                "same event ids is safe", retry_after=max(1, int(self.timeout)),
                context=context) from None

    async def own_writes(self) -> None:
        """Reads see this agent's own writes: what it acknowledged before the read is flushed
        first (now, not at the window's age), waiting at most READ_YOUR_WRITES_WAIT; when
        the upstream cannot take it that fast, the read answers with what it has."""
        target = self.spool.written_seq
        if target > self.flusher.committed_seq:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self.flusher.wait_committed(target),
                                       min(READ_YOUR_WRITES_WAIT, self.timeout))


class RequestAudit:
    """Audit entries about a request: its caller, its target, its correlation id."""

    def __init__(self, auditor: Auditor) -> None:
        self.auditor = auditor

    def __call__(self, request: web.Request, action: str, *, success: bool,
                 claims: Claims | None, detail: dict[str, Any] | None = None,
                 before: Any = None, after: Any = None, target: str | None = None) -> None:
        self.auditor.record(
            action,
            agency=claims.agency if claims else "-",
            actor=claims.sub if claims else "-",
            target=target or f"{request.method} {request.path}",
            success=success,
            correlation_id=request.get(REQUEST_ID),
            source=source_of(request),
            before=before, after=after, detail=detail,
        )


def read_error(exc: UpstreamError) -> FluxError | UpstreamError:
    """What a caller is told when a read fails upstream, decided here once. The database
    being away, or refusing this login or a privilege, is "not now" (503, retryable; the
    operator is told by the logs and the probes). A value PostgreSQL refused is the
    request's fault: 400. Anything else is a bug: re-raised, so that the problem middleware
    logs it with its traceback and answers 500 with the error id."""
    reason = {"reason": type(exc.__cause__ or exc).__name__}
    if isinstance(exc, UnsafeRole):
        return TransientError("DATABASE_UNAVAILABLE", "reads are refused: the database login "
                              "role bypasses row-level security", retry_after=30,
                              context={"reason": "UnsafeRole"})
    if isinstance(exc, PermissionDenied):
        return TransientError("DATABASE_PERMISSION_DENIED", "PostgreSQL refuses this agent's "
                              "login or a privilege it needs; an operator must grant it "
                              "(events are still accepted)", retry_after=30,
                              context={**reason, "sqlstate": exc.code})
    if isinstance(exc, StoreUnavailable):
        return TransientError("DATABASE_UNAVAILABLE", "PostgreSQL is unreachable; reads need "
                              "it (events are still accepted)", retry_after=2, context=reason)
    if isinstance(exc, BadParameter):
        # Input checks should have caught it first; retrying the same request cannot help.
        return ValidationError("INVALID_PARAMETER", "PostgreSQL refused a value of this "
                               "request", status=400, context=reason)
    return exc


def not_found(code: str, detail: str) -> ValidationError:
    return ValidationError(code, detail, status=404)


def known_run_id(request: web.Request, code: str) -> str:
    """The path's run id; one that breaks the run id rule was never stored: 404."""
    run_id = request.match_info["run_id"]
    if not RUN_ID.match(run_id):
        raise not_found(code, "no such run (not a valid run id)")
    return run_id


def limit_param(request: web.Request, default: int) -> int:
    raw = request.query.get("limit")
    if raw is None:
        return default
    if not _SMALL_INT.fullmatch(raw) or not 1 <= int(raw) <= 1000:
        raise ValidationError("INVALID_LIMIT", "limit must be an integer from 1 to 1000",
                              status=400)
    return int(raw)
