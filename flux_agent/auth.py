"""Who is calling: credentials -> Claims (pure; key files are read by the caller).

The agency always comes from here, never from a request body.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Final, Literal, Protocol

from .errors import AuthenticationError, ValidationError

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
