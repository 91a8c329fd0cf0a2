"""Who is calling: credentials -> Claims (pure; key files are read by the caller).

The agency always comes from here, never from a request body. Bearer tokens are verified in
``tokens`` (imported only when the agent runs with ``FLUX_AGENT_AUTH=jwt``: the JWT and
cryptography libraries cost about 9 MiB of memory).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Final, Literal, Protocol

from .errors import AuthenticationError, DataIsolationError, ValidationError

Role = Literal["admin", "operator", "viewer", "analyzer"]
ROLES: Final = ("admin", "operator", "viewer", "analyzer")

# What each role may do: a table, not a chain of ifs.
PERMISSIONS: Final[Mapping[str, frozenset[str]]] = {
    "admin": frozenset({"write", "read", "admin"}),
    "operator": frozenset({"write", "read"}),
    "viewer": frozenset({"read"}),
    "analyzer": frozenset({"read"}),
}


@dataclass(frozen=True, slots=True)
class Claims:
    sub: str
    agency: str
    role: str
    expires_at: float | None = None

    def allows(self, action: str) -> bool:
        return action in PERMISSIONS.get(self.role, frozenset())


def require(claims: Claims, action: str) -> None:
    if not claims.allows(action):
        raise ValidationError(
            "FORBIDDEN",
            f"role {claims.role!r} may not {action}",
            status=403,
            context={"role": claims.role, "action": action},
        )


class Authenticator(Protocol):
    """Turns request headers into Claims or raises AuthenticationError."""

    def authenticate(self, headers: Mapping[str, str], local: bool) -> Claims: ...


class FixedAgency:
    """``FLUX_AGENT_AUTH=none``: every caller is the configured agency's operator.

    Only for the Unix socket and loopback listeners; the configuration refuses anything else.
    """

    def __init__(self, agency: str) -> None:
        self.claims = Claims(sub="local", agency=agency, role="operator")

    def authenticate(self, headers: Mapping[str, str], local: bool) -> Claims:
        if not local:
            raise AuthenticationError("AUTH_REQUIRED", "this listener requires a bearer token")
        return self.claims


def check_agency(claims: Claims, known: Callable[[str], bool]) -> None:
    """A valid token for an agency this deployment does not serve is refused."""
    if not known(claims.agency):
        raise DataIsolationError("UNKNOWN_AGENCY",
                                 f"agency {claims.agency!r} is not served by this agent",
                                 context={"agency": claims.agency})
