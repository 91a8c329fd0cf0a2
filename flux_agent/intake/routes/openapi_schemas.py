"""The component schemas of the OpenAPI document that come from the agent's own schema files
(pure): the step event, the payload, the checkpoint, and the OpenLineage RunEvent with flux's
run facet, each with the rules the agent adds to them (no NUL in a stored string; a run id a
flux run id). Rules JSON Schema cannot state are listed per operation under
``x-flux-rules`` (:func:`rule`): what a request must also satisfy, and the problem a request
that does not gets."""

from __future__ import annotations

import copy
import json
from typing import Any

from ...core.resources import data_dir

REF = "#/components/schemas/"
RUN_ID_PATTERN = "^[A-Za-z0-9][A-Za-z0-9._:-]{0,63}$"
NO_NUL = "^[^\\u0000]*$"  # PostgreSQL cannot store U+0000 in text or jsonb
_V1 = "https://flux-agent.invalid/schemas/v1/"
_OL = "https://flux-agent.invalid/schemas/openlineage/"
_OL_PREFIX = "OpenLineage"


def _load(*parts: str) -> dict[str, Any]:
    with data_dir("schemas").joinpath(*parts).open() as fh:
        schema: dict[str, Any] = json.load(fh)
    schema.pop("$schema", None)
    schema.pop("$id", None)
    return schema


def _rewrite(node: Any, refs: dict[str, str]) -> Any:
    """``$ref`` values rewritten: exact matches, then by prefix (pointers into documents)."""
    if isinstance(node, dict):
        out = {}
        for key, value in node.items():
            if key == "$ref" and isinstance(value, str):
                for old, new in refs.items():
                    if value == old or value.startswith(old + "#"):
                        value = new + value[len(old):].removeprefix("#")
                        break
                out[key] = value
            else:
                out[key] = _rewrite(value, refs)
        return out
    if isinstance(node, list):
        return [_rewrite(v, refs) for v in node]
    return node


def _no_nul(schema: dict[str, Any], *names: str) -> dict[str, Any]:
    """``schema`` with the string properties ``names`` refusing U+0000."""
    out = copy.deepcopy(schema)
    for name in names:
        out["properties"][name] = {**out["properties"][name], "pattern": NO_NUL}
    return out


def rule(status: int, code: str, text: str) -> dict[str, Any]:
    """One rule of an operation that its schemas cannot state."""
    return {"status": status, "code": code, "rule": text}


NUL_RULE = rule(422, "NUL_CHARACTER", "No string anywhere in the body (payload, state or "
                "RunEvent included, keys too) may hold U+0000: PostgreSQL cannot store it.")
DEPTH_RULE = rule(400, "NESTING_TOO_DEEP", "A body nests arrays and objects at most 200 "
                  "levels deep.")


def components() -> dict[str, Any]:
    """Every schema the agent validates request bodies with, as OpenAPI components."""
    refs = {_V1 + "payload.schema.json": REF + "Payload",
            "payload.schema.json": REF + "Payload",
            _V1 + "step-event.schema.json": REF + "StepEvent",
            _OL + "FluxRunFacet.json": REF + "FluxRunFacet"}
    event = _no_nul(_rewrite(_load("v1", "step-event.schema.json"), refs),
                    "step", "provider", "model")
    event["properties"]["agency"]["description"] = (
        "If sent, the caller's agency; else 403 DATA_ISOLATION_ERROR.")
    checkpoint = _no_nul(_load("v1", "checkpoint.schema.json"),
                         "step", "provider", "model", "status")
    out: dict[str, Any] = {"StepEvent": event, "Payload": _load("v1", "payload.schema.json"),
                           "CheckpointSave": checkpoint}
    # OpenLineage: the bundled RunEvent's $defs, each a component of its own.
    run_event = _load("openlineage", "RunEvent-2-0-2.schema.json")
    defs = run_event.pop("$defs")
    local = {f"#/$defs/{name}": f"{REF}{_OL_PREFIX}{name}" for name in defs}
    for name, schema in defs.items():
        out[_OL_PREFIX + name] = _rewrite(schema, local)
    out["FluxRunFacet"] = _rewrite(_load("openlineage", "FluxRunFacet.json"), refs)
    out["LineageRunEvent"] = {
        "description": "An OpenLineage RunEvent (core spec 2-0-2) as flux takes it: run.runId "
                       "must be a flux run id (a UUID is), eventTime an RFC 3339 date-time "
                       "with an offset; the optional run facet `flux` says what OpenLineage "
                       "cannot (kind, step, content_type, use_case). At most "
                       "FLUX_AGENT_LINEAGE_MAX_BYTES, decoded and as canonical JSON.",
        "allOf": [
            {"$ref": f"{REF}{_OL_PREFIX}RunEvent"},
            {"type": "object", "properties": {"run": {"type": "object", "properties": {
                "runId": {"type": "string", "pattern": RUN_ID_PATTERN},
                "facets": {"type": "object", "properties": {
                    "flux": {"$ref": REF + "FluxRunFacet"}}}}}}},
        ],
    }
    return out
