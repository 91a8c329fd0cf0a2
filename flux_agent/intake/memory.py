"""Request memory: one admission budget (``FLUX_AGENT_REQUEST_MEMORY_BYTES``) for everything
the requests in process hold, so that no client, and no number of clients, can take the
agent past its documented memory.

The budget has three shares, each a :class:`ByteBudget`:

- **reading**: request bodies arriving (decoded from gzip, before they are parsed). A body
  reserves its declared size before it is read (a compressed or chunked one: the largest a
  body may be); a request that does not fit waits, in arrival order, with its body still in
  the kernel's socket buffers (TCP backpressure).
- **working**: what a request holds once its body is in: the body itself, the objects it
  decodes to, the sealed rows, their canonical JSON and the spool record. That is estimated
  from the body before it is decoded (:func:`body_cost`); a request waits here for its
  estimate while holding only its reading share, and the working share never waits on the
  reading one, so the two cannot deadlock. A body estimated beyond the whole working share
  is refused (413 ``REQUEST_TOO_COMPLEX``).
- **answers**: read answers (pages of events, one event, a checkpoint) from the moment they
  are fetched until the client has taken them. Reads never wait: a page shrinks to what is
  free, and below a minimum the read is refused (503 ``ANSWERS_BUSY``).

A wait for reading or working memory ends after the body timeout with 503 ``INTAKE_BUSY``.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections import deque
from dataclasses import dataclass

from ..core.errors import TransientError, ValidationError

# What decoding costs beyond the body's own bytes (CPython 3.11+, msgspec), measured with
# tracemalloc over bodies of every shape (tests/test_request_memory.py holds the estimate
# above the measurement):
# - each structural character ({ [ , :) stands for at most one container, key or value and
#   its slot: an empty dict is 64 bytes, a small str 50, a float 24, a list slot 8;
STRUCTURE_COST = 64
# - strings cost their length once decoded when the body is ASCII without escapes; with
#   escapes or non-ASCII text a string may be stored with 2 or 4 bytes per character;
# - the canonical JSON of payloads, the rows that hold it as text and the spool record are
#   two more copies, each up to three times the body when non-ASCII text is escaped.
REQUEST_OVERHEAD = 16 * 1024  # per request: the request object, headers, the answer
ANSWER_MINIMUM = 64 * 1024  # a page is not made smaller than this: below it, 503


def body_cost(body: bytes | bytearray, copies: int = 2) -> int:
    """Upper estimate of the memory a request holds while its body (JSON) is decoded,
    validated, sealed and spooled: the body, its decoded objects, and ``copies`` copies of
    its canonical form. Linear in the body and cheap (a few passes of C over the bytes)."""
    n = len(body)
    plain = body.isascii()
    if plain and body.find(b"\\") < 0:
        strings, canonical = 1, 1
    else:
        strings, canonical = 4, 1 if plain else 3
    structure = 0
    step = 1 << 20  # translate() copies: count a MiB at a time
    for start in range(0, n, step):
        chunk = body[start:start + step]
        structure += len(chunk) - len(chunk.translate(None, b"{[,:"))
    # The body, its strings decoded, the canonical copies, and one more body's worth for
    # what is transient (one payload's canonical JSON while it is checked, buffer growth).
    return (n * (2 + strings + copies * canonical) + structure * STRUCTURE_COST
            + REQUEST_OVERHEAD)


def records_cost(body: bytes | bytearray) -> int:
    """Sealed records (msgpack) from a sidecar: the body, the rows it decodes to (a str
    object per field), and the spool's frame of it."""
    return 6 * len(body) + REQUEST_OVERHEAD


class ByteBudget:
    """Bytes of one share, granted in arrival order. ``try_acquire`` never waits;
    ``acquire`` waits behind those already waiting."""

    def __init__(self, total: int) -> None:
        self.total = total
        self.free = total
        self._waiters: deque[tuple[int, asyncio.Future[None]]] = deque()

    @property
    def waiting(self) -> int:
        return len(self._waiters)

    def try_acquire(self, nbytes: int) -> int:
        """Take ``nbytes`` (at most the whole share) now if they are free and nobody
        waits; 0 otherwise."""
        nbytes = min(nbytes, self.total)
        if self.free >= nbytes and not self._waiters:
            self.free -= nbytes
            return nbytes
        return 0

    def try_acquire_upto(self, wanted: int, minimum: int) -> int:
        """Take what is free, up to ``wanted``, if that is at least ``minimum``; else 0."""
        if self._waiters:
            return 0
        nbytes = min(wanted, self.free)
        if nbytes < min(minimum, wanted):
            return 0
        self.free -= nbytes
        return nbytes

    async def acquire(self, nbytes: int) -> int:
        nbytes = min(nbytes, self.total)
        if self.free >= nbytes and not self._waiters:
            self.free -= nbytes
            return nbytes
        fut: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._waiters.append((nbytes, fut))
        try:
            await fut
        except BaseException:
            if fut.done() and not fut.cancelled():
                self.release(nbytes)  # granted just as we were cancelled: give it back
            else:
                # A cancelled waiter may have been passed over (and dropped) by _wake
                # already, between its cancellation and this line.
                with contextlib.suppress(ValueError):
                    self._waiters.remove((nbytes, fut))
                self._wake()  # those behind may fit now
            raise
        return nbytes

    def release(self, nbytes: int) -> None:
        self.free += nbytes
        self._wake()

    def _wake(self) -> None:
        while self._waiters and self._waiters[0][0] <= self.free:
            wanted, fut = self._waiters.popleft()
            if not fut.done():
                self.free -= wanted
                fut.set_result(None)


@dataclass(frozen=True, slots=True)
class Shares:
    reading: int
    working: int
    answers: int


def shares(total: int, largest_body: int) -> Shares:
    """How ``total`` is divided: an eighth for bodies being read and an eighth for answers
    (each at least one largest body), the rest for the work on admitted requests."""
    reading = max(largest_body, total // 8)
    answers = max(largest_body, total // 8)
    return Shares(reading, max(total - reading - answers, largest_body), answers)


class RequestMemory:
    """The three shares of request memory (see the module doc)."""

    def __init__(self, total: int, largest_body: int, *, timeout: float) -> None:
        split = shares(total, largest_body)
        self.total = total
        self.reading = ByteBudget(split.reading)
        self.working = ByteBudget(split.working)
        self.answers = ByteBudget(split.answers)
        self.timeout = timeout

    async def _wait(self, budget: ByteBudget, nbytes: int) -> int:
        granted = budget.try_acquire(nbytes)  # the common case: no wait, no timer
        if granted:
            return granted
        try:
            async with asyncio.timeout(self.timeout):
                return await budget.acquire(nbytes)
        except TimeoutError:
            raise TransientError("INTAKE_BUSY", "request memory is held by other requests; "
                                 "retry shortly", retry_after=1) from None

    async def reserve_reading(self, nbytes: int) -> int:
        return await self._wait(self.reading, nbytes)

    async def reserve_working(self, nbytes: int) -> int:
        if nbytes > self.working.total:
            raise ValidationError(
                "REQUEST_TOO_COMPLEX", f"this body would take about {nbytes} bytes of memory "
                f"once decoded, more than the {self.working.total} the agent gives one "
                "request (FLUX_AGENT_REQUEST_MEMORY_BYTES); send fewer or simpler events "
                "per request", status=413,
                context={"estimated_bytes": nbytes, "limit_bytes": self.working.total})
        return await self._wait(self.working, nbytes)

    def reserve_answer(self, wanted: int, minimum: int = ANSWER_MINIMUM) -> Held:
        """Up to ``wanted`` bytes for an answer, now, or 503 ANSWERS_BUSY."""
        granted = self.answers.try_acquire_upto(wanted, minimum)
        if not granted:
            raise answers_busy()
        return Held(self.answers, granted)


class Held:
    """Bytes held of one share, adjusted as what they stand for becomes known."""

    __slots__ = ("budget", "nbytes")

    def __init__(self, budget: ByteBudget, nbytes: int) -> None:
        self.budget = budget
        self.nbytes = nbytes

    def resize(self, nbytes: int) -> None:
        """Hold ``nbytes`` (at most the whole share) from now on: more now, or 503
        ANSWERS_BUSY; less gives the rest back."""
        nbytes = min(nbytes, self.budget.total)
        if nbytes > self.nbytes:
            if not self.budget.try_acquire(nbytes - self.nbytes):
                raise answers_busy()
        elif nbytes < self.nbytes:
            self.budget.release(self.nbytes - nbytes)
        self.nbytes = nbytes

    def release(self) -> None:
        self.budget.release(self.nbytes)
        self.nbytes = 0


def answers_busy() -> TransientError:
    return TransientError("ANSWERS_BUSY", "the memory for read answers is held by answers "
                          "clients have not taken yet; retry shortly", retry_after=1)
