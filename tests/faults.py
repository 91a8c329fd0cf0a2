"""Kept for tests written before tests/support: these names now live in tests.support.faults
and .polling; new tests import them from there."""

from .support.faults import Ledger, LoadGen, TcpProxy, assert_exactly_once, stored_ids
from .support.polling import wait_until

__all__ = ["Ledger", "LoadGen", "TcpProxy", "assert_exactly_once", "stored_ids", "wait_until"]
