"""OpenLineage RunEvents -> flux step events (pure).

``POST /api/v1/lineage`` takes what the OpenLineage clients' HTTP transport sends: one RunEvent
as JSON. ``Lineage.to_events`` validates it against the bundled RunEvent schema (core spec
2-0-2, ``schemas/openlineage/``) plus what flux itself needs, and maps it to ONE flux event
dict, which then goes through the normal envelope validation, hashing, spooling and flushing.

Mapping (one RunEvent -> one flux event):

- ``event_id``: a UUIDv7 whose time is ``eventTime`` (to the millisecond) and whose other bits
  are the first of ``openlineage_sha256`` (the SHA-256 of the RunEvent's canonical JSON), so a
  transport's retry of the same RunEvent is a duplicate and lands in the same time partition
  of ``flux.events``. (An ``eventTime`` before 1970 has no v7 form: a UUIDv8 of the digest.)
- ``run_id``: ``run.runId``, unchanged;
- ``kind``: START -> run.started, COMPLETE -> run.completed, FAIL -> run.failed, ABORT ->
  run.aborted; RUNNING, OTHER or no eventType -> the ``kind`` of the run facet ``flux`` if
  it has one (step.started, step.completed, step.failed, checkpoint.saved), else
  step.completed;
- ``step``: the ``flux`` facet's ``step``, else ``<job namespace>/<job name>`` (longer than 128
  characters: its first 111, ``~`` and 16 hex digits of its SHA-256);
- ``occurred_at``: ``eventTime``; ``provider``/``model``: from the ``flux`` facet, if there;
- ``payload``: the RunEvent itself, unchanged, under ``openlineage``; its hash under
  ``openlineage_sha256``; extracted ``event_type``, ``job``, ``producer``, ``inputs``,
  ``outputs`` (namespace and name of each dataset), ``parent_run_id`` (the ``parent`` run
  facet) and ``error`` (the ``errorMessage`` run facet's message); ``content_type`` and
  ``use_case`` from the ``flux`` facet (under the flux profile, run.started defaults to
  ``mixed`` and ``analytics``, which that profile requires); ``items_processed`` and
  ``duration_ms`` from the ``flux`` facet.

Nothing is reordered: the agent keeps a run's events in arrival order.
"""

from __future__ import annotations

import hashlib
import re
import uuid
from collections.abc import Iterator, Mapping
from datetime import datetime
from pathlib import Path
from typing import Any, Final

import jsonschema_rs

from ..core.digest import MAX_DEPTH, NUL_ESCAPE, TooDeep, canonical_json, check_depth
from ..core.errors import ValidationError, too_deep, violation
from ..core.ids import uuid7_at
from ..core.resources import data_dir
from .schemas import KEYWORD_CODES, SCHEMA_VERSION, load_json, pointer
from .validate import parse_timestamp

OPENLINEAGE_DIR: Final = "openlineage"
# What the bundled RunEvent schema is known as; every *.json file in schemas/openlineage/ (and
# the v1 envelope and payload schemas) is registered under its own "$id", so references
# between them resolve offline.
RUN_EVENT_REF: Final = (
    "https://flux-agent.invalid/schemas/openlineage/RunEvent-2-0-2.schema.json#/$defs/RunEvent"
)
FLUX_FACET_REF: Final = "https://flux-agent.invalid/schemas/openlineage/FluxRunFacet.json"
FLUX_FACET: Final = "flux"  # the key of flux's own run facet in run.facets

# The flux profile requires these of run.started; OpenLineage has nothing to say about them.
FLUX_STARTED_DEFAULTS: Final = {"content_type": "mixed", "use_case": "analytics"}
STEP_MAX: Final = 128

KINDS: Final[Mapping[str, str]] = {
    "START": "run.started",
    "COMPLETE": "run.completed",
    "FAIL": "run.failed",
    "ABORT": "run.aborted",
}
DEFAULT_KIND: Final = "step.completed"  # RUNNING, OTHER, or no eventType, without a flux kind

_RUN_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._:-]{0,63}$")
_STATIC_EVENTS = ("/DatasetEvent", "/JobEvent")

# (last property name, failed keyword) -> error code; the keyword alone as a fallback.
_CODES: Final[Mapping[tuple[str, str], str]] = {
    ("runId", "format"): "INVALID_RUN_ID",
    ("eventTime", "format"): "INVALID_TIMESTAMP",
    ("eventType", "enum"): "INVALID_EVENT_TYPE",
    ("kind", "enum"): "INVALID_KIND",
    ("content_type", "enum"): "INVALID_CONTENT_TYPE",
    ("use_case", "enum"): "INVALID_USE_CASE",
}
def _offline(uri: str) -> Any:
    """The retriever: every schema is bundled, nothing is ever fetched."""
    raise ValueError(f"{uri} is not bundled with flux-agent and is never fetched")


def run_event_digest(doc: Any) -> str:
    """SHA-256 (hex) of a RunEvent's canonical JSON: ``openlineage_sha256``."""
    return hashlib.sha256(canonical_json(doc)).hexdigest()


def event_id_for(digest: str, event_time: datetime) -> str:
    """The flux event id of a RunEvent: a UUIDv7 of its ``eventTime`` and digest."""
    time_keyed = uuid7_at(event_time, bytes.fromhex(digest[:20]))
    if time_keyed is not None:
        return time_keyed
    value = int(digest[:32], 16)
    value = (value & ~(0xF << 76)) | (0x8 << 76)  # version 8
    value = (value & ~(0x3 << 62)) | (0x2 << 62)  # RFC 9562 variant
    return str(uuid.UUID(int=value))


def bounded_step(name: str) -> str:
    """``name``, or for one longer than 128 characters a stable 128-character stand-in."""
    if len(name) <= STEP_MAX:
        return name
    tail = hashlib.sha256(name.encode("utf-8", "surrogatepass")).hexdigest()[:16]
    return f"{name[:STEP_MAX - 17]}~{tail}"


def _find_nul(value: Any) -> Iterator[list[str | int]]:
    """The paths of the strings (and member names) holding NUL, in document order; a stack
    of its own, not recursion, however deep the value."""
    stack: list[tuple[list[str | int], Any]] = [([], value)]
    while stack:
        path, node = stack.pop()
        if isinstance(node, str):
            if "\x00" in node:
                yield path
        elif isinstance(node, dict):
            for key, item in reversed(list(node.items())):
                if "\x00" in key:
                    stack.append(([*path, key], "\x00"))  # the name itself
                else:
                    stack.append(([*path, key], item))
        elif isinstance(node, list):
            for i in range(len(node) - 1, -1, -1):
                stack.append(([*path, i], node[i]))


def _datasets(items: Any) -> list[dict[str, Any]]:
    return [{"namespace": d["namespace"], "name": d["name"]} for d in items or ()]


class Lineage:
    """Validates RunEvents against the bundled OpenLineage schema and maps them to events.

    ``schema_dir`` is the ``schemas`` directory (default: the bundled one), holding
    ``openlineage/`` and ``v1/``.
    """

    def __init__(self, schema_dir: Path | None = None) -> None:
        root = schema_dir or data_dir("schemas")
        files = sorted((root / OPENLINEAGE_DIR).glob("*.json"))
        files += [root / SCHEMA_VERSION / "payload.schema.json",
                  root / SCHEMA_VERSION / "step-event.schema.json"]
        resources = []
        for path in files:
            schema = load_json(path)
            resources.append((schema["$id"], schema))
        registry = jsonschema_rs.Registry(resources, retriever=_offline)
        facet_path = {"properties": {"run": {"properties": {"facets": {"properties": {
            FLUX_FACET: {"$ref": FLUX_FACET_REF}}}}}}}
        self.schema = jsonschema_rs.validator_for(
            {"$schema": "https://json-schema.org/draft/2020-12/schema",
             "allOf": [{"$ref": RUN_EVENT_REF}, facet_path]},
            registry=registry, retriever=_offline, validate_formats=True,
        )
        self._is_valid = self.schema.is_valid

    # ------------------------------------------------------------------ validation

    def explain(self, doc: Any) -> list[dict[str, str]]:
        """Every schema violation of a RunEvent, with JSON pointers into it. The validator
        converts what it explains only up to 255 levels: a deeper RunEvent is refused as too
        deep first (400)."""
        try:
            check_depth(doc, MAX_DEPTH)
        except TooDeep as exc:
            raise too_deep(pointer(exc.path), MAX_DEPTH) from None
        out: list[dict[str, str]] = []
        seen: set[tuple[str, str]] = set()
        for err in self.schema.iter_errors(doc):
            path: list[str | int] = list(err.instance_path)
            keyword = err.kind.name
            if keyword in ("allOf", "anyOf", "oneOf", "$ref"):
                continue  # the failing branch is reported on its own
            if keyword == "required":
                path.append(err.kind.property)  # type: ignore[attr-defined]
            last = next((p for p in reversed(path) if isinstance(p, str)), "")
            code = _CODES.get((last, keyword)) or KEYWORD_CODES.get(keyword, "SCHEMA_VIOLATION")
            at = pointer(path)
            if (at, err.message) in seen:
                continue
            seen.add((at, err.message))
            out.append(violation(at, err.message, code))
        return out or [violation("", "not a valid OpenLineage RunEvent", "SCHEMA_VIOLATION")]

    def check(self, doc: Any) -> bytes:
        """Raise one ValidationError naming every problem of ``doc``, or return its canonical
        JSON."""
        if not isinstance(doc, dict):
            kind = "an array" if isinstance(doc, list) else type(doc).__name__
            raise ValidationError(
                "WRONG_TYPE", f"the body must be one OpenLineage RunEvent (a JSON object), "
                f"not {kind}", status=400,
                errors=[violation("", "a RunEvent must be a JSON object", "WRONG_TYPE")],
            )
        schema_url = doc.get("schemaURL")
        if "run" not in doc and ("dataset" in doc or (
                isinstance(schema_url, str) and schema_url.endswith(_STATIC_EVENTS))):
            raise ValidationError(
                "NOT_A_RUN_EVENT", "only OpenLineage RunEvents are accepted here; static "
                "DatasetEvents and JobEvents have no run to record",
                errors=[violation("", "not a RunEvent (no run)", "NOT_A_RUN_EVENT")],
            )
        if self._is_valid(doc):
            problems = []
            run_id = doc["run"]["runId"]
            if not _RUN_ID.fullmatch(run_id):
                problems.append(violation(
                    "/run/runId", "runId must match ^[A-Za-z0-9][A-Za-z0-9._:-]{0,63}$ to be "
                    "a flux run_id (a UUID does)", "INVALID_RUN_ID"))
            try:
                parse_timestamp(doc["eventTime"])
            except ValueError:
                problems.append(violation("/eventTime", "eventTime is not an RFC 3339 "
                                          "date-time with an offset", "INVALID_TIMESTAMP"))
        else:
            problems = self.explain(doc)
        try:
            canonical = canonical_json(doc) if not problems else b""
        except TooDeep as exc:
            raise too_deep(pointer(exc.path), MAX_DEPTH) from None
        if NUL_ESCAPE in canonical:
            problems = [violation(pointer(p), "NUL characters (\\u0000) cannot be stored",
                                  "NUL_CHARACTER") for p in _find_nul(doc)]
        if problems:
            codes = {p["code"] for p in problems}
            code = codes.pop() if len(codes) == 1 else "SCHEMA_VIOLATION"
            raise ValidationError(
                code, f"{len(problems)} violation(s) of the OpenLineage RunEvent; nothing was "
                "accepted", errors=problems,
            )
        return canonical

    # ------------------------------------------------------------------ mapping

    def to_events(self, doc: Any, started_defaults: Mapping[str, Any] | None = None
                  ) -> list[dict[str, Any]]:
        """One RunEvent (decoded JSON) -> one flux event dict, or a ValidationError.
        ``started_defaults``: what a run.started payload gets when the ``flux`` facet does
        not say (the flux profile: :data:`FLUX_STARTED_DEFAULTS`)."""
        canonical = self.check(doc)
        run: dict[str, Any] = doc["run"]
        job: dict[str, Any] = doc["job"]
        run_facets: dict[str, Any] = run.get("facets") or {}
        flux: dict[str, Any] = run_facets.get(FLUX_FACET) or {}
        event_type = doc.get("eventType")
        kind = KINDS.get(event_type or "") or flux.get("kind") or DEFAULT_KIND

        digest = hashlib.sha256(canonical).hexdigest()
        payload: dict[str, Any] = {
            "openlineage": doc,
            "openlineage_sha256": digest,
            "event_type": event_type,
            "job": {"namespace": job["namespace"], "name": job["name"]},
            "producer": doc["producer"],
            "inputs": _datasets(doc.get("inputs")),
            "outputs": _datasets(doc.get("outputs")),
        }
        parent = run_facets.get("parent")
        parent_run = parent.get("run") if isinstance(parent, dict) else None
        if isinstance(parent_run, dict) and isinstance(parent_run.get("runId"), str):
            payload["parent_run_id"] = parent_run["runId"]
        error = run_facets.get("errorMessage")
        if isinstance(error, dict) and isinstance(error.get("message"), str):
            payload["error"] = error["message"]
        for key in ("content_type", "use_case", "items_processed", "duration_ms"):
            if key in flux:
                payload[key] = flux[key]
        if kind == "run.started":
            for key, value in (started_defaults or {}).items():
                payload.setdefault(key, value)

        event: dict[str, Any] = {
            "event_id": event_id_for(digest, parse_timestamp(doc["eventTime"])),
            "run_id": run["runId"],
            "kind": kind,
            "step": bounded_step(flux.get("step") or f"{job['namespace']}/{job['name']}"),
            "occurred_at": doc["eventTime"],
            "payload": payload,
        }
        for key in ("provider", "model"):
            if key in flux:
                event[key] = flux[key]
        return [event]
