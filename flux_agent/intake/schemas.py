"""The contract in force: the bundled envelope, the payload schemas per event kind (the
operator's ``FLUX_AGENT_SCHEMA_DIR``, else the profile's), the agency manifest; loaded and
checked here (reading files: call it off the event loop), swapped whole on a reload.

Profiles (``FLUX_AGENT_SCHEMA_PROFILE``):

- ``neutral`` (the default): any agency slug, any JSON object as payload;
- ``flux``: the Flux contract the project grew from: five agencies (``schemas/v1/
  agencies.json``) and its payload schema (``schemas/profiles/flux/``: ``run.started``
  declares ``content_type`` and ``use_case``).

A schema directory holds JSON Schema 2020-12 files: ``<kind>.json`` (``run.started.json``)
for one kind, ``payload.json`` for every kind without a file of its own; any other
``.json`` file is there to be referenced (``{"$ref": "common.json#/$defs/..."}``). Nothing is
ever fetched: a reference that leaves the directory and the bundled schemas is an error.
"""

from __future__ import annotations

import json
import logging
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from datetime import timedelta
from pathlib import Path
from typing import Any
from urllib.parse import urljoin

import jsonschema_rs

from ..core.digest import MAX_DEPTH, TooDeep, check_depth
from ..core.errors import too_deep, violation
from ..core.event import KINDS
from ..core.resources import data_dir

log = logging.getLogger("flux_agent.intake")

SCHEMA_VERSION = "v1"
PROFILES = ("neutral", "flux")
DRAFT_2020_12 = "https://json-schema.org/draft/2020-12/schema"
FALLBACK = "payload.json"
DEFAULT_RETENTION_DAYS = 30
SERVED_MAX = 10_000  # agencies remembered for retention beyond the manifest's


# (last property name, failed keyword) -> error code. Keyword alone as a fallback.
_CODES: Mapping[tuple[str, str], str] = {
    ("agency", "pattern"): "INVALID_AGENCY_SLUG",
    ("agency", "maxLength"): "INVALID_AGENCY_SLUG",
    ("content_type", "enum"): "INVALID_CONTENT_TYPE",
    ("use_case", "enum"): "INVALID_USE_CASE",
    ("kind", "enum"): "INVALID_KIND",
    ("run_id", "pattern"): "INVALID_RUN_ID",
    ("event_id", "format"): "INVALID_EVENT_ID",
    ("occurred_at", "format"): "INVALID_TIMESTAMP",
    ("payload_sha256", "pattern"): "INVALID_PAYLOAD_SHA256",
    ("payload_jcs_sha256", "pattern"): "INVALID_PAYLOAD_SHA256",
}
KEYWORD_CODES: Mapping[str, str] = {
    "required": "MISSING_FIELD",
    "additionalProperties": "UNKNOWN_FIELD",
    "type": "WRONG_TYPE",
    "format": "INVALID_FORMAT",
    "enum": "INVALID_VALUE",
    "const": "INVALID_VALUE",
    "minimum": "OUT_OF_RANGE",
    "maximum": "OUT_OF_RANGE",
    "pattern": "INVALID_FORMAT",
    "minLength": "INVALID_LENGTH",
    "maxLength": "INVALID_LENGTH",
}


def explain_with(validator: Any, doc: Any, prefix: Sequence[str | int] | None = None,
                 max_depth: int = MAX_DEPTH + 1) -> list[dict[str, str]]:
    """Every violation of ``doc`` against ``validator``, with JSON pointers (after
    ``prefix``, where ``doc`` sits in the request body) and codes.

    The validator converts the document it explains (only up to 255 levels), so a document
    deeper than ``max_depth`` (a payload or state at the limit, plus its envelope) is
    refused first, as too deep (400); a valid one is not walked at all."""
    prefix = list(prefix or ())
    if validator.is_valid(doc):
        return []
    try:
        check_depth(doc, max_depth)
    except TooDeep as exc:
        raise too_deep(pointer([*prefix, *exc.path]), MAX_DEPTH) from None
    out = []
    for err in validator.iter_errors(doc):
        path: list[str | int] = [*prefix, *err.instance_path]
        keyword = err.kind.name
        if keyword == "required":
            path.append(err.kind.property)
        last = next((p for p in reversed(path) if isinstance(p, str)), "")
        code = _CODES.get((last, keyword)) or KEYWORD_CODES.get(keyword, "SCHEMA_VIOLATION")
        out.append(violation(pointer(path), err.message, code))
    return out


def pointer(parts: Sequence[str | int]) -> str:
    """A JSON pointer (RFC 6901) from path parts."""
    return "".join("/" + str(p).replace("~", "~0").replace("/", "~1") for p in parts)


def load_json(path: Path) -> Any:
    with path.open("rb") as fh:
        return json.load(fh)


class SchemaError(ValueError):
    """A schema or manifest that cannot be used: ``setting`` names where it came from."""

    def __init__(self, setting: str, message: str) -> None:
        super().__init__(message)
        self.setting = setting
        self.message = message


@dataclass(frozen=True, slots=True)
class Manifest:
    """The agencies served and their retention (days). Unrestricted (no manifest): every
    agency slug is served, with the default retention."""

    retention_days: Mapping[str, int] = field(default_factory=dict)
    default_retention_days: int = DEFAULT_RETENTION_DAYS
    restricted: bool = False
    source: str = "none: every agency is served"

    def knows(self, agency: str) -> bool:
        return not self.restricted or agency in self.retention_days

    def retention(self, agency: str) -> timedelta:
        return timedelta(days=self.retention_days.get(agency, self.default_retention_days))

    def refusal(self, agency: str) -> str:
        return (f"{agency!r} is not in the agency manifest ({self.source}); list it there, "
                "or set FLUX_AGENT_AGENCY_MANIFEST to a manifest that does")


def bundled() -> Path:
    """The bundled ``schemas`` directory."""
    return data_dir("schemas")


def _bundled_registry(root: Path) -> list[tuple[str, Any]]:
    """Every bundled v1 document under its ``$id``, so that a payload schema may build on
    them (the flux profile's do)."""
    out = []
    for path in sorted((root / SCHEMA_VERSION).glob("*.json")):
        doc = load_json(path)
        if isinstance(doc, dict) and isinstance(doc.get("$id"), str):
            out.append((doc["$id"], doc))
    return out


def load_manifest(path: Path, setting: str = "FLUX_AGENT_AGENCY_MANIFEST",
                  root: Path | None = None) -> Manifest:
    """A manifest file, checked against its schema; a SchemaError names the file."""
    root = root or bundled()
    schema = jsonschema_rs.validator_for(
        load_json(root / SCHEMA_VERSION / "agency-manifest.schema.json"), validate_formats=True)
    try:
        data = load_json(path)
    except (OSError, ValueError) as exc:
        raise SchemaError(setting, f"cannot read the agency manifest {path}: {exc}") from None
    problems = [f"{pointer(list(e.instance_path)) or '/'}: {e.message}"
                for e in schema.iter_errors(data)]
    if problems:
        raise SchemaError(setting, f"the agency manifest {path} is invalid: "
                          f"{'; '.join(problems)}")
    default = int(data.get("default_retention_days", DEFAULT_RETENTION_DAYS))
    return Manifest({a["slug"]: int(a.get("retention_days", default)) for a in data["agencies"]},
                    default, restricted=True, source=str(path))


def load_payload_schemas(directory: Path, setting: str = "FLUX_AGENT_SCHEMA_DIR",
                         root: Path | None = None) -> dict[str, Any]:
    """The compiled payload validator of every kind ``directory`` has a schema for (its
    ``<kind>.json``, else its ``payload.json``). Each file must be JSON Schema 2020-12;
    a SchemaError names the file and what is wrong with it."""
    root = root or bundled()
    if not directory.is_dir():
        raise SchemaError(setting, f"{directory} is not a directory")
    docs: dict[Path, Any] = {}
    for path in sorted(directory.glob("*.json")):
        try:
            doc = load_json(path)
        except OSError as exc:
            raise SchemaError(setting, f"cannot read {path}: {exc.strerror}") from None
        except ValueError as exc:
            raise SchemaError(setting, f"{path} is not JSON: {exc}") from None
        if not isinstance(doc, dict | bool):
            raise SchemaError(setting, f"{path}: a schema is a JSON object (or true/false)")
        if isinstance(doc, dict):
            declared = doc.get("$schema", DRAFT_2020_12)
            if not isinstance(declared, str) or declared.rstrip("#") != DRAFT_2020_12:
                raise SchemaError(setting, f"{path}: \"$schema\" is {declared!r}; payload "
                                  f"schemas are JSON Schema 2020-12 ({DRAFT_2020_12})")
            try:
                jsonschema_rs.meta.validate(doc)
            except (jsonschema_rs.ValidationError, jsonschema_rs.ReferencingError) as exc:
                raise SchemaError(setting, f"{path} is not a valid JSON Schema: "
                                  f"{_first_line(exc)}") from None
        docs[path] = doc
    uris = {path: _uri(path, doc) for path, doc in docs.items()}
    try:
        registry = jsonschema_rs.Registry(
            [*_bundled_registry(root), *((uris[p], d) for p, d in docs.items())])
    except (jsonschema_rs.ReferencingError, ValueError) as exc:
        raise SchemaError(setting, _unresolved(exc, docs, uris)) from None
    referenced = {urljoin(uris[p], ref).split("#")[0] for p, d in docs.items()
                  for ref in _refs(d)}
    compiled: dict[str, Any] = {}
    for path, doc in docs.items():
        name = path.name[:-len(".json")]
        if name not in KINDS and path.name != FALLBACK:
            if uris[path] not in referenced:  # a typo such as run_started.json
                log.warning("a payload schema file is neither an event kind's nor "
                            "payload.json, and no other file refers to it: it is not used",
                            extra={"fields": {"path": str(path), "setting": setting}})
            continue  # there to be referenced
        try:
            compiled[name] = jsonschema_rs.Draft202012Validator(
                doc, registry=registry, base_uri=uris[path], offline=True,
                validate_formats=True)
        except (jsonschema_rs.ValidationError, jsonschema_rs.ReferencingError,
                ValueError) as exc:
            raise SchemaError(setting, f"{path}: {_first_line(exc)}") from None
    fallback = compiled.pop("payload", None)
    return {kind: compiled.get(kind, fallback) for kind in sorted(KINDS)
            if compiled.get(kind, fallback) is not None}


def _unresolved(exc: BaseException, docs: Mapping[Path, Any], uris: Mapping[Path, str]) -> str:
    """Which file holds the reference that resolves to nothing (nothing is fetched)."""
    missing = re.search(r"Resource '([^']+)'", str(exc))
    if missing is not None:
        for path, doc in docs.items():
            refs = [urljoin(uris[path], ref).split("#")[0] for ref in _refs(doc)]
            if missing.group(1) in refs:
                return (f"{path}: the reference to {missing.group(1)} resolves to no file of "
                        "the directory nor a bundled schema (nothing is fetched)")
    return f"a reference resolves to nothing (nothing is fetched): {_first_line(exc)}"


def _refs(doc: Any) -> list[str]:
    if isinstance(doc, dict):
        own = [doc["$ref"]] if isinstance(doc.get("$ref"), str) else []
        return own + [r for value in doc.values() for r in _refs(value)]
    if isinstance(doc, list):
        return [r for value in doc for r in _refs(value)]
    return []


def _uri(path: Path, doc: Any) -> str:
    declared = doc.get("$id") if isinstance(doc, dict) else None
    if isinstance(declared, str) and "://" in declared:
        return declared
    return path.resolve().as_uri()


def _first_line(exc: BaseException) -> str:
    return (str(exc).strip().splitlines() or [type(exc).__name__])[0]


def profile_manifest(profile: str, manifest_path: Path | None = None,
                     root: Path | None = None) -> Manifest:
    """The agency manifest in force: the file given, else the profile's."""
    if manifest_path is not None:
        return load_manifest(manifest_path, root=root)
    if profile == "flux":
        root = root or bundled()
        manifest = load_manifest(root / SCHEMA_VERSION / "agencies.json",
                                 "FLUX_AGENT_SCHEMA_PROFILE", root)
        return Manifest(manifest.retention_days, manifest.default_retention_days,
                        restricted=True, source="the flux profile's")
    return Manifest()


class Schemas:
    """The compiled schemas and the agency manifest, as one configuration says.

    ``profile`` chooses the bundled defaults; ``schema_dir`` replaces the profile's payload
    schemas, ``manifest_path`` its manifest. ``root`` is the bundled ``schemas`` directory."""

    def __init__(self, schema_dir: Path | None = None, manifest_path: Path | None = None, *,
                 profile: str = "neutral", root: Path | None = None) -> None:
        if profile not in PROFILES:
            raise SchemaError("FLUX_AGENT_SCHEMA_PROFILE",
                              f"expected one of {', '.join(PROFILES)}, got {profile!r}")
        root = root or bundled()
        self.profile = profile
        self.event = jsonschema_rs.validator_for(
            load_json(root / SCHEMA_VERSION / "step-event.schema.json"), validate_formats=True)
        self.checkpoint = jsonschema_rs.validator_for(
            load_json(root / SCHEMA_VERSION / "checkpoint.schema.json"), validate_formats=True)
        if schema_dir is not None:
            self.payloads = load_payload_schemas(schema_dir, root=root)
            self.payload_source = str(schema_dir)
        elif profile == "flux":
            self.payloads = load_payload_schemas(root / "profiles" / "flux",
                                                 "FLUX_AGENT_SCHEMA_PROFILE", root)
            self.payload_source = "the flux profile"
        else:
            self.payloads = {}
            self.payload_source = "none: any JSON object"
        self.manifest = profile_manifest(profile, manifest_path, root)

    def explain(self, event: Any, prefix: Sequence[str | int] = (),
                max_depth: int = MAX_DEPTH + 1) -> list[dict[str, str]]:
        """Every violation of one event, with JSON pointers into the request body: its
        envelope, then its payload against the schema of its kind."""
        problems = explain_with(self.event, event, prefix, max_depth)
        if isinstance(event, dict) and isinstance(event.get("payload"), dict):
            validator = self.payloads.get(str(event.get("kind")))
            if validator is not None:
                problems += explain_with(validator, event["payload"], [*prefix, "payload"],
                                         max_depth - 1)
        return problems

    explain_with = staticmethod(explain_with)

    def payload_for(self, kind: str) -> Any:
        """The payload validator of ``kind`` (None: any JSON object)."""
        return self.payloads.get(kind)

    def describe(self) -> dict[str, Any]:
        """Where the schemas in force come from, for logs."""
        return {"profile": self.profile, "payload_schemas": self.payload_source,
                "payload_kinds": sorted(self.payloads),
                "agency_manifest": self.manifest.source,
                "agencies": len(self.manifest.retention_days) if self.manifest.restricted
                else "any"}


class Contract:
    """The schemas in force, replaced whole by a reload (requests in flight keep the one
    they started with), and the agencies served beyond the manifest's, for retention."""

    def __init__(self, schemas: Schemas) -> None:
        self.schemas = schemas
        self._served: dict[str, None] = {}

    def replace(self, schemas: Schemas) -> None:
        self.schemas = schemas

    def knows(self, agency: str) -> bool:
        return self.schemas.manifest.knows(agency)

    def serve(self, agency: str) -> None:
        """Remember an agency served (bounded), so retention purges its rows too."""
        if agency not in self._served and len(self._served) < SERVED_MAX:
            self._served[agency] = None

    def retention(self, agency: str) -> timedelta:
        self.serve(agency)
        return self.schemas.manifest.retention(agency)

    def retention_days(self) -> dict[str, int]:
        """Every agency retention applies to: the manifest's, and those served here (with
        the default retention when the manifest does not list them)."""
        manifest = self.schemas.manifest
        out = dict.fromkeys(self._served, manifest.default_retention_days)
        out.update(manifest.retention_days)
        return out
