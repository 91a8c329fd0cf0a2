"""Who is calling: credentials -> Claims (pure; key files are read by the caller).

The agency always comes from here, never from a request body. Bearer tokens are verified in
``tokens`` (imported only when the agent runs with ``FLUX_AGENT_AUTH=jwt``: the JWT and
cryptography libraries cost about 9 MiB of memory).
"""

from __future__ import annotations

import hashlib
import json
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any, Final, Literal, Protocol

from ..core.errors import AuthenticationError, DataIsolationError, ValidationError

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
    # Every agency the caller may act for (a namespace may be bound to several): ``agency``
    # is the one a request acts for, chosen among them (X-Flux-Agency) or the first.
    agencies: tuple[str, ...] = ()

    def allows(self, action: str) -> bool:
        return action in PERMISSIONS.get(self.role, frozenset())

    def may_act_for(self, agency: str) -> bool:
        return agency == self.agency or agency in self.agencies


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


def authorization(headers: Mapping[str, str]) -> str:
    """The request's one ``Authorization`` header, ``""`` when there is none. Two or more are
    ambiguous (which one would name the caller?): refused, whatever they hold."""
    getall = getattr(headers, "getall", None)  # a multidict: the request's own headers
    if getall is None:
        return headers.get("Authorization", "")
    values = getall("Authorization", ())
    if len(values) > 1:
        raise AuthenticationError("TOKEN_AMBIGUOUS", "send exactly one Authorization header")
    return str(values[0]) if values else ""


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
    """A valid token for an agency this deployment does not serve is refused, naming the
    setting that decides it."""
    if not known(claims.agency):
        raise DataIsolationError("UNKNOWN_AGENCY",
                                 f"agency {claims.agency!r} is not served by this agent: it "
                                 "is not in the agency manifest (FLUX_AGENT_AGENCY_MANIFEST)",
                                 context={"agency": claims.agency,
                                          "setting": "FLUX_AGENT_AGENCY_MANIFEST"})


# --------------------------------------------------------------------------- API keys

_SLUG = re.compile(r"^[a-z0-9]+(-[a-z0-9]+)*$")
_SHA256 = re.compile(r"^[0-9a-f]{64}$")


def load_api_keys(text: str) -> dict[str, Claims]:
    """``{"keys": [{"sha256": "<hex of the key's SHA-256>", "agency": "nasa",
    "role": "operator", "name": "airflow-prod"}]}`` -> {hash: Claims}. The file holds hashes
    only, so reading it reveals no key. Raises ValueError naming the bad entry."""
    data: Any = json.loads(text)
    keys = data.get("keys") if isinstance(data, dict) else None
    if not isinstance(keys, list):
        raise ValueError('expected {"keys": [...]}')
    out: dict[str, Claims] = {}
    for i, entry in enumerate(keys):
        if not isinstance(entry, dict):
            raise ValueError(f"keys[{i}] is not an object")
        digest, agency = entry.get("sha256"), entry.get("agency")
        role, name = entry.get("role", "operator"), entry.get("name", f"api-key-{i}")
        if not isinstance(digest, str) or not _SHA256.match(digest):
            raise ValueError(f"keys[{i}].sha256 must be 64 lower-case hex digits")
        if not isinstance(agency, str) or not _SLUG.match(agency):
            raise ValueError(f"keys[{i}].agency must be an agency slug")
        if role not in ROLES:
            raise ValueError(f"keys[{i}].role must be one of {', '.join(ROLES)}")
        out[digest] = Claims(sub=f"api-key:{name}", agency=agency, role=str(role))
    return out


def api_key_digest(key: str) -> str:
    return hashlib.sha256(key.encode()).hexdigest()


class ApiKeyAuthenticator:
    """Bearer API keys for clients that cannot mint JWTs (the OpenLineage HTTP transport's
    ``api_key`` auth sends one). A token that looks like a JWT goes to ``tokens`` instead.

    Keys are compared by SHA-256: the lookup reveals nothing by its timing."""

    def __init__(self, keys: Mapping[str, Claims], tokens: Authenticator | None = None) -> None:
        self.keys = dict(keys)
        self.tokens = tokens

    def set_keys(self, keys: Mapping[str, Claims]) -> None:
        """The keys file was re-read (a reload): these keys from now on."""
        self.keys = dict(keys)

    def authenticate(self, headers: Mapping[str, str], local: bool) -> Claims:
        raw = authorization(headers)
        scheme, _, token = raw.partition(" ")
        token = token.strip()
        if self.tokens is not None and (not token or token.count(".") == 2):
            return self.tokens.authenticate(headers, local)
        if not raw:
            raise AuthenticationError("TOKEN_MISSING", "send Authorization: Bearer <key>",
                                      headers={"WWW-Authenticate": 'Bearer realm="flux-agent"'})
        if scheme.lower() != "bearer" or not token:
            raise AuthenticationError("TOKEN_MALFORMED", "the Authorization header must be "
                                      "'Bearer <key>'")
        if not token.isascii():  # header bytes beyond ASCII arrive as surrogates
            raise AuthenticationError("TOKEN_MALFORMED", "an API key is ASCII")
        claims = self.keys.get(api_key_digest(token))
        if claims is None:
            raise AuthenticationError("TOKEN_UNKNOWN_KEY", "unknown API key")
        return claims
