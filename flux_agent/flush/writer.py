"""Where the flusher delivers windows: the Writer protocol, implemented by PostgreSQL's sink
and by the forwarder to an aggregator, and what one write reports."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Protocol

from .batch import Work


@dataclass(slots=True)
class Written:
    """What one lane's write reports: how many events were new, which (when asked for),
    and whether the upstream that committed them is a different primary than before (a
    failover: the recently committed window is replayed to it)."""

    inserted: int
    new_ids: set[str] = field(default_factory=set)
    new_primary: bool = False
    # An aggregator holds the items durably but has not committed them to PostgreSQL
    # within the wait a ``Prefer: wait=committed`` caller asked for.
    pending: bool = False


class Writer(Protocol):
    """Where windows go: PostgreSQL (:class:`flux_agent.postgres.sink.Sink`) or an
    aggregator (:class:`flux_agent.forward.writer.Forwarder`). Failures are
    :class:`~flux_agent.core.errors.UpstreamError`: their fault says what to do."""

    async def prepare(self) -> None:
        """Whatever must hold before the first write (the schema); a no-op once done."""

    async def write(self, work: Work, *, returning: bool) -> Written: ...

    async def write_dead_letter(self, work: Work, reason: str, code: str | None) -> None: ...
