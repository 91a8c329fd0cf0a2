"""``PUT`` and ``GET /v1/runs/{run_id}/checkpoint``, ``GET .../checkpoints`` (the history)."""

from __future__ import annotations

import asyncio
from typing import Any

import msgspec
from aiohttp import web

from ...checkpoints.ledger import Known, parse_if_match
from ...core.errors import CheckpointError, FluxError, TransientError
from ..auth import Claims, require
from ..server import CLAIMS, json_response
from .common import Routes, _iso, _known_run_id, _limit, _not_found, _prefers_committed


class CheckpointRoutes(Routes):
    """Save, load and list a run's checkpoints."""

    async def put_checkpoint(self, request: web.Request) -> web.Response:
        claims: Claims = request[CLAIMS]
        require(claims, "write")
        if self.draining:
            raise TransientError("DRAINING", "the agent is shutting down", retry_after=1)
        run_id = request.match_info["run_id"]
        if_match = parse_if_match(request.headers.get("If-Match"))
        self._media_type(request)
        self.spool.check_room(request.content_length or 0)
        self.inflight += 1  # from before the body is read: a drain waits for it
        self._idle.clear()
        try:
            async with self._body(request) as raw:
                body = self._decode_one(raw, "")
            try:
                known, previous, durable, seq = await self.checkpoints.save(
                    claims.agency, run_id, body, self._sealer(request, claims), if_match)
            except FluxError:
                self.metrics.checkpoints_saved.labels("false").inc()
                raise
            try:
                await asyncio.shield(durable)
            except BaseException:
                self.checkpoints.forget(claims.agency, run_id, previous)
                self.metrics.checkpoints_saved.labels("false").inc()
                raise
            if _prefers_committed(request.headers.get("Prefer", "")):
                await self._wait_committed(seq)
        finally:
            self.inflight -= 1
            if self.inflight == 0:
                self._idle.set()
        self.metrics.checkpoints_saved.labels("true").inc()
        assert known.state is not None
        self.metrics.checkpoint_size.observe(len(known.state))
        self.audit(request, "checkpoint.saved", success=True, claims=claims,
                   target=f"run {run_id}",
                   before={"version": previous.version,
                           "checkpoint_hash": previous.checkpoint_hash} if previous else None,
                   after={"version": known.version, "checkpoint_hash": known.checkpoint_hash,
                          "step": known.step})
        headers = {"ETag": f'"{known.version}"',
                   "Location": f"/v1/runs/{run_id}/checkpoint"}
        return json_response(_checkpoint_json(run_id, known, with_state=False), 201, headers)

    async def get_checkpoint(self, request: web.Request) -> web.Response:
        claims: Claims = request[CLAIMS]
        require(claims, "read")
        run_id = _known_run_id(request, "CHECKPOINT_NOT_FOUND")
        try:
            known = await self.checkpoints.load(claims.agency, run_id)
        except CheckpointError as err:
            if err.code == "CHECKPOINT_INTEGRITY_FAILED":
                self.metrics.checkpoint_integrity_failures.inc()
                self.audit(request, "checkpoint.integrity_failed", success=False,
                           claims=claims, target=f"run {run_id}", detail=err.context)
            raise
        if known is None:
            raise _not_found("CHECKPOINT_NOT_FOUND", f"run {run_id} has no checkpoint")
        return json_response(_checkpoint_json(run_id, known, with_state=True), 200,
                             {"ETag": f'"{known.version}"'})

    async def get_checkpoint_history(self, request: web.Request) -> web.Response:
        claims: Claims = request[CLAIMS]
        require(claims, "read")
        run_id = _known_run_id(request, "CHECKPOINT_NOT_FOUND")
        limit = _limit(request, default=100)
        versions = await self._read(self.store.checkpoint_history(claims.agency, run_id,
                                                                  limit))
        pending = self.checkpoints.known.get((claims.agency, run_id))
        if pending is not None and (not versions or versions[0]["version"] < pending.version):
            versions.insert(0, {"version": pending.version,
                                "checkpoint_hash": pending.checkpoint_hash,
                                "step": pending.step, "status": pending.status,
                                "saved_at": _iso(pending.saved_at),
                                "event_id": pending.event_id, "pending": True})
        if not versions:
            raise _not_found("CHECKPOINT_NOT_FOUND", f"run {run_id} has no checkpoint")
        return json_response({"run_id": run_id, "versions": versions[:limit]})

    async def _wait_committed(self, seq: int) -> None:
        try:
            await asyncio.wait_for(self.flusher.wait_committed(seq),
                                   self.config.commit_wait_timeout)
        except TimeoutError:
            raise TransientError(
                "COMMIT_TIMEOUT", "durably spooled but not yet in PostgreSQL; a retry is safe",
                retry_after=max(1, int(self.config.commit_wait_timeout))) from None


def _checkpoint_json(run_id: str, known: Known, *, with_state: bool) -> dict[str, Any]:
    out: dict[str, Any] = {
        "run_id": run_id, "version": known.version, "step": known.step,
        "checkpoint_hash": known.checkpoint_hash, "saved_at": _iso(known.saved_at),
        "provider": known.provider, "model": known.model, "status": known.status,
        "expires_at": _iso(known.expires_at), "event_id": known.event_id,
    }
    if with_state:
        assert known.state is not None
        out["state"] = msgspec.Raw(known.state.encode())
    return out
