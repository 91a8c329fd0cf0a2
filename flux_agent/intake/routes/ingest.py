"""``POST /v1/events``: one event, a JSON array or NDJSON; atomic per request (all accepted
or none), acknowledged only once the spool record is durable."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from aiohttp import web

from ...core.errors import FluxError, TransientError, ValidationError
from ...core.event import EventsRecord, Row, record_encoder
from ..auth import Claims, require
from ..seen import Key
from ..server import CLAIMS, json_response
from .common import Routes, _prefers_committed


@dataclass(slots=True)
class Accepted:
    accepted: int
    duplicates: int  # all of them (with wait=committed, also those PostgreSQL found)
    event_ids: list[str]
    committed: bool
    known_duplicates: int = 0  # those the duplicate index found (metrics: detected_by=intake)


class EventRoutes(Routes):
    """``POST /v1/events``, and the intake path other routes share (:meth:`_ingest`)."""

    async def post_events(self, request: web.Request) -> web.Response:
        return await self._ingest(request, self._read_events)

    def _read_events(self, request: web.Request, body: bytes) -> tuple[list[Any], bool]:
        ndjson = self._media_type(request)
        return self._decode(body, ndjson)

    async def _ingest(
        self,
        request: web.Request,
        read: Callable[[web.Request, bytes], tuple[list[Any], bool]],
        created: int = 202,
    ) -> web.Response:
        claims: Claims = request[CLAIMS]
        require(claims, "write")
        self.inflight += 1
        self._idle.clear()
        try:
            if self.draining:
                raise TransientError("DRAINING", "the agent is shutting down; retry against "
                                     "its successor", retry_after=1)
            # Refuse early when the spool is full, before reading a large body.
            self.spool.check_room(request.content_length or 0)
            reserved = await self._reserve(request)
            try:
                body = await self._read_within_deadline(request)
                events, batch = read(request, body)
                del body
                rows = self._seal(request, claims, events, batch)
                del events
                wait = _prefers_committed(request.headers.get("Prefer", ""))
                result = await self.accept(rows, claims.agency, wait=wait)
            finally:
                self.bodies.release(reserved)
        except FluxError as err:
            # Every refusal of an ingest request, whatever its cause (bad JSON, schema,
            # conflict, full spool, draining), counted by its code.
            self.metrics.events_rejected.labels(err.code).inc()
            raise
        finally:
            self.inflight -= 1
            if self.inflight == 0:
                self._idle.set()
        self.metrics.events_accepted.labels(claims.agency).inc(result.accepted)
        self.runs.observe(rows)
        if result.known_duplicates:
            # PostgreSQL's own finds are counted by the flusher (detected_by=database).
            self.metrics.events_duplicate.labels("intake").inc(result.known_duplicates)
        body_out = {"accepted": result.accepted, "duplicates": result.duplicates,
                    "event_ids": result.event_ids}
        if wait:
            body_out["committed"] = True
            return json_response(body_out, 200, {"Preference-Applied": "wait=committed"})
        return json_response(body_out, created)

    def _seal(self, request: web.Request, claims: Claims, events: list[Any], batch: bool
              ) -> list[Row]:
        return self.checker.rows(events, self._sealer(request, claims), batch=batch)

    # ---------------------------------------------------------------- acceptance

    async def accept(self, rows: list[Row], agency: str, *, wait: bool) -> Accepted:
        """Spool new rows as one record; report known ones as duplicates.

        The answer comes only after the record (and any duplicate's original) is durable.
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
        accepted = len(fresh)
        if wait:
            target = max([seq, *dup_seqs])
            try:
                new_ids = await asyncio.wait_for(self.flusher.wait_committed(target),
                                                 self.config.commit_wait_timeout)
            except TimeoutError:
                raise TransientError(
                    "COMMIT_TIMEOUT",
                    "the events are durably spooled but not yet in PostgreSQL; a retry with "
                    "the same event ids is safe",
                    retry_after=max(1, int(self.config.commit_wait_timeout)),
                    context={"accepted": accepted, "duplicates": duplicates},
                ) from None
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
