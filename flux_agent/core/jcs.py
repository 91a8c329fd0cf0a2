"""RFC 8785 JSON Canonicalization Scheme (JCS) bytes of a decoded value (pure).

The agent's own canonical form is Python's ``json.dumps`` (``digest``); producers in other
languages hash the standard form instead and send it as ``payload_jcs_sha256``. JCS is
ECMAScript's ``JSON.stringify`` with object members sorted by their UTF-16 code units:

- strings: only ``"``, ``\\`` and the C0 controls are escaped (``\\b \\t \\n \\f \\r``, else
  ``\\u00xx`` in lower case); everything else is written as UTF-8;
- numbers: IEEE-754 doubles written as ECMAScript's ``Number.prototype.toString`` does (the
  shortest digits that round-trip, exponent from 1e21 up and below 1e-6, ``-0`` as ``0``);
- literals as they are; no whitespace.

A JSON number is a double to JCS, so an integer whose JCS text would name another number
than the one stored cannot be represented: one no double holds (JavaScript itself reads
1733583600123456789 as 1733583600123456800), or one whose double is written with other
digits (2**60 is written 1152921504606847000). Such a value raises :class:`Unrepresentable`
with the path to it, as does a string that is not valid Unicode. Integers whose JCS text is
the same number (every one up to 2**53, and larger ones as a JavaScript producer writes
them, 1733583600123456800 say) are accepted.

Iterative: nesting costs no recursion (``digest.MAX_DEPTH`` bounds it, as for the agent's
own form). Only computed when a producer sends a JCS hash.
"""

from __future__ import annotations

import json
from decimal import Decimal
from typing import Any

from .digest import MAX_DEPTH, TooDeep

_string = json.encoder.encode_basestring  # JSON.stringify's escaping (C; lower-case \u00xx)
_EXACT = 2**53  # every integer up to here is a double
_INFINITE = (float("inf"), float("-inf"))


class Unrepresentable(ValueError):
    """A value JCS cannot represent; ``path`` leads to it from the value's root."""

    def __init__(self, path: list[str | int], reason: str) -> None:
        super().__init__(reason)
        self.path = path
        self.reason = reason


def number(value: float) -> str | None:
    """ECMAScript's Number::toString of a double (RFC 8785 section 3.2.2.3); None for NaN
    and the infinities, which JSON has no spelling for."""
    if value == 0.0:
        return "0"  # -0 too
    if value != value or value in _INFINITE:
        return None
    text = repr(value)  # the shortest digits that round-trip, as ECMAScript chooses them
    sign = ""
    if text[0] == "-":
        sign, text = "-", text[1:]
    mantissa, _, exponent = text.partition("e")
    whole, _, fraction = mantissa.partition(".")
    digits = whole + fraction
    point = len(whole) + (int(exponent) if exponent else 0)  # where the decimal point goes
    significant = digits.lstrip("0")
    point -= len(digits) - len(significant)
    digits = significant.rstrip("0")
    k, n = len(digits), point  # value = 0.digits * 10**n
    if k <= n <= 21:
        out = digits + "0" * (n - k)
    elif 0 < n <= 21:
        out = f"{digits[:n]}.{digits[n:]}"
    elif -6 < n <= 0:
        out = "0." + "0" * -n + digits
    else:
        e = n - 1
        out = (digits[0] + (f".{digits[1:]}" if k > 1 else "")
               + ("e+" if e >= 0 else "e-") + str(abs(e)))
    return sign + out


def integer(value: int) -> str | None:
    """The JCS text of an integer, or None when it names another number (no double holds
    ``value`` and its nearest double is written with other digits)."""
    if -_EXACT <= value <= _EXACT:
        return str(value)
    try:
        text = number(float(value))
    except OverflowError:
        return None
    if text is None or Decimal(text) != value:
        return None
    return text


def _inexact(value: int) -> str:
    text = str(value)
    shown = text if len(text) <= 40 else f"{text[:20]}... ({len(text)} digits)"
    try:
        nearest = number(float(value))
    except OverflowError:
        return f"the integer {shown} is beyond the range of an IEEE-754 double"
    return (f"the integer {shown} has no exact RFC 8785 form: a JSON number is an IEEE-754 "
            f"double there, written {nearest}")


def _utf16(item: tuple[str, Any]) -> bytes:
    return item[0].encode("utf-16-be")


def jcs(obj: Any, *, max_depth: int = MAX_DEPTH) -> bytes:
    """The RFC 8785 canonical bytes of ``obj`` (a value as the JSON decoder gives it)."""
    out: list[str] = []
    put = out.append
    # One frame per open array or object: [its items, closing bracket, first?, object?]
    frames: list[list[Any]] = []
    path: list[str | int] = []
    value = obj
    while True:
        kind = type(value)
        if kind is str:
            put(_string(value))
        elif kind is dict or kind is list:
            if len(frames) >= max_depth:
                raise TooDeep(list(path), max_depth)
            if kind is dict:
                try:
                    items = sorted(value.items(), key=_utf16)
                except UnicodeEncodeError:
                    raise Unrepresentable(list(path), "a member name is not valid Unicode "
                                          "(a lone surrogate)") from None
                put("{")
                frames.append([iter(items), "}", True, True])
            else:
                put("[")
                frames.append([iter(enumerate(value)), "]", True, False])
            path.append("")
        elif kind is int:
            text = integer(value)
            if text is None:
                raise Unrepresentable(list(path), _inexact(value))
            put(text)
        elif kind is float:
            text = number(value)
            if text is None:
                raise Unrepresentable(list(path), f"{value!r} is not a JSON number")
            put(text)
        elif value is True:
            put("true")
        elif value is False:
            put("false")
        elif value is None:
            put("null")
        else:
            raise Unrepresentable(list(path), f"a {type(value).__name__} is not JSON")
        # The next value: the next member or element of the innermost open container.
        while frames:
            frame = frames[-1]
            item = next(frame[0], None)
            if item is None:
                put(frame[1])
                frames.pop()
                path.pop()
                continue
            key, value = item
            path[-1] = key
            if frame[2]:
                frame[2] = False
            else:
                put(",")
            if frame[3]:
                put(_string(key))
                put(":")
            break
        else:
            break
    try:
        return "".join(out).encode("utf-8")
    except UnicodeEncodeError:
        raise Unrepresentable(_lone_surrogate(obj), "a string is not valid Unicode "
                              "(a lone surrogate)") from None


def _lone_surrogate(obj: Any) -> list[str | int]:
    """The path to the first string (or member name) that UTF-8 cannot encode."""
    stack: list[tuple[list[str | int], Any]] = [([], obj)]
    while stack:
        path, node = stack.pop()
        if type(node) is str:
            try:
                node.encode("utf-8")
            except UnicodeEncodeError:
                return path
        elif type(node) in (dict, list):
            items: Any = node.items() if type(node) is dict else enumerate(node)
            for key, item in reversed(list(items)):
                stack.append(([*path, key], item))
    return []
