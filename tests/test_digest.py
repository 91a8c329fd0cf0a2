"""Canonical JSON is byte-for-byte json.dumps(sort_keys=True, separators=(",", ":"))."""

from __future__ import annotations

import hashlib
import json
from typing import Any

import msgspec
import pytest
from hypothesis import example, given, settings
from hypothesis import strategies as st

from flux_agent.core.digest import MAX_DEPTH, TooDeep, canonical_json, floats_plain, payload_digest

from .support.profiles import examples

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


@settings(max_examples=examples(2000))
@given(json_values)
@example({"a": 1e16, "b": [1.5e-5, 1e-7], "c": "2e5 and 0.00001 inside a string"})
@example({"é": "ü", "x": "\u2028\x7f😀"})
@example(-0.00001)
def test_canonical_json_equals_json_dumps(obj: Any):
    assert canonical_json(obj) == reference(obj)


@settings(max_examples=examples(1000))
@given(json_values)
def test_what_the_request_decoder_yields_hashes_like_json_dumps(obj: Any):
    """The request path: msgspec decodes the body, then the payload is hashed."""
    decoded = msgspec.json.decode(json.dumps(obj).encode())
    assert canonical_json(decoded) == reference(decoded)


@settings(max_examples=examples(3000))
@given(st.floats(allow_nan=False, allow_infinity=False))
def test_every_float_alone_and_in_a_container(value: float):
    assert canonical_json(value) == reference(value)
    assert canonical_json({"v": [value, value]}) == reference({"v": [value, value]})


def test_known_differences_fall_back():
    for value in (1e16, 1.5e-5, 1e300, 5e-324, 1e-7, {"é": "ü"}, "\u2028", "\x7f", "😀",
                  "\ud800", [0.00001, 10.00001]):
        assert canonical_json(value) == reference(value)


def test_digest_is_sha256_of_canonical_bytes():
    data, digest = payload_digest({"b": 1, "a": [1.5, "x"]})
    assert data == b'{"a":[1.5,"x"],"b":1}'
    assert digest == hashlib.sha256(b'{"a":[1.5,"x"],"b":1}').hexdigest()


def nested(levels: int, kind: type = list) -> Any:
    value: Any = 1
    for _ in range(levels):
        value = [value] if kind is list else {"k": value}
    return value


def test_the_depth_limit_is_exact_and_names_the_path():
    for kind in (list, dict):
        assert canonical_json(nested(MAX_DEPTH, kind)) == reference(nested(MAX_DEPTH, kind))
        with pytest.raises(TooDeep) as caught:
            canonical_json(nested(MAX_DEPTH + 1, kind))
        assert caught.value.limit == MAX_DEPTH
        assert caught.value.path == [0 if kind is list else "k"] * MAX_DEPTH
    # The first branch too deep, wherever it is; the others are not reported.
    value = {"a": [1, {"b": 2.5}], "z": [1, nested(MAX_DEPTH + 5)]}
    with pytest.raises(TooDeep) as caught:
        canonical_json(value)
    assert caught.value.path[:3] == ["z", 1, 0] and len(caught.value.path) == MAX_DEPTH
    for limit in (1, 2, 3):
        for depth in range(6):
            if depth <= limit:
                floats_plain(nested(depth), limit)
            else:
                with pytest.raises(TooDeep):
                    floats_plain(nested(depth), limit)


def test_no_depth_costs_a_frame_and_the_limit_leaves_room_for_any_caller():
    """The walk is iterative: 100,000 levels cost it no recursion (it stops at the limit
    without a RecursionError). At the limit, both encoders (which do recurse, in C) still
    work from a caller already 600 frames deep, far more than a request handler's stack."""
    with pytest.raises(TooDeep):
        canonical_json(nested(100_000))

    def deep_caller(frames: int) -> bytes:
        if frames:
            return deep_caller(frames - 1)
        out = canonical_json([*nested(MAX_DEPTH - 1), 1e-7])  # json.dumps' path too
        assert out == reference([*nested(MAX_DEPTH - 1), 1e-7])
        return canonical_json(nested(MAX_DEPTH, dict))

    assert deep_caller(600).startswith(b'{"k":')
