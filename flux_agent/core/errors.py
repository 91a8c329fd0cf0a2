"""The FluxError tree and its RFC 7807 rendering.

Every failure the agent reports is classified once, where it is detected, into one of five
classes; the class fixes the HTTP status family and whether a retry can help. Everything
downstream (intake answers, metrics, the flusher's retry loop) obeys that classification.
"""

from __future__ import annotations

import enum
import uuid
from collections.abc import Mapping, Sequence
from typing import Any, ClassVar

from .timefmt import utc_now_text

PROBLEM_CONTENT_TYPE = "application/problem+json"
PROBLEM_TYPE_BASE = "urn:flux-agent:problem:"


class FluxError(Exception):
    """Base of every error the agent reports to a caller.

    ``code`` is machine-readable (``INVALID_AGENCY_SLUG``); ``detail`` is for humans and never
    carries secrets; ``context`` holds small structured facts; ``errors`` lists per-field
    violations as ``{"pointer": "/3/payload/use_case", "message": ..., "code": ...}``.
    """

    error_class: ClassVar[str] = "TERMINAL_ERROR"
    default_status: ClassVar[int] = 500
    retryable: ClassVar[bool] = False

    def __init__(
        self,
        code: str,
        detail: str,
        *,
        status: int | None = None,
        title: str | None = None,
        context: Mapping[str, Any] | None = None,
        errors: Sequence[Mapping[str, Any]] | None = None,
        headers: Mapping[str, str] | None = None,
    ) -> None:
        super().__init__(detail)
        self.code = code
        self.detail = detail
        self.status = status or self.default_status
        self.title = title or code.replace("_", " ").capitalize()
        self.context = dict(context or {})
        self.errors = list(errors or [])
        self.headers = dict(headers or {})

    def problem(
        self,
        *,
        instance: str = "",
        request_id: str = "",
        trace_id: str = "",
        span_id: str = "",
    ) -> dict[str, Any]:
        """The RFC 7807 body, extended with the Flux contract's members."""
        body: dict[str, Any] = {
            "type": PROBLEM_TYPE_BASE + self.code.lower().replace("_", "-"),
            "title": self.title,
            "status": self.status,
            "detail": self.detail,
            "instance": instance,
            "error_id": str(uuid.uuid4()),
            "timestamp": utc_now_text(),
            "class": self.error_class,
            "code": self.code,
            "context": self.context,
            "trace_id": trace_id,
            "span_id": span_id,
            "request_id": request_id,
            "retryable": self.retryable,
        }
        if self.errors:
            body["errors"] = self.errors
        return body

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.code!r}, {self.detail!r}, status={self.status})"


class ValidationError(FluxError, ValueError):
    """The request is wrong; repeating it unchanged will fail again (4xx)."""

    error_class = "VALIDATION_ERROR"
    default_status = 422


class TransientError(FluxError):
    """A temporary condition (spool full, draining, database away); retry later (503)."""

    error_class = "TRANSIENT_ERROR"
    default_status = 503
    retryable = True

    def __init__(self, code: str, detail: str, *, retry_after: int = 1, **kw: Any) -> None:
        headers = dict(kw.pop("headers", None) or {})
        headers.setdefault("Retry-After", str(max(1, retry_after)))
        super().__init__(code, detail, headers=headers, **kw)
        self.retry_after = max(1, retry_after)


class TerminalError(FluxError):
    """Something is broken that a retry cannot fix (500)."""

    error_class = "TERMINAL_ERROR"
    default_status = 500


class DataIsolationError(FluxError):
    """The request would cross an agency boundary (403)."""

    error_class = "DATA_ISOLATION_ERROR"
    default_status = 403


class CheckpointError(FluxError):
    """A checkpoint could not be stored or failed its integrity check."""

    error_class = "CHECKPOINT_ERROR"
    default_status = 500


class AuthenticationError(ValidationError):
    """No valid credentials (401); ``WWW-Authenticate`` tells the caller what is expected."""

    default_status = 401

    def __init__(self, code: str, detail: str, **kw: Any) -> None:
        headers = dict(kw.pop("headers", None) or {})
        headers.setdefault(
            "WWW-Authenticate",
            f'Bearer realm="flux-agent", error="invalid_token", error_description="{code}"',
        )
        super().__init__(code, detail, headers=headers, **kw)


class ConfigError(Exception):
    """A setting is invalid; the message names it. The CLI exits with code 78."""

    def __init__(self, setting: str, message: str) -> None:
        super().__init__(f"{setting}: {message}")
        self.setting = setting
        self.message = message


def violation(pointer: str, message: str, code: str) -> dict[str, str]:
    return {"pointer": pointer, "message": message, "code": code}


def too_deep(where: str, limit: int) -> ValidationError:
    """400 NESTING_TOO_DEEP: ``where`` (a JSON pointer into the request body) is the first
    array or object beyond ``limit`` levels."""
    return ValidationError(
        "NESTING_TOO_DEEP", f"the body nests arrays and objects deeper than {limit} levels "
        "(the limit for a payload, a checkpoint state or a RunEvent); nothing was accepted",
        status=400, context={"max_depth": limit},
        errors=[violation(where, f"more than {limit} levels of arrays and objects",
                          "NESTING_TOO_DEEP")],
    )


# --------------------------------------------------------------------------- upstreams


class Fault(enum.StrEnum):
    """What a failure of an upstream (PostgreSQL, an aggregator) means for the item that met
    it: classified once, where it is detected, and obeyed by the flusher and the routes."""

    TRANSIENT = "transient"  # the upstream or the path to it is away now: retry
    POISON = "poison"  # the item itself is refused: isolate it, keep it as a dead letter
    ERROR = "error"  # an operator must act (a privilege, a missing table) or a bug: retried,
    # and logged as an error


class UpstreamError(Exception):
    """A failure of PostgreSQL or of an aggregator, as the stages above them see it: its
    fault, a one-line description without secrets, and the upstream's own code (a SQLSTATE,
    an HTTP status) when there is one."""

    fault: ClassVar[Fault] = Fault.ERROR

    def __init__(self, detail: str, *, code: str | None = None) -> None:
        super().__init__(detail)
        self.detail = detail
        self.code = code


class StoreUnavailable(UpstreamError):
    """The upstream, or the path to it, is unavailable now; the same request may succeed
    later (connection errors, deadlines, shutdowns, overload, a standby, a full aggregator)."""

    fault = Fault.TRANSIENT


class PermissionDenied(UpstreamError):
    """The upstream refuses this login or one of its privileges: an operator must act."""


class UnsafeRole(PermissionDenied):
    """The login role is a superuser or has BYPASSRLS: isolation would not be enforced."""


class BadParameter(UpstreamError, ValueError):
    """The upstream refused a value it was given (a row it cannot store, a read parameter it
    cannot take): retrying the same item cannot help."""

    fault = Fault.POISON


class SchemaNotReady(UpstreamError):
    """The flux schema is missing or behind and this agent may not (or could not) migrate."""


def fault_of(exc: BaseException) -> Fault:
    """The fault of any failure: an upstream's own, else transient for the network and
    deadlines, else an error."""
    if isinstance(exc, UpstreamError):
        return exc.fault
    if isinstance(exc, OSError | TimeoutError):
        return Fault.TRANSIENT
    return Fault.ERROR


def describe(exc: BaseException) -> str:
    """One line about a failure, without secrets."""
    if isinstance(exc, UpstreamError):
        return exc.detail
    text = str(exc).splitlines()[0] if str(exc) else ""
    return f"{type(exc).__name__}: {text}" if text else type(exc).__name__
