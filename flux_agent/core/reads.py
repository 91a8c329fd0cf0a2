"""The read side of an upstream, as the checkpoint stage and the read routes use it: own
agency only, implemented by PostgreSQL's store and by an aggregator's read API; the pages
they answer, bounded by rows and by bytes, and the cursors that continue them (pure)."""

from __future__ import annotations

import base64
import re
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any, Protocol

import msgspec

from .event import CheckpointRow
from .ids import UUID_TEXT

# What an item of a page costs beyond its payload, counted against the page's byte budget
# (the envelope of a stored event is a few hundred bytes of JSON).
EVENT_ENVELOPE_BYTES = 512
RUN_ITEM_BYTES = 256
_RUN_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._:-]{0,63}\Z")  # \Z: "$" allows a final "\n"
_RUNS = "runs"  # the first element of a runs cursor


class BadCursor(ValueError):
    """A page cursor the upstream did not issue."""


@dataclass(slots=True)
class Page:
    """One page: ``items`` in order, the cursor of the next page (None: this is the last),
    and about how many bytes of JSON the items make (what the read's memory holds)."""

    items: list[Any]
    next_cursor: str | None
    nbytes: int


class Reader(Protocol):
    async def latest_checkpoint(self, agency: str, run_id: str) -> CheckpointRow | None: ...

    async def checkpoint_history(self, agency: str, run_id: str, limit: int
                                 ) -> list[dict[str, Any]]: ...

    async def run_summary(self, agency: str, run_id: str) -> dict[str, Any] | None: ...

    async def runs(self, agency: str, *, cursor: str | None, limit: int, max_bytes: int
                   ) -> Page:
        """The agency's runs, newest first (by their first event, then run id): at most
        ``limit`` and, beyond the first, about ``max_bytes``; :class:`BadCursor` for a
        foreign cursor."""
        ...

    async def run_events(self, agency: str, run_id: str, *, kind: str | None,
                         step: str | None, cursor: str | None, limit: int, max_bytes: int
                         ) -> Page:
        """One page of a run's events in (occurred_at, event_id) order: at most ``limit``
        events and, beyond the first, ``max_bytes`` of JSON; :class:`BadCursor` for a
        foreign cursor."""
        ...

    async def event(self, agency: str, event_id: str) -> dict[str, Any] | None: ...


# --------------------------------------------------------------------------- cursors


def _b64(raw: bytes) -> str:
    return base64.urlsafe_b64encode(raw).decode().rstrip("=")


def _unb64(cursor: str) -> bytes:
    return base64.urlsafe_b64decode(cursor + "=" * (-len(cursor) % 4))


def _instant(text: str) -> datetime:
    at = datetime.fromisoformat(text)
    # What this agent issued, and nothing PostgreSQL would refuse as a parameter.
    if at.tzinfo is None:
        raise ValueError(text)
    at.astimezone(UTC)  # OverflowError near year 1 or 9999
    return at


_BAD = (ValueError, OverflowError, msgspec.DecodeError, msgspec.ValidationError)


def encode_cursor(occurred_at: datetime, event_id: str) -> str:
    """Where a page of a run's events stopped: after this event."""
    return _b64(msgspec.json.encode([occurred_at.isoformat(), event_id]))


def decode_cursor(cursor: str) -> tuple[datetime, str]:
    try:
        when, event_id = msgspec.json.decode(_unb64(cursor), type=tuple[str, str])
        if not UUID_TEXT.fullmatch(event_id):
            raise ValueError(cursor)
        return _instant(when), event_id
    except _BAD:
        raise BadCursor("the cursor is not one this agent issued") from None


def encode_runs_cursor(first_at: datetime, run_id: str) -> str:
    """Where a page of runs stopped: after this run (newest first)."""
    return _b64(msgspec.json.encode([_RUNS, first_at.isoformat(), run_id]))


def decode_runs_cursor(cursor: str) -> tuple[datetime, str]:
    try:
        tag, when, run_id = msgspec.json.decode(_unb64(cursor), type=tuple[str, str, str])
        if tag != _RUNS or not _RUN_ID.fullmatch(run_id):
            raise ValueError(cursor)
        return _instant(when), run_id
    except _BAD:
        raise BadCursor("the cursor is not one this agent issued") from None
