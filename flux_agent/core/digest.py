"""Canonical JSON and SHA-256 (pure).

The contract: canonical JSON is byte-for-byte ``json.dumps(obj, sort_keys=True,
separators=(",", ":"))``, because producers already hash that way. msgspec produces the same
bytes about five times faster as long as the output is plain ASCII (``json.dumps`` escapes
everything outside space..tilde as ``\\uXXXX``) and no float needs an exponent (the two
libraries switch to exponent notation at different magnitudes and spell it differently). The
fast path is taken only when both hold; everything else goes through ``json.dumps`` itself.
``tests/test_digest.py`` proves the two paths identical with hypothesis.

Both encoders recurse once per level of nesting, in C, within the interpreter's recursion
limit, and the decoder admits almost that many levels. So the walk that decides the path
(iterative: no depth costs it a frame) also bounds the depth: a value nested deeper than
``max_depth`` levels of arrays and objects raises :class:`TooDeep` before either encoder
starts, with the path to the first level too many.
"""

from __future__ import annotations

import hashlib
import json
from typing import Any, Final

import msgspec

# Levels of arrays and objects in one payload, checkpoint state or OpenLineage RunEvent (the
# value itself is level 1). Far beyond what data needs (Ruby's JSON parser stops at 100), and
# below what everything after the decoder can take: the encoders here (the interpreter's
# recursion limit, 1,000 frames, less the caller's stack) and the schema validator, whose
# explanation of an invalid document converts it only up to 255 levels.
MAX_DEPTH: Final = 200

_sorted = msgspec.json.Encoder(order="sorted")
_DEL = b"\x7f"
# What a NUL character (which PostgreSQL's text and jsonb cannot store) looks like in
# canonical JSON.
NUL_ESCAPE = b"\\u0000"


class TooDeep(ValueError):
    """A value nested deeper than ``limit`` levels; ``path`` (keys and indexes from the
    value's root) leads to the first array or object beyond it."""

    def __init__(self, path: list[str | int], limit: int) -> None:
        super().__init__(f"nested deeper than {limit} levels of arrays and objects")
        self.path = path
        self.limit = limit

    @property
    def pointer(self) -> str:
        """``path`` as an RFC 6901 JSON pointer."""
        return "".join("/" + str(p).replace("~", "~0").replace("/", "~1") for p in self.path)


def floats_plain(obj: Any, max_depth: int = MAX_DEPTH) -> bool:
    """True when no float in ``obj`` needs an exponent in ``repr()`` (below 1e-4 or from
    1e16 up), i.e. when msgspec and ``json.dumps`` print every float alike. Raises TooDeep
    for a value nested deeper than ``max_depth``. Walking the decoded value costs about half
    a microsecond for a typical payload, much less than searching the encoded bytes; the walk
    keeps its own stack of iterators, so depth costs no recursion."""
    kind = type(obj)
    if kind is dict:
        values = iter(obj.values())
    elif kind is list:
        values = iter(obj)
    elif kind is float:
        magnitude = abs(obj)
        return bool(magnitude == 0.0 or 1e-4 <= magnitude < 1e16)
    else:
        return True
    plain = True
    for value in values:  # the first level without the machinery: most payloads are flat
        kind = type(value)
        if kind is float:
            if plain:
                magnitude = abs(value)
                plain = magnitude == 0.0 or 1e-4 <= magnitude < 1e16
        elif kind is dict or kind is list:
            break
    else:
        return plain
    if max_depth < 2:
        raise TooDeep(_path_beyond(obj, max_depth), max_depth)
    parents: list[Any] = [values]  # the iterators of the enclosing levels
    values = iter(value.values() if kind is dict else value)
    deepest = max_depth - 1  # a container met with this many parents is one level too deep
    while True:
        for value in values:
            kind = type(value)
            if kind is float:
                if plain:
                    magnitude = abs(value)
                    plain = magnitude == 0.0 or 1e-4 <= magnitude < 1e16
            elif kind is dict or kind is list:
                if len(parents) >= deepest:
                    raise TooDeep(_path_beyond(obj, max_depth), max_depth)
                parents.append(values)
                values = iter(value.values() if kind is dict else value)
                break
        else:
            if not parents:
                return plain
            values = parents.pop()


def check_depth(obj: Any, max_depth: int = MAX_DEPTH) -> None:
    """Raise TooDeep when ``obj`` is nested deeper than ``max_depth`` (iteratively)."""
    floats_plain(obj, max_depth)


def _path_beyond(obj: Any, max_depth: int) -> list[str | int]:
    """The path to the first array or object at level ``max_depth + 1`` (only for the error:
    the walk above keeps no paths)."""
    stack: list[tuple[list[str | int], Any]] = [([], obj)]
    while stack:
        path, node = stack.pop()
        if len(path) >= max_depth:
            return path
        items: Any = node.items() if type(node) is dict else enumerate(node)
        for key, value in reversed(list(items)):
            if type(value) in (dict, list):
                stack.append(([*path, key], value))
    return []


def canonical_json(obj: Any, *, max_depth: int = MAX_DEPTH) -> bytes:
    """Canonical JSON bytes of a JSON-compatible value; TooDeep beyond ``max_depth``."""
    if floats_plain(obj, max_depth):
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
