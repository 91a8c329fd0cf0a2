"""Command line: the only code that reads ``sys.argv``, installs signal handlers or exits.

Exit codes: 0 clean, 78 bad configuration (the message names the setting), 1 otherwise; the
commands that talk to an agent also use 65, 69 and 77 (sysexits.h, in ``common``).

Modules, low to high (each imports only those above it):

- ``common``: the exit codes, and the event loop (uvloop where installed) a command runs;
- ``run``: ``flux-agent run``, the agent itself: its signals, the process's tuning;
- ``admin``: ``status`` (the running agent's health) and ``validate`` (the configuration);
- ``tools``: ``migrate``, ``verify``, ``spool``, ``token`` and ``emit``;
- ``reads``: ``runs`` and ``events`` (reading back through the agent's API);
- ``inject``: ``inject`` and ``inject-webhook``, which parse their own arguments;
- this package: the parser, ``completion`` (scripts from that parser), :func:`main`.
"""

from __future__ import annotations

import argparse
import os
import signal
import sys
from collections.abc import Callable, Sequence
from typing import Any

from .._version import __version__
from ..core.errors import ConfigError
from ..core.settings import add_flags
from ..obs import logs
from .admin import cmd_status, cmd_validate
from .common import EXIT_CONFIG, EXIT_FAILURE, EXIT_OK
from .inject import cmd_inject, cmd_inject_webhook
from .reads import add_reader_flags, cmd_events, cmd_runs
from .run import cmd_aggregate, cmd_run
from .tools import cmd_emit, cmd_migrate, cmd_spool, cmd_token, cmd_verify

# --------------------------------------------------------------------------- completion


def cmd_completion(args: argparse.Namespace) -> int:
    from .completion import script

    print(script(build_parser(), args.shell), end="")
    return EXIT_OK


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
                "Run the agent. Exit 0 after a clean drain (everything acknowledged was "
                "delivered upstream or handed to an aggregator), 75 when acknowledged events "
                "are left on the spool, 78 on bad configuration, 1 otherwise.")
    add_flags(p)
    p.set_defaults(func=cmd_run)

    p = command("aggregate", "run an aggregator (sealed records from sidecars -> PostgreSQL)",
                "Run the agent as an aggregator (FLUX_AGENT_ROLE=aggregator): it takes sealed "
                "records from sidecars on POST /v1/records, answers once they are durable on "
                "its own spool, and writes them to PostgreSQL in large windows. Exit codes as "
                "`run`.")
    add_flags(p)
    p.set_defaults(func=cmd_aggregate)

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
                "Ask the running agent (the admin listener it recorded in its state dir, else "
                "FLUX_AGENT_ADMIN_LISTEN) for readiness, database, spool, last flush and "
                "background tasks. Exit 0 "
                "healthy (ready, PostgreSQL up, no task failing), 1 not healthy, 69 no agent "
                "answers, 77 a token is needed, 78 bad configuration.")
    p.add_argument("--url", default=None, help="the admin listener's URL [default: where "
                   "the agent on the state dir listens, else FLUX_AGENT_ADMIN_LISTEN; a "
                   "wildcard address asked on loopback]")
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
        "agency": ("The agency the embedded database's psql line is for, when the running "
                   "agent does not say (it has no fixed agency).", "the agent's")})
    p.set_defaults(func=cmd_status)

    p = command("migrate", "apply pending schema migrations",
                "Apply pending schema migrations to FLUX_AGENT_DATABASE_URL (as a role that "
                "may create them). Exit 0 when done, 78 on bad configuration, 1 otherwise.")
    add_flags(p, ("database_url",), REQUIRED_URL)
    p.set_defaults(func=cmd_migrate)

    p = command("emit", "post one event (for shell scripts)",
                "Post one event; stdout gets one JSON object with its id (event_ids), "
                "whatever happens. Exit 0 when accepted (or a duplicate), 65 when the agent "
                "refused the event (its violations on stderr), 69 when it could not be "
                "reached, 75 with --wait-committed when it was accepted but is not yet in "
                "PostgreSQL, 77 when authentication failed, 1 otherwise.")
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

    p = command("runs", "list the caller's runs, newest first (one JSON object per line)",
                "Print the runs of the caller's agency, newest first (by their first event): "
                "run_id, status, first_event_at, last_event_at, events; one JSON object per "
                "line. Exit 0, 69 when the agent could not be reached, 77 when authentication "
                "failed, 1 otherwise.")
    p.add_argument("--limit", type=int, default=100,
                   help="at most this many runs [default: 100]")
    add_reader_flags(p)
    p.set_defaults(func=cmd_runs)

    p = command("events", "print a run's events (one JSON object per line), or follow them",
                "Print the events of a run in order (occurred_at, then id), one JSON object "
                "per line, walking the pages by their cursor. --follow then polls for new "
                "ones until interrupted (Ctrl-C: exit 0); an event that arrives after later "
                "ones were printed, with an earlier occurred_at, is not printed by a follow "
                "(a new listing shows it). Exit 0, 1 when the run has no events (without "
                "--follow), 65 for a refused filter, 69 when the agent could not be reached, "
                "77 when authentication failed.")
    p.add_argument("--run", required=True, help="run id")
    p.add_argument("--kind", default=None, help="only events of this kind")
    p.add_argument("--step", default=None, help="only events of this step")
    p.add_argument("--follow", "-f", action="store_true",
                   help="keep polling for new events until interrupted")
    p.add_argument("--interval", default="1s", metavar="DURATION",
                   help="how often --follow polls [default: 1s]")
    p.add_argument("--limit", type=int, default=500, choices=range(1, 1001),
                   metavar="N", help="events per page, 1 to 1000 [default: 500]")
    add_reader_flags(p)
    p.set_defaults(func=cmd_events)

    p = command("token", "mint a development JWT, key pair or API key",
                "Development credentials: a JWT signed with a local key (--key), a new key "
                "pair (--generate-key) or an API key (--api-key). Production tokens come "
                "from your identity provider.")
    p.add_argument("--api-key", action="store_true",
                   help="print a new random API key (and its entry for the API keys file)")
    p.add_argument("--generate-key", metavar="PATH",
                   help="write a new ES256 private key to PATH and its public key to PATH.pub")
    p.add_argument("--key", help="PEM private key (RSA, P-256 or Ed25519)")
    p.add_argument("--agency", default=None, help="the agency the credential writes and "
                   "reads as (required with --key and --api-key)")
    p.add_argument("--role", default="operator",
                   help="admin, operator, viewer or analyzer [default: operator]")
    p.add_argument("--sub", default="developer@localhost", help="[default: %(default)s]")
    p.add_argument("--issuer", default="flux-agent-dev", help="[default: %(default)s]")
    p.add_argument("--audience", default=None)
    p.add_argument("--kid", default=None)
    p.add_argument("--ttl", default="1h", help="lifetime, e.g. 15m or 8h [default: 1h]")
    p.add_argument("--agency-manifest", default=None, metavar="FILE", help="the manifest "
                   "--agency is checked against [default: the profile's; env "
                   "FLUX_AGENT_AGENCY_MANIFEST]")
    p.add_argument("--schema-profile", default=None, choices=["neutral", "flux"],
                   help="whose manifest, without --agency-manifest [default: neutral, which "
                   "serves every agency; env FLUX_AGENT_SCHEMA_PROFILE]")
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
    add_flags(p, ("database_url", "agency", "agency_manifest", "schema_profile"), {
        **REQUIRED_URL, "agency": ("Only this agency (required when no agency manifest lists "
                                   "them).", "every agency in the manifest")})
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
