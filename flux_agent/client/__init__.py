"""What workloads import to talk to their flux-agent sidecar.

The synchronous :class:`FluxClient` uses only the standard library (``http.client``, over the
agent's Unix socket or TCP), so an ETL script needs nothing else installed. The asynchronous
:class:`AsyncFluxClient` has the same API with ``await``; it imports aiohttp when one is made
(a client-only install without aiohttp gets an ImportError saying what to install).

Quick start::

    from flux_agent.client import FluxClient

    with FluxClient() as flux:
        with flux.run("nightly-2026-11-23", source="s3://bucket/raw") as run:
            with run.step("extract") as step:
                rows = extract()
                step.payload["items_processed"] = len(rows)
            run.checkpoint("extract", {"offset": len(rows)})

    # async
    async with AsyncFluxClient() as flux:
        async with flux.run("nightly") as run:
            async with run.step("index"):
                ...

Where the agent is (first that applies):

1. ``FluxClient(url=...)``: ``http://host:port`` (TCP), ``https://...``, or ``unix:///path``;
   ``FluxClient(socket_path=...)``: a Unix socket;
2. ``FLUX_AGENT_SOCKET``: the Unix socket (the sidecar injector sets it);
3. ``FLUX_AGENT_URL``: TCP (the injector sets it too: ``http://127.0.0.1:8787``);
4. ``http://127.0.0.1:8787``.

Authentication: a bearer token from ``token=...``, else ``FLUX_AGENT_TOKEN``, else the file
named by ``token_file=...`` or ``FLUX_AGENT_TOKEN_FILE`` (re-read when it changes, as a
projected service-account token is). No token: no ``Authorization`` header (agents running
with ``FLUX_AGENT_AUTH=none``).

Events
    ``emit(kind, run_id, step=..., payload=...)`` posts one event; ``post_events([...])``
    posts several atomically (all accepted or none). Each event gets a UUIDv7 ``event_id``
    and an RFC 3339 ``occurred_at`` here, before the first attempt, so every retry carries
    the same ids and the agent stores each event once (a re-post counts as a duplicate).
    Both return a :class:`PostResult` (``accepted``, ``duplicates``, ``event_ids``,
    ``committed``). ``wait_committed=True`` asks for ``Prefer: wait=committed``: the answer
    comes once the events are in PostgreSQL.

Runs
    ``with client.run(run_id, payload=None, **fields) as run:`` emits ``run.started`` with
    ``payload`` and ``fields`` as its payload (whatever the agent's payload schema for
    run.started asks; under the ``flux`` profile, ``content_type=`` and ``use_case=``);
    on normal exit ``run.completed`` (payload: ``duration_ms`` plus whatever was put in
    ``run.payload``), on an exception ``run.failed`` (payload ``error``: ``{"type",
    "message"}``) and the exception propagates; on KeyboardInterrupt, SystemExit or
    cancellation ``run.aborted``. ``run.step(name)`` does the same for ``step.started`` /
    ``step.completed`` / ``step.failed``; ``run.emit(kind, ...)`` anything else.

Batching
    ``with client.batch(max_events=500) as batch: batch.add(kind, run_id, ...)`` collects
    events and posts them as one JSON array when ``max_events`` or ``max_bytes`` is reached,
    on ``flush()`` and on ``close()`` (or leaving the ``with``). ``batch.results`` lists the
    answers.

Checkpoints
    ``client.checkpoint(run_id, step, state)`` is ``PUT /v1/runs/{run_id}/checkpoint`` with
    ``{"step", "state"}`` and returns the agent's answer (``{"version": N, ...}``);
    ``client.resume(run_id)`` is ``GET`` of the same path and returns a :class:`Checkpoint`
    (``step``, ``state``, ``version``, ``checkpoint_hash``) or None when there is none (404).

Fail-open (events only)
    ``FluxClient(fail_open=True)`` (or ``FLUX_AGENT_CLIENT_FAIL_OPEN=true``): when the agent
    cannot take events (unreachable, or 503/5xx after the retries), posting them logs a
    warning and drops them instead of raising (the result says ``dropped=True``;
    ``client.dropped`` counts them), and for 10 s after a failure drops further events at
    once. Checkpoints, resumes and drains still raise, as does a 4xx (a bug in the job). See
    :mod:`flux_agent.client.failopen` for why events are dropped rather than buffered.

Retries
    Connection failures and answers 429/502/503/504 (or any problem with ``retryable:
    true``) are retried with exponential backoff and jitter, waiting at least the agent's
    ``Retry-After``; :class:`RetryPolicy` sets the attempts and delays. Other errors are not
    retried, nor is ``503 COMMIT_TIMEOUT`` (the events are accepted; asking again only
    waits again).

Errors (all carry ``status``, ``code``, ``retryable``, ``problem`` - the problem+json body -
``errors`` and ``request_id``)::

    FluxClientError
    +-- FluxConnectionError      the agent could not be reached (after retries)
    +-- FluxHTTPError            the agent answered with an error
        +-- FluxRequestError     4xx: the request is wrong (validation, conflict, too large)
        |   +-- FluxAuthError    401, 403
        |   +-- FluxNotFoundError 404
        +-- FluxUnavailableError 503 still after the retries (spool full, draining)
        |   +-- FluxNotCommittedError  503 COMMIT_TIMEOUT to wait_committed: accepted and
        |                            durable, not yet in PostgreSQL (not retried; event_ids)
        +-- FluxServerError      other 5xx

Events are checked here for what makes them unacceptable whatever the payload (kind,
``run_id`` pattern, ``step`` presence); the agent validates the rest and answers 422 with
pointers.
"""

from __future__ import annotations

from .aio import AsyncEventBatch, AsyncFluxClient, AsyncRun, AsyncStep
from .core import Checkpoint, PostResult, RetryPolicy, make_event, uuid7
from .core import Endpoint as Endpoint  # public, outside __all__, as they were before
from .core import TokenSource as TokenSource
from .core import resolve_endpoint as resolve_endpoint
from .errors import (
    FluxAuthError,
    FluxClientError,
    FluxConnectionError,
    FluxHTTPError,
    FluxNotCommittedError,
    FluxNotFoundError,
    FluxRequestError,
    FluxServerError,
    FluxUnavailableError,
)
from .errors import error_from as error_from
from .sync import EventBatch, FluxClient, Run, Step

__all__ = [
    "AsyncEventBatch",
    "AsyncFluxClient",
    "AsyncRun",
    "AsyncStep",
    "Checkpoint",
    "EventBatch",
    "FluxAuthError",
    "FluxClient",
    "FluxClientError",
    "FluxConnectionError",
    "FluxHTTPError",
    "FluxNotCommittedError",
    "FluxNotFoundError",
    "FluxRequestError",
    "FluxServerError",
    "FluxUnavailableError",
    "PostResult",
    "RetryPolicy",
    "Run",
    "Step",
    "make_event",
    "uuid7",
]
