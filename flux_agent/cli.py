"""Command line: the only code that reads ``sys.argv``, installs signal handlers or exits.

Exit codes: 0 clean, 78 bad configuration (the message names the setting), 1 otherwise; the
commands that talk to an agent also use 65, 69 and 77 (sysexits.h, below).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import ctypes
import json
import logging
import os
import resource
import signal
import sys
import time
from collections.abc import Callable, Coroutine, Sequence
from pathlib import Path
from typing import Any, TypeVar

from . import logs
from ._files import lock_holder
from ._version import __version__
from .config import (
    AgentConfig,
    add_flags,
    defaulted,
    effective_settings,
    env_name,
    load_config,
    parse_duration,
    to_toml,
)
from .errors import ConfigError

log = logging.getLogger("flux_agent.cli")
T = TypeVar("T")

EXIT_OK = 0
EXIT_FAILURE = 1
# sysexits.h, so shell scripts can tell what went wrong.
EXIT_DATAERR = 65  # the agent refused the event (4xx): fix the event, do not retry
EXIT_UNAVAILABLE = 69  # the agent could not be reached or stayed unavailable: retry later
EXIT_NOPERM = 77  # authentication or authorisation refused
EXIT_CONFIG = 78  # EX_CONFIG: a bad setting


def _runner() -> asyncio.Runner:
    try:
        import uvloop
    except ImportError:
        return asyncio.Runner()
    return asyncio.Runner(loop_factory=uvloop.new_event_loop)


def _run_async(main: Callable[[], Coroutine[Any, Any, T]]) -> T:
    with _runner() as runner:
        return runner.run(main())


# --------------------------------------------------------------------------- run


async def _serve(config: AgentConfig) -> int:
    from .agent import Agent

    agent = Agent(config)
    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    signals = 0

    def on_signal() -> None:
        nonlocal signals
        signals += 1
        if signals > 1:
            # The spool is already durable; the next start replays what is left.
            log.warning("second signal: exiting now, without finishing the drain; what was "
                        "not flushed stays on the spool for the next start",
                        extra={"fields": {"backlog_records": agent.flusher.backlog
                                          if agent.flusher else None}})
            os._exit(EXIT_FAILURE)
        stop.set()

    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, on_signal)
    try:
        await agent.start()
        waiters = [asyncio.create_task(stop.wait()),
                   asyncio.create_task(agent.exit_requested.wait())]
        await asyncio.wait(waiters, return_when=asyncio.FIRST_COMPLETED)
        for task in waiters:
            task.cancel()
    finally:
        await agent.stop()
    return EXIT_OK


def _tune_process() -> None:
    """Process-wide settings for the sidecar (an embedding application keeps its own).

    - glibc: cap the per-thread malloc arenas (the spool's I/O threads would each grow one);
    - a shorter GIL switch interval: the spool's I/O thread finishes an fdatasync and must
      get the GIL back to wake the requests waiting for it; with the default 5 ms it waits
      behind a busy event loop for most of that;
    - the descriptor soft limit raised to the hard one (as nginx and Go do): the HTTP
      connection caps are derived from it.
    """
    sys.setswitchinterval(0.001)
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft != hard:
        with contextlib.suppress(ValueError, OSError):
            resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    try:
        libc = ctypes.CDLL("libc.so.6")
    except OSError:
        return
    m_arena_max = -8
    libc.mallopt(m_arena_max, 2)


def cmd_run(args: argparse.Namespace) -> int:
    config = load_config(args)
    logs.setup(config.log_level, fmt=config.log_format, access_log=config.access_log)
    _tune_process()
    return _run_async(lambda: _serve(config))


# --------------------------------------------------------------------------- migrate


def cmd_migrate(args: argparse.Namespace) -> int:
    config = load_config(args, serving=False)
    if not config.database_url:
        raise ConfigError("FLUX_AGENT_DATABASE_URL",
                          "required by migrate (the embedded default migrates itself at start)")
    from .sink import migrate_dsn

    applied = _run_async(_wrap(migrate_dsn(config.database_url.reveal(),
                                           pgbouncer=config.database_pgbouncer)))
    print(json.dumps({"applied": applied}))
    return EXIT_OK


def _wrap(coro: Coroutine[Any, Any, Any]) -> Callable[[], Coroutine[Any, Any, Any]]:
    return lambda: coro


# --------------------------------------------------------------------------- verify


def cmd_verify(args: argparse.Namespace) -> int:
    """Re-hash stored events and checkpoints; exit 1 if any does not match its hash."""
    from .postgres import Postgres
    from .store import Store
    from .validate import Schemas

    config = load_config(args, serving=False)
    if not config.database_url:
        raise ConfigError("FLUX_AGENT_DATABASE_URL",
                          "required by verify (for the embedded default, the url that "
                          "'flux-agent run' logs at start)")
    manifest = Schemas(manifest_path=Path(config.agency_manifest) if config.agency_manifest
                       else None).manifest
    if config.agency and not manifest.knows(config.agency):
        raise ConfigError("FLUX_AGENT_AGENCY",
                          f"{config.agency!r} is not in the agency manifest")
    agencies = [config.agency] if config.agency else list(manifest.retention_days)

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
    from . import spool

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

    from .tokens import mint

    if args.api_key:
        import secrets

        from .auth import api_key_digest

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
    from .validate import Schemas

    manifest = args.agency_manifest or os.environ.get(env_name("agency_manifest"))
    try:
        known = Schemas(manifest_path=Path(manifest) if manifest else None).manifest
    except ValueError as exc:
        raise ConfigError(env_name("agency_manifest"), str(exc)) from None
    if not known.knows(args.agency):
        print(f"flux-agent token: warning: agency {args.agency!r} is not in the agency "
              f"manifest ({manifest or 'the bundled one'}): an agent using it refuses this "
              "credential (403 UNKNOWN_AGENCY)", file=sys.stderr)


# --------------------------------------------------------------------------- emit


def cmd_emit(args: argparse.Namespace) -> int:
    """Post one event from a shell script, through the workload client."""
    from .client import (
        FluxAuthError,
        FluxClient,
        FluxClientError,
        FluxConnectionError,
        FluxRequestError,
        FluxUnavailableError,
        RetryPolicy,
    )

    try:
        payload = _read_payload(args.payload)
    except ValueError as exc:
        print(f"flux-agent emit: --payload: {exc}", file=sys.stderr)
        return EXIT_DATAERR
    client = FluxClient(args.url, socket_path=args.socket, token=args.token,
                        token_file=args.token_file, timeout=args.timeout,
                        retry=RetryPolicy(attempts=args.attempts))
    try:
        with client:
            result = client.emit(args.kind, args.run, step=args.step, payload=payload,
                                 provider=args.provider, model=args.model,
                                 occurred_at=args.occurred_at, event_id=args.event_id,
                                 wait_committed=args.wait_committed)
    except ValueError as exc:  # the client refuses what the agent would refuse anyway
        print(f"flux-agent emit: {exc}", file=sys.stderr)
        return EXIT_DATAERR
    except FluxClientError as exc:
        print(f"flux-agent emit: {exc}", file=sys.stderr)
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
    print(json.dumps({"accepted": result.accepted, "duplicates": result.duplicates,
                      "event_ids": result.event_ids, "committed": result.committed}))
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


# --------------------------------------------------------------------------- status


def cmd_status(args: argparse.Namespace) -> int:
    """Ask the running agent (its admin listener) how it is: 0 healthy, 1 not healthy, 69 no
    agent answers, 77 a token is needed."""
    from .client import TokenSource
    from .status import Refused, Report, Unreachable, admin_url, fetch, render

    config = load_config(args, serving=False)
    if args.url:
        url = args.url
    elif config.admin_listen:
        url = admin_url(config.admin_listen)
    else:
        raise ConfigError(env_name("admin_listen"), "the admin listener is off: give --url")
    try:
        deadline = time.monotonic() + parse_duration(args.wait)
    except ValueError as exc:
        raise ConfigError("--wait", str(exc)) from None
    token = TokenSource(args.token, args.token_file).get()
    while True:
        try:
            report: Report | None = fetch(url, token=token, timeout=args.timeout)
            failure = ""
        except Unreachable as exc:
            report, failure = None, str(exc)
        except Refused as exc:
            print(f"flux-agent status: {exc}", file=sys.stderr)
            return EXIT_NOPERM
        if (report is not None and report.healthy) or time.monotonic() >= deadline:
            break
        time.sleep(0.25)
    if report is None:
        print(f"flux-agent status: {failure}", file=sys.stderr)
        holder = lock_holder(config.state_path / "agent.lock")
        print(f"flux-agent status: an agent (pid {holder}) holds the state dir "
              f"{config.state_path}: it may be starting, or listen elsewhere "
              f"({env_name('admin_listen')}, --url)" if holder is not None else
              f"flux-agent status: no agent runs on the state dir {config.state_path} "
              f"({env_name('state_dir')})", file=sys.stderr)
        return EXIT_UNAVAILABLE
    embedded = _embedded_connect(config)
    if args.json:
        print(json.dumps({**report.as_json(), **({"embedded": embedded} if embedded else {})},
                         indent=2))
    else:
        print(render(report))
        if embedded:
            from .agent import SUPERUSER_NOTE

            print(f"  {'psql':<11} {embedded['connect']}\n"
                  f"  {'':<11} (the agent's own role, under row-level security)\n"
                  f"  {'superuser':<11} {embedded['connect_superuser']}\n"
                  f"  {'':<11} ({SUPERUSER_NOTE})")
    return EXIT_OK if report.healthy else EXIT_FAILURE


def _embedded_connect(config: AgentConfig) -> dict[str, str]:
    """psql commands for the embedded PostgreSQL running under the state dir, if one is."""
    data_dir = config.state_path / "postgres"
    if not (data_dir / "postmaster.pid").exists():
        return {}
    from .agent import embedded_connect
    from .embedded import EmbeddedError, LocalPostgres

    try:
        pg = LocalPostgres(data_dir)
    except EmbeddedError:  # no binaries here to connect with
        return {}
    return embedded_connect(pg, config.agency) if pg.running_pid() is not None else {}


# --------------------------------------------------------------------------- validate


def cmd_validate(args: argparse.Namespace) -> int:
    """Load the configuration as ``run`` does and check it without starting: 0 or 78."""
    try:
        config, notes = _validate(args)
    except ConfigError as exc:
        if args.json:
            print(json.dumps({"valid": False, "setting": exc.setting, "error": exc.message}))
        raise
    settings, defaults = effective_settings(config), defaulted(config)
    if args.json:
        print(json.dumps({"valid": True, "settings": settings, "defaults": sorted(defaults),
                          "notes": notes}, indent=2))
    else:
        for note in ["the configuration is valid", *notes]:
            print(f"flux-agent validate: {note}", file=sys.stderr)
        print(to_toml(settings, defaults), end="")
    return EXIT_OK


def _validate(args: argparse.Namespace) -> tuple[AgentConfig, list[str]]:
    from .agent import preflight
    from .embedded import EmbeddedError, find_bin_dir
    from .tracing import make_exporter

    config = load_config(args)
    preflight(config)
    if config.tracing != "off":
        try:
            make_exporter(config.tracing)
        except RuntimeError as exc:
            raise ConfigError(env_name("tracing"), str(exc)) from None
    notes = []
    if config.database_url:
        if args.check_database:
            notes.append(_run_async(lambda: _check_database(config)))
    else:
        try:
            bin_dir = find_bin_dir()
        except EmbeddedError as exc:
            raise ConfigError(env_name("database_url"), str(exc)) from None
        notes.append(f"database: the embedded PostgreSQL under {config.state_path / 'postgres'}"
                     f" (binaries: {bin_dir})" + ("; the agent starts it, so there is nothing "
                                                  "to connect to yet" if args.check_database
                                                  else ""))
    holder = lock_holder(config.state_path / "agent.lock")
    if holder is not None:
        notes.append(f"an agent (pid {holder}) is running on the state dir "
                     f"{config.state_path}: a second one would be refused")
    return config, notes


async def _check_database(config: AgentConfig) -> str:
    """Connect as the agent would (same timeouts, same role check) and read the schema
    version; changes nothing. A database the agent could not use is a ConfigError."""
    from .postgres import Postgres, Timeouts, UnsafeRole, describe
    from .sink import SchemaNotReady, Sink

    assert config.database_url is not None
    setting = env_name("database_url")
    pg = Postgres(config.database_url.reveal(), max_connections=1,
                  pgbouncer=config.database_pgbouncer, name="flux-agent-validate",
                  timeouts=Timeouts(connect=config.database_connect_timeout,
                                    statement=config.database_statement_timeout))
    sink = Sink(pg, migrate_on_connect=False)
    try:
        latency = await pg.ping()
        try:
            await sink.ensure_schema()
            pending = ""
        except SchemaNotReady as exc:
            if not config.migrate:
                raise ConfigError(env_name("migrate"), f"false, and {exc}") from None
            pending = "; the agent applies the pending migrations at start"
        version = await sink.schema_version()
    except UnsafeRole as exc:
        raise ConfigError(setting, str(exc)) from None
    except ConfigError:
        raise
    except Exception as exc:  # noqa: BLE001 - whatever stops the agent using it
        raise ConfigError(setting, f"cannot use the database: {describe(exc)}") from None
    finally:
        await pg.close()
    role = pg.role.name if pg.role else "?"
    return (f"database: reachable as {role} in {latency * 1000:.1f} ms, schema "
            f"{version or 'not created yet'}{pending}")


# --------------------------------------------------------------------------- completion


def cmd_completion(args: argparse.Namespace) -> int:
    from .completion import script

    print(script(build_parser(), args.shell), end="")
    return EXIT_OK


# --------------------------------------------------------------------------- injector


def cmd_inject(argv: Sequence[str]) -> int:
    from .kube import cli_inject

    return cli_inject(argv)


def cmd_inject_webhook(argv: Sequence[str]) -> int:
    from .kube import prepare_webhook, serve_webhook

    plan = prepare_webhook(argv)
    if isinstance(plan, int):
        return plan
    logs.setup(plan.log_level)

    async def serve() -> int:
        loop = asyncio.get_running_loop()
        stop = asyncio.Event()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, stop.set)
        await serve_webhook(plan.config, plan.host, plan.port, plan.cert, plan.key,
                            metrics_port=plan.metrics_port, stop=stop, grace=plan.grace)
        return EXIT_OK

    try:
        return _run_async(serve)
    except OSError as exc:
        print(f"flux-agent inject-webhook: {exc}", file=sys.stderr)
        return EXIT_FAILURE


# The injector's commands parse their own arguments (they are not agent settings).
PASSTHROUGH: dict[str, Callable[[Sequence[str]], int]] = {
    "inject": cmd_inject,
    "inject-webhook": cmd_inject_webhook,
}


# --------------------------------------------------------------------------- entry point


REQUIRED_URL = {"database_url": ("PostgreSQL URL, required (for the embedded default: the url "
                                 "that `flux-agent run` logs at start).", "unset")}


def build_parser() -> argparse.ArgumentParser:
    """The CLI. Each command takes only the settings it uses, each flag shows its default and
    environment variable, and no flag may be abbreviated (a typo is an error, not a guess)."""
    parser = argparse.ArgumentParser(
        prog="flux-agent", allow_abbrev=False,
        description="Durable, validated, exactly-once step events from ETL pods to PostgreSQL.",
        epilog="Each command's own flags: flux-agent COMMAND --help.",
    )
    parser.add_argument("--version", action="version", version=f"flux-agent {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    def command(name: str, text: str, description: str | None = None,
                **kwargs: Any) -> argparse.ArgumentParser:
        return sub.add_parser(name, help=text, description=description or text[:1].upper()
                              + text[1:] + ".", allow_abbrev=False, **kwargs)

    p = command("run", "run the agent (the sidecar)",
                "Run the agent. Exit 0 after a clean drain, 78 on bad configuration, "
                "1 otherwise.")
    add_flags(p)
    p.set_defaults(func=cmd_run)

    p = command("validate", "check the configuration without starting the agent",
                "Load flags, environment and file as `run` does, check them (keys, agency "
                "manifest, ...; with --check-database also the database) and print the "
                "effective configuration, secrets redacted, as TOML. Exit 0 when valid, "
                "78 otherwise.")
    p.add_argument("--check-database", action="store_true",
                   help="also connect to FLUX_AGENT_DATABASE_URL as the agent would (same "
                        "timeouts and role check) and read the schema version")
    p.add_argument("--json", action="store_true", help="print JSON instead of TOML")
    add_flags(p)
    p.set_defaults(func=cmd_validate)

    p = command("status", "ask the running agent how it is",
                "Ask the running agent (its admin listener, FLUX_AGENT_ADMIN_LISTEN) for "
                "readiness, database, spool, last flush and background tasks. Exit 0 "
                "healthy (ready, PostgreSQL up, no task failing), 1 not healthy, 69 no agent "
                "answers, 77 a token is needed, 78 bad configuration.")
    p.add_argument("--url", default=None, help="the admin listener's URL [default: from "
                   "FLUX_AGENT_ADMIN_LISTEN, a wildcard address asked on loopback]")
    p.add_argument("--token", default=None,
                   help="bearer token (an operator's, for remote agents) [env FLUX_AGENT_TOKEN]")
    p.add_argument("--token-file", default=None, help="[env FLUX_AGENT_TOKEN_FILE]")
    p.add_argument("--wait", default="0s", metavar="DURATION",
                   help="until the agent is healthy, ask again for up to this long "
                        "[default: 0s]")
    p.add_argument("--timeout", type=float, default=10.0,
                   help="seconds to wait for an answer [default: 10]")
    p.add_argument("--json", action="store_true", help="print JSON")
    add_flags(p, ("admin_listen", "state_dir", "agency"), {
        "agency": ("The agency the embedded database's psql line is for (the agent's fixed "
                   "agency).", "unset")})
    p.set_defaults(func=cmd_status)

    p = command("migrate", "apply pending schema migrations",
                "Apply pending schema migrations to FLUX_AGENT_DATABASE_URL (as a role that "
                "may create them). Exit 0 when done, 78 on bad configuration, 1 otherwise.")
    add_flags(p, ("database_url",), REQUIRED_URL)
    p.set_defaults(func=cmd_migrate)

    p = command("emit", "post one event (for shell scripts)",
                "Post one event. Exit 0 when accepted (or a duplicate), 65 when the agent "
                "refused the event, 69 when it could not be reached, 77 when "
                "authentication failed, 1 otherwise.")
    p.add_argument("--run", required=True, help="run id")
    p.add_argument("--kind", required=True, help="run.started, step.completed, ...")
    p.add_argument("--step", default=None, help="required for step.* and checkpoint.saved")
    p.add_argument("--payload", default=None,
                   help="a JSON object, @file.json, or - to read it from stdin [default: {}]")
    p.add_argument("--provider", default=None)
    p.add_argument("--model", default=None)
    p.add_argument("--occurred-at", default=None, metavar="TIME",
                   help="RFC 3339 date-time with an offset [default: now]")
    p.add_argument("--event-id", default=None, help="idempotency key [default: a new UUIDv7]")
    p.add_argument("--wait-committed", action="store_true",
                   help="answer once the event is in PostgreSQL")
    p.add_argument("--url", default=None, help="agent URL [default: the socket of "
                   "FLUX_AGENT_SOCKET, else FLUX_AGENT_URL, else http://127.0.0.1:8787]")
    p.add_argument("--socket", default=None, help="agent Unix socket [env FLUX_AGENT_SOCKET]")
    p.add_argument("--token", default=None, help="bearer token [env FLUX_AGENT_TOKEN]")
    p.add_argument("--token-file", default=None,
                   help="a file holding the token [env FLUX_AGENT_TOKEN_FILE]")
    p.add_argument("--timeout", type=float, default=30.0,
                   help="seconds per attempt [default: 30]")
    p.add_argument("--attempts", type=int, default=6,
                   help="tries, with backoff, on 503 [default: 6]")
    p.set_defaults(func=cmd_emit)

    p = command("token", "mint a development JWT, key pair or API key",
                "Development credentials: a JWT signed with a local key (--key), a new key "
                "pair (--generate-key) or an API key (--api-key). Production tokens come "
                "from your identity provider.")
    p.add_argument("--api-key", action="store_true",
                   help="print a new random API key (and its entry for the API keys file)")
    p.add_argument("--generate-key", metavar="PATH",
                   help="write a new ES256 private key to PATH and its public key to PATH.pub")
    p.add_argument("--key", help="PEM private key (RSA, P-256 or Ed25519)")
    p.add_argument("--agency", default="nasa", help="[default: nasa]")
    p.add_argument("--role", default="operator",
                   help="admin, operator, viewer or analyzer [default: operator]")
    p.add_argument("--sub", default="developer@localhost", help="[default: %(default)s]")
    p.add_argument("--issuer", default="flux-agent-dev", help="[default: %(default)s]")
    p.add_argument("--audience", default=None)
    p.add_argument("--kid", default=None)
    p.add_argument("--ttl", default="1h", help="lifetime, e.g. 15m or 8h [default: 1h]")
    p.add_argument("--agency-manifest", default=None, metavar="FILE", help="the manifest "
                   "--agency is checked against [default: bundled manifest; env "
                   "FLUX_AGENT_AGENCY_MANIFEST]")
    p.set_defaults(func=cmd_token)

    for name, text in (
        ("inject", "print a pod (or workload) as the sidecar injector would admit it"),
        ("inject-webhook", "serve the sidecar-injection admission webhook over HTTPS"),
    ):
        p = command(name, text, add_help=False)
        p.add_argument("rest", nargs=argparse.REMAINDER)

    p = command("verify", "re-hash stored events and checkpoints",
                "Re-hash stored events and checkpoints. Exit 0 when all match, 1 naming "
                "those that do not, 78 on bad configuration.")
    p.add_argument("--run", default=None, help="only this run [default: every run]")
    add_flags(p, ("database_url", "agency", "agency_manifest"), {
        **REQUIRED_URL, "agency": ("Only this agency.", "every agency in the manifest")})
    p.set_defaults(func=cmd_verify)

    p = command("spool", "inspect or verify a stopped agent's spool",
                "inspect: segments, records, bytes, oldest age (JSON); verify: every "
                "checksum (exit 1 on corruption). Read a stopped agent's spool: a running "
                "agent's is behind what it holds (ask it with flux-agent status).")
    p.add_argument("action", choices=["inspect", "verify"])
    add_flags(p, ("state_dir",))
    p.set_defaults(func=cmd_spool)

    p = command("completion", "print a shell completion script",
                "Print a completion script: bash: source <(flux-agent completion bash) in "
                "~/.bashrc; zsh: source <(flux-agent completion zsh) in ~/.zshrc.")
    p.add_argument("shell", choices=["bash", "zsh"])
    p.set_defaults(func=cmd_completion)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    try:
        code = _command(list(sys.argv[1:] if argv is None else argv))
        sys.stdout.flush()  # a reader that went away is found here, not at interpreter exit
    except BrokenPipeError:
        # flux-agent status | head: not a failure to report; exit as a SIGPIPE would.
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 128 + signal.SIGPIPE
    return code


def _command(words: list[str]) -> int:
    if words and words[0] in PASSTHROUGH:
        return PASSTHROUGH[words[0]](words[1:])
    parser = build_parser()
    args = parser.parse_args(words)
    try:
        code: int = args.func(args)
    except ConfigError as exc:
        print(f"flux-agent: configuration error: {exc.setting}: {exc.message}", file=sys.stderr)
        return EXIT_CONFIG
    except KeyboardInterrupt:
        return EXIT_FAILURE
    except BrokenPipeError:
        raise  # main's to answer
    except Exception as exc:  # noqa: BLE001 - the last line of defence: a message, exit 1
        print(f"flux-agent: {logs.scrub(str(exc)) or type(exc).__name__}", file=sys.stderr)
        return EXIT_FAILURE
    return code
