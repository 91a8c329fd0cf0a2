"""``POST /v1/records`` (an aggregator): sealed records from a sidecar, answered only once
they are durable on this aggregator's spool; ``GET /v1/records``: whether it takes them now.

The caller is a sidecar (its projected service-account token, or a development key), bound
to one or a few agencies: a record of any other agency refuses the whole request (403,
audited), so a compromised sidecar cannot write as another agency. Ids, hashes and trace
context are kept exactly as the sidecar sealed them; each payload and checkpoint state is
checked against its hash (a record damaged on the way is refused, 422); the request body
is spooled as it came, one record. PostgreSQL's keys absorb what is sent twice."""

from __future__ import annotations

import asyncio
import hashlib

from aiohttp import web

from ...checkpoints.ledger import Checkpoints
from ...core.errors import DataIsolationError, ValidationError, violation
from ...core.event import ForwardedRecord
from ...core.ids import UUID_TEXT
from ...forward import wire
from ...obs.metrics import Metrics
from ...spool import Spool
from ..auth import Claims, require
from ..body import BodyReader, prefers_committed
from ..responses import CLAIMS, json_response
from .common import Commits, Gate, RequestAudit

_MAX_LISTED = 20  # violations named in one answer


class RecordsRoutes:
    def __init__(self, *, spool: Spool, gate: Gate, bodies: BodyReader, commits: Commits,
                 checkpoints: Checkpoints, metrics: Metrics, audit: RequestAudit) -> None:
        self.spool = spool
        self.gate = gate
        self.bodies = bodies
        self.commits = commits
        self.checkpoints = checkpoints
        self.metrics = metrics
        self.audit = audit

    async def get_records(self, request: web.Request) -> web.Response:
        """A sidecar's check of the path and its credentials: 200 while records are taken."""
        require(request[CLAIMS], "write")
        with self.gate.enter():
            self.spool.check_room(wire.MAX_BYTES)
        return json_response({"accepting": True})

    async def post_records(self, request: web.Request) -> web.Response:
        claims: Claims = request[CLAIMS]
        require(claims, "write")
        media = request.headers.get("Content-Type", "").split(";", 1)[0].strip().lower()
        if media != wire.CONTENT_TYPE:
            raise ValidationError("UNSUPPORTED_MEDIA_TYPE", f"send {wire.CONTENT_TYPE}",
                                  status=415)
        wait = prefers_committed(request)
        with self.gate.enter():
            self.spool.check_room(request.content_length or 0)
            async with self.bodies.admit(request) as admitted:  # until durable
                body = bytes(admitted.body)  # spooled as it came
                admitted.drop_body()
                try:
                    record = wire.decode(body)
                except ValueError as exc:
                    raise ValidationError("INVALID_RECORDS", f"the body is not sealed records "
                                          f"({exc})", status=400) from None
                self._check(record, claims, request)
                self.spool.check_room(len(body))
                seq, durable = self.spool.append(body, record)
                del body
                await asyncio.shield(durable)
            for checkpoint in record.checkpoints():
                self.checkpoints.recovered(seq, checkpoint)  # reads see it before PostgreSQL
            answer: dict[str, object] = {"events": len(record.events()),
                                         "checkpoints": len(record.checkpoints()),
                                         "audits": len(record.audits())}
            if wait:
                new_ids = await self.commits.wait(seq)
                answer["committed"] = True
                answer["new_event_ids"] = sorted(new_ids) if new_ids is not None else None
        for agency in {row.agency_id for row in record.events()}:
            self.metrics.events_accepted.labels(agency).inc(
                sum(1 for row in record.events() if row.agency_id == agency))
        self.metrics.records_received.labels(claims.agency).inc()
        return json_response(answer, 200)

    def _check(self, record: ForwardedRecord, claims: Claims, request: web.Request) -> None:
        """Every item of the caller's agencies, every id a UUID, every hash true."""
        foreign: list[dict[str, str]] = []
        damaged: list[dict[str, str]] = []
        for i, row in enumerate(record.events()):
            where = f"/events/{i}"
            if not claims.may_act_for(row.agency_id):
                foreign.append(violation(f"{where}/agency_id", f"agency {row.agency_id!r} is "
                                         "not this caller's", "AGENCY_NOT_ALLOWED"))
            if not UUID_TEXT.fullmatch(row.event_id):
                damaged.append(violation(f"{where}/event_id", "not a UUID", "INVALID_EVENT_ID"))
            if hashlib.sha256(row.payload.encode()).hexdigest() != row.payload_sha256:
                damaged.append(violation(f"{where}/payload_sha256", "does not match the "
                                         "payload", "PAYLOAD_HASH_MISMATCH"))
        for i, cp in enumerate(record.checkpoints()):
            where = f"/checkpoints/{i}"
            if not claims.may_act_for(cp.agency_id):
                foreign.append(violation(f"{where}/agency_id", f"agency {cp.agency_id!r} is "
                                         "not this caller's", "AGENCY_NOT_ALLOWED"))
            if hashlib.sha256(cp.state.encode()).hexdigest() != cp.checkpoint_hash:
                damaged.append(violation(f"{where}/checkpoint_hash", "does not match the "
                                         "state", "CHECKPOINT_HASH_MISMATCH"))
        for i, audit in enumerate(record.audits()):
            if audit.agency_id != "-" and not claims.may_act_for(audit.agency_id):
                foreign.append(violation(f"/audits/{i}/agency_id", f"agency "
                                         f"{audit.agency_id!r} is not this caller's",
                                         "AGENCY_NOT_ALLOWED"))
        if foreign:
            self.audit(request, "isolation.violation", success=False, claims=claims,
                       detail={"code": "AGENCY_NOT_ALLOWED", "errors": foreign[:_MAX_LISTED]})
            raise DataIsolationError(
                "AGENCY_NOT_ALLOWED", f"{len(foreign)} item(s) of an agency this caller is not "
                "bound to; nothing from this request was accepted",
                errors=foreign[:_MAX_LISTED], context={"agencies": sorted(
                    {claims.agency, *claims.agencies})})
        if damaged:
            raise ValidationError("RECORD_INTEGRITY_FAILED", f"{len(damaged)} item(s) do not "
                                  "match their hash or id; nothing from this request was "
                                  "accepted", status=422, errors=damaged[:_MAX_LISTED])
