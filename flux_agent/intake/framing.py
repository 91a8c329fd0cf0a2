"""A shadow of HTTP/1.x request framing on one connection (pure: bytes in, a verdict out).

It reads each request line and each chunk size before aiohttp's parser acts on them, to
refuse at once what that parser would accept and then wait on: a request line that is not
HTTP/1.0 or HTTP/1.1 (an HTTP/0.9 request has no headers and its answer no status line, so
no credentials and no error could be told apart), and a chunk larger than any request may be
(``ffffffffffffffff`` makes the parser wait for 2**64 bytes). It follows only the framing
(heads, Content-Length bodies, chunks, trailers); everything else is the parser's to judge,
and where the two might part (an upgrade, CONNECT, a head too long to be valid) it stops
looking and leaves the connection to the parser alone.
"""

from __future__ import annotations

import re
from typing import NamedTuple

_HEAD, _BODY, _SIZE, _DATA, _TRAILER, _PASS = range(6)
_VERSIONS = frozenset({b"HTTP/1.1", b"HTTP/1.0"})
_FRAMING = re.compile(rb"\r\n(content-length|transfer-encoding|upgrade)[ \t]*:[ \t]*([^\r]*)",
                      re.IGNORECASE)
_HEX = re.compile(rb"[0-9A-Fa-f]{1,32}")
MAX_HEAD = 128 * 1024  # beyond this the parser has refused the head already (8 KiB lines)
MAX_LINE = 8 * 1024


class Refusal(NamedTuple):
    status: int
    code: str
    detail: str
    counted: bool = False  # the refused request is among ``Framing.requests`` (its head passed)


class Framing:
    """Feed it every byte a connection receives, in order; :meth:`feed` answers a
    :class:`Refusal` for the first request that must not reach the parser."""

    __slots__ = ("_held", "_left", "_state", "max_chunk", "requests")

    def __init__(self, max_chunk: int) -> None:
        self.max_chunk = max_chunk
        self.requests = 0  # request heads complete so far
        self._state = _HEAD
        self._held = b""  # an unfinished head, chunk-size or trailer line
        self._left = 0  # bytes of the body (or of the chunk and its CRLF) still to come

    @property
    def at_rest(self) -> bool:
        """Between requests: no head, body or chunk under way."""
        return self._state == _HEAD and not self._held.lstrip(b"\r\n")

    @property
    def in_head(self) -> bool:
        """A request head has begun and is not complete: the client owes the rest."""
        return self._state == _HEAD and bool(self._held.lstrip(b"\r\n"))

    def feed(self, data: bytes) -> Refusal | None:
        pos, end = 0, len(data)
        while pos < end:
            state = self._state
            if state in (_BODY, _DATA):
                take = min(self._left, end - pos)
                pos += take
                self._left -= take
                if not self._left:
                    self._state = _SIZE if state == _DATA else _HEAD
                continue
            if state == _PASS:
                return None
            held = len(self._held)
            src = self._held + data[pos:] if held else data
            start = 0 if held else pos
            if state == _HEAD:
                while src.startswith(b"\r\n", start):  # empty lines before a request
                    start += 2
                stop = src.find(b"\r\n\r\n", start)
                if stop < 0:
                    line_end = src.find(b"\r\n", start)
                    if line_end >= 0 and not _http1(src[start:line_end]):
                        return _not_http1()
                    self._hold(src[start:], MAX_HEAD)
                    return None
                refusal = self._head(src[start:stop + 2])
                if refusal is not None:
                    return refusal
                stop += 4
            else:
                stop = src.find(b"\r\n", start)
                if stop < 0:
                    self._hold(src[start:], MAX_LINE)
                    return None
                line = src[start:stop]
                stop += 2
                if state == _SIZE:
                    refusal = self._chunk(line)
                    if refusal is not None:
                        return refusal
                elif not line:  # the empty line that ends the trailers
                    self._state = _HEAD
            self._held = b""
            pos = pos + stop - held if held else stop  # src is data itself when nothing is held
        return None

    def _hold(self, rest: bytes, limit: int) -> None:
        self._held = rest
        if len(rest) > limit:
            self._state, self._held = _PASS, b""  # the parser refuses such a line itself

    def _head(self, head: bytes) -> Refusal | None:
        line_end = head.find(b"\r\n")
        line = head[:line_end]
        if not _http1(line):
            return _not_http1()
        self.requests += 1
        if line.startswith(b"CONNECT "):
            self._state = _PASS
            return None
        chunked, length = False, 0
        for m in _FRAMING.finditer(head, line_end):
            name, value = m.group(1).lower(), m.group(2).strip().lower()
            if name == b"transfer-encoding":
                chunked = value.rsplit(b",", 1)[-1].strip() == b"chunked"
            elif name == b"content-length" and value.isdigit():
                length = int(value)
            elif name == b"upgrade":
                self._state = _PASS  # what follows may be another protocol
                return None
        if chunked:
            self._state = _SIZE
        elif length:
            self._state, self._left = _BODY, length
        return None

    def _chunk(self, line: bytes) -> Refusal | None:
        digits = line.split(b";", 1)[0].strip(b" \t")
        if not _HEX.fullmatch(digits):
            self._state = _PASS  # not a chunk size: the parser refuses it
            return None
        size = int(digits, 16)
        if size > self.max_chunk:
            return Refusal(413, "REQUEST_TOO_LARGE", f"a chunk of {size} bytes is larger than "
                           f"a request may be ({self.max_chunk} bytes)", counted=True)
        if size:
            self._state, self._left = _DATA, size + 2  # the data and its CRLF
        else:
            self._state = _TRAILER
        return None


def _http1(line: bytes) -> bool:
    parts = line.split(b" ")
    return len(parts) == 3 and parts[2] in _VERSIONS


def _not_http1() -> Refusal:
    return Refusal(400, "BAD_REQUEST", "only HTTP/1.0 and HTTP/1.1 are served")
