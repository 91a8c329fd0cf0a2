"""Decoded events -> sealed rows, or precise violations (pure).

The schemas are compiled once (:mod:`.schemas`). The hot path asks jsonschema-rs only "is
it valid?"; the slow, detailed walk (every violation with its JSON pointer) runs only for
events that failed.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from datetime import UTC, datetime
from typing import Any

from ..core.digest import (
    MAX_DEPTH,
    NUL_ESCAPE,
    TooDeep,
    canonical_json,
    sha256_hex,
)
from ..core.errors import DataIsolationError, ValidationError, too_deep, violation
from ..core.event import Row, Seal
from ..core.jcs import Unrepresentable, jcs
from .schemas import Contract, pointer
from .schemas import Schemas as Schemas  # where it was before the schemas had a module

_FRACTION = re.compile(r"(\.\d{6})\d+")


def parse_timestamp(text: str) -> datetime:
    """RFC 3339 (already format-checked) to an aware datetime; nanoseconds are truncated."""
    if "t" in text or "z" in text:  # RFC 3339 allows lower case; fromisoformat does not
        text = text.upper()
    try:
        value = datetime.fromisoformat(text)
    except ValueError:
        value = datetime.fromisoformat(_FRACTION.sub(r"\1", text))
    if value.tzinfo is None:  # the schema requires an offset; be defensive anyway
        raise ValueError("timestamp has no offset")
    if value.year in (1, 9999):  # per event: only the edge years pay for the checks below
        try:  # 0001-01-01T00:00:00+14:00 is valid RFC 3339 but before year 1 in UTC
            utc = value.astimezone(UTC).replace(tzinfo=None)
        except OverflowError:
            raise ValueError("timestamp out of range in UTC") from None
        if utc in (datetime.min, datetime.max):
            # asyncpg writes these two as -infinity and infinity: not a time, and not
            # readable back as one.
            raise ValueError("timestamp at the very edge of the range")
    return value


# A request of 400,000 invalid events must not buy 400,000 explanations: list this many
# violations of each kind, count the rest.
MAX_LISTED = 100


class _Listed(list[dict[str, str]]):
    """Violations up to MAX_LISTED, and whether more were left out."""

    omitted = False

    def add(self, item: dict[str, str]) -> None:
        if len(self) < MAX_LISTED:
            self.append(item)
        else:
            self.omitted = True

    @property
    def how_many(self) -> str:
        return f"more than {len(self)}" if self.omitted else str(len(self))

    def context(self) -> dict[str, Any]:
        return {"listed": len(self), "more_omitted": True} if self.omitted else {}


class EventChecker:
    """Turns decoded request events into sealed rows, or raises one precise error.

    Precedence when a request has several problems: agency isolation (403) before size (413)
    before schema and content violations (422); all violations of the winning kind are listed.
    """

    def __init__(self, schemas: Schemas | Contract, event_max_bytes: int) -> None:
        # A Contract is swapped whole by a reload; each request uses the schemas in force
        # when it began.
        self.contract = schemas if isinstance(schemas, Contract) else Contract(schemas)
        self.event_max_bytes = event_max_bytes

    def rows(self, events: Sequence[Any], seal: Seal, *, batch: bool,
             payload_depth: int = MAX_DEPTH) -> list[Row]:
        """``payload_depth``: how deep a payload may nest (one more for an OpenLineage
        RunEvent's, which holds the RunEvent one level down)."""
        rows: list[Row] = []
        invalid, foreign, too_large = _Listed(), _Listed(), _Listed()
        agency = seal.agency
        schemas = self.contract.schemas
        is_valid = schemas.event.is_valid
        payloads = schemas.payloads
        for i, ev in enumerate(events):
            valid = is_valid(ev)
            if valid and payloads:  # the envelope holds: a known kind, an object payload
                check = payloads.get(ev["kind"])
                valid = check is None or check.is_valid(ev["payload"])
            if not valid:
                prefix: list[str | int] = [i] if batch else []
                if not isinstance(ev, dict):
                    invalid.add(
                        violation(pointer(prefix), "an event must be a JSON object", "WRONG_TYPE")
                    )
                elif len(invalid) >= MAX_LISTED:
                    invalid.omitted = True  # not worth explaining
                else:
                    for v in schemas.explain(ev, prefix, payload_depth + 1):
                        invalid.add(v)
                continue
            payload = ev["payload"]
            at = f"/{i}" if batch else ""  # JSON pointer of this event, for errors
            claimed = ev.get("agency")
            if claimed is not None and claimed != agency:
                foreign.add(violation(at + "/agency", "agency differs from the caller's",
                                         "AGENCY_MISMATCH"))
            p_agency = payload.get("agency")
            if p_agency is not None and p_agency != agency:
                foreign.add(violation(at + "/payload/agency",
                                         "payload agency differs from the caller's",
                                         "AGENCY_MISMATCH"))
            try:
                canonical = canonical_json(payload, max_depth=payload_depth)
            except TooDeep as exc:
                raise too_deep(at + "/payload" + pointer(exc.path), MAX_DEPTH) from None
            if len(canonical) > self.event_max_bytes:
                too_large.add(violation(
                    at + "/payload",
                    f"payload is {len(canonical)} bytes; the limit is {self.event_max_bytes}",
                    "EVENT_TOO_LARGE",
                ))
                continue
            step, provider, model = ev.get("step"), ev.get("provider"), ev.get("model")
            if NUL_ESCAPE in canonical or (
                    (step is not None and "\x00" in step)
                    or (provider is not None and "\x00" in provider)
                    or (model is not None and "\x00" in model)):
                invalid.add(violation(at, "NUL characters (\\u0000) cannot be stored",
                                         "NUL_CHARACTER"))
                continue
            digest = sha256_hex(canonical)
            sent_digest = ev.get("payload_sha256")
            if sent_digest is not None and sent_digest != digest:
                invalid.add(violation(
                    at + "/payload_sha256",
                    f"payload_sha256 does not match the canonical JSON hash {digest} (of "
                    "Python's json.dumps(payload, sort_keys=True, separators=(',', ':'))); "
                    "an RFC 8785 (JCS) hash goes in payload_jcs_sha256",
                    "PAYLOAD_HASH_MISMATCH",
                ))
                continue
            sent_jcs = ev.get("payload_jcs_sha256")
            if sent_jcs is not None:  # only when asked: JCS is slower than the form above
                problem = _jcs_problem(payload, sent_jcs, at)
                if problem is not None:
                    invalid.add(problem)
                    continue
            try:
                occurred_at = parse_timestamp(ev["occurred_at"])
            except ValueError:
                invalid.add(violation(at + "/occurred_at", "not a valid RFC 3339 date-time",
                                         "INVALID_TIMESTAMP"))
                continue
            rows.append(Row(
                agency, ev["event_id"].lower(), ev["run_id"], ev["kind"], step,
                occurred_at, seal.received_at, provider, model, canonical.decode("ascii"),
                digest, seal.correlation_id, seal.agent_id, seal.trace_id, seal.span_id,
                seal.expires_at,
            ))
        if foreign:
            raise DataIsolationError(
                "DATA_ISOLATION_ERROR",
                f"{foreign.how_many} field(s) name an agency other than the caller's",
                errors=foreign, context={"agency": agency, **foreign.context()},
            )
        if too_large:
            raise ValidationError(
                "EVENT_TOO_LARGE", f"{too_large.how_many} event payload(s) exceed the size limit",
                status=413, errors=too_large,
                context={"limit_bytes": self.event_max_bytes, **too_large.context()},
            )
        if invalid:
            codes = {v["code"] for v in invalid}
            code = codes.pop() if len(codes) == 1 else "SCHEMA_VIOLATION"
            raise ValidationError(
                code, f"{invalid.how_many} violation(s); nothing from this request was accepted",
                errors=invalid, context=invalid.context(),
            )
        return rows


def _jcs_problem(payload: Any, sent: str, at: str) -> dict[str, str] | None:
    """Why ``sent`` is not the RFC 8785 (JCS) hash of ``payload``, or None when it is."""
    try:
        digest = sha256_hex(jcs(payload))
    except Unrepresentable as exc:
        return violation(at + "/payload" + pointer(exc.path),
                         f"{exc.reason}; an RFC 8785 hash cannot cover this payload: send the "
                         "value as a string, or hash the payload's canonical form into "
                         "payload_sha256 instead", "JCS_UNREPRESENTABLE")
    if sent != digest:
        return violation(at + "/payload_jcs_sha256", "payload_jcs_sha256 does not match "
                         f"the payload's RFC 8785 (JCS) hash {digest}", "PAYLOAD_HASH_MISMATCH")
    return None


def utcnow() -> datetime:
    return datetime.now(UTC)
