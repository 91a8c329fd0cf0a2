"""``flux-agent status``: ask a running agent how it is, through its admin listener.

Reads ``/health/deep`` (readiness, where the agent delivers, spool, last flush, background
tasks) with the standard library only, and says it in a few lines for a person, or as JSON.
Healthy means ready, its upstream up (PostgreSQL, or for a sidecar forwarding to aggregators
the aggregators) and no background task failing; an agent that is ready while its upstream
is away still accepts events (they wait on the spool) but is not healthy.
"""

from __future__ import annotations

import json
import time
import urllib.error
import urllib.request
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any

from ..core.files import lock_holder
from ..core.settings import split_hostport

AGENT_FILE = "agent.json"  # what a running agent writes in its state dir (agent.setup)


class Unreachable(Exception):
    """No flux-agent admin listener answers at the URL."""


class Refused(Exception):
    """The admin listener refused the request (401/403): a token is needed for this."""


@dataclass(frozen=True, slots=True)
class Report:
    url: str
    ready: bool
    body: dict[str, Any]

    @property
    def problems(self) -> list[str]:
        """Why the agent is not healthy (empty when it is)."""
        out = [f"not ready: {', '.join(self.body.get('reasons') or ['?'])}"] if not self.ready \
            else []
        kind, upstream = _upstream(self.body)
        status = upstream.get("status") if isinstance(upstream, dict) else upstream
        if status != "up":
            out.append(f"{kind} {status or 'unknown'}")
        out += [f"task {name} failing" for name, task in _tasks(self.body).items()
                if task.get("failing")]
        return out

    @property
    def healthy(self) -> bool:
        return not self.problems

    def as_json(self) -> dict[str, Any]:
        return {"url": self.url, "healthy": self.healthy, "ready": self.ready,
                "problems": self.problems, "health": self.body}


def running_agent(state_dir: Path) -> dict[str, Any] | None:
    """What the agent running on ``state_dir`` says about itself (where it listens, the
    agency it writes as): its file, if the process holding the state dir wrote it."""
    try:
        data = json.loads((state_dir / AGENT_FILE).read_text())
    except (OSError, ValueError):
        return None
    if not isinstance(data, dict) or data.get("pid") != lock_holder(state_dir / "agent.lock"):
        return None  # left by an agent that is gone
    return data


def loopback(url: str) -> str:
    """An admin URL on a wildcard address, asked on loopback instead."""
    for wildcard, local in (("//0.0.0.0:", "//127.0.0.1:"), ("//[::]:", "//[::1]:")):
        url = url.replace(wildcard, local)
    return url


def admin_url(admin_listen: str) -> str:
    """The admin listener's URL from ``FLUX_AGENT_ADMIN_LISTEN``; a wildcard address is asked
    on loopback (where the diagnostic detail is served)."""
    host, port = split_hostport(admin_listen)
    host = {"0.0.0.0": "127.0.0.1", "::": "::1", "": "127.0.0.1"}.get(host, host)
    return f"http://[{host}]:{port}" if ":" in host else f"http://{host}:{port}"


def fetch(url: str, *, token: str | None = None, timeout: float = 10.0) -> Report:
    """One ``GET /health/deep``. Raises :class:`Unreachable` or :class:`Refused`."""
    request = urllib.request.Request(url.rstrip("/") + "/health/deep",
                                     headers={"Accept": "application/json"})
    if token:
        request.add_header("Authorization", f"Bearer {token}")
    try:
        with urllib.request.urlopen(request, timeout=timeout) as response:
            status, raw = response.status, response.read()
    except urllib.error.HTTPError as exc:
        status, raw = exc.code, exc.read()
    except (OSError, ValueError) as exc:  # refused, timed out, no such host, bad URL
        reason = getattr(exc, "reason", None) or exc
        why = getattr(reason, "strerror", None) or reason
        raise Unreachable(f"no agent answers at {url} ({why})") from None
    if status in (401, 403):
        raise Refused(f"{url} refused the request ({status}); pass an operator token with "
                      "--token or FLUX_AGENT_TOKEN")
    try:
        body = json.loads(raw)
    except ValueError:
        body = None
    if status not in (200, 503) or not isinstance(body, dict) or "status" not in body:
        raise Unreachable(f"{url} answered {status}, not as a flux-agent admin listener")
    return Report(url, status == 200 and body["status"] == "ready", body)


def render(report: Report) -> str:
    """The report for a person: a headline, then one line per part."""
    body = report.body
    verdict = "healthy" if report.healthy else "NOT HEALTHY: " + "; ".join(report.problems)
    lines = [f"flux-agent at {report.url}: {verdict}"]

    def row(name: str, text: str) -> None:
        lines.append(f"  {name:<11} {text}")

    row("ready", "yes" if report.ready else f"no ({', '.join(body.get('reasons') or [])})")
    upstream_name, upstream = _upstream(body)
    row(upstream_name, _reach(upstream))
    spool = body.get("spool")
    if isinstance(spool, dict):
        row("spool", _spool(spool))
    flush = body.get("flush")
    if isinstance(flush, dict):
        row("last flush", _since(flush.get("last_flush_at")))
        row("last error", flush.get("last_error") or "none")
    tasks = _tasks(body)
    if tasks:
        failing = [f"{name} ({task.get('last_error') or 'failing'})"
                   for name, task in tasks.items() if task.get("failing")]
        row("tasks", "failing: " + "; ".join(failing) if failing
            else f"ok ({', '.join(tasks)})")
    if isinstance(body.get("uptime_s"), int | float):
        row("uptime", _duration(float(body["uptime_s"])))
    return "\n".join(lines)


def _tasks(body: dict[str, Any]) -> dict[str, dict[str, Any]]:
    tasks = body.get("tasks")
    return {k: v for k, v in tasks.items() if isinstance(v, dict)} \
        if isinstance(tasks, dict) else {}


def _upstream(body: dict[str, Any]) -> tuple[str, Any]:
    """Where the agent delivers, as /health/deep names it: ``upstream`` on a sidecar that
    forwards to aggregators, ``database`` elsewhere."""
    if "upstream" in body:
        return "aggregators", body["upstream"]
    return "database", body.get("database")


def _reach(part: Any) -> str:
    if not isinstance(part, dict):
        return str(part or "unknown")
    status = str(part.get("status", "unknown"))
    where = f" ({part['current']})" if part.get("current") else ""
    if status != "up":
        why = f" ({part['reason']})" if part.get("reason") else ""
        return f"{status}{why}{where}: {part.get('error') or 'no detail'}"
    parts = [status]
    if part.get("latency_ms") is not None:
        parts.append(f"{part['latency_ms']:g} ms")
    if part.get("schema_version"):
        parts.append(f"schema {part['schema_version']}")
    return ", ".join(parts) + where


def _spool(spool: dict[str, Any]) -> str:
    used = _size(spool.get("bytes", 0))
    if spool.get("max_bytes"):
        share = 100 * spool.get("bytes", 0) / spool["max_bytes"]
        used += f" of {_size(spool['max_bytes'])} ({share:.0f}%)"
    text = f"{used}; {spool.get('backlog_records', 0)} records waiting"
    age = spool.get("oldest_unflushed_age_s")
    if age:
        text += f", the oldest for {_duration(float(age))}"
    if spool.get("writable") is False:
        text += "; NOT WRITABLE"
    return text


def _since(stamp: Any) -> str:
    if not stamp:
        return "never"
    try:
        ago = time.time() - datetime.fromisoformat(str(stamp).replace("Z", "+00:00")).timestamp()
    except ValueError:
        return str(stamp)
    return f"{stamp} ({_duration(max(0.0, ago))} ago)"


def _size(n: float) -> str:
    units = ["B", "KiB", "MiB", "GiB"]
    while n >= 1024 and len(units) > 1:
        n /= 1024
        units.pop(0)
    return f"{n:.0f} B" if units[0] == "B" else f"{n:.1f} {units[0]}"


def _duration(seconds: float) -> str:
    if seconds < 60:
        return f"{seconds:.1f} s"
    minutes, secs = divmod(int(seconds), 60)
    hours, minutes = divmod(minutes, 60)
    return f"{hours} h {minutes} m" if hours else f"{minutes} m {secs} s"
