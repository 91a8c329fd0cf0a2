"""The HTTP edge: the event API and the admin listener (aiohttp).

Modules, low to high (each imports only those above it):

- ``framing``: a shadow of each connection's request framing, which refuses what aiohttp's
  parser would accept and then wait on (not HTTP/1.x, a chunk beyond the request limit);
- ``server``: request keys, JSON and problem+json answers, the problem middleware, the
  runner that answers unparseable HTTP in problem+json, where a request came from;
- ``common``: :class:`~flux_agent.http.common.Routes`, the state and helpers every route
  family shares (body decoding, audit, database reads), and the request-memory bound;
- one module per route family: ``events`` (``POST /v1/events``), ``lineage``
  (``POST /api/v1/lineage``), ``checkpoints``, ``reads``, ``openapi`` (``/openapi.json``),
  ``admin`` (the admin listener's ``/health/*`` and ``/metrics``, and ``POST /v1/drain``);
- ``intake``: :class:`~flux_agent.http.intake.Intake`, the event API's route table and
  auth middleware over all the families.
"""
