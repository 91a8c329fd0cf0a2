"""The OpenAPI 3.1 description served at ``GET /openapi.json``: :func:`document` builds it
(pure), :class:`OpenAPIRoutes` serves it.

Built from the same JSON Schemas the agent validates with, so the description cannot drift
from the behaviour; ``tests/test_openapi.py`` runs schemathesis against a live agent to
check that every status it answers is one documented here.
"""

from __future__ import annotations

import copy
from typing import Any

from aiohttp import web

from ..._version import __version__
from ...core.event import KINDS
from ..responses import json_bytes
from .openapi_schemas import (
    DEPTH_RULE,
    NO_NUL,
    NUL_RULE,
    RUN_ID_PATTERN,
    components,
    rule,
)

PROBLEM = "application/problem+json"
_REF = "#/components/schemas/"
_IF_MATCH = r'^\s*(\*|(W/)?"*[0-9]{1,18}"*)\s*$'  # what checkpoints.parse_if_match takes
_CURSOR_RULE = rule(400, "INVALID_CURSOR", "cursor is a next_cursor this agent answered, "
                    "of the same listing")


def _problem(description: str) -> dict[str, Any]:
    return {"description": description,
            "content": {PROBLEM: {"schema": {"$ref": _REF + "Problem"}}}}


def _json(description: str, schema: dict[str, Any], headers: dict[str, Any] | None = None
          ) -> dict[str, Any]:
    out: dict[str, Any] = {"description": description,
                           "content": {"application/json": {"schema": schema}}}
    if headers:
        out["headers"] = headers
    return out


_ERRORS = {
    "400": "Malformed request (bad JSON, JSON nested too deep, body, cursor, limit or "
           "If-Match).",
    "401": "No valid bearer token (see WWW-Authenticate).",
    "403": "The role may not do this, or the request names another agency.",
    "404": "Not found for the caller's agency (another agency's data is 404 too).",
    "409": "An event id was reused for a different payload.",
    "412": "If-Match names a version that is not the latest.",
    "413": "The request, an event or a checkpoint is too large.",
    "415": "Unsupported Content-Type.",
    "422": "Schema or content violations; `errors` lists them with JSON pointers.",
    "500": "The stored checkpoint failed its integrity check (CHECKPOINT_INTEGRITY_FAILED), "
           "or the agent failed unexpectedly; never a partial acceptance.",
    "503": "Retry later (Retry-After): spool full or unwritable, draining, or PostgreSQL "
           "needed and unreachable.",
}


def _errors(*codes: str) -> dict[str, Any]:
    return {code: _problem(_ERRORS[code]) for code in codes}


def document(servers: list[str] | None = None, admin_servers: list[str] | None = None,
             *, aggregator: bool = False, auth: bool = True) -> dict[str, Any]:
    """The OpenAPI document; ``servers`` are the URLs this agent's event API answers on,
    ``admin_servers`` its admin listener's (``/health/*`` and ``/metrics``; ``[]``: off, and
    those paths are left out). ``None``: the defaults. ``aggregator``: an aggregator's API
    (sealed records from sidecars, and the reads). ``auth``: whether the agent asks for
    credentials (not with FLUX_AGENT_AUTH=none)."""
    run_id = {"name": "run_id", "in": "path", "required": True,
              "schema": {"type": "string", "pattern": RUN_ID_PATTERN}}
    request_headers = [
        {"name": "X-Request-ID", "in": "header", "required": False,
         "schema": {"type": "string"},
         "description": "Echoed, and stored as correlation_id, when it matches "
                        "^[A-Za-z0-9._:/+=@-]{1,128}$ (X-Correlation-ID likewise); any other "
                        "value is replaced by a generated id, as is an absent one."},
        {"name": "traceparent", "in": "header", "required": False,
         "schema": {"type": "string"},
         "description": "W3C trace context; a value that is not one starts a new trace."},
    ]
    prefer = {"name": "Prefer", "in": "header", "required": False,
              "schema": {"type": "string"},
              "description": "`wait=committed` (RFC 7240; parameters after `;` allowed): "
                             "answer only once the events are in PostgreSQL (200, "
                             "Preference-Applied). Other preferences are ignored."}
    accepted = {"$ref": _REF + "Accepted"}
    etag = {"ETag": {"schema": {"type": "string"}, "description": "The version, quoted."}}
    event_writes = _errors("400", "401", "403", "409", "413", "415", "422", "500", "503")
    reads = _errors("400", "401", "403", "404", "503")
    hash_rule = rule(422, "PAYLOAD_HASH_MISMATCH", "payload_sha256 (payload_jcs_sha256), if "
                     "sent, is the SHA-256 (hex) of the payload's canonical JSON (its RFC 8785 "
                     "form)")
    jcs_rule = rule(422, "JCS_UNREPRESENTABLE", "a payload sent with payload_jcs_sha256 holds "
                    "only numbers RFC 8785 represents exactly")
    ndjson_rule = rule(400, "MALFORMED_JSON", "an application/x-ndjson body holds one "
                       "StepEvent (JSON) per line")
    ndjson_schema_rule = rule(422, "SCHEMA_VIOLATION", "each line of an application/x-ndjson "
                              "body is a StepEvent")
    limit_rule = rule(413, "EVENT_TOO_LARGE", "a payload is at most "
                      "FLUX_AGENT_EVENT_MAX_BYTES as canonical JSON")
    paths: dict[str, Any] = {
        "/v1/events": {"post": {
            "operationId": "postEvents",
            "summary": "Post one event, a JSON array, or NDJSON. Atomic: all or none.",
            "parameters": [*request_headers, prefer],
            "requestBody": {"required": True, "content": {
                "application/json": {"schema": {"oneOf": [
                    {"$ref": _REF + "StepEvent"},
                    {"type": "array", "items": {"$ref": _REF + "StepEvent"}, "minItems": 1},
                ]}},
                "application/x-ndjson": {"schema": {"type": "string"}},
            }},
            "responses": {"202": _json("Durably spooled.", accepted),
                          "200": _json("In PostgreSQL (Prefer: wait=committed).", accepted),
                          **event_writes},
            "x-flux-rules": [hash_rule, jcs_rule, NUL_RULE, DEPTH_RULE, limit_rule,
                             ndjson_rule, ndjson_schema_rule],
        }},
        "/api/v1/lineage": {"post": {
            "operationId": "postLineage",
            "summary": "An OpenLineage RunEvent, as the openlineage-python HTTP transport "
                       "sends it; stored as one flux event.",
            "parameters": [*request_headers, prefer],
            "requestBody": {"required": True, "content": {"application/json": {"schema": {
                "$ref": _REF + "LineageRunEvent"}}}},
            "responses": {"201": _json("Durably spooled.", accepted),
                          "200": _json("In PostgreSQL (Prefer: wait=committed).", accepted),
                          **event_writes},
            "x-flux-rules": [NUL_RULE, DEPTH_RULE,
                             rule(413, "EVENT_TOO_LARGE", "the RunEvent is at most "
                                  "FLUX_AGENT_LINEAGE_MAX_BYTES as canonical JSON")],
        }},
        "/v1/runs/{run_id}/checkpoint": {
            "parameters": [run_id],
            "put": {
                "operationId": "saveCheckpoint",
                "summary": "Save the run's checkpoint; the agent hashes it and assigns the "
                           "next version.",
                "parameters": [*request_headers, prefer,
                               {"name": "If-Match", "in": "header", "required": False,
                                "schema": {"type": "string", "pattern": _IF_MATCH},
                                "description": 'The version the writer read, e.g. "3" '
                                               "(* : only if the run has none yet)."}],
                "requestBody": {"required": True, "content": {
                    "application/json": {"schema": {"$ref": _REF + "CheckpointSave"}}}},
                "responses": {"201": _json("Saved (durably spooled).",
                                           {"$ref": _REF + "CheckpointInfo"}, etag),
                              **_errors("400", "401", "403", "412", "413", "415", "422",
                                        "500", "503")},
                "x-flux-rules": [
                    NUL_RULE, DEPTH_RULE,
                    rule(412, "CHECKPOINT_VERSION_MISMATCH", "If-Match names the run's "
                         "latest version (* : the run has none)"),
                    rule(413, "CHECKPOINT_TOO_LARGE", "the state is at most "
                         "FLUX_AGENT_EVENT_MAX_BYTES as canonical JSON")],
            },
            "get": {
                "operationId": "loadCheckpoint",
                "summary": "The latest checkpoint, its hash verified.",
                "parameters": request_headers,
                "responses": {"200": _json("The checkpoint.", {"$ref": _REF + "Checkpoint"},
                                           etag),
                              **_errors("401", "403", "404", "500", "503")},
            },
        },
        "/v1/runs/{run_id}/checkpoints": {"get": {
            "operationId": "checkpointHistory",
            "summary": "The run's checkpoint versions, newest first.",
            "parameters": [run_id, *request_headers, _limit()],
            "responses": {"200": _json("Versions.", {"type": "object", "properties": {
                "run_id": {"type": "string"},
                "versions": {"type": "array", "items": {"type": "object"}}}}),
                **reads},
        }},
        "/v1/runs/{run_id}": {"get": {
            "operationId": "runSummary",
            "summary": "Status, last step, first/last event time, counts by kind.",
            "parameters": [run_id, *request_headers],
            "responses": {"200": _json("The run.", {"type": "object"}), **reads},
        }},
        "/v1/runs/{run_id}/events": {"get": {
            "operationId": "runEvents",
            "summary": "The run's events by occurred_at then event_id (keyset pagination).",
            "description": "A page ends before its JSON would exceed "
                           "FLUX_AGENT_READ_PAGE_MAX_BYTES (it holds at least one event); "
                           "next_cursor continues after its last event, null on the last "
                           "page.",
            "parameters": [
                run_id, *request_headers, _limit(),
                {"name": "kind", "in": "query", "required": False,
                 "schema": {"enum": list(KINDS)}},
                {"name": "step", "in": "query", "required": False,
                 "schema": {"type": "string", "minLength": 1, "maxLength": 128,
                            "pattern": NO_NUL}},
                _cursor(),
            ],
            "responses": {"200": _json("A page.", {
                "type": "object", "required": ["run_id", "events", "next_cursor"],
                "properties": {
                    "run_id": {"type": "string"},
                    "events": {"type": "array", "items": {"$ref": _REF + "StoredEvent"}},
                    "next_cursor": {"type": ["string", "null"]}}}), **reads},
            "x-flux-rules": [_CURSOR_RULE],
        }},
        "/v1/runs": {"get": {
            "operationId": "listRuns",
            "summary": "The caller's runs, newest first (by their first event, then run id).",
            "parameters": [*request_headers, _limit(), _cursor()],
            "responses": {"200": _json("A page of runs.", {
                "type": "object", "required": ["runs", "next_cursor"],
                "properties": {
                    "runs": {"type": "array", "items": {"$ref": _REF + "RunItem"}},
                    "next_cursor": {"type": ["string", "null"]}}}),
                **_errors("400", "401", "403", "503")},
            "x-flux-rules": [_CURSOR_RULE],
        }},
        "/v1/events/{event_id}": {"get": {
            "operationId": "getEvent",
            "summary": "One stored event of the caller's agency.",
            "parameters": [{"name": "event_id", "in": "path", "required": True,
                            "schema": {"type": "string"}}, *request_headers],
            "responses": {"200": _json("The event.", {"$ref": _REF + "StoredEvent"}),
                          **reads},
        }},
        "/v1/drain": {"post": {
            "operationId": "drain",
            "summary": "For Jobs on clusters without native sidecars: flush, then exit 0.",
            "parameters": request_headers,
            "responses": {"200": _json("Drained (or the deadline passed).", {
                "type": "object", "properties": {"drained": {"type": "boolean"},
                                                 "backlog_records": {"type": "integer"}}}),
                **_errors("401", "403", "503")},
        }},
        "/openapi.json": {"get": {
            "operationId": "openapi", "summary": "This document.", "security": [],
            "responses": {"200": _json("OpenAPI 3.1.", {"type": "object"})},
        }},
    }
    if aggregator:
        paths = _aggregator_paths(paths, request_headers)
    admin = [{"url": url, "description": "The admin listener (FLUX_AGENT_ADMIN_LISTEN)."}
             for url in (["http://127.0.0.1:9464"] if admin_servers is None else admin_servers)]
    for path, summary in () if not admin else (
        ("/health/live", "200 while the process is sound."),
        ("/health/ready", "200 while the agent accepts events; 503 when draining, when the "
                          "spool is full or unwritable, or when flushing has stalled."),
        ("/health/deep", "Diagnostics: PostgreSQL latency, schema version, spool, last "
                         "flush and error, uptime."),
        ("/metrics", "Prometheus text exposition."),
    ):
        paths[path] = {"servers": admin, "get": {
            "operationId": path.strip("/").replace("/", "_"),
            "summary": summary + " Admin listener only (FLUX_AGENT_ADMIN_LISTEN).",
            "tags": ["admin"], "security": [],
            "responses": {"200": {"description": "OK"},
                          **({"503": _problem("Not ready.")} if "ready" in path
                             or "deep" in path else {})},
        }}
    return {
        "openapi": "3.1.0",
        "info": {"title": "flux-agent", "version": __version__,
                 "description": (
                     "The API of a flux-agent aggregator: sealed records from sidecars, and "
                     "reads for the agencies their identity is bound to."
                     if aggregator else "The event API of the flux-agent sidecar (localhost "
                     "TCP and Unix socket).") + " Every error is application/problem+json."},
        "servers": [{"url": url} for url in (servers or ["http://127.0.0.1:8787"])],
        **({"security": [{"bearer": []}]} if auth else {}),
        "paths": paths,
        "components": {
            "securitySchemes": {"bearer": {
                "type": "http", "scheme": "bearer", "bearerFormat": "JWT",
                "description": "Claims iss, sub, agency, role, exp, iat (or an API key). "
                               "An agent run with FLUX_AGENT_AUTH=none asks for none, and its "
                               "document declares none."}},
            "schemas": {
                **components(),
                "RunItem": {"type": "object", "required": [
                    "run_id", "status", "first_event_at", "last_event_at", "events"],
                    "properties": {"run_id": {"type": "string"},
                                   "status": {"enum": ["running", "completed", "failed",
                                                       "aborted"]},
                                   "first_event_at": {"type": "string"},
                                   "last_event_at": {"type": "string"},
                                   "events": {"type": "integer"}}},
                "Accepted": {"type": "object", "required": ["accepted", "duplicates",
                                                            "event_ids"],
                             "properties": {"accepted": {"type": "integer"},
                                            "duplicates": {"type": "integer"},
                                            "event_ids": {"type": "array",
                                                          "items": {"type": "string"}},
                                            "committed": {"type": "boolean"}}},
                "CheckpointInfo": _checkpoint_info(),
                "Checkpoint": {**copy.deepcopy(_checkpoint_info()),
                               "required": ["run_id", "version", "step", "state",
                                            "checkpoint_hash"]},
                "StoredEvent": {"type": "object", "required": [
                    "event_id", "run_id", "kind", "occurred_at", "payload", "payload_sha256",
                    "agency"]},
                "Problem": _problem_schema(),
            },
        },
    }


def _aggregator_paths(paths: dict[str, Any], request_headers: list[dict[str, Any]]
                      ) -> dict[str, Any]:
    """An aggregator serves the reads (GET) and the records of sidecars."""
    out: dict[str, Any] = {}
    for path, item in paths.items():
        kept = {k: v for k, v in item.items() if k in ("get", "parameters")}
        if "get" in kept:
            out[path] = kept
    agency = {"name": "X-Flux-Agency", "in": "header", "required": False,
              "schema": {"type": "string", "pattern": "^[a-z0-9]+(-[a-z0-9]+)*$"},
              "description": "Which of the caller's agencies a request acts for (a namespace "
                             "may be bound to several); the first by default."}
    for item in out.values():
        item["get"] = {**item["get"],
                       "parameters": [*item["get"].get("parameters", []), agency]}
    receipt = {"type": "object", "required": ["events", "checkpoints", "audits"],
               "properties": {"events": {"type": "integer"},
                              "checkpoints": {"type": "integer"},
                              "audits": {"type": "integer"},
                              "committed": {"type": "boolean"},
                              "new_event_ids": {"type": ["array", "null"],
                                                "items": {"type": "string"}}}}
    out["/v1/records"] = {
        "post": {
            "operationId": "postRecords",
            "summary": "Sealed records of one sidecar's flush window (msgpack), answered once "
                       "durable on this aggregator's spool. Every item must be of an agency "
                       "the caller is bound to (else 403, nothing accepted).",
            "parameters": [*request_headers, {
                "name": "Prefer", "in": "header", "required": False,
                "schema": {"type": "string", "enum": ["wait=committed"]},
                "description": "Answer once the records are in PostgreSQL."}],
            "requestBody": {"required": True, "content": {
                "application/vnd.flux.records+msgpack": {"schema": {"type": "string"}}}},
            "responses": {"200": _json("Durably spooled.", receipt),
                          **_errors("400", "401", "403", "413", "415", "422", "500", "503")},
        },
        "get": {
            "operationId": "recordsReady",
            "summary": "Whether this aggregator takes records now (and the caller's "
                       "credentials are good).",
            "parameters": request_headers,
            "responses": {"200": _json("Taking records.", {"type": "object"}),
                          **_errors("401", "403", "503")},
        },
    }
    return out


def _cursor() -> dict[str, Any]:
    return {"name": "cursor", "in": "query", "required": False, "schema": {"type": "string"},
            "description": "next_cursor of the previous page (empty: the first page)."}


def _limit() -> dict[str, Any]:
    return {"name": "limit", "in": "query", "required": False,
            "schema": {"type": "integer", "minimum": 1, "maximum": 1000, "default": 100}}


def _checkpoint_info() -> dict[str, Any]:
    return {"type": "object", "required": ["run_id", "version", "step", "checkpoint_hash"],
            "properties": {"run_id": {"type": "string"}, "version": {"type": "integer"},
                           "step": {"type": "string"},
                           "checkpoint_hash": {"type": "string", "pattern": "^[0-9a-f]{64}$"},
                           "saved_at": {"type": "string"}, "state": {"type": "object"}}}


def _problem_schema() -> dict[str, Any]:
    return {
        "type": "object",
        "required": ["type", "title", "status", "detail", "instance", "error_id", "timestamp",
                     "class", "code", "context", "trace_id", "span_id", "request_id",
                     "retryable"],
        "properties": {
            "type": {"type": "string"}, "title": {"type": "string"},
            "status": {"type": "integer"}, "detail": {"type": "string"},
            "instance": {"type": "string"}, "error_id": {"type": "string"},
            "timestamp": {"type": "string"},
            "class": {"enum": ["VALIDATION_ERROR", "TRANSIENT_ERROR", "TERMINAL_ERROR",
                               "DATA_ISOLATION_ERROR", "CHECKPOINT_ERROR"]},
            "code": {"type": "string"}, "context": {"type": "object"},
            "trace_id": {"type": "string"}, "span_id": {"type": "string"},
            "request_id": {"type": "string"}, "retryable": {"type": "boolean"},
            "errors": {"type": "array", "items": {
                "type": "object", "required": ["pointer", "message", "code"],
                "properties": {"pointer": {"type": "string"}, "message": {"type": "string"},
                               "code": {"type": "string"}}}},
        },
    }


class OpenAPIRoutes:
    """``GET /openapi.json``, built on first request and kept."""

    def __init__(self, servers: list[str], admin_servers: list[str], *,
                 aggregator: bool = False, auth: bool = True) -> None:
        self.servers = servers
        self.admin_servers = admin_servers
        self.aggregator = aggregator
        self.auth = auth
        self._document: bytes | None = None

    async def get_openapi(self, request: web.Request) -> web.Response:
        if self._document is None:
            self._document = json_bytes(document(
                self.servers, self.admin_servers, aggregator=self.aggregator, auth=self.auth))
        return web.Response(body=self._document, content_type="application/json")
