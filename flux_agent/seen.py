"""A bounded index of recently accepted event ids, for reporting duplicates at intake.

Exactly-once in PostgreSQL never depends on this index (the database's primary key does
that); the index only lets a re-post be answered as a duplicate without spooling it again.
Keys are exact (the UUID's 128 bits plus the agency), so a hit is never a false positive.
Two generations bound memory: when the young one fills, it becomes the old one and the old
one is dropped, so the index holds between ``capacity / 2`` and ``capacity`` ids.

Each entry remembers the first 32 bits of the payload hash (to tell a true re-post from a
conflicting reuse of an id), the spool sequence number, and until it is durable, the future
that says so: a duplicate must not be acknowledged before its original is durable.
"""

from __future__ import annotations

import asyncio
import os
from pathlib import Path
from typing import NamedTuple

import msgspec


class Entry(NamedTuple):
    sha32: int
    seq: int  # 0 when known to be committed (loaded from the snapshot)
    durable: asyncio.Future[int] | None


class _Snapshot(msgspec.Struct, array_like=True):
    version: int
    agencies: list[str]
    entries: list[tuple[bytes, int, int]]  # uuid bytes, agency index, sha32


def event_key(agency_index: int, event_id: str) -> int:
    return (int(event_id.replace("-", ""), 16) << 20) | agency_index


class SeenIndex:
    def __init__(self, capacity: int) -> None:
        self.capacity = max(2, capacity)
        self._young: dict[int, Entry] = {}
        self._old: dict[int, Entry] = {}
        self._agencies: dict[str, int] = {}
        self._names: list[str] = []

    def __len__(self) -> int:
        return len(self._young) + len(self._old)

    def key(self, agency: str, event_id: str) -> int:
        index = self._agencies.get(agency)
        if index is None:
            index = self._agencies[agency] = len(self._names)
            self._names.append(agency)
        return event_key(index, event_id)

    def get(self, key: int) -> Entry | None:
        entry = self._young.get(key)
        if entry is None:
            entry = self._old.get(key)
        return entry

    def add(self, key: int, entry: Entry) -> None:
        self._young[key] = entry
        if len(self._young) >= self.capacity // 2:
            self._old = self._young
            self._young = {}

    def discard(self, key: int) -> None:
        self._young.pop(key, None)
        self._old.pop(key, None)

    # ---------------------------------------------------------------- persistence

    def dump(self) -> bytes:
        """Entries whose originals are durable (others would be replayed from the spool)."""
        entries = []
        for gen in (self._old, self._young):
            for key, entry in gen.items():
                fut = entry.durable
                if fut is not None and not (fut.done() and not fut.cancelled()
                                            and fut.exception() is None):
                    continue
                uuid_int, index = key >> 20, key & 0xFFFFF
                entries.append((uuid_int.to_bytes(16, "big"), index, entry.sha32))
        return msgspec.msgpack.encode(_Snapshot(1, list(self._names), entries))

    def load(self, data: bytes) -> int:
        snap = msgspec.msgpack.decode(data, type=_Snapshot)
        if snap.version != 1:
            return 0
        for uuid_bytes, index, sha32 in snap.entries[-self.capacity :]:
            name = snap.agencies[index]
            key = self.key(name, uuid_bytes.hex())
            self.add(key, Entry(sha32, 0, None))
        return len(snap.entries)

    def save(self, path: Path) -> None:
        tmp = path.with_suffix(".tmp")
        with tmp.open("wb") as fh:
            fh.write(self.dump())
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)

    def restore(self, path: Path) -> int:
        try:
            data = path.read_bytes()
        except FileNotFoundError:
            return 0
        try:
            return self.load(data)
        except (msgspec.DecodeError, msgspec.ValidationError, IndexError, ValueError):
            return 0  # a damaged snapshot only costs duplicate reporting, never data
