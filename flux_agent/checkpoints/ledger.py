"""Run checkpoints: versioned saves with integrity, and read-your-writes during outages.

A save is spooled like an event (one record: the checkpoint and its ``checkpoint.saved``
event), so it is durable before the answer and reaches PostgreSQL exactly once. The agent
assigns versions: it remembers the latest version of recently used runs (and persists that
memory across restarts); for a run it does not know it asks PostgreSQL. A save PostgreSQL
has not received yet is served from memory or read back from the spool, so a load returns
the latest save even while PostgreSQL is down, also after a restart.

``checkpoint_hash`` is the SHA-256 of the state's canonical JSON (the same canonical form as
event payloads). It is verified on every load; a mismatch is never returned as valid.
"""

from __future__ import annotations

import asyncio
import hashlib
import re
import uuid
from collections import OrderedDict
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from datetime import datetime
from typing import Any

import msgspec

from ..core.digest import MAX_DEPTH, NUL_ESCAPE, TooDeep, canonical_json, sha256_hex
from ..core.errors import (
    CheckpointError,
    PermissionDenied,
    StoreUnavailable,
    TransientError,
    ValidationError,
    too_deep,
    violation,
)
from ..core.event import CheckpointRecord, CheckpointRow, Row, Seal, decode_record, record_encoder
from ..core.ids import uuid7_at
from ..core.reads import Reader
from ..spool import Spool

# \Z, not $: "$" also matches before a final newline, and "run\n" is not a run id.
RUN_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._:-]{0,63}\Z")
_VERSION = re.compile(r"[0-9]{1,18}")  # ASCII digits that fit a bigint
# checkpoint.saved event ids derive from the checkpoint, so a replay is the same event: a
# UUIDv7 of the save's time (its partition of flux.events) and a digest of what was saved.
# (Before sql/006 they were uuid5(_EVENT_NAMESPACE, ...), without a time; those still on a
# spool replay under their old ids.)
_EVENT_NAMESPACE = uuid.UUID("6a4f6c1e-4a51-4c6e-9b0a-2f1d5f9f7c10")


@dataclass(slots=True)
class Known:
    """What the agent knows of a run's latest checkpoint: the checkpoint (its state ``""``
    when not held in memory: it is then read back from the spool or the upstream) and the
    spool record of its save (0 when it came from the upstream or the snapshot)."""

    row: CheckpointRow
    seq: int

    @property
    def version(self) -> int:
        return self.row.version

    @property
    def held(self) -> bool:
        return bool(self.row.state)

    def drop_state(self) -> None:
        self.row = self.row._replace(state="")


class _Snapshot(msgspec.Struct, array_like=True):
    version: int
    runs: list[tuple[str, str, int, str, str, str]]  # agency, run, version, hash, step, at


def parse_if_match(value: str | None) -> int | None:
    """``If-Match: "3"`` (or ``W/"3"``, or ``3``) -> 3; ``*`` -> -1; absent -> None."""
    if value is None:
        return None
    text = value.strip()
    if text == "*":
        return -1
    text = text.removeprefix("W/").strip('"')
    if not _VERSION.fullmatch(text):
        raise ValidationError("INVALID_IF_MATCH", 'If-Match must be a version, e.g. "3"',
                              status=400)
    return int(text)


class Checkpoints:
    """The checkpoint stage: between intake's routes and the spool and store."""

    def __init__(
        self,
        spool: Spool,
        store: Reader,
        explain: Callable[[Any], list[dict[str, str]]],
        *,
        max_bytes: int,
        committed: Callable[[], int],
        capacity: int = 10_000,
        state_memory_bytes: int = 16 * 1024 * 1024,
    ) -> None:
        self.spool = spool
        self.store = store
        self.explain = explain  # the checkpoint schema's violations of a save request
        self.max_bytes = max_bytes
        self.committed = committed  # the flusher's committed sequence number
        self.capacity = capacity
        self.state_memory_bytes = state_memory_bytes
        self.known: OrderedDict[tuple[str, str], Known] = OrderedDict()
        self._state_bytes = 0
        self.integrity_failures = 0

    # ---------------------------------------------------------------- memory

    def remember(self, key: tuple[str, str], known: Known) -> None:
        old = self.known.pop(key, None)
        if old is not None:
            self._state_bytes -= len(old.row.state)
        self.known[key] = known
        self._state_bytes += len(known.row.state)
        while len(self.known) > self.capacity:
            _, evicted = self.known.popitem(last=False)
            self._state_bytes -= len(evicted.row.state)
        # States beyond the memory budget are dropped oldest first; they are still on the
        # spool (or upstream) and are read back from there when asked for.
        if self._state_bytes > self.state_memory_bytes:
            for entry in self.known.values():
                if entry.held and entry is not known:
                    self._state_bytes -= len(entry.row.state)
                    entry.drop_state()
                    if self._state_bytes <= self.state_memory_bytes:
                        break

    def pending(self) -> int:
        """Saves not yet in PostgreSQL (the checkpoint queue depth)."""
        committed = self.committed()
        return sum(1 for k in self.known.values() if k.seq > committed)

    def recovered(self, seq: int, cp: CheckpointRow) -> None:
        """A save found on the spool at start (or forwarded to an aggregator)."""
        key = (cp.agency_id, cp.run_id)
        current = self.known.get(key)
        if current is None or current.version <= cp.version:
            self.remember(key, Known(cp, seq))

    def dump(self) -> bytes:
        runs = [(a, r, k.version, k.row.checkpoint_hash, k.row.step, k.row.saved_at.isoformat())
                for (a, r), k in self.known.items()]
        return msgspec.msgpack.encode(_Snapshot(1, runs))

    def load_snapshot(self, data: bytes) -> int:
        """Versions known before a restart (saves still on the spool are recovered too).
        A damaged snapshot costs nothing but a question to PostgreSQL later."""
        try:
            snap = msgspec.msgpack.decode(data, type=_Snapshot)
        except (msgspec.DecodeError, msgspec.ValidationError):
            return 0
        for agency, run, version, digest, step, at in snap.runs[-self.capacity:]:
            saved = datetime.fromisoformat(at)
            self.known[(agency, run)] = Known(CheckpointRow(
                agency, run, version, step, "", digest, None, None, None, saved, saved, "",
                None), 0)
        return len(snap.runs)

    # ---------------------------------------------------------------- save

    def check_request(self, run_id: str, body: Any) -> tuple[str, dict[str, Any]]:
        """Validate a save request; returns the state's canonical JSON and the body."""
        if not RUN_ID.match(run_id):
            raise ValidationError("INVALID_RUN_ID", f"{run_id!r} is not a valid run id",
                                  errors=[violation("/run_id", "must match "
                                                    "^[A-Za-z0-9][A-Za-z0-9._:-]{0,63}$",
                                                    "INVALID_RUN_ID")])
        problems = self.explain(body)
        if problems:
            codes = {p["code"] for p in problems}
            raise ValidationError(codes.pop() if len(codes) == 1 else "SCHEMA_VIOLATION",
                                  f"{len(problems)} violation(s); the checkpoint was not saved",
                                  errors=problems)
        try:
            state = canonical_json(body["state"])
        except TooDeep as exc:
            raise too_deep("/state" + exc.pointer, MAX_DEPTH) from None
        if len(state) > self.max_bytes:
            raise ValidationError(
                "CHECKPOINT_TOO_LARGE",
                f"state is {len(state)} bytes; the limit is {self.max_bytes}", status=413,
                context={"limit_bytes": self.max_bytes},
                errors=[violation("/state", "too large", "CHECKPOINT_TOO_LARGE")])
        if NUL_ESCAPE in state or any("\x00" in str(body.get(k) or "")
                                       for k in ("step", "provider", "model", "status")):
            raise ValidationError("NUL_CHARACTER", "NUL characters (\\u0000) cannot be stored",
                                  errors=[violation("", "NUL character", "NUL_CHARACTER")])
        return state.decode("ascii"), body

    async def current(self, agency: str, run_id: str) -> Known | None:
        """The latest checkpoint the agent knows of, asking PostgreSQL if it must."""
        key = (agency, run_id)
        known = self.known.get(key)
        if known is not None:
            self.known.move_to_end(key)
            return known
        try:
            stored = await self.store.latest_checkpoint(agency, run_id)
        except (StoreUnavailable, PermissionDenied) as exc:
            refused = isinstance(exc, PermissionDenied)
            raise TransientError(
                "CHECKPOINT_VERSION_UNKNOWN",
                ("PostgreSQL refuses this agent's login or a privilege it needs (an operator "
                 "must grant it)" if refused else "PostgreSQL is unreachable") + ", and this "
                "agent has not seen this run's checkpoints; retry shortly",
                retry_after=30 if refused else 2,
                context={"reason": type(exc.__cause__ or exc).__name__},
            ) from None
        known = self.known.get(key)  # another request may have saved meanwhile
        if known is not None:
            return known
        if stored is None:
            return None
        known = Known(stored, 0)
        self.remember(key, known)
        return known

    def build(
        self, agency: str, run_id: str, version: int, state: str, body: Mapping[str, Any],
        seal: Seal,
    ) -> CheckpointRecord:
        digest = sha256_hex(state.encode("ascii"))
        name = f"{agency}/{run_id}/{version}/{digest}"
        content = hashlib.sha256(_EVENT_NAMESPACE.bytes + name.encode()).digest()
        event_id = uuid7_at(seal.received_at, content) or str(uuid.uuid5(_EVENT_NAMESPACE, name))
        payload = canonical_json({"version": version, "checkpoint_hash": digest,
                                  "agency": agency}).decode("ascii")
        event = Row(
            agency, event_id, run_id, "checkpoint.saved", body["step"], seal.received_at,
            seal.received_at, body.get("provider"), body.get("model"), payload,
            sha256_hex(payload.encode("ascii")), seal.correlation_id, seal.agent_id,
            seal.trace_id, seal.span_id, seal.expires_at,
        )
        row = CheckpointRow(
            agency, run_id, version, body["step"], state, digest, body.get("provider"),
            body.get("model"), body.get("status"), seal.received_at, seal.expires_at,
            event_id, seal.correlation_id,
        )
        return CheckpointRecord([event], row)

    async def save(
        self, agency: str, run_id: str, body: Any, seal: Seal, if_match: int | None
    ) -> tuple[Known, Known | None, asyncio.Future[int], int]:
        """Spool a save. Returns (new, previous, durability future, spool seq)."""
        state, body = self.check_request(run_id, body)
        previous = await self.current(agency, run_id)
        current = previous.version if previous else 0
        if if_match is not None and (
            (if_match == -1 and previous is None) or (if_match >= 0 and if_match != current)
        ):
            expected = "any version" if if_match == -1 else f"version {if_match}"
            raise CheckpointError(
                "CHECKPOINT_VERSION_MISMATCH",
                f"the latest checkpoint of {run_id} is version {current}, not {expected}",
                status=412, context={"current_version": current})
        record = self.build(agency, run_id, current + 1, state, body, seal)
        payload = record_encoder.encode(record)
        self.spool.check_room(len(payload))
        seq, durable = self.spool.append(payload, record)
        known = Known(record.checkpoint, seq)
        self.remember((agency, run_id), known)
        return known, previous, durable, seq

    def forget(self, agency: str, run_id: str, previous: Known | None) -> None:
        """Undo ``remember`` after a save that did not become durable."""
        if previous is None:
            self.known.pop((agency, run_id), None)
        else:
            self.remember((agency, run_id), previous)

    # ---------------------------------------------------------------- load

    async def load(self, agency: str, run_id: str) -> CheckpointRow | None:
        """The latest checkpoint, hash verified; None when the run has none."""
        if not RUN_ID.match(run_id):
            return None
        key = (agency, run_id)
        known = self.known.get(key)
        stored: CheckpointRow | None = None
        if known is None or known.seq <= self.committed():
            try:
                stored = await self.store.latest_checkpoint(agency, run_id)
            except (StoreUnavailable, PermissionDenied) as exc:
                if known is None or (not known.held and known.seq <= self.spool.cursor):
                    if isinstance(exc, PermissionDenied):
                        raise  # the reads' own answer: 503 DATABASE_PERMISSION_DENIED
                    raise TransientError(
                        "CHECKPOINT_UNAVAILABLE",
                        "PostgreSQL is unreachable; this checkpoint is not held locally",
                        retry_after=2, context={"reason": type(exc.__cause__ or exc).__name__}
                    ) from None
        if stored is not None and (known is None or stored.version >= known.version):
            known = Known(stored, 0)
        if known is None:
            return None
        row = known.row
        if not known.held and known.seq > self.spool.cursor:
            row = await self._from_spool(known.seq) or row
        if not row.state:
            return None
        self.verify(run_id, row)
        return row

    async def _from_spool(self, seq: int) -> CheckpointRow | None:
        for got, payload in await self.spool.read(seq, 1):
            if got == seq:
                record = decode_record(payload)
                if isinstance(record, CheckpointRecord):
                    return record.checkpoint
        return None

    def verify(self, run_id: str, row: CheckpointRow) -> None:
        actual = sha256_hex(row.state.encode())
        if actual != row.checkpoint_hash:
            self.integrity_failures += 1
            raise CheckpointError(
                "CHECKPOINT_INTEGRITY_FAILED",
                f"checkpoint version {row.version} of run {run_id} does not match its hash; "
                "it is not returned",
                context={"version": row.version, "stored_hash": row.checkpoint_hash,
                         "computed_hash": actual})

