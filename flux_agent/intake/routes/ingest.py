"""``POST /v1/events``: one event, a JSON array or NDJSON; atomic per request (all accepted
or none), acknowledged only once the spool record is durable. :meth:`Ingest.ingest` is the
intake path other readers of events share (OpenLineage)."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from aiohttp import web

from ...core.digest import MAX_DEPTH
from ...core.errors import FluxError, ValidationError
from ...core.event import EventsRecord, Row, record_encoder
from ...obs.metrics import Metrics
from ...obs.tracing import Tracing
from ...spool import Spool
from ..answers import write_answer
from ..auth import Claims, require
from ..body import BodyReader, media_type, prefers_committed
from ..responses import CLAIMS, json_bytes
from ..runs import RunTracker
from ..seen import Key, SeenIndex
from ..validate import EventChecker
from .common import Commits, Gate, Sealer

Reader = Callable[[web.Request, bytearray], tuple[list[Any], bool]]
ANSWER_BYTES_PER_EVENT = 160  # an event id in the answer: its str, its list slot, its JSON


@dataclass(slots=True)
class Accepted:
    accepted: int
    duplicates: int  # all of them (with wait=committed, also those PostgreSQL found)
    event_ids: list[str]
    committed: bool
    known_duplicates: int = 0  # those the duplicate index found (metrics: detected_by=intake)


class Ingest:
    """Events in: read, seal, accept (spool them as one record, report known ones as
    duplicates), answer once durable."""

    def __init__(self, *, checker: EventChecker, sealer: Sealer, spool: Spool,
                 seen: SeenIndex, commits: Commits, gate: Gate, bodies: BodyReader,
                 metrics: Metrics, runs: RunTracker, tracing: Tracing) -> None:
        self.checker = checker
        self.sealer = sealer
        self.spool = spool
        self.seen = seen
        self.commits = commits
        self.gate = gate
        self.bodies = bodies
        self.metrics = metrics
        self.runs = runs
        self.tracing = tracing

    def with_limit(self, checker: EventChecker, bodies: BodyReader) -> Ingest:
        """The same intake with other size limits (a route with its own)."""
        return Ingest(checker=checker, sealer=self.sealer, spool=self.spool, seen=self.seen,
                      commits=self.commits, gate=self.gate, bodies=bodies,
                      metrics=self.metrics, runs=self.runs, tracing=self.tracing)

    async def post_events(self, request: web.Request) -> web.StreamResponse:
        return await self.ingest(request, self._read_events)

    def _read_events(self, request: web.Request, body: bytearray) -> tuple[list[Any], bool]:
        return self.bodies.decode(body, media_type(request))

    async def ingest(self, request: web.Request, read: Reader, created: int = 202,
                     payload_depth: int = MAX_DEPTH) -> web.StreamResponse:
        """``payload_depth``: how deep a payload may nest (see EventChecker.rows)."""
        claims: Claims = request[CLAIMS]
        require(claims, "write")
        wait = prefers_committed(request)
        try:
            with self.gate.enter():
                # Refuse early when the spool is full, before reading a large body.
                self.spool.check_room(request.content_length or 0)
                # Everything the request holds (body, objects, rows, record, and then its
                # answer) is within the working memory admitted for it, until the client
                # has its answer.
                async with self.bodies.admit(request) as admitted:
                    events, batch = read(request, admitted.body)
                    admitted.drop_body()
                    rows = self.checker.rows(events, self.sealer.seal(request, claims),
                                             batch=batch, payload_depth=payload_depth)
                    del events
                    answer_bytes = ANSWER_BYTES_PER_EVENT * len(rows) + 1024
                    result = await self.accept(
                        rows, claims.agency, wait=wait,
                        on_durable=lambda: admitted.shrink_to(answer_bytes))
                    return await self._answer(request, claims, rows, result, wait, created)
        except FluxError as err:
            # Every refusal of an ingest request, whatever its cause (bad JSON, schema,
            # conflict, full spool, draining), counted by its code.
            self.metrics.events_rejected.labels(err.code).inc()
            raise

    async def _answer(self, request: web.Request, claims: Claims, rows: list[Row],
                      result: Accepted, wait: bool, created: int) -> web.StreamResponse:
        self.metrics.events_accepted.labels(claims.agency).inc(result.accepted)
        self.runs.observe(rows)
        if result.known_duplicates:
            # PostgreSQL's own finds are counted by the flusher (detected_by=database).
            self.metrics.events_duplicate.labels("intake").inc(result.known_duplicates)
        body_out = {"accepted": result.accepted, "duplicates": result.duplicates,
                    "event_ids": result.event_ids}
        status, headers = created, None
        if wait:
            body_out["committed"] = True
            status, headers = 200, {"Preference-Applied": "wait=committed"}
        data = json_bytes(body_out)
        del body_out, rows
        return await write_answer(request, [data], len(data), status, headers,
                                  self.bodies.timeout)

    async def accept(self, rows: list[Row], agency: str, *, wait: bool,
                     on_durable: Callable[[], None] | None = None) -> Accepted:
        """Spool new rows as one record; report known ones as duplicates.

        The answer comes only after the record (and any duplicate's original) is durable;
        ``on_durable`` is called then (before a wait for the commit): the request's memory is
        the flusher's to account for from there on.
        """
        seen = self.seen
        fresh: list[Row] = []
        fresh_keys: list[tuple[Key, int]] = []
        ids: list[str] = []
        waits: list[asyncio.Future[int]] = []
        dup_seqs: list[int] = []
        conflicts: list[dict[str, str]] = []
        in_request: dict[Key, int] = {}
        duplicates = 0
        for i, row in enumerate(rows):
            event_id = row.event_id
            ids.append(event_id)
            key = (agency, event_id)
            sha32 = int(row.payload_sha256[:8], 16)
            earlier = in_request.get(key)
            entry = None
            if earlier is None:
                entry = seen.get(key)
                if entry is None:
                    in_request[key] = sha32
                    fresh.append(row)
                    fresh_keys.append((key, sha32))
                    continue
                earlier = entry[0]
            if earlier != sha32:
                conflicts.append({"pointer": f"/{i}/event_id" if len(rows) > 1 else "/event_id",
                                  "message": f"event_id {event_id} was already used for a "
                                             "different payload", "code": "EVENT_ID_CONFLICT"})
                continue
            duplicates += 1
            if entry is not None:
                _, dup_seq, durable = entry
                dup_seqs.append(dup_seq)
                if durable is not None:
                    if not durable.done():
                        waits.append(durable)
                    elif durable.exception() is not None:
                        raise durable.exception()  # type: ignore[misc]
        if conflicts:
            raise ValidationError(
                "EVENT_ID_CONFLICT", "an event id is reused with a different payload; "
                "nothing from this request was accepted", status=409, errors=conflicts,
            )
        seq = 0
        if fresh:
            record = EventsRecord(fresh)
            payload = record_encoder.encode(record)
            self.spool.check_room(len(payload))
            seq, durable = self.spool.append(payload, record)
            del payload  # the spool framed a copy
            for key, sha32 in fresh_keys:
                seen.add(key, (sha32, seq, durable))
            waits.append(durable)
        try:
            if self.tracing.enabled:
                started = time.perf_counter()
                await _all_durable(waits)
                self.tracing.event("flux.spool.durable", {
                    "flux.events": len(fresh),
                    "flux.spool.wait_ms": round((time.perf_counter() - started) * 1000, 3)})
            else:
                await _all_durable(waits)
        except BaseException:
            for key, _ in fresh_keys:
                seen.discard(key)
            raise
        if on_durable is not None:
            on_durable()
        accepted = len(fresh)
        if wait:
            new_ids = await self.commits.wait(max([seq, *dup_seqs]), {
                "accepted": accepted, "duplicates": duplicates})
            if new_ids is not None:
                really_new = sum(1 for row in fresh if row.event_id in new_ids)
                return Accepted(really_new, duplicates + accepted - really_new, ids, wait,
                                duplicates)
        return Accepted(accepted, duplicates, ids, wait, duplicates)


async def _all_durable(waits: list[asyncio.Future[int]]) -> None:
    for fut in waits:
        # shield: the future is shared by every request of the commit group, and a client
        # that hangs up must not cancel it for the others.
        await asyncio.shield(fut)
