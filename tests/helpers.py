"""Kept for tests written before tests/support: these names now live in tests.support.http
and .capture; new tests import them from there."""

from .support.capture import CAPTURED, SECRETS, remember_secret
from .support.http import PROBLEM, assert_problem, get, post, put, raw_http, split_answer

__all__ = ["CAPTURED", "PROBLEM", "SECRETS", "assert_problem", "get", "post", "put",
           "raw_http", "remember_secret", "split_answer"]
