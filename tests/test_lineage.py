"""OpenLineage intake (``POST /api/v1/lineage``): the RunEvent -> flux event mapping, its
validation with JSON pointers, and end to end with the real openlineage-python client against
a real agent (JWT auth, gzip on and off, a real 503 that the client retries)."""

from __future__ import annotations

import asyncio
import copy
import hashlib
import json
import shutil
import time
import uuid
from collections.abc import AsyncIterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import attr
import jwt
import pytest
import requests
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import rsa
from openlineage.client import OpenLineageClient, facet_v2
from openlineage.client.event_v2 import InputDataset, Job, OutputDataset, Run, RunEvent, RunState
from openlineage.client.generated import base as ol_base
from openlineage.client.serde import Serde
from openlineage.client.transport.http import (
    ApiKeyTokenProvider,
    HttpCompression,
    HttpConfig,
    HttpTransport,
)
from openlineage.client.uuid import generate_new_uuid

from flux_agent import Agent
from flux_agent.core.digest import canonical_json
from flux_agent.core.errors import ValidationError
from flux_agent.core.event import Seal
from flux_agent.core.ids import id_time
from flux_agent.intake.openlineage import (
    FLUX_FACET_REF,
    FLUX_STARTED_DEFAULTS,
    Lineage,
    bounded_step,
    event_id_for,
    run_event_digest,
)
from flux_agent.intake.validate import EventChecker, Schemas, parse_timestamp
from flux_agent.testing import make_event

from .support.agents import agent_config
from .support.capture import remember_secret
from .support.faults import TcpProxy
from .support.http import assert_problem, post
from .support.polling import wait_until
from .support.postgres import Database, proxied

ISSUER = "https://idp.flux.test"
AUDIENCE = "flux-agent"
PRODUCER = "https://github.com/example/etl/tree/1.0.0"
SCHEMA_URL = "https://openlineage.io/spec/2-0-2/OpenLineage.json#/$defs/RunEvent"
REPO_SCHEMAS = Path(__file__).resolve().parent.parent / "schemas"


# --------------------------------------------------------------------------- building blocks


def facet(**fields: Any) -> dict[str, Any]:
    return {"_producer": PRODUCER,
            "_schemaURL": "https://openlineage.io/spec/facets/1-0-0/Some.json#/$defs/Some",
            **fields}


def run_event(event_type: str | None = "START", run_id: str | None = None,
              **extra: Any) -> dict[str, Any]:
    """A RunEvent as a client sends it, with a few standard and custom facets."""
    doc: dict[str, Any] = {
        "eventTime": "2026-11-23T07:00:00.123456+00:00",
        "producer": PRODUCER,
        "schemaURL": SCHEMA_URL,
        "run": {
            "runId": run_id or "0190f0b2-2f6c-7c3e-9d4a-1234567890ab",
            "facets": {
                "nominalTime": facet(nominalStartTime="2026-11-23T07:00:00Z"),
                "acme_custom": facet(nested={"list": [1, 2.5, None, True, "é"]}),
            },
        },
        "job": {
            "namespace": "nightly",
            "name": "images.extract",
            "facets": {"sql": facet(query="SELECT 1"), "jobType": facet(
                processingType="BATCH", integration="SPARK", jobType="JOB")},
        },
        "inputs": [{"namespace": "s3://bucket", "name": "raw/images",
                    "facets": {"schema": facet(fields=[{"name": "id", "type": "int"}])},
                    "inputFacets": {"stats": facet(rowCount=10)}}],
        "outputs": [{"namespace": "postgres://db:5432", "name": "public.images",
                     "outputFacets": {"outputStatistics": facet(rowCount=10, size=1024)}}],
    }
    if event_type is not None:
        doc["eventType"] = event_type
    doc.update(extra)
    return doc


def lineage_id(doc: dict[str, Any]) -> str:
    """The flux event id of a RunEvent, from its digest and eventTime."""
    return event_id_for(run_event_digest(doc), parse_timestamp(doc["eventTime"]))


def flux_facet(**fields: Any) -> dict[str, Any]:
    return {"_producer": PRODUCER, "_schemaURL": FLUX_FACET_REF, **fields}


def with_flux_facet(doc: dict[str, Any], **fields: Any) -> dict[str, Any]:
    doc["run"]["facets"]["flux"] = flux_facet(**fields)
    return doc


@pytest.fixture(scope="module")
def lineage() -> Lineage:
    return Lineage()


@pytest.fixture(scope="module")
def checker() -> EventChecker:
    """The flux profile's validation: the contract these mappings were written for."""
    return EventChecker(Schemas(profile="flux"), event_max_bytes=256 * 1024)


def seal() -> Seal:
    now = datetime.now(UTC)
    return Seal(agency="nasa", received_at=now, correlation_id="c-1", agent_id="test",
                trace_id=None, span_id=None, expires_at=now + timedelta(days=30))


def problems(lineage: Lineage, doc: Any) -> ValidationError:
    with pytest.raises(ValidationError) as info:
        lineage.to_events(doc)
    return info.value


# --------------------------------------------------------------------------- mapping


@pytest.mark.parametrize(
    ("event_type", "kind"),
    [
        ("START", "run.started"),
        ("RUNNING", "step.completed"),
        ("COMPLETE", "run.completed"),
        ("FAIL", "run.failed"),
        ("ABORT", "run.aborted"),
        ("OTHER", "step.completed"),
        (None, "step.completed"),
    ],
)
def test_every_event_type_maps_to_one_flux_event(lineage: Lineage, checker: EventChecker,
                                                 event_type: str | None, kind: str):
    doc = run_event(event_type)
    neutral = lineage.to_events(doc)  # the default profile adds nothing to run.started
    assert "content_type" not in neutral[0]["payload"]
    assert EventChecker(Schemas(), 256 * 1024).rows(neutral, seal(), batch=False)
    events = lineage.to_events(doc, FLUX_STARTED_DEFAULTS)
    assert len(events) == 1
    event = events[0]
    assert set(event) <= {"event_id", "run_id", "kind", "step", "occurred_at", "provider",
                          "model", "payload", "payload_sha256", "agency"}
    assert "agency" not in event
    assert event["kind"] == kind
    assert event["run_id"] == doc["run"]["runId"]
    assert event["step"] == "nightly/images.extract"
    assert event["occurred_at"] == doc["eventTime"]
    payload = event["payload"]
    assert payload["event_type"] == event_type
    assert payload["job"] == {"namespace": "nightly", "name": "images.extract"}
    assert payload["producer"] == PRODUCER
    assert payload["inputs"] == [{"namespace": "s3://bucket", "name": "raw/images"}]
    assert payload["outputs"] == [{"namespace": "postgres://db:5432", "name": "public.images"}]
    if kind == "run.started":
        assert (payload["content_type"], payload["use_case"]) == ("mixed", "analytics")
    else:
        assert "content_type" not in payload
        assert "use_case" not in payload
    # The mapped event passes the agent's own envelope and payload validation.
    rows = checker.rows(events, seal(), batch=False)
    assert len(rows) == 1
    assert rows[0][3] == kind


def test_facets_and_unknown_members_pass_through_untouched(lineage: Lineage):
    doc = run_event("COMPLETE", extraTopLevel={"kept": True})
    doc["run"]["facets"]["weird"] = facet(**{"a/b~c": [{"deep": {"er": [[], {}]}}], "f": 1e-7})
    doc["job"]["facets"]["ownership"] = facet(owners=[{"name": "team:etl", "type": "TEAM"}])
    original = copy.deepcopy(doc)
    [event] = lineage.to_events(doc)
    assert doc == original, "the caller's document was changed"
    assert event["payload"]["openlineage"] == original
    assert canonical_json(event["payload"]["openlineage"]) == canonical_json(original)
    assert event["payload"]["openlineage_sha256"] == hashlib.sha256(
        canonical_json(original)).hexdigest()


def test_the_flux_facet_chooses_kind_step_and_run_metadata(lineage: Lineage,
                                                           checker: EventChecker):
    started = with_flux_facet(run_event("RUNNING"), kind="step.started", step="resize",
                              provider="openai", model="gpt-image-1", items_processed=7,
                              duration_ms=12.5)
    [event] = lineage.to_events(started)
    assert (event["kind"], event["step"]) == ("step.started", "resize")
    assert (event["provider"], event["model"]) == ("openai", "gpt-image-1")
    assert event["payload"]["items_processed"] == 7
    assert event["payload"]["duration_ms"] == 12.5
    checkpoint = with_flux_facet(run_event("OTHER"), kind="checkpoint.saved")
    assert lineage.to_events(checkpoint)[0]["kind"] == "checkpoint.saved"
    # The eventType of a transition wins over the facet's kind.
    done = with_flux_facet(run_event("COMPLETE"), kind="step.started")
    assert lineage.to_events(done)[0]["kind"] == "run.completed"
    # A run.started declares its content type and use case through the facet.
    start = with_flux_facet(run_event("START"), content_type="images", use_case="vr")
    [event] = lineage.to_events(start)
    assert (event["payload"]["content_type"], event["payload"]["use_case"]) == ("images", "vr")
    checker.rows(lineage.to_events(start) + lineage.to_events(started), seal(), batch=True)


def test_failure_message_and_parent_run_are_extracted(lineage: Lineage):
    doc = run_event("FAIL")
    doc["run"]["facets"]["errorMessage"] = facet(message="disk full", programmingLanguage="PY")
    doc["run"]["facets"]["parent"] = facet(
        run={"runId": "0190f0b2-0000-7000-8000-000000000001"},
        job={"namespace": "nightly", "name": "dag"})
    [event] = lineage.to_events(doc)
    assert event["kind"] == "run.failed"
    assert event["payload"]["error"] == "disk full"
    assert event["payload"]["parent_run_id"] == "0190f0b2-0000-7000-8000-000000000001"


def test_event_ids_are_deterministic_uuids_of_the_run_event(lineage: Lineage):
    doc = run_event("START")
    first = lineage.to_events(doc)[0]
    again = lineage.to_events(copy.deepcopy(doc))[0]
    assert first == again
    # Key order and whitespace do not matter: the id is over canonical JSON.
    reordered = json.loads(json.dumps(doc, sort_keys=True, indent=3)[::-1][::-1])
    reordered = dict(reversed(list(reordered.items())))
    assert lineage.to_events(reordered)[0]["event_id"] == first["event_id"]
    # Any change to the RunEvent is another event.
    later = run_event("START", eventTime="2026-11-23T07:00:01Z")
    assert lineage.to_events(later)[0]["event_id"] != first["event_id"]
    other_run = run_event("START", run_id="0190f0b2-2f6c-7c3e-9d4a-1234567890ac")
    assert lineage.to_events(other_run)[0]["event_id"] != first["event_id"]
    # A UUIDv7 of the RunEvent's eventTime and its own SHA-256: verifiable from the stored
    # payload, and in the time partition of flux.events of its eventTime.
    parsed = uuid.UUID(first["event_id"])
    assert parsed.version == 7
    assert parsed.variant == uuid.RFC_4122
    digest = run_event_digest(doc)
    assert first["payload"]["openlineage_sha256"] == digest
    assert lineage_id(doc) == first["event_id"]
    assert id_time(first["event_id"]) == datetime(2026, 11, 23, 7, 0, 0, 123000, tzinfo=UTC)
    # Before 1970 there is no v7 time: a UUIDv8 of the digest (an unkeyed partition).
    old = run_event("START", eventTime="1969-07-20T20:17:40Z")
    assert uuid.UUID(lineage.to_events(old)[0]["event_id"]).version == 8


def test_long_job_names_make_a_bounded_stable_step(lineage: Lineage):
    doc = run_event("RUNNING")
    doc["job"]["name"] = "x" * 300
    [event] = lineage.to_events(doc)
    step = event["step"]
    assert len(step) == 128
    assert step.startswith("nightly/xxx")
    assert step == bounded_step("nightly/" + "x" * 300)
    assert bounded_step("nightly/" + "x" * 299) != step
    assert bounded_step("short") == "short"


# --------------------------------------------------------------------------- validation


@pytest.mark.parametrize(
    ("name", "mutate", "code", "pointers"),
    [
        ("missing run.runId", lambda d: d["run"].pop("runId"), "MISSING_FIELD",
         {"/run/runId"}),
        ("missing job", lambda d: d.pop("job"), "MISSING_FIELD", {"/job"}),
        ("missing eventTime and producer",
         lambda d: (d.pop("eventTime"), d.pop("producer")), "MISSING_FIELD",
         {"/eventTime", "/producer"}),
        ("bad eventTime", lambda d: d.update(eventTime="yesterday"), "INVALID_TIMESTAMP",
         {"/eventTime"}),
        ("eventTime without offset", lambda d: d.update(eventTime="2026-11-23T07:00:00"),
         "INVALID_TIMESTAMP", {"/eventTime"}),
        ("leap second", lambda d: d.update(eventTime="2026-12-31T23:59:60Z"),
         "INVALID_TIMESTAMP", {"/eventTime"}),
        ("runId not a UUID", lambda d: d["run"].update(runId="run 1"), "INVALID_RUN_ID",
         {"/run/runId"}),
        ("wrong types",
         lambda d: (d.update(run=5, inputs={}), d["job"].update(name=3)), "WRONG_TYPE",
         {"/run", "/inputs", "/job/name"}),
        ("runId a number", lambda d: d["run"].update(runId=7), "WRONG_TYPE", {"/run/runId"}),
        ("facets not an object", lambda d: d["run"].update(facets=[]), "WRONG_TYPE",
         {"/run/facets"}),
        ("unknown eventType", lambda d: d.update(eventType="DONE"), "INVALID_EVENT_TYPE",
         {"/eventType"}),
        ("facet without base members",
         lambda d: d["job"]["facets"].update(sql={"query": "SELECT 1"}), "MISSING_FIELD",
         {"/job/facets/sql/_producer", "/job/facets/sql/_schemaURL"}),
        ("dataset without name", lambda d: d["outputs"][0].pop("name"), "MISSING_FIELD",
         {"/outputs/0/name"}),
        ("producer not a URI", lambda d: d.update(producer="my etl"), "INVALID_FORMAT",
         {"/producer"}),
        ("bad flux facet",
         lambda d: with_flux_facet(d, kind="run.started", content_type="pics"),
         "SCHEMA_VIOLATION", {"/run/facets/flux/kind", "/run/facets/flux/content_type"}),
        ("NUL character", lambda d: d["job"]["facets"]["sql"].update(query="a\x00b"),
         "NUL_CHARACTER", {"/job/facets/sql/query"}),
    ],
)
def test_invalid_run_events_name_every_violation(lineage: Lineage, name: str, mutate: Any,
                                                 code: str, pointers: set[str]):
    doc = run_event("START")
    mutate(doc)
    err = problems(lineage, doc)
    assert err.status == 422, name
    assert err.code == code, err.errors
    assert {e["pointer"] for e in err.errors} == pointers, err.errors
    for e in err.errors:
        assert set(e) == {"pointer", "message", "code"}
        assert e["message"]


@pytest.mark.parametrize("body", [[run_event()], "START", 42, None, True])
def test_a_body_that_is_not_an_object_is_a_400(lineage: Lineage, body: Any):
    err = problems(lineage, body)
    assert err.status == 400
    assert err.code == "WRONG_TYPE"
    assert err.errors == [{"pointer": "", "message": "a RunEvent must be a JSON object",
                           "code": "WRONG_TYPE"}]


def test_static_dataset_and_job_events_are_refused(lineage: Lineage):
    job_event = {"eventTime": "2026-11-23T07:00:00Z", "producer": PRODUCER,
                 "schemaURL": "https://openlineage.io/spec/2-0-2/OpenLineage.json#/$defs/"
                              "JobEvent", "job": {"namespace": "a", "name": "b"}}
    dataset_event = {"eventTime": "2026-11-23T07:00:00Z", "producer": PRODUCER,
                     "schemaURL": SCHEMA_URL, "dataset": {"namespace": "a", "name": "b"}}
    for doc in (job_event, dataset_event):
        err = problems(lineage, doc)
        assert (err.status, err.code) == (422, "NOT_A_RUN_EVENT")


def test_schemas_are_never_fetched(tmp_path: Path):
    shutil.copytree(REPO_SCHEMAS, tmp_path / "schemas")
    facet_file = tmp_path / "schemas" / "openlineage" / "FluxRunFacet.json"
    schema = json.loads(facet_file.read_text())
    schema["properties"]["remote"] = {"$ref": "http://127.0.0.1:9/never.json"}
    facet_file.write_text(json.dumps(schema))
    started = time.monotonic()
    with pytest.raises(ValueError, match="never fetched"):
        Lineage(tmp_path / "schemas")
    assert time.monotonic() - started < 5


def test_the_bundled_schema_agrees_with_the_installed_client(lineage: Lineage):
    """Drift guard: the pinned RunEvent schema says what openlineage-python's generated model
    (made from the official spec) says, and the client's own events are valid."""
    schema = json.loads((REPO_SCHEMAS / "openlineage" / "RunEvent-2-0-2.schema.json")
                        .read_text())
    defs = schema["$defs"]
    assert RunEvent._get_schema() == SCHEMA_URL  # the client speaks core spec 2-0-2
    run_event_props = defs["RunEvent"]["allOf"][1]["properties"]
    assert run_event_props["eventType"]["enum"] == [s.value for s in RunState]

    def required(cls: type) -> set[str]:
        return {a.name for a in attr.fields(cls)
                if a.default is attr.NOTHING and a.init and not a.name.startswith("_")}

    assert required(ol_base.Run) == set(defs["Run"]["required"])
    assert required(ol_base.Job) == set(defs["Job"]["required"])
    assert required(ol_base.Dataset) == set(defs["Dataset"]["required"])
    assert required(ol_base.RunEvent) == {"eventTime", "run", "job"}
    assert set(defs["BaseEvent"]["properties"]) == {
        a.name for a in attr.fields(ol_base.BaseEvent)}
    assert set(defs["BaseFacet"]["properties"]) == {
        a.name for a in attr.fields(ol_base.BaseFacet)}
    event = client_event(RunState.FAIL, str(generate_new_uuid()), with_facets=True)
    doc = json.loads(Serde.to_json(event))
    assert lineage.to_events(doc)[0]["kind"] == "run.failed"


# --------------------------------------------------------------------------- the real client


@attr.define
class FluxRunFacet(facet_v2.RunFacet):
    """flux's custom run facet, as a client would declare it."""

    kind: str | None = attr.field(default=None)
    step: str | None = attr.field(default=None)
    content_type: str | None = attr.field(default=None)
    use_case: str | None = attr.field(default=None)

    @staticmethod
    def _get_schema() -> str:
        return FLUX_FACET_REF


def client_event(state: RunState, run_id: str, *, with_facets: bool = False,
                 run_facets: dict[str, Any] | None = None) -> RunEvent:
    facets: dict[str, Any] = dict(run_facets or {})
    job_facets: dict[str, Any] = {}
    inputs: list[InputDataset] = []
    outputs: list[OutputDataset] = []
    if with_facets:
        facets["nominalTime"] = facet_v2.nominal_time_run.NominalTimeRunFacet(
            nominalStartTime="2026-11-23T07:00:00Z")
        facets["errorMessage"] = facet_v2.error_message_run.ErrorMessageRunFacet(
            message="boom", programmingLanguage="python", stackTrace="Traceback ...")
        facets["parent"] = facet_v2.parent_run.ParentRunFacet(
            run=facet_v2.parent_run.Run(runId=str(generate_new_uuid())),
            job=facet_v2.parent_run.Job(namespace="nightly", name="dag"))
        job_facets["sql"] = facet_v2.sql_job.SQLJobFacet(query="SELECT * FROM raw")
        job_facets["jobType"] = facet_v2.job_type_job.JobTypeJobFacet(
            processingType="BATCH", integration="PYTHON", jobType="TASK")
        inputs = [InputDataset(namespace="s3://bucket", name="raw/images", facets={
            "schema": facet_v2.schema_dataset.SchemaDatasetFacet(fields=[
                facet_v2.schema_dataset.SchemaDatasetFacetFields(name="id", type="int")])})]
        outputs = [OutputDataset(namespace="postgres://db", name="public.images", outputFacets={
            "outputStatistics": facet_v2.output_statistics_output_dataset
            .OutputStatisticsOutputDatasetFacet(rowCount=10, size=2048)})]
    return RunEvent(
        eventType=state,
        eventTime=datetime.now(UTC).isoformat(),
        run=Run(runId=run_id, facets=facets),
        job=Job(namespace="nightly", name="images.extract", facets=job_facets),
        producer=PRODUCER,
        inputs=inputs,
        outputs=outputs,
    )


class RecordingTransport(HttpTransport):
    """The client's own HTTP transport; remembers each body it sent and each final answer."""

    def __init__(self, config: HttpConfig) -> None:
        super().__init__(config)
        self.sent: list[dict[str, Any]] = []
        self.headers: list[dict[str, str]] = []
        self.answers: list[tuple[int, Any]] = []

    def _prepare_request(self, event_str: str) -> tuple[bytes | str, dict[str, str]]:
        body, headers = super()._prepare_request(event_str)
        self.sent.append(json.loads(event_str))
        self.headers.append({k: v for k, v in headers.items() if k != "Authorization"})
        return body, headers

    def emit(self, event: Any) -> Any:
        resp = super().emit(event)
        self.answers.append((resp.status_code, resp.json()))
        return resp


def make_client(url: str, token: str, *, gzip: bool,
                retry: dict[str, Any] | None = None) -> tuple[OpenLineageClient,
                                                              RecordingTransport]:
    config = HttpConfig(
        url=url,
        auth=ApiKeyTokenProvider({"apiKey": token}),  # sends "Authorization: Bearer <key>"
        compression=HttpCompression.GZIP if gzip else None,
        timeout=30.0,
        retry=retry or {"total": 3, "connect": 3, "read": 3, "backoff_factor": 0.1,
                        "status_forcelist": [500, 502, 503, 504],
                        "allowed_methods": ["POST"]},
    )
    transport = RecordingTransport(config)
    client = OpenLineageClient(
        transport=transport,
        config={"facets": {"source_code_location": {"disabled": True}}},
    )
    return client, transport


@pytest.fixture(autouse=True)
def _no_openlineage_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    import os

    for name in list(os.environ):
        if name.startswith("OPENLINEAGE"):
            monkeypatch.delenv(name)


@pytest.fixture(scope="module")
def rsa_key() -> rsa.RSAPrivateKey:
    key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    remember_secret(key.private_bytes(serialization.Encoding.PEM,
                                      serialization.PrivateFormat.PKCS8,
                                      serialization.NoEncryption()))
    return key


def token(key: rsa.RSAPrivateKey, **claims: Any) -> str:
    now = int(time.time())
    body = {"iss": ISSUER, "sub": "etl@nasa.gov", "agency": "nasa", "role": "operator",
            "iat": now, "exp": now + 600, "aud": AUDIENCE, **claims}
    minted = jwt.encode(body, key, algorithm="RS256")
    remember_secret(minted)
    return minted


def jwt_config(database: Database, state_dir: Path, key: rsa.RSAPrivateKey,
               **overrides: Any) -> Any:
    key_file = state_dir / "idp.pem"
    key_file.write_bytes(key.public_key().public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo))
    return agent_config(database, state_dir, auth="jwt", agency="",
                        jwt_algorithms=("RS256",), jwt_issuers=(ISSUER,),
                        jwt_audience=AUDIENCE, jwt_public_key_file=str(key_file), **overrides)


@pytest.fixture
async def jwt_agent(database: Database, state_dir: Path, rsa_key) -> AsyncIterator[Agent]:
    # The flux profile: run.started events get its content_type and use_case defaults.
    async with Agent(jwt_config(database, state_dir, rsa_key,
                                schema_profile="flux")) as running:
        yield running


async def stored(database: Database, run_ids: list[str]) -> list[dict[str, Any]]:
    rows = await database.fetch(
        "SELECT agency_id, event_id, run_id, kind, step, occurred_at, payload, payload_sha256 "
        "FROM flux.events WHERE run_id = ANY($1::text[]) ORDER BY occurred_at", run_ids)
    out = []
    for r in rows:
        row = dict(r)
        row["event_id"] = str(row["event_id"])
        row["payload"] = json.loads(row["payload"])
        out.append(row)
    return out


async def wait_for_rows(database: Database, run_ids: list[str], count: int,
                        timeout: float = 20) -> list[dict[str, Any]]:
    async def landed() -> bool:
        return len(await stored(database, run_ids)) >= count

    assert await wait_until(landed, timeout), "the RunEvents did not reach PostgreSQL"
    await asyncio.sleep(0.2)  # a late duplicate would show up now
    return await stored(database, run_ids)


def check_rows_match(rows: list[dict[str, Any]], sent: list[dict[str, Any]]) -> None:
    """Every RunEvent sent is stored exactly once, unchanged, with a hash that verifies."""
    assert len(rows) == len(sent)
    by_id = {r["event_id"]: r for r in rows}
    assert len(by_id) == len(rows)
    for doc in sent:
        digest = hashlib.sha256(canonical_json(doc)).hexdigest()
        row = by_id[lineage_id(doc)]
        assert row["agency_id"] == "nasa"
        assert row["payload"]["openlineage"] == doc
        stored_digest = hashlib.sha256(canonical_json(row["payload"]["openlineage"])).hexdigest()
        assert stored_digest == row["payload"]["openlineage_sha256"] == digest
        assert row["payload_sha256"] == hashlib.sha256(
            canonical_json(row["payload"])).hexdigest()
        assert row["run_id"] == doc["run"]["runId"]


@pytest.mark.parametrize("gzip", [False, True], ids=["plain", "gzip"])
async def test_real_openlineage_client_end_to_end(jwt_agent: Agent, database: Database,
                                                  rsa_key, gzip: bool):
    assert jwt_agent.endpoints.event_url is not None
    client, transport = make_client(jwt_agent.endpoints.event_url, token(rsa_key), gzip=gzip)
    good, bad = str(generate_new_uuid()), str(generate_new_uuid())
    events = [
        client_event(RunState.START, good, with_facets=True),
        client_event(RunState.RUNNING, good, run_facets={
            "flux": FluxRunFacet(kind="step.started", step="resize")}),
        client_event(RunState.COMPLETE, good),
        client_event(RunState.FAIL, bad, with_facets=True),
    ]
    for event in events:
        await asyncio.to_thread(client.emit, event)
        await asyncio.sleep(0.002)  # distinct eventTimes, in order
    client.close()
    assert [h.get("Content-Encoding") for h in transport.headers] == (
        ["gzip"] * 4 if gzip else [None] * 4)
    for (status, body), doc in zip(transport.answers, transport.sent, strict=True):
        assert status == 201, body
        assert body == {"accepted": 1, "duplicates": 0, "event_ids": [lineage_id(doc)]}
    rows = await wait_for_rows(database, [good, bad], 4)
    check_rows_match(rows, transport.sent)
    assert [(r["run_id"], r["kind"], r["step"]) for r in rows] == [
        (good, "run.started", "nightly/images.extract"),
        (good, "step.started", "resize"),
        (good, "run.completed", "nightly/images.extract"),
        (bad, "run.failed", "nightly/images.extract"),
    ]
    assert rows[0]["payload"]["content_type"] == "mixed"
    assert rows[3]["payload"]["error"] == "boom"


async def test_the_same_run_event_twice_is_stored_once(jwt_agent: Agent, database: Database,
                                                       rsa_key):
    assert jwt_agent.endpoints.event_url is not None
    url = jwt_agent.endpoints.event_url + "/api/v1/lineage"
    headers = {"Authorization": f"Bearer {token(rsa_key)}"}
    doc = run_event("START", run_id=str(generate_new_uuid()))
    event_id = lineage_id(doc)
    status, body, _ = await post(url, doc, headers=headers)
    assert (status, body) == (201, {"accepted": 1, "duplicates": 0, "event_ids": [event_id]})
    # What a transport's retry sends: the same RunEvent (here gzipped, keys in another order).
    reordered = dict(reversed(list(doc.items())))
    status, body, _ = await post(url, reordered, headers=headers, compress=True)
    assert (status, body) == (201, {"accepted": 0, "duplicates": 1, "event_ids": [event_id]})
    status, body, resp_headers = await post(url, doc, headers={**headers,
                                                               "Prefer": "wait=committed"})
    assert status == 200, body
    assert body["duplicates"] == 1
    assert resp_headers["Preference-Applied"] == "wait=committed"
    # And the real client emitting one RunEvent object twice.
    client, transport = make_client(jwt_agent.endpoints.event_url, token(rsa_key), gzip=True)
    event = client_event(RunState.COMPLETE, doc["run"]["runId"])
    for _ in range(2):
        await asyncio.to_thread(client.emit, event)
    client.close()
    assert [b["duplicates"] for _, b in transport.answers] == [0, 1]
    assert transport.sent[0] == transport.sent[1]
    rows = await wait_for_rows(database, [doc["run"]["runId"]], 2)
    check_rows_match(rows, [doc, transport.sent[0]])


async def test_invalid_run_events_get_problem_details(jwt_agent: Agent, rsa_key):
    assert jwt_agent.endpoints.event_url is not None
    url = jwt_agent.endpoints.event_url + "/api/v1/lineage"
    headers = {"Authorization": f"Bearer {token(rsa_key)}"}
    doc = run_event("START")
    del doc["run"]["runId"]
    doc["eventTime"] = "not a time"
    status, body, resp = await post(url, doc, headers=headers, compress=True)
    assert_problem(status, body, resp, 422, "SCHEMA_VIOLATION")
    assert {(e["pointer"], e["code"]) for e in body["errors"]} == {
        ("/run/runId", "MISSING_FIELD"), ("/eventTime", "INVALID_TIMESTAMP")}
    assert body["class"] == "VALIDATION_ERROR"
    assert body["retryable"] is False

    status, body, resp = await post(url, [run_event()], headers=headers)
    assert_problem(status, body, resp, 400, "WRONG_TYPE")
    assert body["errors"][0]["pointer"] == ""

    status, body, resp = await post(url, None, raw=b'{"eventType": "START",', headers=headers)
    assert_problem(status, body, resp, 400, "MALFORMED_JSON")

    status, body, resp = await post(url, run_event(), headers={})
    assert_problem(status, body, resp, 401, "TOKEN_MISSING")

    viewer = {"Authorization": f"Bearer {token(rsa_key, role='viewer')}"}
    status, body, resp = await post(url, run_event(), headers=viewer)
    assert_problem(status, body, resp, 403, "FORBIDDEN")

    # The real client is told too: its transport raises on a 4xx (no retry).
    client, _ = make_client(jwt_agent.endpoints.event_url, token(rsa_key), gzip=False)
    naive = client_event(RunState.START, str(generate_new_uuid()))
    naive.eventTime = datetime.now().isoformat()  # no offset: not RFC 3339
    with pytest.raises(requests.HTTPError, match="422"):
        await asyncio.to_thread(client.emit, naive)
    client.close()


# --------------------------------------------------------------------------- a real 503


def lineage_answers(agent: Agent, status: int) -> float:
    value = agent.metrics.registry.get_sample_value(
        "flux_requests_total", {"route": "/api/v1/lineage", "status": str(status),
                                "agency": "nasa"})
    return value or 0.0


@pytest.mark.slow
async def test_client_retries_a_real_503_and_every_event_is_stored_once(
        database: Database, proxy: TcpProxy, state_dir: Path, rsa_key):
    config = jwt_config(proxied(database, proxy), state_dir, rsa_key,
                        spool_max_bytes=512 * 1024, spool_segment_bytes=128 * 1024,
                        request_max_bytes=64 * 1024, event_max_bytes=16 * 1024,
                        flush_retry_max=0.3)
    async with Agent(config) as agent:
        assert agent.endpoints.event_url is not None
        tok = token(rsa_key)
        headers = {"Authorization": f"Bearer {tok}"}
        events_url = agent.endpoints.event_url + "/v1/events"
        proxy.cut()  # PostgreSQL unreachable: the spool fills up
        filler: set[str] = set()
        for size in (12_000, 0):  # big events first, then small ones to leave no room
            for _ in range(500):
                batch = [make_event(payload={"pad": "x" * size}) for _ in range(4 if size
                                                                                else 1)]
                status, body, _ = await post(events_url, batch, headers=headers)
                if status == 503:
                    assert body["code"] == "SPOOL_FULL"
                    break
                assert status == 202, body
                filler.update(e["event_id"] for e in batch)
            else:
                pytest.fail("the spool never filled")
        # The client's default retry policy already retries 503; say so explicitly.
        client, transport = make_client(
            agent.endpoints.event_url, tok, gzip=True,
            retry={"total": 15, "connect": 5, "read": 5, "backoff_factor": 0.2,
                   "status_forcelist": [503], "allowed_methods": ["POST"]})
        run_id = str(generate_new_uuid())
        start = client_event(RunState.START, run_id, with_facets=True)
        emitting = asyncio.create_task(asyncio.to_thread(client.emit, start))

        async def refused() -> bool:
            return lineage_answers(agent, 503) >= 1

        assert await wait_until(refused, 20), "the agent never answered 503"
        assert not emitting.done()
        proxy.restore()  # PostgreSQL is back: the flusher drains, the spool makes room
        await asyncio.wait_for(emitting, 60)  # the client's own retry got through
        for state in (RunState.RUNNING, RunState.COMPLETE):
            await asyncio.to_thread(client.emit, client_event(state, run_id))
        client.close()
        assert [status for status, _ in transport.answers] == [201, 201, 201]
        assert lineage_answers(agent, 503) >= 1
        assert lineage_answers(agent, 201) == 3
        # One emit() per RunEvent: the 503s were answered to the transport's own retries
        # (urllib3 resends the same body), and the START landed once all the same.
        assert len(transport.sent) == 3
        rows = await wait_for_rows(database, [run_id], 3, timeout=60)
        check_rows_match(rows, transport.sent)
        assert [r["kind"] for r in rows] == ["run.started", "step.completed", "run.completed"]

        async def filler_landed() -> bool:
            ids = {str(r[0]) for r in await database.fetch("SELECT event_id FROM flux.events")}
            return filler <= ids

        assert await wait_until(filler_landed, 60)

