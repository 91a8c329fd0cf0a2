"""Bearer tokens (JWT): verification keys, the authenticator, and development tokens.

Loaded only in ``FLUX_AGENT_AUTH=jwt`` mode and by ``flux-agent token``.
"""

from __future__ import annotations

import json
import math
import re
import time
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import jwt

from ..core.errors import AuthenticationError, DataIsolationError
from ..core.settings import KUBE_BINDING
from .auth import ROLES, Claims, authorization

_SLUG = re.compile(r"^[a-z0-9]+(-[a-z0-9]+)*$")
_NUMERIC_DATES = ("exp", "nbf", "iat")


class _NotNumericDate(jwt.InvalidTokenError):
    def __init__(self, claim: str) -> None:
        super().__init__(claim)
        self.claim = claim


class _StrictJWT(jwt.PyJWT):
    """RFC 7519 makes ``exp``, ``nbf`` and ``iat`` NumericDates (JSON numbers); pyjwt also
    takes ``"1700000000"``. Checked after the signature, before pyjwt reads the times."""

    def _validate_claims(self, payload: dict[str, Any], *args: Any, **kwargs: Any) -> None:
        for claim in _NUMERIC_DATES:
            value = payload.get(claim)
            if claim in payload and (isinstance(value, bool) or not isinstance(value, int | float)
                                     or (isinstance(value, float) and not math.isfinite(value))):
                raise _NotNumericDate(claim)
        super()._validate_claims(payload, *args, **kwargs)


# pyjwt's exceptions -> precise problem codes (most specific first: they subclass each other).
_JWT_CODES: tuple[tuple[type[Exception], str, str], ...] = (
    (_NotNumericDate, "TOKEN_INVALID_CLAIM", "a time claim is not a NumericDate"),
    (jwt.ExpiredSignatureError, "TOKEN_EXPIRED", "the token has expired"),
    (jwt.ImmatureSignatureError, "TOKEN_NOT_YET_VALID", "the token is not valid yet"),
    (jwt.InvalidIssuedAtError, "TOKEN_INVALID_CLAIM", "the token's iat is not a number"),
    (jwt.InvalidIssuerError, "TOKEN_WRONG_ISSUER", "the token's issuer is not trusted"),
    (jwt.InvalidAudienceError, "TOKEN_WRONG_AUDIENCE", "the token is for another audience"),
    (jwt.MissingRequiredClaimError, "TOKEN_MISSING_CLAIM", "the token lacks a claim"),
    (jwt.InvalidAlgorithmError, "TOKEN_ALGORITHM_NOT_ALLOWED",
     "the token's algorithm is not allowed"),
    (jwt.InvalidSignatureError, "TOKEN_BAD_SIGNATURE", "the token's signature is invalid"),
    (jwt.DecodeError, "TOKEN_MALFORMED", "the token is malformed"),
    (jwt.InvalidKeyError, "TOKEN_BAD_SIGNATURE", "the token cannot be verified with our keys"),
    (jwt.PyJWKError, "TOKEN_BAD_SIGNATURE", "the token cannot be verified with our keys"),
    (jwt.InvalidTokenError, "TOKEN_INVALID", "the token is invalid"),
)


class KeySet:
    """Verification keys: one PEM public key, a JWKS (by ``kid``), or an HMAC secret."""

    def __init__(self, *, pem: bytes | None = None, jwks: str | None = None,
                 secret: str | None = None) -> None:
        self.single: Any = None
        self.by_kid: dict[str, Any] = {}
        if pem is not None:
            self.single = _load_public_pem(pem)
        if jwks is not None:
            data = json.loads(jwks)
            keys = data.get("keys") if isinstance(data, dict) else None
            if not isinstance(keys, list) or not keys:
                raise ValueError("a JWKS needs a non-empty \"keys\" list")
            for item in keys:
                jwk = jwt.PyJWK.from_dict(item)
                kid = item.get("kid") or ""
                self.by_kid[kid] = jwk.key
            if len(self.by_kid) == 1:
                self.single = next(iter(self.by_kid.values()))
        if secret is not None:
            self.single = secret.encode() if isinstance(secret, str) else secret

    def key_for(self, kid: str | None) -> Any:
        if kid is not None and kid in self.by_kid:
            return self.by_kid[kid]
        if self.single is not None and (kid is None or not self.by_kid):
            return self.single
        raise AuthenticationError("TOKEN_UNKNOWN_KEY",
                                  f"no verification key with kid {kid!r}" if kid else
                                  "the token names no kid and several keys are configured")


def _load_public_pem(pem: bytes) -> Any:
    from cryptography.hazmat.primitives.serialization import (
        load_pem_public_key,
    )

    return load_pem_public_key(pem)


class JwtAuthenticator:
    """Bearer tokens, verified with an explicit algorithm list and cached until expiry.

    Verifying a signature costs about 0.2 ms (RS256 2048-bit or ES256 here) against about
    1 µs for a cache hit; a workload sends the same token with every request, so a verified
    token's claims are cached (bounded) until it expires. A key rotation clears the cache.
    """

    def __init__(
        self,
        keys: KeySet,
        *,
        algorithms: Sequence[str],
        issuers: Sequence[str],
        audience: str | None = None,
        leeway: float = 30.0,
        cache_size: int = 4096,
        clock: Callable[[], float] = time.time,
        claims: Callable[[dict[str, Any]], Claims] | None = None,
    ) -> None:
        self.keys = keys
        self.algorithms = list(algorithms)
        self.issuers = list(issuers)
        self.audience = audience or None
        self.leeway = leeway
        self.clock = clock
        self._jwt = _StrictJWT()
        self._claims = claims or flux_claims
        # Kubernetes service-account tokens name no agency: the mapping requires what they
        # do carry instead.
        self._required = ["exp", "iat", "iss", "sub"] if claims is None else \
            ["exp", "iat", "iss", "sub", "aud"]
        self._cache: dict[str, Claims] = {}
        self._cache_size = cache_size
        self.verifications = 0

    def set_keys(self, keys: KeySet) -> None:
        self.keys = keys
        self._cache.clear()

    def authenticate(self, headers: Mapping[str, str], local: bool) -> Claims:
        raw = authorization(headers)
        scheme, _, token = raw.partition(" ")
        if not raw:
            raise AuthenticationError("TOKEN_MISSING", "send Authorization: Bearer <token>",
                                      headers={"WWW-Authenticate": 'Bearer realm="flux-agent"'})
        if scheme.lower() != "bearer" or not token.strip():
            raise AuthenticationError("TOKEN_MALFORMED", "the Authorization header must be "
                                      "'Bearer <token>'")
        token = token.strip()
        cached = self._cache.get(token)
        now = self.clock()
        if cached is not None:
            if cached.expires_at is not None and now <= cached.expires_at + self.leeway:
                return cached
            del self._cache[token]
        claims = self._verify(token)
        if len(self._cache) >= self._cache_size:
            self._evict(now)
        self._cache[token] = claims
        return claims

    def _evict(self, now: float) -> None:
        expired = [t for t, c in self._cache.items()
                   if c.expires_at is None or c.expires_at + self.leeway < now]
        for t in expired:
            del self._cache[t]
        while len(self._cache) >= self._cache_size:
            del self._cache[next(iter(self._cache))]

    def _verify(self, token: str) -> Claims:
        self.verifications += 1
        try:
            header = jwt.get_unverified_header(token)
            alg = header.get("alg")
            if alg not in self.algorithms:
                raise AuthenticationError(
                    "TOKEN_ALGORITHM_NOT_ALLOWED",
                    f"algorithm {alg!r} is not allowed (allowed: {', '.join(self.algorithms)})")
            key = self.keys.key_for(header.get("kid"))
            payload = self._jwt.decode(
                token, key, algorithms=self.algorithms, issuer=self.issuers,
                audience=self.audience, leeway=self.leeway,
                options={"require": self._required,
                         "verify_aud": self.audience is not None},
            )
        except AuthenticationError:
            raise
        except jwt.PyJWTError as exc:
            for kind, code, detail in _JWT_CODES:
                if isinstance(exc, kind):
                    if isinstance(exc, jwt.MissingRequiredClaimError):
                        detail = f"the token lacks the {exc.claim!r} claim"
                    elif isinstance(exc, _NotNumericDate):
                        detail = f"{exc.claim!r} must be a NumericDate (a JSON number)"
                    raise AuthenticationError(code, detail) from None
            raise AuthenticationError("TOKEN_INVALID", "the token is invalid") from None
        except (ValueError, TypeError):
            raise AuthenticationError("TOKEN_MALFORMED", "the token is malformed") from None
        return self._claims(payload)


def expiry(payload: dict[str, Any]) -> float:
    try:
        return float(payload["exp"])
    except (OverflowError, TypeError, ValueError):  # e.g. exp = 10**400
        raise AuthenticationError("TOKEN_INVALID_CLAIM", "'exp' is out of range") from None


def flux_claims(payload: dict[str, Any]) -> Claims:
    """A flux token's claims: ``sub``, ``agency`` (a slug), ``role``."""
    sub, agency, role = payload.get("sub"), payload.get("agency"), payload.get("role")
    if "agency" not in payload:
        raise AuthenticationError("TOKEN_MISSING_CLAIM", "the token lacks the 'agency' claim")
    if "role" not in payload:
        raise AuthenticationError("TOKEN_MISSING_CLAIM", "the token lacks the 'role' claim")
    if not isinstance(sub, str) or not sub:
        raise AuthenticationError("TOKEN_INVALID_CLAIM", "'sub' must be a non-empty string")
    if not isinstance(agency, str) or not _SLUG.match(agency):
        raise AuthenticationError("TOKEN_INVALID_CLAIM", "'agency' must be an agency slug")
    if not isinstance(role, str):
        raise AuthenticationError("TOKEN_INVALID_CLAIM", "'role' must be a string")
    return Claims(sub=sub, agency=agency, role=role, expires_at=expiry(payload))


_SERVICE_ACCOUNT_SUB = re.compile(
    r"^system:serviceaccount:([a-z0-9][a-z0-9-]{0,62}):([a-z0-9][a-z0-9.-]{0,252})$")


class ServiceAccountBindings:
    """Kubernetes workload identity: a projected service-account token, as the kubelet
    issues it (``sub: system:serviceaccount:NS:SA`` and the same names in its
    ``kubernetes.io`` claim), mapped to an agency and a role by ``NS[/SA]=AGENCY[:ROLE]``
    entries. A service account's own entry wins over its namespace's; a token of an
    account bound by neither is refused (403), whoever signed it."""

    def __init__(self, entries: Sequence[str]) -> None:
        # (namespace, account) -> (agencies, role); several entries of one name add agencies
        self.bindings: dict[tuple[str, str], tuple[tuple[str, ...], str]] = {}
        for entry in entries:
            m = KUBE_BINDING.match(entry.strip())
            if m is None:
                raise ValueError(f"{entry!r} is not NAMESPACE[/SERVICEACCOUNT]=AGENCY[:ROLE]")
            role = m.group(4) or "operator"
            if role not in ROLES:
                raise ValueError(f"{entry!r}: role must be one of {', '.join(ROLES)}")
            key = (m.group(1), m.group(2) or "")
            known, known_role = self.bindings.get(key, ((), role))
            if known and known_role != role:
                raise ValueError(f"{entry!r}: {key[0]}{'/' + key[1] if key[1] else ''} is "
                                 f"bound with role {known_role} already")
            if m.group(3) not in known:
                self.bindings[key] = ((*known, m.group(3)), role)

    def agencies(self) -> set[str]:
        return {agency for agencies, _ in self.bindings.values() for agency in agencies}

    def __call__(self, payload: dict[str, Any]) -> Claims:
        sub = payload.get("sub")
        m = _SERVICE_ACCOUNT_SUB.match(sub) if isinstance(sub, str) else None
        if m is None:
            raise AuthenticationError("TOKEN_INVALID_CLAIM", "'sub' is not a Kubernetes "
                                      "service account (system:serviceaccount:NS:NAME)")
        namespace, account = m.group(1), m.group(2)
        kube = payload.get("kubernetes.io")
        kube = kube if isinstance(kube, dict) else {}
        named = kube.get("serviceaccount")
        if not isinstance(named, dict) or kube.get("namespace") != namespace \
                or named.get("name") != account:
            raise AuthenticationError("TOKEN_INVALID_CLAIM", "the token's kubernetes.io claim "
                                      "does not name the service account of its 'sub'")
        bound = self.bindings.get((namespace, account)) or self.bindings.get((namespace, ""))
        if bound is None:
            raise DataIsolationError("SERVICE_ACCOUNT_NOT_BOUND",
                                     f"service account {namespace}/{account} is bound to no "
                                     "agency on this agent",
                                     context={"namespace": namespace, "serviceaccount": account})
        return Claims(sub=str(sub), agency=bound[0][0], role=bound[1],
                      expires_at=expiry(payload), agencies=bound[0])


def mint(
    private_key: Any,
    *,
    algorithm: str,
    issuer: str,
    sub: str,
    agency: str,
    role: str,
    ttl: float,
    audience: str | None = None,
    kid: str | None = None,
    now: float | None = None,
) -> str:
    """A development token (``"dev": true``), for the README's examples and the tests."""
    issued = int(now if now is not None else time.time())
    claims: dict[str, Any] = {"iss": issuer, "sub": sub, "agency": agency, "role": role,
                              "iat": issued, "exp": issued + int(ttl), "dev": True}
    if audience:
        claims["aud"] = audience
    headers = {"kid": kid} if kid else None
    return jwt.encode(claims, private_key, algorithm=algorithm, headers=headers)
