"""A bounded index of recently accepted event ids, for reporting duplicates at intake.

Exactly-once in PostgreSQL never depends on this index (the database's primary key does
that); the index only lets a re-post be answered as a duplicate without spooling it again.
Keys are exact ``(agency, event_id)`` pairs, so a hit is never a false positive. Two
generations bound memory: when the young one fills, it becomes the old one and the old one
is dropped, so the index holds between ``capacity / 2`` and ``capacity`` ids.

Each entry is ``(sha32, seq, durable)``: the first 32 bits of the payload hash (to tell a true
re-post from a conflicting reuse of an id), the spool sequence number (0 when known to be
committed), and until the original is durable, the future that says so: a duplicate must not
be acknowledged before its original is durable.
"""

from __future__ import annotations

import asyncio

import msgspec

Key = tuple[str, str]  # (agency, lower-case event id)
Entry = tuple[int, int, "asyncio.Future[int] | None"]


class _Snapshot(msgspec.Struct, array_like=True):
    version: int
    entries: list[tuple[str, str, int]]  # agency, event id, sha32


class SeenIndex:
    def __init__(self, capacity: int) -> None:
        self.capacity = max(2, capacity)
        self._young: dict[Key, Entry] = {}
        self._old: dict[Key, Entry] = {}

    def __len__(self) -> int:
        return len(self._young) + len(self._old)

    def get(self, key: Key) -> Entry | None:
        entry = self._young.get(key)
        if entry is None:
            entry = self._old.get(key)
        return entry

    def add(self, key: Key, entry: Entry) -> None:
        self._young[key] = entry
        if len(self._young) >= self.capacity // 2:
            self._old = self._young
            self._young = {}

    def discard(self, key: Key) -> None:
        self._young.pop(key, None)
        self._old.pop(key, None)

    def clear(self) -> None:
        self._young.clear()
        self._old.clear()

    # ---------------------------------------------------------------- persistence

    def dump(self) -> bytes:
        """Entries whose originals are durable (the others will be replayed from the spool).
        Call it on the event loop, which is where the index changes."""
        entries = []
        for gen in (self._old, self._young):
            for (agency, event_id), (sha32, _, fut) in gen.items():
                if fut is not None and not (fut.done() and not fut.cancelled()
                                            and fut.exception() is None):
                    continue
                entries.append((agency, event_id, sha32))
        return msgspec.msgpack.encode(_Snapshot(1, entries))

    def load(self, data: bytes) -> int:
        """Entries of a snapshot; a damaged one only costs duplicate reporting, never data."""
        try:
            snap = msgspec.msgpack.decode(data, type=_Snapshot)
        except (msgspec.DecodeError, msgspec.ValidationError):
            return 0
        if snap.version != 1:
            return 0
        for agency, event_id, sha32 in snap.entries[-self.capacity :]:
            self.add((agency, event_id), (sha32, 0, None))
        return len(snap.entries)
