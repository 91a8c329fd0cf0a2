"""The one-shot commands: ``migrate``, ``verify``, ``spool``, ``token`` and ``emit``."""

from __future__ import annotations

import argparse
import json
import os
import sys
from collections.abc import Callable, Coroutine
from pathlib import Path
from typing import Any

from ..core.errors import ConfigError
from ..core.files import lock_holder
from ..core.settings import env_name, load_config, parse_duration
from .common import (
    EXIT_DATAERR,
    EXIT_FAILURE,
    EXIT_NOPERM,
    EXIT_NOT_COMMITTED,
    EXIT_OK,
    EXIT_UNAVAILABLE,
    _run_async,
)

# --------------------------------------------------------------------------- migrate


def cmd_migrate(args: argparse.Namespace) -> int:
    config = load_config(args, serving=False)
    if not config.database_url:
        raise ConfigError("FLUX_AGENT_DATABASE_URL",
                          "required by migrate (the embedded default migrates itself at start)")
    from ..postgres.migrations import migrate_dsn

    applied = _run_async(_wrap(migrate_dsn(config.database_url.reveal(),
                                           pgbouncer=config.database_pgbouncer)))
    print(json.dumps({"applied": applied}))
    return EXIT_OK


def _wrap(coro: Coroutine[Any, Any, Any]) -> Callable[[], Coroutine[Any, Any, Any]]:
    return lambda: coro


# --------------------------------------------------------------------------- verify


def cmd_verify(args: argparse.Namespace) -> int:
    """Re-hash stored events and checkpoints; exit 1 if any does not match its hash."""
    from ..intake.schemas import SchemaError, profile_manifest
    from ..postgres.pool import Postgres
    from ..postgres.store import Store

    config = load_config(args, serving=False)
    if not config.database_url:
        raise ConfigError("FLUX_AGENT_DATABASE_URL",
                          "required by verify (for the embedded default, the url that "
                          "'flux-agent run' logs at start)")
    try:
        manifest = profile_manifest(config.schema_profile, Path(config.agency_manifest)
                                    if config.agency_manifest else None)
    except SchemaError as exc:
        raise ConfigError(exc.setting, exc.message) from None
    if config.agency and not manifest.knows(config.agency):
        raise ConfigError("FLUX_AGENT_AGENCY", manifest.refusal(config.agency))
    if not config.agency and not manifest.restricted:
        raise ConfigError("FLUX_AGENT_AGENCY", "required: no agency manifest lists the "
                          "agencies to verify (or set FLUX_AGENT_AGENCY_MANIFEST)")
    agencies = [config.agency] if config.agency else list(manifest.retention_days)
    # Payloads stored before the nesting limit may nest up to ~1,000 levels (what the decoder
    # took then); re-canonicalising them recurses in C once per level.
    sys.setrecursionlimit(max(sys.getrecursionlimit(), 10_000))

    async def run() -> int:
        # An auditor's role may bypass row-level security: verify only reads, by agency.
        store = Store(Postgres(config.database_url.reveal(),  # type: ignore[union-attr]
                               max_connections=1, require_safe_role=False,
                               pgbouncer=config.database_pgbouncer,
                               name="flux-agent-verify"))
        mismatches = 0
        try:
            for agency in agencies:
                async for report in store.verify(agency, args.run):
                    print(json.dumps(report))
                    if "stored_hash" in report:
                        mismatches += 1
        finally:
            await store.close()
        return EXIT_FAILURE if mismatches else EXIT_OK

    return _run_async(run)


# --------------------------------------------------------------------------- spool


def cmd_spool(args: argparse.Namespace) -> int:
    from .. import spool

    config = load_config(args, serving=False)
    directory = config.spool_dir
    if not directory.is_dir():
        print(f"flux-agent: no spool at {directory}", file=sys.stderr)
        return EXIT_FAILURE
    holder = lock_holder(config.state_path / "agent.lock")
    if holder is not None:
        print(f"flux-agent spool: an agent (pid {holder}) is running on {config.state_path}: "
              "these are its files as last written, behind what it holds in memory (records "
              "shown pending may be flushed already); ask it with: flux-agent status",
              file=sys.stderr)
    if args.action == "inspect":
        print(json.dumps(spool.inspect(directory), indent=2))
        return EXIT_OK
    problems = spool.verify(directory)
    for problem in problems:
        print(problem)
    if not problems:
        print(f"{directory}: all checksums verified")
    return EXIT_FAILURE if problems else EXIT_OK


# --------------------------------------------------------------------------- token


def cmd_token(args: argparse.Namespace) -> int:
    """Mint a development token (or generate a development key pair)."""
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric import ec, ed25519, rsa

    from ..intake.tokens import mint

    if not args.generate_key and not args.agency:
        raise ConfigError("--agency", "required: the agency the credential acts for")
    if args.api_key:
        import secrets

        from ..intake.auth import api_key_digest

        _warn_unknown_agency(args)
        api_key = "flux_" + secrets.token_urlsafe(32)
        entry = {"sha256": api_key_digest(api_key), "agency": args.agency, "role": args.role,
                 "name": args.sub}
        print("flux-agent: a new API key. Give the key (stdout) to the client; add this "
              f"entry to FLUX_AGENT_API_KEYS_FILE: {json.dumps(entry)}", file=sys.stderr)
        print(api_key)
        return EXIT_OK
    if args.generate_key:
        private = Path(args.generate_key)
        key = ec.generate_private_key(ec.SECP256R1())
        private.write_bytes(key.private_bytes(
            serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption()))
        private.chmod(0o600)
        public = private.with_name(private.name + ".pub")
        public.write_bytes(key.public_key().public_bytes(
            serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo))
        print(f"development key pair: {private} (private, ES256), {public} (public)",
              file=sys.stderr)
        return EXIT_OK
    if not args.key:
        raise ConfigError("--key", "a PEM private key (or --generate-key PATH first)")
    try:
        pem = Path(args.key).read_bytes()
        private_key = serialization.load_pem_private_key(pem, password=None)
    except (OSError, ValueError, TypeError) as exc:
        raise ConfigError("--key", f"cannot load a private key from {args.key}: {exc}") from None
    if isinstance(private_key, rsa.RSAPrivateKey):
        algorithm = "RS256"
    elif isinstance(private_key, ec.EllipticCurvePrivateKey):
        algorithm = "ES256"
    elif isinstance(private_key, ed25519.Ed25519PrivateKey):
        algorithm = "EdDSA"
    else:
        raise ConfigError("--key", "use an RSA, P-256 or Ed25519 private key")
    _warn_unknown_agency(args)
    token = mint(private_key, algorithm=algorithm, issuer=args.issuer, sub=args.sub,
                 agency=args.agency, role=args.role, ttl=parse_duration(args.ttl),
                 audience=args.audience, kid=args.kid)
    print("flux-agent: DEVELOPMENT TOKEN (\"dev\": true); mint production tokens with your "
          "identity provider", file=sys.stderr)
    print(token)
    return EXIT_OK


def _warn_unknown_agency(args: argparse.Namespace) -> None:
    """A token for an agency the manifest does not know is refused by the agent
    (UNKNOWN_AGENCY); say so now rather than at the first request."""
    from ..intake.schemas import SchemaError, profile_manifest

    manifest = args.agency_manifest or os.environ.get(env_name("agency_manifest"))
    profile = args.schema_profile or os.environ.get(env_name("schema_profile")) or "neutral"
    try:
        known = profile_manifest(profile, Path(manifest) if manifest else None)
    except SchemaError as exc:
        raise ConfigError(exc.setting, exc.message) from None
    if not known.knows(args.agency):
        print(f"flux-agent token: warning: agency {args.agency!r} is not in the agency "
              f"manifest ({known.source}): an agent using it refuses this credential (403 "
              "UNKNOWN_AGENCY)", file=sys.stderr)


# --------------------------------------------------------------------------- emit


def cmd_emit(args: argparse.Namespace) -> int:
    """Post one event from a shell script, through the workload client. Whatever happens,
    stdout gets one JSON object with the event's id (``event_ids``); a failure adds
    ``error`` (status, code, the violations' pointers) and says it on stderr too."""
    from ..client import (
        FluxAuthError,
        FluxClient,
        FluxClientError,
        FluxConnectionError,
        FluxNotCommittedError,
        FluxRequestError,
        FluxUnavailableError,
        RetryPolicy,
        uuid7,
    )

    event_id = args.event_id or uuid7()

    def answer(accepted: int = 0, duplicates: int = 0, committed: bool = False,
               error: dict[str, Any] | None = None) -> None:
        out: dict[str, Any] = {"accepted": accepted, "duplicates": duplicates,
                               "event_ids": [event_id], "committed": committed}
        if error is not None:
            out["error"] = error
        print(json.dumps(out))

    def refused(message: str) -> int:  # here, before the agent could say anything
        print(f"flux-agent emit: {message}", file=sys.stderr)
        answer(error={"detail": message})
        return EXIT_DATAERR

    try:
        payload = _read_payload(args.payload)
    except ValueError as exc:
        return refused(f"--payload: {exc}")
    client = FluxClient(args.url, socket_path=args.socket, token=args.token,
                        token_file=args.token_file, timeout=args.timeout,
                        retry=RetryPolicy(attempts=args.attempts))
    try:
        with client:
            result = client.emit(args.kind, args.run, step=args.step, payload=payload,
                                 provider=args.provider, model=args.model,
                                 occurred_at=args.occurred_at, event_id=event_id,
                                 wait_committed=args.wait_committed)
    except ValueError as exc:  # the client refuses what the agent would refuse anyway
        return refused(str(exc))
    except FluxNotCommittedError as exc:
        print(f"flux-agent emit: accepted (durable on the agent's spool) but not yet in "
              f"PostgreSQL within the agent's wait ({exc.code}); it will be delivered, and "
              "posting the same event id again is safe", file=sys.stderr)
        answer(exc.accepted, exc.duplicates, error={"status": exc.status, "code": exc.code})
        return EXIT_NOT_COMMITTED
    except FluxClientError as exc:
        print(f"flux-agent emit: {exc}", file=sys.stderr)
        for v in exc.errors[:20]:
            if isinstance(v, dict):
                print(f"flux-agent emit:   {v.get('pointer') or '/'}: {v.get('message')} "
                      f"[{v.get('code')}]", file=sys.stderr)
        answer(error={"status": exc.status, "code": exc.code, "errors": exc.errors})
        if isinstance(exc, FluxAuthError):
            given = args.token or args.token_file or os.environ.get("FLUX_AGENT_TOKEN") \
                or os.environ.get("FLUX_AGENT_TOKEN_FILE")
            if exc.status == 401 and not given:
                print("flux-agent emit: the agent wants a token: pass --token or "
                      "--token-file, or set FLUX_AGENT_TOKEN or FLUX_AGENT_TOKEN_FILE",
                      file=sys.stderr)
            return EXIT_NOPERM
        if isinstance(exc, FluxRequestError):
            return EXIT_DATAERR
        if isinstance(exc, FluxConnectionError | FluxUnavailableError):
            return EXIT_UNAVAILABLE
        return EXIT_FAILURE
    answer(result.accepted, result.duplicates, result.committed)
    return EXIT_OK


def _read_payload(spec: str | None) -> dict[str, object]:
    """``--payload '{"a": 1}'``, ``--payload @file.json`` or ``--payload -`` (stdin)."""
    if spec is None:
        return {}
    if spec == "-":
        text = sys.stdin.read()
    elif spec.startswith("@"):
        try:
            text = Path(spec[1:]).read_text()
        except OSError as exc:
            raise ValueError(f"cannot read {spec[1:]}: {exc.strerror}") from None
    else:
        text = spec
    try:
        value = json.loads(text)
    except json.JSONDecodeError as exc:
        raise ValueError(f"not JSON: {exc}") from None
    if not isinstance(value, dict):
        raise ValueError("the payload must be a JSON object")
    return value
