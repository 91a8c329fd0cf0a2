"""The read side of an upstream, as the checkpoint stage and the read routes use it: own
agency only, implemented by PostgreSQL's store and by an aggregator's read API."""

from __future__ import annotations

from typing import Any, Protocol

from .event import CheckpointRow


class BadCursor(ValueError):
    """A page cursor the upstream did not issue."""


class Reader(Protocol):
    async def latest_checkpoint(self, agency: str, run_id: str) -> CheckpointRow | None: ...

    async def checkpoint_history(self, agency: str, run_id: str, limit: int
                                 ) -> list[dict[str, Any]]: ...

    async def run_summary(self, agency: str, run_id: str) -> dict[str, Any] | None: ...

    async def run_events(self, agency: str, run_id: str, *, kind: str | None,
                         step: str | None, cursor: str | None, limit: int
                         ) -> tuple[list[dict[str, Any]], str | None]:
        """One page and the cursor of the next; :class:`BadCursor` for a foreign cursor."""
        ...

    async def event(self, agency: str, event_id: str) -> dict[str, Any] | None: ...
