"""The client's errors: what an error answer of the agent becomes, with its problem+json body."""

from __future__ import annotations

import json
from collections.abc import Mapping
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


class FluxServerError(FluxHTTPError):
    """Any other 5xx."""


def error_from(status: int, body: bytes, headers: Mapping[str, str]) -> FluxHTTPError:
    """The exception for an error answer, carrying its problem+json body."""
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
    return cls(f"{status} {code}: {detail}", status=status, code=code, retryable=retryable,
               problem=problem, request_id=request_id)


def _header(headers: Mapping[str, str], name: str) -> str:
    for key, value in headers.items():
        if key.lower() == name.lower():
            return value
    return ""
