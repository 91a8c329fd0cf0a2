"""An identity provider for tests: RSA keys, signed tokens, a JWKS, the bearer header. Every
private key and token is remembered as a secret that must never be logged or answered."""

from __future__ import annotations

import json
import time
from typing import Any

import jwt
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import rsa

from .capture import remember_secret

ISSUER = "https://idp.flux.test"
AUDIENCE = "flux-agent"


def pem_public(key: Any) -> bytes:
    return key.public_key().public_bytes(serialization.Encoding.PEM,
                                         serialization.PublicFormat.SubjectPublicKeyInfo)


def private_key() -> rsa.RSAPrivateKey:
    key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    remember_secret(key.private_bytes(serialization.Encoding.PEM,
                                      serialization.PrivateFormat.PKCS8,
                                      serialization.NoEncryption()))
    return key


def token(key: Any, algorithm: str = "RS256", **claims: Any) -> str:
    now = int(time.time())
    body = {"iss": ISSUER, "sub": "etl@nasa.gov", "agency": "nasa", "role": "operator",
            "iat": now, "exp": now + 600, "aud": AUDIENCE}
    body.update(claims)
    body = {k: v for k, v in body.items() if v is not None}
    minted = jwt.encode(body, key, algorithm=algorithm)
    remember_secret(minted)
    return minted


def bearer(tok: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {tok}"}


def jwks(*pairs: tuple[str, Any]) -> str:
    """A JWKS of these (kid, RSA private key) pairs' public keys."""
    keys = []
    for kid, key in pairs:
        jwk = json.loads(jwt.algorithms.RSAAlgorithm.to_jwk(key.public_key()))
        jwk.update({"kid": kid, "use": "sig", "alg": "RS256"})
        keys.append(jwk)
    return json.dumps({"keys": keys})
