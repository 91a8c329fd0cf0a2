"""Logs for people and for machines: the console format, the choice between the two, and the
access log at info level."""

from __future__ import annotations

import asyncio
import io
import logging
from collections.abc import Iterator
from pathlib import Path

import pytest

from flux_agent.obs import logs
from flux_agent.testing import make_event

from .support.agents import AgentProcess, agent_env
from .support.http import post
from .support.postgres import Database


class _Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


@pytest.fixture
def restore_logging() -> Iterator[None]:
    """logs.setup configures the process; put back what the session's capture relies on."""
    root, access = logging.getLogger(), logging.getLogger("aiohttp.access")
    handlers, level, access_level = list(root.handlers), root.level, access.level
    yield
    root.handlers[:] = handlers
    root.setLevel(level)
    access.setLevel(access_level)


def _record(message: str, **fields: object) -> logging.LogRecord:
    record = logging.LogRecord("flux_agent.agent", logging.WARNING, __file__, 1, message, (),
                               None)
    record.fields = fields
    return record


def test_console_lines_read_as_text_with_fields_as_key_value():
    line = logs.ConsoleFormatter().format(_record(
        "PostgreSQL unreachable", error="08001: connection refused", attempt=3, url=None,
        dsn="postgresql://flux:hunter2-console@db/flux"))
    assert line.endswith(' WARNING PostgreSQL unreachable  error="08001: connection refused" '
                         'attempt=3 dsn=postgresql://flux:***@db/flux')
    assert "hunter2" not in line
    assert "\n" not in line


@pytest.mark.usefixtures("restore_logging")
def test_auto_is_console_on_a_terminal_and_json_elsewhere():
    terminal, pipe = _Terminal(), io.StringIO()
    assert isinstance(logs.setup("info", terminal).formatter, logs.ConsoleFormatter)
    assert isinstance(logs.setup("info", pipe).formatter, logs.JsonFormatter)
    assert isinstance(logs.setup("info", terminal, fmt="json").formatter, logs.JsonFormatter)
    assert isinstance(logs.setup("info", pipe, fmt="console").formatter, logs.ConsoleFormatter)


@pytest.mark.usefixtures("restore_logging")
def test_access_log_is_off_at_info_unless_asked_for():
    access = logging.getLogger("aiohttp.access")
    logs.setup("info", io.StringIO())
    assert not access.isEnabledFor(logging.INFO)
    logs.setup("info", io.StringIO(), access_log=True)
    assert access.isEnabledFor(logging.INFO)
    logs.setup("debug", io.StringIO())
    assert access.isEnabledFor(logging.INFO)


async def test_an_agent_logs_each_request_at_info_in_the_console_format(database: Database,
                                                                       state_dir: Path):
    env = agent_env(database, state_dir, FLUX_AGENT_ACCESS_LOG="true",
                    FLUX_AGENT_LOG_FORMAT="console")
    proc = AgentProcess(env, state_dir / "agent.log")
    await asyncio.to_thread(proc.start)
    try:
        status, _, headers = await post(proc.url + "/v1/events", make_event())
        assert status == 202
    finally:
        assert await asyncio.to_thread(proc.terminate) == 0
    lines = proc.log_path.read_text().splitlines()
    assert not any(line.startswith("{") for line in lines)  # console, although not a tty
    access = [line for line in lines if " INFO    POST /v1/events 202" in line]
    assert access, lines
    assert f"correlation_id={headers['X-Request-ID']}" in access[0]
    assert "status=202" in access[0]
