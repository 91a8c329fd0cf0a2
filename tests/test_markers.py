"""The layers' markers are right: a test that uses a database fixture is marked ``db`` and one
that uses the cutting proxy ``fault`` without anyone writing it, so ``-m "not db and not
fault"`` leaves them out; and a test left in the pure layer that reaches for PostgreSQL or
builds a fault anyway fails, naming the marker, before it starts anything.

Checked on a small suite of its own, run by a pytest of its own with this suite's conftest
as a plugin.
"""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

SUITE = '''
import asyncio

import pytest

from flux_agent.postgres.embedded import LocalPostgres
from tests.support.agents import AgentProcess
from tests.support.faults import TcpProxy


async def test_uses_a_database(database):
    raise AssertionError("deselected: marked db by the hook")


async def test_uses_an_agent(agent):
    raise AssertionError("deselected: marked db by the hook")


async def test_uses_the_proxy(proxy):
    raise AssertionError("deselected: marked fault (and db) by the hook")


@pytest.mark.fault
def test_marked_by_hand():
    raise AssertionError("deselected: marked fault by hand")


def test_pure():
    from tests.support import markers

    assert markers.running is not None  # the hook watches pure tests too


def test_pure_asks_for_a_database(request):
    request.getfixturevalue("database")


def test_pure_starts_postgresql(tmp_path):
    LocalPostgres(tmp_path / "pg").start()


def test_pure_runs_an_agent_on_its_embedded_postgresql(tmp_path):
    AgentProcess({"PATH": "/usr/bin"}, tmp_path / "agent.log").start()


def test_pure_builds_a_cutting_proxy():
    asyncio.run(TcpProxy("127.0.0.1", 9).start())
'''


def test_database_and_proxy_fixtures_mark_their_tests_and_pure_tests_cannot_cheat(
        tmp_path: Path):
    (tmp_path / "test_layers.py").write_text(textwrap.dedent(SUITE))
    env = {k: v for k, v in os.environ.items()
           if not k.startswith(("FLUX_TEST_", "PYTEST_"))}
    env["PYTHONPATH"] = str(ROOT)
    result = subprocess.run(
        [sys.executable, "-m", "pytest", "-p", "tests.conftest", "-p", "no:cacheprovider",
         "-n", "0",
         "-c", str(ROOT / "pyproject.toml"), "--rootdir", str(tmp_path),
         "-m", "not db and not fault", "-rA", "-vv", "test_layers.py"],
        cwd=tmp_path, env=env, capture_output=True, text=True, timeout=120)
    out = result.stdout
    assert result.returncode == 1, out + result.stderr
    assert "4 failed, 1 passed, 4 deselected" in out, out
    assert "PASSED test_layers.py::test_pure" in out, out
    expected = {
        "test_pure_asks_for_a_database": "starts PostgreSQL but is not marked 'db'",
        "test_pure_starts_postgresql": "starts PostgreSQL but is not marked 'db'",
        "test_pure_runs_an_agent_on_its_embedded_postgresql":
            "runs an agent on its embedded PostgreSQL but is not marked 'db'",
        "test_pure_builds_a_cutting_proxy": "but is not marked 'fault'",
    }
    for test, message in expected.items():
        line = next((x for x in out.splitlines() if x.startswith(f"FAILED test_layers.py::"
                                                                   f"{test} ")), "")
        assert message in line, (test, out)
    # Refused before anything started: no cluster was made, no agent was run.
    assert not (tmp_path / "pg").exists()
    assert not (tmp_path / "agent.log").exists()
