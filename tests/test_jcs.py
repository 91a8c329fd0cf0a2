"""RFC 8785 (JCS) payload hashes from producers in other languages.

The agent's canonical form is Python's json.dumps; a producer in JavaScript, Go or the JVM
sends the standard form's hash as ``payload_jcs_sha256`` instead. Checked against the RFC's
own vectors, against an independent implementation in Python (``rfc8785``, by hypothesis)
and in JavaScript (npm ``canonicalize``, run by node), and end to end: a Node producer's
events, hashed by ``canonicalize``, are accepted by a live agent, including docs/events.md's
example as written."""

from __future__ import annotations

import json
import os
import re
import shutil
import struct
import subprocess
from pathlib import Path
from typing import Any

import pytest
import rfc8785
from hypothesis import example, given, settings
from hypothesis import strategies as st

from flux_agent import Agent
from flux_agent.core.digest import canonical_json, sha256_hex
from flux_agent.core.jcs import Unrepresentable, jcs, number
from flux_agent.testing import make_event

from .support.http import assert_problem, get, post
from .support.postgres import Database
from .support.profiles import examples
from .support.tools import unavailable

ROOT = Path(__file__).resolve().parent.parent
EVENTS_PAGE = (ROOT / "docs" / "events.md").read_text()  # the producers' examples
CANONICALIZE = "canonicalize@2.1.0"  # .ci/run installs it; FLUX_TEST_NODE_MODULES names where

# RFC 8785 Appendix B: IEEE-754 doubles (hex) and their canonical text.
APPENDIX_B = {
    "0000000000000000": "0", "8000000000000000": "0", "0000000000000001": "5e-324",
    "8000000000000001": "-5e-324", "7fefffffffffffff": "1.7976931348623157e+308",
    "ffefffffffffffff": "-1.7976931348623157e+308", "4340000000000000": "9007199254740992",
    "c340000000000000": "-9007199254740992", "4430000000000000": "295147905179352830000",
    "44b52d02c7e14af5": "9.999999999999997e+22", "44b52d02c7e14af6": "1e+23",
    "44b52d02c7e14af7": "1.0000000000000001e+23", "444b1ae4d6e2ef4e": "999999999999999700000",
    "444b1ae4d6e2ef4f": "999999999999999900000", "444b1ae4d6e2ef50": "1e+21",
    "3eb0c6f7a0b5ed8c": "9.999999999999997e-7", "3eb0c6f7a0b5ed8d": "0.000001",
    "41b3de4355555553": "333333333.3333332", "41b3de4355555554": "333333333.33333325",
    "41b3de4355555555": "333333333.3333333", "41b3de4355555556": "333333333.3333334",
    "41b3de4355555557": "333333333.33333343", "becbf647612f3696": "-0.0000033333333333333333",
    "43143ff3c1cb0959": "1424953923781206.2",
}


def test_rfc_8785_number_vectors():
    for bits, text in APPENDIX_B.items():
        assert number(struct.unpack(">d", bytes.fromhex(bits))[0]) == text, bits


def test_rfc_8785_examples():
    # Section 3.2.2 (the input of 3.2.1, decoded): strings and numbers.
    value = {"numbers": [333333333.33333329, 1e30, 4.50, 2e-3, 0.000000000000000000000000001],
             "string": "\u20ac$\u000f\u000aA'\u0042\u0022\u005c\\\"/",
             "literals": [None, True, False]}
    assert jcs(value) == ('{"literals":[null,true,false],"numbers":[333333333.3333333,1e+30,'
                          '4.5,0.002,1e-27],"string":"\u20ac$\\u000f\\nA\'B\\"\\\\\\\\\\"/"}'
                          ).encode()
    # Section 3.2.3: members sorted by UTF-16 code units (not code points).
    value = {"\u20ac": "Euro Sign", "\r": "Carriage Return", "\ufb33": "Hebrew Letter Dalet "
             "With Dagesh", "1": "One", "\U0001f600": "Emoji: Grinning Face",
             "\u0080": "Control", "\u00f6": "Latin Small Letter O With Diaeresis"}
    assert [json.loads(f'"{k}"') for k in re.findall(r'"((?:[^"\\]|\\.)*)":', jcs(
        value).decode())] == ["\r", "1", "\u0080", "\u00f6", "\u20ac", "\U0001f600",
                               "\ufb33"]


def test_what_jcs_cannot_represent_is_named():
    with pytest.raises(Unrepresentable) as caught:
        jcs({"a": [1, {"started_ns": 1733583600123456789}]})
    assert caught.value.path == ["a", 1, "started_ns"]
    assert "1733583600123456800" in caught.value.reason  # what JCS would have written
    with pytest.raises(Unrepresentable):
        jcs({"big": 10**400})
    with pytest.raises(Unrepresentable) as caught:
        jcs({"s": ["ok", "\ud800"]})
    assert caught.value.path == ["s", 1]
    # Integers a double holds and JCS writes as the same number are fine, as JavaScript
    # writes them.
    assert jcs([2**53, -(2**53), 1733583600123456800, 10**21]) == (
        b"[9007199254740992,-9007199254740992,1733583600123456800,1e+21]")


# What the request decoder yields: I-JSON values (no lone surrogates; integers in the safe
# range, where rfc8785 and JCS agree; every finite double).
safe_json = st.recursive(
    st.none() | st.booleans()
    | st.integers(min_value=-(2**53) + 1, max_value=2**53 - 1)
    | st.floats(allow_nan=False, allow_infinity=False)
    | st.text(),
    lambda children: st.lists(children, max_size=5)
    | st.dictionaries(st.text(max_size=8), children, max_size=5),
    max_leaves=30,
)


@settings(max_examples=examples(3000))
@given(safe_json)
@example({"\U0001f600": 1, "\ufb33": 2, "\u20ac": [1e21, 1e-7, -0.0, 5e-324]})
@example("\u2028\x7f\x1f\"\\/")
def test_equals_rfc8785(value: Any):
    assert jcs(value) == rfc8785.dumps(value)


# ---------------------------------------------------------------- node and `canonicalize`


def node_canonicalize() -> tuple[str, Path]:
    """node, and the directory holding npm's canonicalize (FLUX_TEST_NODE_MODULES, as .ci/run
    installs it)."""
    node = shutil.which("node")
    if node is None:
        unavailable("node", "node is not installed (Debian: apt-get install nodejs npm)")
    modules = Path(os.environ.get("FLUX_TEST_NODE_MODULES",
                                  ROOT / ".ci" / "node" / "node_modules"))
    if not (modules / "canonicalize" / "package.json").is_file():
        unavailable("node", f"npm's canonicalize is not in {modules} (npm install --prefix "
                    f"{modules.parent} {CANONICALIZE}; or set FLUX_TEST_NODE_MODULES)")
    return node, modules


_NODE_CANONICALIZE = r"""
const canonicalize = require("canonicalize");
const { createHash } = require("node:crypto");
const lines = require("node:fs").readFileSync(0, "utf8").split("\n").filter(l => l.length);
const out = lines.map(line => {
  const text = canonicalize(JSON.parse(line));
  return JSON.stringify([text, createHash("sha256").update(text).digest("hex")]);
});
process.stdout.write(out.join("\n") + "\n");
"""


def canonicalize_in_node(texts: list[str]) -> list[tuple[str, str]]:
    """npm canonicalize's output and its SHA-256 for each JSON text, as a Node producer
    computes them (JSON.parse, then canonicalize)."""
    node, modules = node_canonicalize()
    done = subprocess.run([node, "-e", _NODE_CANONICALIZE], input="\n".join(texts),
                          capture_output=True, text=True, timeout=60, check=True,
                          env={**os.environ, "NODE_PATH": str(modules)})
    # "\n" only: JSON.stringify leaves U+2028 unescaped, and str.splitlines() splits there.
    return [tuple(json.loads(line)) for line in done.stdout.split("\n") if line]


any_json = st.recursive(
    st.none() | st.booleans()
    | st.integers(min_value=-(2**64), max_value=2**64)
    | st.floats(allow_nan=False, allow_infinity=False)
    | st.text(),
    lambda children: st.lists(children, max_size=5)
    | st.dictionaries(st.text(max_size=8), children, max_size=5),
    max_leaves=30,
)


def test_equals_canonicalize_in_node():
    """Thousands of values, each sent to node as JSON text (so numbers reach JavaScript as
    any producer's would): where JCS can represent the value, the bytes are node's; where it
    cannot, JavaScript's own reading changed the number."""
    values: list[Any] = []

    @settings(max_examples=examples(3000), database=None)
    @given(any_json)
    def collect(value: Any) -> None:
        values.append(value)

    collect()
    values += [{"\U0001f600": 1, "\ufb33": 2}, [1e21, 1e-7, 1e-6, -0.0, 5e-324, 2**53 + 2],
               "\u2028\x7f\x1f\"\\/\u00e9", 1733583600123456800, 2.5e16]
    texts = [json.dumps(v, ensure_ascii=i % 2 == 0) for i, v in enumerate(values)]
    theirs = canonicalize_in_node(texts)
    assert len(theirs) == len(values)
    compared = 0
    for value, (text, digest) in zip(values, theirs, strict=True):
        try:
            mine = jcs(value)
        except Unrepresentable:
            assert json.loads(text) != value  # JavaScript could not hold it either
            continue
        assert mine == text.encode(), value
        assert sha256_hex(mine) == digest
        compared += 1
    assert compared > len(values) * 0.8


# ---------------------------------------------------------------- through a live agent

PAYLOAD_CLASSES = {
    "ascii": {"items_processed": 3, "note": "plain"},
    "non-ascii": {"title": "Café ☕ — Zürich", "tags": ["日本語", "ελληνικά"]},
    "emoji and member order": {"\U0001f600": 1, "\ufb33": 2, "\u20ac": 3, "a": 4},
    "escapes": {"text": "line\nbreak\ttab \"quoted\" back\\slash \u0001 \u007f \u2028"},
    "floats": {"ratio": 0.1, "tiny": 1e-7, "small": 0.000001, "third": 1 / 3, "neg": -2.5},
    "big numbers": {"bytes_total": 2.5e16, "huge": 1e21, "limit": 9007199254740991,
                    "from_js": 1733583600123456800},
    "negative zero and integral floats": {"zero": -0.0, "one": 1.0, "million": 1e6},
    "nested": {"a": [{"b": [1, 2.5, {"c": None}]}, [], {}], "d": {"e": {"f": True}}},
}


async def test_node_producers_hashes_are_accepted(agent: Agent, database: Database):
    """The eight payload classes of issue 27 (today's form accepted four of them): each
    event carries the hash node computed with canonicalize; the agent accepts it and stores
    its own Python-form payload_sha256, as before."""
    texts = [json.dumps(p) for p in PAYLOAD_CLASSES.values()]
    hashed = canonicalize_in_node(texts)
    events = []
    for (name, payload), (_, digest) in zip(PAYLOAD_CLASSES.items(), hashed, strict=True):
        events.append(make_event(payload=payload, payload_jcs_sha256=digest,
                                 run_id="node-" + name.replace(" ", "-")))
    status, body, _ = await post(agent.endpoints.event_url + "/v1/events", events,
                                 headers={"Prefer": "wait=committed"})
    assert status == 200, body
    assert body["accepted"] == len(PAYLOAD_CLASSES)
    stored = {r["event_id"]: r["payload_sha256"] for r in await database.fetch(
        "SELECT event_id::text, payload_sha256 FROM flux.events")}
    for event in events:
        decoded = json.loads(json.dumps(event["payload"]))
        assert stored[event["event_id"]] == sha256_hex(canonical_json(decoded))
        # Both hashes at once: both are checked.
    both = make_event(payload=PAYLOAD_CLASSES["floats"],
                      payload_jcs_sha256=hashed[4][1],
                      payload_sha256=sha256_hex(canonical_json(PAYLOAD_CLASSES["floats"])))
    status, body, _ = await post(agent.endpoints.event_url + "/v1/events", both)
    assert status == 202, body


async def test_wrong_and_unrepresentable_jcs_hashes_are_refused(agent: Agent):
    url = agent.endpoints.event_url + "/v1/events"
    payload = {"note": "Café"}
    right = sha256_hex(jcs(payload))
    python_form = sha256_hex(canonical_json(payload))
    assert right != python_form  # the two forms differ for non-ASCII text
    # The Python form's hash sent as the JCS hash (or the reverse) is a mismatch, named.
    status, body, headers = await post(url, make_event(payload=payload,
                                                       payload_jcs_sha256=python_form))
    assert_problem(status, body, headers, 422, "PAYLOAD_HASH_MISMATCH")
    assert body["errors"][0]["pointer"] == "/payload_jcs_sha256"
    assert right in body["errors"][0]["message"]
    status, body, headers = await post(url, make_event(payload=payload, payload_sha256=right))
    assert_problem(status, body, headers, 422, "PAYLOAD_HASH_MISMATCH")
    assert body["errors"][0]["pointer"] == "/payload_sha256"
    assert "payload_jcs_sha256" in body["errors"][0]["message"]  # says where JCS goes
    # An integer no double holds: JCS would hash another number than the one stored.
    events = [make_event(payload={"ok": 1}),
              make_event(payload={"started_ns": 1733583600123456789, "b": 2.5e16},
                         payload_jcs_sha256="0" * 64)]
    status, body, headers = await post(url, events)
    assert_problem(status, body, headers, 422, "JCS_UNREPRESENTABLE")
    [error] = body["errors"]
    assert error["pointer"] == "/1/payload/started_ns"
    assert "1733583600123456800" in error["message"]
    # Without a JCS hash the same payload is accepted (the Python form is exact).
    status, body, _ = await post(url, make_event(
        payload={"started_ns": 1733583600123456789, "b": 2.5e16}))
    assert status == 202, body
    # Not a hash at all.
    status, body, headers = await post(url, make_event(payload=payload,
                                                       payload_jcs_sha256=right.upper()))
    assert_problem(status, body, headers, 422, "INVALID_PAYLOAD_SHA256")


async def test_the_openapi_document_describes_the_field(agent: Agent):
    status, doc, _ = await get(agent.endpoints.event_url + "/openapi.json")
    assert status == 200
    field = doc["components"]["schemas"]["StepEvent"]["properties"]["payload_jcs_sha256"]
    assert field["pattern"] == "^[0-9a-f]{64}$"


def readme_example(language: str) -> str:
    """docs/events.md's hashing example in ``language`` (the block after its marker)."""
    marker = f"<!-- jcs-example: {language} -->"
    assert marker in EVENTS_PAGE
    block = EVENTS_PAGE[EVENTS_PAGE.index(marker):]
    start = block.index("```" + language) + len("```" + language)
    return block[start:block.index("```", start)]


async def test_the_readme_javascript_example_runs_as_written(agent: Agent, database: Database):
    node, modules = node_canonicalize()
    script = readme_example("js")
    env = {**os.environ, "NODE_PATH": str(modules),
           "FLUX_AGENT_URL": agent.endpoints.event_url}
    import asyncio

    done = await asyncio.to_thread(subprocess.run, [node, "-e", script], env=env,
                                   capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stdout + done.stderr
    answer = json.loads(done.stdout.strip().splitlines()[-1])
    assert answer["accepted"] == 1, answer
    assert "payload_jcs_sha256" in script and "canonicalize" in script


def test_the_readme_go_example_uses_the_field():
    example_go = readme_example("go")
    assert "jcs.Transform" in example_go and "payload_jcs_sha256" in example_go
    assert "sha256.Sum256" in example_go
