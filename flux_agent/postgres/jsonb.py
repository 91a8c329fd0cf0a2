"""What jsonb respells in canonical JSON, and how verification undoes it (pure).

Payloads are hashed as canonical JSON (Python's ``json.dumps`` form, ``core.digest``) and
stored as ``jsonb``, which keeps values but not spellings. Decoding jsonb's text and
re-canonicalising gives back the hashed bytes, except for two kinds of number:

- a float of magnitude 1e16 or more: canonical ``2.5e+16``, jsonb ``25000000000000000``,
  which decodes as an integer;
- ``-0.0``: jsonb writes ``0.0``.

:func:`respelled` finds those numbers in the canonical text the agent hashed (a substring
test rules out nearly every payload without decoding it); the agent stores their JSON
pointers beside the payload (``flux.events.payload_hint``, ``sql/008``) and
:func:`restore` puts them back, exactly: a pointer that does not lead to what jsonb makes of
such a number fails the check instead of being believed. Rows written before the agent
recorded hints are checked by trying every way their ambiguous numbers could have been
spelled, up to a bound (:func:`matches`).
"""

from __future__ import annotations

import hashlib
import itertools
import json
import math
import re
from collections.abc import Callable, Iterator
from decimal import Decimal
from typing import Any, Final

import msgspec

UNRECORDED: Final = "unrecorded"  # payload_hint of rows stored before hints were recorded
SEARCH_LIMIT: Final = 12  # ambiguous numbers in one unrecorded payload: 2**12 spellings
_MAYBE = re.compile(r"[0-9]e\+|-0\.0(?![0-9])")
_decode = msgspec.json.Decoder().decode
Hasher = Callable[[Any], str]


class Unrestorable(ValueError):
    """A hint that does not fit the payload it was stored with."""


def _token(key: str | int) -> str:
    return str(key).replace("~", "~0").replace("/", "~1")


def _respelled_float(value: float) -> bool:
    return abs(value) >= 1e16 or (value == 0.0 and math.copysign(1.0, value) < 0.0)


def respelled(canonical: str) -> list[str] | None:
    """JSON pointers of the numbers in ``canonical`` (canonical JSON text) that jsonb
    respells; None when there are none (nearly always, and found without decoding)."""
    if "e+" not in canonical and "-0.0" not in canonical:
        return None
    if _MAYBE.search(canonical) is None:
        return None
    value = _decode(canonical)
    found: list[str] = []
    # A payload is an object; the walk keeps its own stack, however deep the value.
    stack: list[tuple[str, Any]] = [("", value)] if type(value) in (dict, list) else []
    while stack:
        where, node = stack.pop()
        items: Any = node.items() if type(node) is dict else enumerate(node)
        for key, item in items:
            kind = type(item)
            if kind is float:
                if _respelled_float(item):
                    found.append(f"{where}/{_token(key)}")
            elif kind is dict or kind is list:
                stack.append((f"{where}/{_token(key)}", item))
    return sorted(found) or None


def _as_jsonb_writes(value: float) -> str:
    """The integer text jsonb stores for a float of 1e16 or more: its canonical spelling
    (Python's repr) written out in full."""
    return format(Decimal(repr(value)), "f")


def _float_behind(value: int) -> float | None:
    """The float jsonb turned into the integer ``value``, if one did."""
    if -10**16 < value < 10**16:
        return None
    try:
        candidate = float(value)
    except OverflowError:
        return None
    return candidate if _as_jsonb_writes(candidate) == str(value) else None


def _key(parent: Any, token: str) -> Any:
    """The member name or index ``token`` names in ``parent``, which must hold it."""
    if type(parent) is dict:
        if token not in parent:
            raise KeyError(token)
        return token
    if type(parent) is list and token.isdigit() and int(token) < len(parent):
        return int(token)
    raise KeyError(token)


def _resolve(value: Any, pointer: str) -> tuple[Any, Any]:
    """The container and key an RFC 6901 pointer leads to."""
    if not pointer.startswith("/"):
        raise Unrestorable(pointer)
    parent = value
    try:
        tokens = [t.replace("~1", "/").replace("~0", "~") for t in pointer[1:].split("/")]
        for token in tokens[:-1]:
            parent = parent[_key(parent, token)]
        return parent, _key(parent, tokens[-1])
    except KeyError:
        raise Unrestorable(pointer) from None


def restore(value: Any, pointers: list[str]) -> Any:
    """``value`` (decoded from jsonb's text, integers exact) with the numbers at ``pointers``
    spelled as they were hashed; Unrestorable when one is not what jsonb makes of a float of
    1e16 or more, or of -0.0."""
    for pointer in pointers:
        parent, key = _resolve(value, pointer)
        current = parent[key]
        if type(current) is int and (original := _float_behind(current)) is not None:
            parent[key] = original
        elif type(current) is float and current == 0.0 and math.copysign(1.0, current) > 0:
            parent[key] = -0.0
        else:
            raise Unrestorable(pointer)
    return value


def _ambiguous(value: Any) -> Iterator[tuple[Any, Any, Any]]:
    """(container, key, the other spelling) of every number jsonb may have respelled."""
    stack = [value]
    while stack:
        node = stack.pop()
        items: Any = node.items() if type(node) is dict else enumerate(node)
        for key, item in items:
            kind = type(item)
            if kind is int:
                original = _float_behind(item)
                if original is not None:
                    yield node, key, original
            elif kind is float:
                if item == 0.0 and math.copysign(1.0, item) > 0:
                    yield node, key, -0.0
            elif kind is dict or kind is list:
                stack.append(item)


def decode(text: str) -> Any:
    """jsonb's text of a payload, integers exact (jsonb keeps every digit)."""
    return json.loads(text)


def matches(text: str, hint: Any, digest: str, hasher: Hasher) -> bool | None:
    """Whether the payload jsonb gave back as ``text`` is the one that hashed to ``digest``.
    ``hint`` is the stored payload_hint (None, a list of pointers, or UNRECORDED). None: an
    unrecorded payload with too many ambiguous numbers to try every spelling."""
    value = decode(text)
    if isinstance(hint, list):
        try:
            value = restore(value, hint)
        except Unrestorable:
            return False
        return hasher(value) == digest
    if hasher(value) == digest:
        return True
    if hint != UNRECORDED:
        return False
    places = list(_ambiguous(value))
    if not places:
        return False
    if len(places) > SEARCH_LIMIT:
        return None
    originals = [node[key] for node, key, _ in places]
    for choice in itertools.product((False, True), repeat=len(places)):
        if not any(choice):
            continue  # as stored: tried above
        for (node, key, other), original, flip in zip(places, originals, choice, strict=True):
            node[key] = other if flip else original
        if hasher(value) == digest:
            return True
    return False


def sha256_of(canonical: Callable[[Any], bytes]) -> Hasher:
    return lambda value: hashlib.sha256(canonical(value)).hexdigest()
