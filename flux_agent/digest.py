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


def float_is_plain(value: float) -> bool:
    """True when ``repr(value)`` has no exponent, so msgspec prints it identically."""
    magnitude = abs(value)
    return magnitude == 0.0 or 1e-4 <= magnitude < 1e16


def _floats_plain(obj: Any) -> bool:
    if isinstance(obj, float):
        return float_is_plain(obj)
    if isinstance(obj, dict):
        return all(_floats_plain(v) for v in obj.values())
    if isinstance(obj, list):
        return all(_floats_plain(v) for v in obj)
    return True


def canonical_json(obj: Any, *, plain_floats: bool | None = None) -> bytes:
    """Canonical JSON bytes of a JSON-compatible value.

    ``plain_floats`` lets a caller that already knows the value holds no exponent-form float
    (the request decoder records it while parsing) skip the walk that checks it.
    """
    if plain_floats is None:
        plain_floats = _floats_plain(obj)
    if plain_floats:
        try:
            out = _sorted.encode(obj)
        except (TypeError, UnicodeEncodeError, OverflowError):
            out = b""  # lone surrogates and the like: let json.dumps decide
        if out and out.isascii() and _DEL not in out:
            return out
    return json.dumps(obj, sort_keys=True, separators=(",", ":")).encode("ascii")


def sha256_hex(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def payload_digest(obj: Any, *, plain_floats: bool | None = None) -> tuple[bytes, str]:
    """Canonical bytes and their SHA-256 hex, the pair every event and checkpoint carries."""
    data = canonical_json(obj, plain_floats=plain_floats)
    return data, hashlib.sha256(data).hexdigest()


class JsonDecoder:
    """msgspec JSON decoding that also notes whether any float needs an exponent.

    Not thread-safe: one per event loop. Out-of-range numbers (``1e400``) are refused, as
    they have no JSON representation to hash.
    """

    __slots__ = ("_decoder", "plain_floats")

    def __init__(self) -> None:
        self.plain_floats = True
        self._decoder = msgspec.json.Decoder(float_hook=self._float)

    def _float(self, text: str) -> float:
        value = float(text)
        if value != value or value in (float("inf"), float("-inf")):
            raise ValueError(f"number out of range: {text}")
        if self.plain_floats and not float_is_plain(value):
            self.plain_floats = False
        return value

    def decode(self, data: bytes) -> Any:
        self.plain_floats = True
        return self._decoder.decode(data)
