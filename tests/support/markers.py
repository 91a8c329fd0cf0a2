"""The suite's layers, as markers (registered in pyproject.toml):

- ``db``: needs PostgreSQL. Applied by a collection hook (:mod:`.hooks`) to every test whose
  fixtures include ``pg_server``, which every database fixture rests on; by hand to tests
  that start a PostgreSQL of their own;
- ``fault``: real faults (processes killed, TCP proxies, full disks, namespaces). Applied by
  the hook to every test that uses the ``proxy`` fixture, by hand to the rest;
- ``slow`` and ``image`` as before.

So ``pytest -m "not db and not fault"`` runs the pure tests, in seconds, and starts no
PostgreSQL. The markers are also enforced while a test runs: a test not marked ``db`` that
starts PostgreSQL or asks for a database (``request.getfixturevalue``, an embedded
PostgreSQL, an agent process with no database URL) fails, and so does one not marked
``fault`` that builds a fault (a cutting proxy, a mount). Outside a test run (bench, the
soak script) nothing is enforced. This module does not import pytest: bench uses what
checks here.
"""

from __future__ import annotations

from typing import Any

# A test whose fixture closure holds this needs PostgreSQL: every database fixture rests on it.
DB_FIXTURE = "pg_server"
FAULT_FIXTURES = frozenset({"proxy"})

running: Any = None  # the pytest item being run, while one is (set by .hooks)


def require_marker(name: str, what: str) -> None:
    """Fail the running test unless it is marked ``name``: it ``what``."""
    item = running
    if item is None or item.get_closest_marker(name) is not None:
        return
    import pytest

    pytest.fail(f"{item.nodeid} {what} but is not marked {name!r}: mark it "
                f"@pytest.mark.{name} (the pure layer, -m 'not db and not fault', must not "
                f"need it)", pytrace=False)
