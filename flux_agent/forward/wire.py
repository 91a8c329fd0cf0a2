"""Sealed records on the wire between a sidecar and an aggregator: one
:class:`~flux_agent.core.event.ForwardedRecord` per request, msgpack-encoded exactly as the
aggregator's spool keeps it."""

from __future__ import annotations

from collections.abc import Iterator

import msgspec

from ..core.event import ForwardedRecord, record_encoder
from ..flush.batch import Work

CONTENT_TYPE = "application/vnd.flux.records+msgpack"
RECORDS_PATH = "/v1/records"
AGENCY_HEADER = "X-Flux-Agency"  # which of the caller's agencies a read is for
MAX_BYTES = 8 * 1024 * 1024  # one request body; a larger window goes in several

_decoder = msgspec.msgpack.Decoder(ForwardedRecord)


def encode(work: Work) -> bytes:
    return record_encoder.encode(ForwardedRecord(work.events, work.checkpoints, work.audits))


def bodies(work: Work, max_bytes: int = MAX_BYTES) -> Iterator[bytes]:
    """The window as request bodies of at most ``max_bytes`` (halved until they fit; one
    item larger than that is sent alone)."""
    body = encode(work)
    if len(body) <= max_bytes or len(work) <= 1:
        yield body
        return
    for half in work.halves():
        if len(half):
            yield from bodies(half, max_bytes)


def decode(body: bytes) -> ForwardedRecord:
    """Raises ValueError for anything but a well-formed record."""
    try:
        return _decoder.decode(body)
    except (msgspec.DecodeError, msgspec.ValidationError) as exc:
        raise ValueError(str(exc)) from None
