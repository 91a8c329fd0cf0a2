"""Reading back without psql: ``flux-agent runs`` (the caller's runs, newest first) and
``flux-agent events --run RUN [--follow]`` (a run's events, in order, following new ones).
Both print one JSON object per line and walk the API's pages by their cursor."""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from collections.abc import Iterator
from datetime import datetime
from typing import Any
from urllib.parse import quote, urlencode

from ..core.reads import encode_cursor
from ..core.settings import parse_duration
from .common import EXIT_DATAERR, EXIT_FAILURE, EXIT_NOPERM, EXIT_OK, EXIT_UNAVAILABLE


def add_reader_flags(parser: argparse.ArgumentParser) -> None:
    """How a read command reaches the agent (as ``emit`` does)."""
    parser.add_argument("--url", default=None, help="agent URL [default: the socket of "
                        "FLUX_AGENT_SOCKET, else FLUX_AGENT_URL, else http://127.0.0.1:8787]")
    parser.add_argument("--socket", default=None,
                        help="agent Unix socket [env FLUX_AGENT_SOCKET]")
    parser.add_argument("--token", default=None, help="bearer token [env FLUX_AGENT_TOKEN]")
    parser.add_argument("--token-file", default=None,
                        help="a file holding the token [env FLUX_AGENT_TOKEN_FILE]")
    parser.add_argument("--timeout", type=float, default=30.0,
                        help="seconds per request [default: 30]")


def cmd_runs(args: argparse.Namespace) -> int:
    """The caller's runs, newest first, one JSON object per line."""
    def pages(get: Any) -> Iterator[list[dict[str, Any]]]:
        cursor, left = None, args.limit
        while left > 0:
            query = {"limit": str(min(left, 1000))}
            if cursor:
                query["cursor"] = cursor
            page = get(f"/v1/runs?{urlencode(query)}")
            runs = page["runs"][:left]
            left -= len(runs)
            yield runs
            cursor = page["next_cursor"]
            if not cursor:
                return

    return _run(args, "runs", lambda get: (r for page in pages(get) for r in page))


def cmd_events(args: argparse.Namespace) -> int:
    """A run's events in order (occurred_at, then id), one JSON object per line; with
    ``--follow``, then those that arrive, until interrupted."""
    try:
        interval = parse_duration(args.interval)
    except ValueError as exc:
        print(f"flux-agent events: --interval: {exc}", file=sys.stderr)
        return EXIT_DATAERR
    path = f"/v1/runs/{quote(args.run, safe='')}/events"

    def events(get: Any) -> Iterator[dict[str, Any]]:
        cursor: str | None = None
        while True:
            query = {k: v for k, v in (("kind", args.kind), ("step", args.step),
                                       ("limit", str(args.limit)), ("cursor", cursor)) if v}
            page = get(f"{path}?{urlencode(query)}", missing_ok=args.follow)
            yield from page["events"]
            if page["next_cursor"]:
                cursor = page["next_cursor"]
                continue
            if not args.follow:
                return
            if page["events"]:  # the next poll starts after the last event printed
                last = page["events"][-1]
                cursor = encode_cursor(datetime.fromisoformat(last["occurred_at"]),
                                       last["event_id"])
            time.sleep(interval)

    return _run(args, "events", events)


def _run(args: argparse.Namespace, name: str, items: Any) -> int:
    from ..client import (
        FluxAuthError,
        FluxClient,
        FluxClientError,
        FluxConnectionError,
        FluxNotFoundError,
        FluxRequestError,
        FluxUnavailableError,
    )
    from ..client.errors import error_from

    client = FluxClient(args.url, socket_path=args.socket, token=args.token,
                        token_file=args.token_file, timeout=args.timeout)

    def get(path: str, missing_ok: bool = False) -> dict[str, Any]:
        status, data, headers = client.request("GET", path)
        if status == 404 and missing_ok:  # a run not started yet: nothing so far
            return {"events": [], "runs": [], "next_cursor": None}
        if status != 200:
            raise error_from(status, data, headers)
        page: dict[str, Any] = json.loads(data)
        return page

    try:
        with client:
            for item in items(get):
                print(json.dumps(item, ensure_ascii=False, separators=(",", ":")),
                      flush=True)
    except KeyboardInterrupt:
        return EXIT_OK  # what --follow waits for: stop, having printed whole lines
    except FluxClientError as exc:
        print(f"flux-agent {name}: {exc}", file=sys.stderr)
        if isinstance(exc, FluxAuthError):
            if exc.status == 401 and not (args.token or args.token_file
                                          or os.environ.get("FLUX_AGENT_TOKEN")
                                          or os.environ.get("FLUX_AGENT_TOKEN_FILE")):
                print(f"flux-agent {name}: the agent wants a token: pass --token or "
                      "--token-file, or set FLUX_AGENT_TOKEN or FLUX_AGENT_TOKEN_FILE",
                      file=sys.stderr)
            return EXIT_NOPERM
        if isinstance(exc, FluxNotFoundError):
            return EXIT_FAILURE
        if isinstance(exc, FluxRequestError):
            return EXIT_DATAERR
        if isinstance(exc, FluxConnectionError | FluxUnavailableError):
            return EXIT_UNAVAILABLE
        return EXIT_FAILURE
    return EXIT_OK
