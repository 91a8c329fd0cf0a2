"""Canonical JSON and SHA-256 (pure).

The contract: canonical JSON is byte-for-byte ``json.dumps(obj, sort_keys=True,
separators=(",", ":"))``, because producers already hash that way. msgspec produces the same
bytes about five times faster as long as the output is plain ASCII (``json.dumps`` escapes
everything outside space..tilde as ``\\uXXXX``) and no float needs an exponent (the two
libraries switch to exponent notation at different magnitudes and spell it differently). The
fast path is taken only when both hold; everything else goes through ``json.dumps`` itself.
``tests/test_digest.py`` proves the two paths identical with hypothesis.
"""

from __future__ import annotations

import hashlib
import json
from typing import Any

import msgspec

_sorted = msgspec.json.Encoder(order="sorted")
_DEL = b"\x7f"
# What a NUL character (which PostgreSQL's text and jsonb cannot store) looks like in
# canonical JSON.
NUL_ESCAPE = b"\\u0000"
_SCALARS = (str, int, bool, type(None))


def floats_plain(obj: Any) -> bool:
    """True when no float in ``obj`` needs an exponent in ``repr()`` (below 1e-4 or from
    1e16 up), i.e. when msgspec and ``json.dumps`` print every float alike. Walking the
    decoded value costs about half a microsecond for a typical payload, much less than
    searching the encoded bytes."""
    kind = type(obj)
    if kind is float:
        magnitude = abs(obj)
        return bool(magnitude == 0.0 or 1e-4 <= magnitude < 1e16)
    if kind is dict:
        values = obj.values()
    elif kind is list:
        values = obj
    else:
        return True
    for value in values:
        if type(value) in _SCALARS:
            continue
        if not floats_plain(value):
            return False
    return True


def canonical_json(obj: Any) -> bytes:
    """Canonical JSON bytes of a JSON-compatible value."""
    if floats_plain(obj):
        try:
            out = _sorted.encode(obj)
        except (TypeError, UnicodeEncodeError, OverflowError):
            out = b""  # lone surrogates and the like: let json.dumps decide
        if out and out.isascii() and _DEL not in out:
            return out
    return json.dumps(obj, sort_keys=True, separators=(",", ":")).encode("ascii")


def sha256_hex(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def payload_digest(obj: Any) -> tuple[bytes, str]:
    """Canonical bytes and their SHA-256 hex, the pair every event and checkpoint carries."""
    data = canonical_json(obj)
    return data, hashlib.sha256(data).hexdigest()
