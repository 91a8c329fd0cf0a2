"""Reads through an aggregator (which reads PostgreSQL): runs, events and checkpoints of
one agency, for a sidecar that holds no database credentials. The aggregator answers for the
agencies the sidecar's identity is bound to; ``X-Flux-Agency`` says which one a read is for."""

from __future__ import annotations

from datetime import datetime
from typing import Any
from urllib.parse import quote, urlencode

import msgspec

from ..core.errors import BadParameter, UpstreamError
from ..core.event import CheckpointRow
from ..core.reads import (
    RUN_ITEM_BYTES,
    BadCursor,
    Page,
    encode_cursor,
    encode_runs_cursor,
)
from . import wire
from .upstream import Answer, Upstream


class _Checkpoint(msgspec.Struct):
    run_id: str
    version: int
    step: str
    checkpoint_hash: str
    saved_at: datetime
    expires_at: datetime
    state: msgspec.Raw  # the exact bytes, as hashed
    event_id: str = ""
    provider: str | None = None
    model: str | None = None
    status: str | None = None


class _Page(msgspec.Struct):
    """A page as an aggregator answers it; its items kept as the raw JSON they came as."""

    events: list[msgspec.Raw] | None = None
    runs: list[msgspec.Raw] | None = None
    next_cursor: str | None = None


_checkpoint = msgspec.json.Decoder(_Checkpoint)
_page_decoder = msgspec.json.Decoder(_Page)
_json = msgspec.json.Decoder()


class UpstreamReader:
    def __init__(self, upstream: Upstream) -> None:
        self.upstream = upstream

    async def _get(self, agency: str, path: str) -> Answer | None:
        answer = await self.upstream.request("GET", path, headers={wire.AGENCY_HEADER: agency})
        if answer.status == 404:
            return None
        if answer.status == 400:
            problem = _decode(answer)
            if isinstance(problem, dict) and problem.get("code") == "INVALID_CURSOR":
                raise BadCursor(str(problem.get("detail", "the cursor is not one this agent "
                                                          "issued")))
            raise BadParameter(f"{self.upstream.current}{path}: 400", code="400")
        if answer.status != 200:
            raise UpstreamError(f"{self.upstream.current}{path}: {answer.status}",
                                code=str(answer.status))
        return answer

    async def latest_checkpoint(self, agency: str, run_id: str) -> CheckpointRow | None:
        answer = await self._get(agency, f"/v1/runs/{quote(run_id)}/checkpoint")
        if answer is None:
            return None
        try:
            c = _checkpoint.decode(answer.body)
        except (msgspec.DecodeError, msgspec.ValidationError) as exc:
            raise UpstreamError(f"{self.upstream.current}: a checkpoint that does not "
                                f"decode ({exc})") from None
        return CheckpointRow(agency, c.run_id, c.version, c.step, bytes(c.state).decode(),
                             c.checkpoint_hash, c.provider, c.model, c.status, c.saved_at,
                             c.expires_at, c.event_id, None)

    async def checkpoint_history(self, agency: str, run_id: str, limit: int
                                 ) -> list[dict[str, Any]]:
        answer = await self._get(agency, f"/v1/runs/{quote(run_id)}/checkpoints?limit={limit}")
        if answer is None:
            return []
        versions = _decode(answer).get("versions", [])
        return [v for v in versions if not v.get("pending")]

    async def run_summary(self, agency: str, run_id: str) -> dict[str, Any] | None:
        answer = await self._get(agency, f"/v1/runs/{quote(run_id)}")
        return None if answer is None else dict(_decode(answer))

    async def runs(self, agency: str, *, cursor: str | None, limit: int, max_bytes: int
                   ) -> Page:
        query = {k: v for k, v in (("cursor", cursor), ("limit", str(limit))) if v is not None}
        answer = await self._get(agency, f"/v1/runs?{urlencode(query)}")
        if answer is None:
            return Page([], None, 0)
        page = _page(answer)
        items = page.runs or []
        kept = max(1, min(len(items), max_bytes // RUN_ITEM_BYTES)) if items else 0
        if kept < len(items):  # the aggregator's pages may be larger than this agent's
            last = msgspec.json.decode(items[kept - 1])
            following: str | None = encode_runs_cursor(
                datetime.fromisoformat(last["first_event_at"]), last["run_id"])
        else:
            following = page.next_cursor
        return Page(items[:kept], following, kept * RUN_ITEM_BYTES)

    async def run_events(self, agency: str, run_id: str, *, kind: str | None,
                         step: str | None, cursor: str | None, limit: int, max_bytes: int
                         ) -> Page:
        query = {k: v for k, v in (("kind", kind), ("step", step), ("cursor", cursor),
                                   ("limit", str(limit))) if v is not None}
        answer = await self._get(agency,
                                 f"/v1/runs/{quote(run_id)}/events?{urlencode(query)}")
        if answer is None:
            return Page([], None, 0)
        page = _page(answer)
        events = page.events or []  # each event's JSON as the aggregator sent it
        total, kept = 0, 0
        for raw in events:
            if kept and total + len(raw) > max_bytes:
                break
            total += len(raw)
            kept += 1
        following = page.next_cursor
        if kept < len(events):  # cut to this agent's page budget: continue after the last
            last = msgspec.json.decode(events[kept - 1])
            following = encode_cursor(datetime.fromisoformat(last["occurred_at"]),
                                      last["event_id"])
        return Page(events[:kept], following, total)

    async def event(self, agency: str, event_id: str) -> dict[str, Any] | None:
        answer = await self._get(agency, f"/v1/events/{quote(event_id)}")
        return None if answer is None else dict(_decode(answer))


def _page(answer: Answer) -> _Page:
    try:
        return _page_decoder.decode(answer.body)
    except (msgspec.DecodeError, msgspec.ValidationError):
        raise UpstreamError("an aggregator's page that is not one") from None


def _decode(answer: Answer) -> Any:
    try:
        return _json.decode(answer.body)
    except msgspec.DecodeError:
        raise UpstreamError("an aggregator's answer that is not JSON") from None
