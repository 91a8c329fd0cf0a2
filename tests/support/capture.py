"""Everything the agents said during the session (logs, answers), and the secrets that must
never appear in any of it: the session fixture in conftest checks at the end."""

from __future__ import annotations

import logging

from flux_agent.obs.logs import JsonFormatter

CAPTURED: list[str] = []
SECRETS: set[str] = set()


def remember_secret(value: str | bytes) -> None:
    text = value.decode() if isinstance(value, bytes) else value
    for line in text.splitlines():
        line = line.strip()
        if len(line) >= 12 and not line.startswith("-----"):
            SECRETS.add(line)


def leaked_secrets() -> list[str]:
    """The beginnings of the remembered secrets found in anything captured."""
    return sorted({s[:8] + "..." for s in SECRETS for text in CAPTURED if s in text})


class CaptureHandler(logging.Handler):
    """Every log record of the test process, as the agent's JSON line, into CAPTURED."""

    def __init__(self) -> None:
        super().__init__(logging.DEBUG)
        self.setFormatter(JsonFormatter())

    def emit(self, record: logging.LogRecord) -> None:
        CAPTURED.append(self.format(record))
