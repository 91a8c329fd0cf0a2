"""``flux-agent status`` and ``validate``: how a running agent is, and whether a
configuration would start one."""

from __future__ import annotations

import argparse
import json
import sys
import time

from ..core.errors import ConfigError
from ..core.files import lock_holder
from ..core.settings import (
    AgentConfig,
    defaulted,
    effective_settings,
    env_name,
    load_config,
    parse_duration,
    to_toml,
)
from .common import EXIT_FAILURE, EXIT_NOPERM, EXIT_OK, EXIT_UNAVAILABLE, _run_async

# --------------------------------------------------------------------------- status


def cmd_status(args: argparse.Namespace) -> int:
    """Ask the running agent (its admin listener) how it is: 0 healthy, 1 not healthy, 69 no
    agent answers, 77 a token is needed."""
    from ..client import TokenSource
    from .status import (
        Refused,
        Report,
        Unreachable,
        admin_url,
        fetch,
        loopback,
        render,
        running_agent,
    )

    config = load_config(args, serving=False)
    # The agent on this state dir says where it listens, wherever that is.
    running = running_agent(config.state_path) or {}
    if args.url:
        url = args.url
    elif running.get("admin_url"):
        url = loopback(str(running["admin_url"]))
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
        print(f"flux-agent status: {failure}; the admin listener is "
              f"{env_name('admin_listen')} (or --url)", file=sys.stderr)
        holder = lock_holder(config.state_path / "agent.lock")
        print(f"flux-agent status: an agent (pid {holder}) holds the state dir "
              f"{config.state_path}: it may be starting, or have its admin listener off"
              if holder is not None else
              f"flux-agent status: no agent runs on the state dir {config.state_path} "
              f"({env_name('state_dir')})", file=sys.stderr)
        return EXIT_UNAVAILABLE
    # The psql line is for the agency the running agent writes as (its fixed agency).
    embedded = _embedded_connect(config, str(running.get("agency") or config.agency))
    if args.json:
        print(json.dumps({**report.as_json(), **({"embedded": embedded} if embedded else {})},
                         indent=2))
    else:
        print(render(report))
        if embedded:
            from ..agent import SUPERUSER_NOTE

            print(f"  {'psql':<11} {embedded['connect']}\n"
                  f"  {'':<11} (the agent's own role, under row-level security)\n"
                  f"  {'superuser':<11} {embedded['connect_superuser']}\n"
                  f"  {'':<11} ({SUPERUSER_NOTE})")
    return EXIT_OK if report.healthy else EXIT_FAILURE


def _embedded_connect(config: AgentConfig, agency: str) -> dict[str, str]:
    """psql commands for the embedded PostgreSQL running under the state dir, if one is."""
    data_dir = config.state_path / "postgres"
    if not (data_dir / "postmaster.pid").exists():
        return {}
    from ..agent import embedded_connect
    from ..postgres.embedded import EmbeddedError, LocalPostgres

    try:
        pg = LocalPostgres(data_dir)
    except EmbeddedError:  # no binaries here to connect with
        return {}
    return embedded_connect(pg, agency) if pg.running_pid() is not None else {}


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
    from ..agent import preflight
    from ..obs.tracing import make_exporter
    from ..postgres.embedded import EmbeddedError, find_bin_dir

    config = load_config(args)
    schemas, _ = preflight(config)
    if config.tracing != "off":
        try:
            make_exporter(config.tracing)
        except RuntimeError as exc:
            raise ConfigError(env_name("tracing"), str(exc)) from None
    kinds = f" (kinds: {', '.join(sorted(schemas.payloads))})" if schemas.payloads else ""
    notes = [f"payload schemas: {schemas.payload_source}{kinds}; agency manifest: "
             f"{schemas.manifest.source}"]
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
    else:
        from ..agent.listeners import check_addresses

        check_addresses(config)  # a taken port: 78 naming FLUX_AGENT_LISTEN, as `run` says
    return config, notes


async def _check_database(config: AgentConfig) -> str:
    """Connect as the agent would (same timeouts, same role check) and read the schema
    version; changes nothing. A database the agent could not use is a ConfigError."""
    from ..core.errors import SchemaNotReady, UnsafeRole, describe
    from ..postgres.pool import Postgres, Timeouts
    from ..postgres.sink import Sink

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
