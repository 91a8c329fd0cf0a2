"""The client's errors: what an error answer of the agent becomes, with its problem+json body."""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from typing import Any

RETRY_STATUSES = frozenset({429, 502, 503, 504})


class FluxClientError(Exception):
    """Base of the client's errors."""

    def __init__(self, message: str, *, status: int | None = None, code: str = "",
                 retryable: bool = False, problem: Mapping[str, Any] | None = None,
                 request_id: str = "") -> None:
        super().__init__(message)
        self.status = status
        self.code = code
        self.retryable = retryable
        self.problem: dict[str, Any] = dict(problem or {})
        self.errors: list[Any] = list(self.problem.get("errors") or [])
        self.request_id = request_id


class FluxConnectionError(FluxClientError):
    """The agent could not be reached (socket missing, connection refused or cut)."""


class FluxHTTPError(FluxClientError):
    """The agent answered with an error status."""


class FluxRequestError(FluxHTTPError):
    """4xx: the request is wrong; sending it again unchanged fails again."""


class FluxAuthError(FluxRequestError):
    """401 or 403: missing or invalid token, role or agency."""


class FluxNotFoundError(FluxRequestError):
    """404."""


class FluxUnavailableError(FluxHTTPError):
    """503 (spool full, draining, commit timeout) still after the retries."""


class FluxNotCommittedError(FluxUnavailableError):
    """503 COMMIT_TIMEOUT to ``wait_committed``: the events are accepted and durable on the
    agent's spool, not yet in PostgreSQL (a retry with the same ids is safe, and waits
    again). Not retried by the client; ``event_ids`` are the events posted."""

    def __init__(self, message: str, *, event_ids: list[str], **kw: Any) -> None:
        super().__init__(message, **kw)
        self.event_ids = event_ids
        self.accepted = int(self.problem.get("context", {}).get("accepted", 0) or 0)
        self.duplicates = int(self.problem.get("context", {}).get("duplicates", 0) or 0)


class FluxServerError(FluxHTTPError):
    """Any other 5xx."""


def error_from(status: int, body: bytes, headers: Mapping[str, str],
               event_ids: Sequence[str] = ()) -> FluxHTTPError:
    """The exception for an error answer, carrying its problem+json body (and, for a commit
    that did not come in time, the ids of the events posted)."""
    problem: dict[str, Any] = {}
    try:
        decoded = json.loads(body) if body else {}
        if isinstance(decoded, dict):
            problem = decoded
    except ValueError:
        problem = {"detail": body[:500].decode(errors="replace")}
    code = str(problem.get("code") or f"HTTP_{status}")
    detail = str(problem.get("detail") or problem.get("title") or f"HTTP {status}")
    retryable = bool(problem.get("retryable", status in RETRY_STATUSES))
    request_id = _header(headers, "X-Request-ID")
    message = f"{status} {code}: {detail}"
    if status == 503 and code == "COMMIT_TIMEOUT":
        return FluxNotCommittedError(message, event_ids=list(event_ids), status=status,
                                     code=code, retryable=retryable, problem=problem,
                                     request_id=request_id)
    cls: type[FluxHTTPError]
    if status in (401, 403):
        cls = FluxAuthError
    elif status == 404:
        cls = FluxNotFoundError
    elif 400 <= status < 500:
        cls = FluxRequestError
    elif status == 503:
        cls = FluxUnavailableError
    else:
        cls = FluxServerError
    return cls(message, status=status, code=code, retryable=retryable, problem=problem,
               request_id=request_id)


def _header(headers: Mapping[str, str], name: str) -> str:
    for key, value in headers.items():
        if key.lower() == name.lower():
            return value
    return ""
