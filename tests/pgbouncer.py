"""Kept for tests written before tests/support: PgBouncer now lives in
tests.support.pgbouncer; new tests import it from there."""

from .support.pgbouncer import PgBouncer

__all__ = ["PgBouncer"]
