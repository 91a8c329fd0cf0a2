"""Canonical JSON is byte-for-byte json.dumps(sort_keys=True, separators=(",", ":"))."""

from __future__ import annotations

import hashlib
import json
from typing import Any

from hypothesis import given, settings
from hypothesis import strategies as st

from flux_agent.digest import JsonDecoder, canonical_json, float_is_plain, payload_digest

json_values = st.recursive(
    st.none()
    | st.booleans()
    | st.integers(min_value=-(2**70), max_value=2**70)
    | st.floats(allow_nan=False, allow_infinity=False)
    | st.text(),
    lambda children: st.lists(children, max_size=5)
    | st.dictionaries(st.text(max_size=8), children, max_size=5),
    max_leaves=30,
)


def reference(obj: Any) -> bytes:
    return json.dumps(obj, sort_keys=True, separators=(",", ":")).encode()


@settings(max_examples=1500, deadline=None)
@given(json_values)
def test_canonical_json_equals_json_dumps(obj: Any):
    assert canonical_json(obj) == reference(obj)


@settings(max_examples=500, deadline=None)
@given(json_values)
def test_decoder_float_tracking_keeps_the_fast_path_exact(obj: Any):
    """What the request path does: decode with JsonDecoder, hash with its float flag."""
    decoder = JsonDecoder()
    decoded = decoder.decode(json.dumps(obj).encode())
    assert canonical_json(decoded, plain_floats=decoder.plain_floats) == reference(decoded)


@settings(max_examples=2000, deadline=None)
@given(st.floats(allow_nan=False, allow_infinity=False))
def test_plain_floats_are_printed_alike(value: float):
    if float_is_plain(value):
        assert canonical_json(value, plain_floats=True) == reference(value)


def test_known_differences_fall_back():
    for value in (1e16, 1.5e-5, 1e300, 5e-324, {"é": "ü"}, "\u2028", "\x7f", "😀", "\ud800"):
        assert canonical_json(value) == reference(value)


def test_digest_is_sha256_of_canonical_bytes():
    data, digest = payload_digest({"b": 1, "a": [1.5, "x"]})
    assert data == b'{"a":[1.5,"x"],"b":1}'
    assert digest == hashlib.sha256(b'{"a":[1.5,"x"],"b":1}').hexdigest()
