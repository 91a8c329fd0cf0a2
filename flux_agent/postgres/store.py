"""The read side: checkpoints, runs and events, for the caller's agency only.

Every query runs in a READ ONLY transaction that first declares the agency, so row-level
security decides what is visible: another agency's run is simply not there (404, not 403).
The read path never writes.
"""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from typing import Any

import msgspec

from ..core.digest import canonical_json, sha256_hex
from ..core.event import CheckpointRow
from ..core.reads import (
    EVENT_ENVELOPE_BYTES,
    RUN_ITEM_BYTES,
    Page,
    decode_cursor,
    decode_runs_cursor,
    encode_cursor,
    encode_runs_cursor,
)
from ..core.timefmt import rfc3339
from .jsonb import UNRECORDED, Unrestorable, matches, restore
from .pool import Postgres

_SET_AGENCY = "SELECT set_config('flux.current_agency_id', $1, true)"
# The payload as its UTF-8 bytes (bytea): passed to the answer as raw JSON, never decoded.
_EVENT_COLUMNS = (
    "agency_id, event_id::text AS event_id, run_id, kind, step, occurred_at, received_at, "
    "provider, model, convert_to(payload::text, 'UTF8') AS payload, payload_sha256, "
    "correlation_id, agent_id, trace_id, span_id, expires_at, "
    "payload_hint::text AS payload_hint"
)
_CHECKPOINT_COLUMNS = (  # in CheckpointRow's order
    "agency_id, run_id, version, step, state::text AS state, checkpoint_hash, provider, model, "
    "status, saved_at, expires_at, event_id::text AS event_id, correlation_id"
)
TERMINAL = {"run.completed": "completed", "run.failed": "failed", "run.aborted": "aborted"}
# A page of events: the first ``limit`` + 1 in order, each with its size and the running
# total, of which PostgreSQL sends the first and then those within the byte budget. The
# (limit + 1)th only says whether there is more.
_PAGE = f"""
SELECT s.* FROM (
  SELECT p.*, sum(p.nbytes) OVER w AS upto, row_number() OVER w AS n, count(*) OVER () AS fetched
  FROM (
    SELECT q.*, octet_length(q.payload) + octet_length(coalesce(q.step, ''))
           + octet_length(coalesce(q.provider, '')) + octet_length(coalesce(q.model, ''))
           + {EVENT_ENVELOPE_BYTES} AS nbytes
    FROM (SELECT {_EVENT_COLUMNS}, event_id AS uuid FROM flux.events WHERE {{where}}
          ORDER BY occurred_at, event_id LIMIT ${{fetch}}) q
  ) p
  WINDOW w AS (ORDER BY p.occurred_at, p.uuid ROWS UNBOUNDED PRECEDING)
) s WHERE s.n <= ${{limit}} AND (s.n = 1 OR s.upto <= ${{budget}})
ORDER BY s.occurred_at, s.uuid"""
# A page of runs, newest first (by first event, then run id), with each run's status from
# its latest event that is not a checkpoint (one index probe per run of the page).
_RUNS = """
WITH page AS (
  SELECT run_id, min(occurred_at) AS first_at, max(occurred_at) AS last_at, count(*) AS n
  FROM flux.events WHERE agency_id = $1 GROUP BY run_id {having}
  ORDER BY first_at DESC, run_id DESC LIMIT $2
)
SELECT p.run_id, p.first_at, p.last_at, p.n, s.kind AS last_kind FROM page p
LEFT JOIN LATERAL (
  SELECT kind FROM flux.events e WHERE e.agency_id = $1 AND e.run_id = p.run_id
  AND e.kind <> 'checkpoint.saved' ORDER BY e.occurred_at DESC, e.event_id DESC LIMIT 1
) s ON true
ORDER BY p.first_at DESC, p.run_id DESC"""


# Stored payloads may predate the nesting limit (the decoder once let ~1,000 levels in).
_ANY_DEPTH = 100_000


def _canonical(value: Any) -> bytes:
    return canonical_json(value, max_depth=_ANY_DEPTH)


def _hash(value: Any) -> str:
    return sha256_hex(_canonical(value))


def _hash_matches(kind: str, body: str, digest: str, hint: str | None) -> bool | None:
    """Checkpoint states are stored as exact text (json): hash the text. Event payloads are
    jsonb, which keeps values, not spellings: re-canonicalise, with the numbers jsonb
    respelled put back as the hint says (``jsonb``). None: a payload stored before hints
    were recorded whose ambiguous numbers are too many to try every spelling."""
    if kind == "checkpoint":
        return sha256_hex(body.encode()) == digest
    return matches(body, None if hint is None else json.loads(hint), digest, _hash)


def _payload(text: bytes, hint: str | None) -> msgspec.Raw:
    """A stored payload as it was hashed: jsonb's text (its UTF-8 bytes, passed on as they
    came), or where jsonb respelled numbers (the hint names them), the canonical JSON with
    them put back."""
    if hint is None or not hint.startswith("["):
        return msgspec.Raw(text)
    try:
        return msgspec.Raw(_canonical(restore(json.loads(text), json.loads(hint))))
    except Unrestorable:
        return msgspec.Raw(text)  # `flux-agent verify` names such a row


def event_json(r: Any) -> dict[str, Any]:
    """A stored event as the API shows it; the payload is passed through as raw JSON."""
    return {
        "event_id": r["event_id"], "run_id": r["run_id"], "kind": r["kind"],
        "step": r["step"], "occurred_at": rfc3339(r["occurred_at"]),
        "received_at": rfc3339(r["received_at"]), "provider": r["provider"],
        "model": r["model"], "payload": _payload(r["payload"], r["payload_hint"]),
        "payload_sha256": r["payload_sha256"], "agency": r["agency_id"],
        "correlation_id": r["correlation_id"], "agent_id": r["agent_id"],
        "trace_id": r["trace_id"], "span_id": r["span_id"],
        "expires_at": rfc3339(r["expires_at"]),
    }


class Store:
    """Read-only queries, on the pool the agent shares with its writes."""

    # A verification reads a whole agency: far beyond a statement's deadline.
    VERIFY_TIMEOUT = 6 * 3600.0

    def __init__(self, pg: Postgres) -> None:
        self.pg = pg

    async def close(self) -> None:
        await self.pg.close()

    async def _fetch(self, agency: str, query: str, *args: Any) -> list[Any]:
        async with self.pg.connection() as conn, conn.transaction(readonly=True):
            await conn.execute(_SET_AGENCY, agency)
            return list(await conn.fetch(query, *args))

    # ---------------------------------------------------------------- checkpoints

    async def latest_checkpoint(self, agency: str, run_id: str) -> CheckpointRow | None:
        rows = await self._fetch(
            agency, f"SELECT {_CHECKPOINT_COLUMNS} FROM flux.checkpoints "
            "WHERE agency_id = $1 AND run_id = $2", agency, run_id)
        return CheckpointRow(*rows[0]) if rows else None

    async def checkpoint_history(self, agency: str, run_id: str, limit: int
                                 ) -> list[dict[str, Any]]:
        rows = await self._fetch(
            agency, "SELECT version, checkpoint_hash, step, status, saved_at, event_id::text "
            "AS event_id FROM flux.checkpoint_history WHERE agency_id = $1 AND run_id = $2 "
            "ORDER BY version DESC LIMIT $3", agency, run_id, limit)
        return [{"version": r["version"], "checkpoint_hash": r["checkpoint_hash"],
                 "step": r["step"], "status": r["status"], "saved_at": rfc3339(r["saved_at"]),
                 "event_id": r["event_id"]} for r in rows]

    # ---------------------------------------------------------------- runs and events

    async def run_summary(self, agency: str, run_id: str) -> dict[str, Any] | None:
        async with self.pg.connection() as conn, conn.transaction(readonly=True):
            await conn.execute(_SET_AGENCY, agency)
            counts = await conn.fetch(
                "SELECT kind, count(*) AS n, min(occurred_at) AS first, "
                "max(occurred_at) AS last FROM flux.events "
                "WHERE agency_id = $1 AND run_id = $2 GROUP BY kind", agency, run_id)
            if not counts:
                return None
            last = await conn.fetchrow(
                "SELECT kind, step, occurred_at FROM flux.events "
                "WHERE agency_id = $1 AND run_id = $2 "
                "ORDER BY occurred_at DESC, event_id DESC LIMIT 1", agency, run_id)
            # A checkpoint is bookkeeping, not progress: one saved after the end of a run
            # leaves it completed (or failed, or aborted).
            status_kind = last["kind"]
            if status_kind == "checkpoint.saved":
                status_kind = await conn.fetchval(
                    "SELECT kind FROM flux.events WHERE agency_id = $1 AND run_id = $2 "
                    "AND kind <> 'checkpoint.saved' "
                    "ORDER BY occurred_at DESC, event_id DESC LIMIT 1", agency, run_id)
            last_step = await conn.fetchval(
                "SELECT step FROM flux.events WHERE agency_id = $1 AND run_id = $2 "
                "AND step IS NOT NULL ORDER BY occurred_at DESC, event_id DESC LIMIT 1",
                agency, run_id)
            checkpoint = await conn.fetchval(
                "SELECT version FROM flux.checkpoints WHERE agency_id = $1 AND run_id = $2",
                agency, run_id)
        return {
            "run_id": run_id,
            "status": TERMINAL.get(status_kind, "running"),
            "last_event": {"kind": last["kind"], "step": last["step"],
                           "occurred_at": rfc3339(last["occurred_at"])},
            "last_step": last_step,
            "first_event_at": rfc3339(min(r["first"] for r in counts)),
            "last_event_at": rfc3339(max(r["last"] for r in counts)),
            "events": sum(r["n"] for r in counts),
            "counts_by_kind": {r["kind"]: r["n"] for r in counts},
            "checkpoint_version": checkpoint,
        }

    async def runs(self, agency: str, *, cursor: str | None, limit: int, max_bytes: int
                   ) -> Page:
        """The agency's runs, newest first (by their first event, then run id); keyset
        pagination on that pair, which later events of a run do not move."""
        args: list[Any] = [agency, limit + 1]
        having = ""
        if cursor:
            args += list(decode_runs_cursor(cursor))
            having = "HAVING (min(occurred_at), run_id) < ($3, $4)"
        rows = await self._fetch(agency, _RUNS.format(having=having), *args)
        more = len(rows) > limit
        rows = rows[:limit]
        kept = max(1, min(len(rows), max_bytes // RUN_ITEM_BYTES))
        more, rows = more or kept < len(rows), rows[:kept]
        items = [{"run_id": r["run_id"], "status": TERMINAL.get(r["last_kind"], "running"),
                  "first_event_at": rfc3339(r["first_at"]),
                  "last_event_at": rfc3339(r["last_at"]), "events": r["n"]} for r in rows]
        following = encode_runs_cursor(rows[-1]["first_at"], rows[-1]["run_id"]) \
            if more and rows else None
        return Page(items, following, len(items) * RUN_ITEM_BYTES)

    async def run_events(
        self, agency: str, run_id: str, *, kind: str | None, step: str | None,
        cursor: str | None, limit: int, max_bytes: int,
    ) -> Page:
        """One page in (occurred_at, event_id) order, and the cursor of the next page: at most
        ``limit`` events and, beyond the first, about ``max_bytes`` of JSON (PostgreSQL cuts
        the page, so no more than that is ever fetched).

        Keyset pagination: a page starts strictly after the last row of the previous one, so
        rows inserted meanwhile never make a row appear twice or shift another out of view.
        """
        after = decode_cursor(cursor) if cursor else None
        args: list[Any] = [agency, run_id]
        where = ["agency_id = $1", "run_id = $2"]
        if kind is not None:
            args.append(kind)
            where.append(f"kind = ${len(args)}")
        if step is not None:
            args.append(step)
            where.append(f"step = ${len(args)}")
        if after is not None:
            args += [after[0], after[1]]
            where.append(f"(occurred_at, event_id) > (${len(args) - 1}, ${len(args)}::uuid)")
        args += [limit + 1, limit, max_bytes]
        n = len(args)
        rows = await self._fetch(agency, _PAGE.format(where=" AND ".join(where), fetch=n - 2,
                                                      limit=n - 1, budget=n), *args)
        more = bool(rows) and rows[0]["fetched"] > len(rows)
        following = encode_cursor(rows[-1]["occurred_at"], rows[-1]["event_id"]) if more else None
        return Page([event_json(r) for r in rows], following,
                    int(rows[-1]["upto"]) if rows else 0)

    async def event(self, agency: str, event_id: str) -> dict[str, Any] | None:
        # The partition key, computed from the id as PostgreSQL routes it (sql/006): one
        # partition's primary key is probed instead of every time range's.
        rows = await self._fetch(
            agency, f"SELECT {_EVENT_COLUMNS} FROM flux.events "
            "WHERE agency_id = $1 AND event_id = $2::uuid "
            "AND flux.event_id_time(event_id) = flux.event_id_time($2::uuid)", agency, event_id)
        return event_json(rows[0]) if rows else None

    # ---------------------------------------------------------------- verification

    async def verify(self, agency: str, run_id: str | None = None
                     ) -> AsyncIterator[dict[str, Any]]:
        """Re-hash stored events and checkpoints; yields one report per mismatch (and per
        event that cannot be checked exactly), then a summary (``{"agency", "events",
        "checkpoints", "mismatches", "unverifiable"}``)."""
        counts = {"events": 0, "checkpoints": 0, "mismatches": 0, "unverifiable": 0}
        async with self.pg.connection() as conn, conn.transaction(readonly=True):
            hinted = await conn.fetchval(
                "SELECT true FROM pg_attribute WHERE attrelid = 'flux.events'::regclass "
                "AND attname = 'payload_hint' AND NOT attisdropped")
        # Before sql/008 no hint was recorded: every row is as one stored before it.
        hint_column = "payload_hint::text" if hinted else f"'\"{UNRECORDED}\"'"
        queries = (
            ("event", "SELECT event_id::text AS id, run_id, payload::text AS body, "
                      f"payload_sha256 AS digest, {hint_column} AS hint "
                      "FROM flux.events WHERE agency_id = $1"),
            ("checkpoint", "SELECT run_id || ' v' || version AS id, run_id, "
                           "state::text AS body, checkpoint_hash AS digest, NULL AS hint "
                           "FROM flux.checkpoint_history WHERE agency_id = $1"),
            ("checkpoint", "SELECT run_id || ' v' || version || ' (latest)' AS id, run_id, "
                           "state::text AS body, checkpoint_hash AS digest, NULL AS hint "
                           "FROM flux.checkpoints WHERE agency_id = $1"),
        )
        for kind, query in queries:
            args: list[Any] = [agency]
            if run_id is not None:
                query += " AND run_id = $2"
                args.append(run_id)
            async with self.pg.connection(self.VERIFY_TIMEOUT) as conn, \
                    conn.transaction(readonly=True):
                await conn.execute(_SET_AGENCY, agency)
                async for r in conn.cursor(query, *args, prefetch=500, timeout=60):
                    counts["events" if kind == "event" else "checkpoints"] += 1
                    verdict = _hash_matches(kind, r["body"], r["digest"], r["hint"])
                    if verdict:
                        continue
                    report = {"kind": kind, "agency": agency, "run_id": r["run_id"],
                              "id": r["id"]}
                    if verdict is None:
                        counts["unverifiable"] += 1
                        yield {**report, "unverifiable": "stored before the agent recorded "
                               "what jsonb respells (sql/008), with too many numbers that "
                               "may have been respelled to try every spelling"}
                        continue
                    counts["mismatches"] += 1
                    yield {**report, "stored_hash": r["digest"],
                           "computed_hash": sha256_hex(r["body"].encode())
                           if kind == "checkpoint" else _hash(json.loads(r["body"]))}
        yield {"agency": agency, **counts}
