"""The flusher's Writer when the upstream is an aggregator: each window goes as sealed
records (one request, or several for a large window), and counts as delivered once the
aggregator answers that it holds them durably."""

from __future__ import annotations

import msgspec

from ..core.errors import UpstreamError
from ..flush.batch import Work
from ..flush.writer import Written
from . import wire
from .upstream import Upstream


class _Accepted(msgspec.Struct):
    events: int = 0
    new_event_ids: list[str] | None = None


_accepted = msgspec.json.Decoder(_Accepted)
_DURABLE_UNCOMMITTED = frozenset({"COMMIT_TIMEOUT"})


class Forwarder:
    def __init__(self, upstream: Upstream, *, max_bytes: int = wire.MAX_BYTES,
                 commit_wait: float = 10.0) -> None:
        self.upstream = upstream
        self.max_bytes = max_bytes
        self.commit_wait = commit_wait  # how long an aggregator may wait for PostgreSQL

    async def prepare(self) -> None:
        """Nothing to prepare: the aggregator owns the schema."""

    async def write(self, work: Work, *, returning: bool) -> Written:
        """``returning`` (a caller waits with ``Prefer: wait=committed``): the aggregator
        answers once the records are in PostgreSQL too, with the ids that were new; when
        it cannot commit them in time it still holds them (503 COMMIT_TIMEOUT): delivered,
        and ``pending`` for that caller."""
        headers = {"Content-Type": wire.CONTENT_TYPE}
        timeout = None
        if returning:
            headers["Prefer"] = "wait=committed"
            timeout = self.upstream.timeout + self.commit_wait
        inserted, new_ids, pending = 0, set(), False
        for body in wire.bodies(work, self.max_bytes):
            answer = await self.upstream.request(
                "POST", wire.RECORDS_PATH, body=body, headers=headers, timeout=timeout,
                answer_codes=_DURABLE_UNCOMMITTED if returning else frozenset())
            if answer.status == 503:  # COMMIT_TIMEOUT: durable there, not in PostgreSQL yet
                pending = True
                inserted += len(wire.decode(body).events())
                continue
            if answer.status != 200:
                raise UpstreamError(f"{self.upstream.current}{wire.RECORDS_PATH}: "
                                    f"{answer.status}, records refused",
                                    code=str(answer.status))
            try:
                got = _accepted.decode(answer.body)
            except msgspec.DecodeError:
                raise UpstreamError(f"{self.upstream.current}: an answer that is not the "
                                    "records' receipt") from None
            inserted += got.events
            if got.new_event_ids is not None:
                new_ids.update(got.new_event_ids)
        return Written(inserted, new_ids, pending=pending)

    async def write_dead_letter(self, work: Work, reason: str, code: str | None) -> None:
        # An aggregator refuses no single item as poison (it isolates them itself, in
        # PostgreSQL): the flusher never asks this.
        raise UpstreamError("dead letters are kept by the aggregator")
