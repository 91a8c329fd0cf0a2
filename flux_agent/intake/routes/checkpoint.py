"""``PUT`` and ``GET /v1/runs/{run_id}/checkpoint``, ``GET .../checkpoints`` (the history)."""

from __future__ import annotations

import asyncio
from typing import Any

import msgspec
from aiohttp import web

from ...checkpoints.ledger import Checkpoints, parse_if_match
from ...core.errors import CheckpointError, FluxError, UpstreamError
from ...core.event import CheckpointRow
from ...core.reads import Reader
from ...core.timefmt import rfc3339
from ...obs.metrics import Metrics
from ...spool import Spool
from ..answers import Answers
from ..auth import Claims, require
from ..body import BodyReader, media_type, prefers_committed
from ..responses import CLAIMS, json_response
from .common import (
    Commits,
    Gate,
    RequestAudit,
    Sealer,
    known_run_id,
    limit_param,
    not_found,
    read_error,
)


class CheckpointRoutes:
    """Save, load and list a run's checkpoints."""

    def __init__(self, *, checkpoints: Checkpoints, reader: Reader, sealer: Sealer,
                 spool: Spool, commits: Commits, gate: Gate, bodies: BodyReader,
                 metrics: Metrics, audit: RequestAudit, answers: Answers) -> None:
        self.checkpoints = checkpoints
        self.reader = reader
        self.sealer = sealer
        self.spool = spool
        self.commits = commits
        self.gate = gate
        self.bodies = bodies
        self.metrics = metrics
        self.audit = audit
        self.answers = answers

    async def put_checkpoint(self, request: web.Request) -> web.Response:
        claims: Claims = request[CLAIMS]
        require(claims, "write")
        run_id = request.match_info["run_id"]
        wait = prefers_committed(request)
        with self.gate.enter():  # from before the body is read: a drain waits for it
            if_match = parse_if_match(request.headers.get("If-Match"))
            media_type(request)
            self.spool.check_room(request.content_length or 0)
            async with self.bodies.admit(request) as admitted:  # until the save is durable
                body = self.bodies.decode_one(admitted.body, "")
                admitted.drop_body()
                try:
                    known, previous, durable, seq = await self.checkpoints.save(
                        claims.agency, run_id, body, self.sealer.seal(request, claims),
                        if_match)
                except FluxError:
                    self.metrics.checkpoints_saved.labels("false").inc()
                    raise
                del body
                try:
                    await asyncio.shield(durable)
                except BaseException:
                    self.checkpoints.forget(claims.agency, run_id, previous)
                    self.metrics.checkpoints_saved.labels("false").inc()
                    raise
            if wait:
                await self.commits.wait(seq)
        row = known.row
        self.metrics.checkpoints_saved.labels("true").inc()
        self.metrics.checkpoint_size.observe(len(row.state))
        self.audit(request, "checkpoint.saved", success=True, claims=claims,
                   target=f"run {run_id}",
                   before={"version": previous.version,
                           "checkpoint_hash": previous.row.checkpoint_hash}
                   if previous else None,
                   after={"version": row.version, "checkpoint_hash": row.checkpoint_hash,
                          "step": row.step})
        headers = {"ETag": f'"{row.version}"', "Location": f"/v1/runs/{run_id}/checkpoint"}
        if wait:
            headers["Preference-Applied"] = "wait=committed"
        return json_response(checkpoint_json(row, with_state=False), 201, headers)

    async def get_checkpoint(self, request: web.Request) -> web.StreamResponse:
        claims: Claims = request[CLAIMS]
        require(claims, "read")
        run_id = known_run_id(request, "CHECKPOINT_NOT_FOUND")
        try:
            row = await self.checkpoints.load(claims.agency, run_id)
        except CheckpointError as err:
            if err.code == "CHECKPOINT_INTEGRITY_FAILED":
                self.metrics.checkpoint_integrity_failures.inc()
                self.audit(request, "checkpoint.integrity_failed", success=False,
                           claims=claims, target=f"run {run_id}", detail=err.context)
            raise
        except UpstreamError as exc:
            raise read_error(exc) from None
        if row is None:
            raise not_found("CHECKPOINT_NOT_FOUND", f"run {run_id} has no checkpoint")
        return await self.answers.send(request, self.answers.for_page(),
                                       checkpoint_json(row, with_state=True),
                                       headers={"ETag": f'"{row.version}"'})

    async def get_checkpoint_history(self, request: web.Request) -> web.StreamResponse:
        claims: Claims = request[CLAIMS]
        require(claims, "read")
        run_id = known_run_id(request, "CHECKPOINT_NOT_FOUND")
        limit = limit_param(request, default=100)
        await self.commits.own_writes()
        try:
            versions = await self.reader.checkpoint_history(claims.agency, run_id, limit)
        except UpstreamError as exc:
            raise read_error(exc) from None
        pending = self.checkpoints.known.get((claims.agency, run_id))
        if pending is not None and (not versions or versions[0]["version"] < pending.version):
            row = pending.row
            versions.insert(0, {"version": row.version, "checkpoint_hash": row.checkpoint_hash,
                                "step": row.step, "status": row.status,
                                "saved_at": rfc3339(row.saved_at), "event_id": row.event_id,
                                "pending": True})
        if not versions:
            raise not_found("CHECKPOINT_NOT_FOUND", f"run {run_id} has no checkpoint")
        return await self.answers.send(request, self.answers.for_page(),
                                       {"run_id": run_id, "versions": versions[:limit]})


def checkpoint_json(row: CheckpointRow, *, with_state: bool) -> dict[str, Any]:
    out: dict[str, Any] = {
        "run_id": row.run_id, "version": row.version, "step": row.step,
        "checkpoint_hash": row.checkpoint_hash, "saved_at": rfc3339(row.saved_at),
        "provider": row.provider, "model": row.model, "status": row.status,
        "expires_at": rfc3339(row.expires_at), "event_id": row.event_id,
    }
    if with_state:
        out["state"] = msgspec.Raw(row.state.encode())
    return out
