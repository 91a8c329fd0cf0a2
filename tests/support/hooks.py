"""The suite's hooks (conftest.py imports them so pytest finds them): the markers applied and
enforced (:mod:`.markers`), and how many worker processes a run takes."""

from __future__ import annotations

import os
from collections.abc import Generator

import pytest

from . import markers


@pytest.hookimpl(tryfirst=True)  # before -m deselects anything
def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    for item in items:
        names = set(getattr(item, "fixturenames", ()))
        if markers.DB_FIXTURE in names and item.get_closest_marker("db") is None:
            item.add_marker(pytest.mark.db)
        if names & markers.FAULT_FIXTURES and item.get_closest_marker("fault") is None:
            item.add_marker(pytest.mark.fault)


@pytest.hookimpl(wrapper=True)
def pytest_runtest_protocol(item: pytest.Item) -> Generator[None, object, object]:
    markers.running = item
    try:
        return (yield)
    finally:
        markers.running = None


@pytest.hookimpl(optionalhook=True)  # pytest-xdist's hook
def pytest_xdist_auto_num_workers(config: pytest.Config) -> int | None:
    """``-n auto`` (addopts): two worker processes for the suite, a folder or a marker
    selection of it; none (this process) when the command names test files or tests, which
    run in less time than a second process takes to start. PYTEST_XDIST_AUTO_NUM_WORKERS
    still decides when set."""
    if os.environ.get("PYTEST_XDIST_AUTO_NUM_WORKERS"):
        return None
    named = [arg for arg in config.args if "::" in arg or arg.endswith(".py")]
    return 0 if named and len(named) == len(config.args) else 2
