"""Kept for tests written before tests/support: these names now live in tests.support.tools;
new tests import them from there."""

from .support.tools import SEARCH, require_root, require_tool, unavailable

__all__ = ["SEARCH", "require_root", "require_tool", "unavailable"]
