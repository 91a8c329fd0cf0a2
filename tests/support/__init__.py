"""What the tests share, one module per concern (conftest.py keeps only the fixtures):

- ``postgres``: the throwaway PostgreSQL (and PgBouncer in front of it), its template and
  per-test databases, the login role an agent uses;
- ``agents``: an agent's configuration and environment for a test database, and a real
  ``flux-agent run`` process;
- ``paths``: short state directories (Unix socket paths must stay short);
- ``http``: post, get, put and raw HTTP, problem+json checks;
- ``faults``: a TCP proxy that cuts or black-holes the line, a load generator with its
  ledger of acknowledged events, the exactly-once check;
- ``polling``: ``wait_until``;
- ``tokens``: an identity provider's keys and tokens;
- ``capture``: everything the agents said, and the secrets that must never be in it;
- ``pgbouncer``, ``tools``: PgBouncer, and external tools found or the test failed/skipped;
- ``markers``, ``hooks``: the ``db`` and ``fault`` layers, applied and enforced;
- ``profiles``: hypothesis's quick and thorough (``HYPOTHESIS_PROFILE=ci``) profiles;
- ``virtual_time``: an event loop whose clock jumps to its next timer (flusher unit tests).
"""
