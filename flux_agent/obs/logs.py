"""Structured logs: one JSON object per line (or, for people at a terminal, one readable
line), request context attached, secrets scrubbed.

Each JSON line carries ``timestamp level message service trace_id span_id correlation_id
fields``; a console line shows the time, level, message and fields as ``key=value``.
Request context lives in context variables set by intake, so any log call made while a
request is handled is tagged with it. Repeated warnings and errors are rate-limited: an
outage logs its first failures and then a count, not a line per retry.
"""

from __future__ import annotations

import contextvars
import json
import logging
import re
import sys
import time
from datetime import UTC, datetime
from typing import IO, Any

SERVICE = "flux-agent"

# (correlation_id, trace_id, span_id) of the request being handled: one variable, one set per
# request.
request_context: contextvars.ContextVar[tuple[str, str, str]] = contextvars.ContextVar(
    "request_context", default=("", "", ""))

_SCRUB = (
    (re.compile(r"(?i)(postgres(?:ql)?://[^:/@\s]*:)[^@\s]*@"), r"\1***@"),
    (re.compile(r"(?i)(bearer\s+)[A-Za-z0-9._~+/=-]+"), r"\1***"),
    (re.compile(r"eyJ[A-Za-z0-9_-]{4,}\.[A-Za-z0-9_-]{4,}\.[A-Za-z0-9_-]*"), "***"),
    (re.compile(r"(?i)(password|secret|token)(\s*[=:]\s*)[^\s,;&]+"), r"\1\2***"),
)
_secrets: set[str] = set()


def register_secret(value: str | None) -> None:
    """Literal values (keys, passwords) that must never be printed."""
    if value and len(value) >= 4:
        _secrets.add(str.__str__(value))


def scrub(text: str) -> str:
    for secret in _secrets:
        if secret in text:
            text = text.replace(secret, "***")
    for pattern, replacement in _SCRUB:
        text = pattern.sub(replacement, text)
    return text


def _scrub_value(value: Any) -> Any:
    if isinstance(value, str):
        return scrub(value)
    if isinstance(value, dict):
        return {k: _scrub_value(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_scrub_value(v) for v in value]
    return value


class JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        fields = getattr(record, "fields", None) or {}
        rid, trace, span = request_context.get()
        entry: dict[str, Any] = {
            "timestamp": _timestamp(record),
            "level": record.levelname,
            "message": scrub(record.getMessage()),
            "service": SERVICE,
            "trace_id": getattr(record, "trace_id", None) or trace,
            "span_id": getattr(record, "span_id", None) or span,
            "correlation_id": getattr(record, "correlation_id", None) or rid,
            "logger": record.name,
            "fields": _scrub_value(fields),
        }
        if record.exc_info:
            entry["exception"] = scrub(self.formatException(record.exc_info))
        return json.dumps(entry, default=str, separators=(",", ":"))


def _timestamp(record: logging.LogRecord) -> str:
    return datetime.fromtimestamp(record.created, UTC).isoformat(
        timespec="milliseconds").replace("+00:00", "Z")


class ConsoleFormatter(logging.Formatter):
    """``2026-11-23T07:00:00.000Z INFO    agent ready  event_url=http://... auth=none``"""

    def format(self, record: logging.LogRecord) -> str:
        fields = _scrub_value(getattr(record, "fields", None) or {})
        correlation = getattr(record, "correlation_id", None) or request_context.get()[0]
        if correlation:
            fields = {**fields, "correlation_id": correlation}
        pairs = " ".join(f"{key}={_console_value(value)}" for key, value in fields.items()
                         if value is not None)
        line = f"{_timestamp(record)} {record.levelname:<7} {scrub(record.getMessage())}"
        if pairs:
            line += "  " + pairs
        if record.exc_info:
            line += "\n" + scrub(self.formatException(record.exc_info))
        return line


def _console_value(value: Any) -> str:
    if isinstance(value, str):
        return value if value and not any(c.isspace() or c in "\"'=" for c in value) \
            else json.dumps(value)
    return json.dumps(value, default=str, separators=(",", ":"))


class RateLimit(logging.Filter):
    """At most ``burst`` identical warnings/errors per ``interval`` seconds per message."""

    def __init__(self, burst: int = 5, interval: float = 60.0) -> None:
        super().__init__()
        self.burst = burst
        self.interval = interval
        self._seen: dict[tuple[str, str], list[float]] = {}

    def filter(self, record: logging.LogRecord) -> bool:
        if record.levelno < logging.WARNING:
            return True
        key = (record.name, str(record.msg))
        now = time.monotonic()
        window = self._seen.get(key)
        if window is None or now - window[0] > self.interval:
            if window is not None and window[2] > 0:
                fields = dict(getattr(record, "fields", None) or {})
                fields["suppressed_since_last"] = int(window[2])
                record.fields = fields
            self._seen[key] = [now, 1, 0]
            if len(self._seen) > 1024:
                self._seen.clear()
            return True
        window[1] += 1
        if window[1] <= self.burst:
            return True
        window[2] += 1
        return False


class AgentHandler(logging.StreamHandler):  # type: ignore[type-arg]
    """The handler :func:`setup` installs (and replaces when called again)."""


def setup(level: str = "info", stream: IO[str] | None = None, *, fmt: str = "auto",
          access_log: bool = False) -> logging.Handler:
    """Send the agent's logs (and aiohttp's) to ``stream`` (stdout): ``fmt`` is ``json``,
    ``console``, or ``auto`` (console on a terminal, else JSON)."""
    out = stream or sys.stdout
    if fmt == "auto":
        fmt = "console" if out.isatty() else "json"
    handler = AgentHandler(out)
    handler.setFormatter(ConsoleFormatter() if fmt == "console" else JsonFormatter())
    handler.addFilter(RateLimit())
    root = logging.getLogger()
    for old in [h for h in root.handlers if isinstance(h, AgentHandler)]:
        root.removeHandler(old)
    root.addHandler(handler)
    set_level(level, access_log=access_log)
    return handler


def set_level(level: str, *, access_log: bool = False) -> None:
    """The agent's log level (at start, and again on SIGHUP)."""
    logging.getLogger().setLevel(level.upper())
    # One line per request (at info), when asked for and at debug level.
    logging.getLogger("aiohttp.access").setLevel(
        logging.INFO if access_log or level == "debug" else logging.WARNING
    )
