"""The hooks that apply and enforce the markers (:mod:`.markers`), and the hypothesis profile;
conftest.py imports them so pytest finds them."""

from __future__ import annotations

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
