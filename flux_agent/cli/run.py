"""``flux-agent run``: the agent as a sidecar; its signals and the process's tuning."""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import ctypes
import gc
import logging
import os
import resource
import signal
import sys
from typing import Any

from ..core.errors import ConfigError
from ..core.settings import AgentConfig, load_config
from ..obs import logs
from .common import EXIT_FAILURE, EXIT_OK, EXIT_UNDELIVERED, _run_async

log = logging.getLogger("flux_agent.cli")

# A signal this soon after the first is the same request delivered twice (`timeout`, a
# supervisor and a shell that each forward it, a kill of the process and of its group all
# arrive within a millisecond or so), not a person's second Ctrl-C: it does not cut the drain.
SAME_SIGNAL_WITHIN = 0.25


async def _serve(config: AgentConfig, args: argparse.Namespace | None = None) -> int:
    from ..agent import Agent

    agent = Agent(config)
    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    first_signal: float | None = None

    def on_signal() -> None:
        nonlocal first_signal
        now = loop.time()
        if first_signal is None:
            first_signal = now
        elif now - first_signal >= SAME_SIGNAL_WITHIN:
            # The spool is already durable; the next start replays what is left.
            log.warning("second signal: exiting now, without finishing the drain; what was "
                        "not flushed stays on the spool for the next start",
                        extra={"fields": {"backlog_records": agent.flusher.backlog
                                          if agent.flusher else None}})
            agent.abandon()
            os._exit(EXIT_FAILURE)
        stop.set()

    reloads: set[asyncio.Task[None]] = set()

    def on_hangup() -> None:
        task = asyncio.create_task(_reload(agent, args))
        reloads.add(task)
        task.add_done_callback(reloads.discard)

    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, on_signal)
    loop.add_signal_handler(signal.SIGHUP, on_hangup)
    try:
        await agent.start()
        # Everything built so far (modules, schemas, the app) lives as long as the process:
        # out of the collector's reach, a full collection walks only what requests made.
        gc.freeze()
        waiters = [asyncio.create_task(stop.wait()),
                   asyncio.create_task(agent.exit_requested.wait())]
        await asyncio.wait(waiters, return_when=asyncio.FIRST_COMPLETED)
        for task in waiters:
            task.cancel()
    finally:
        delivered = await agent.stop()
    return EXIT_OK if delivered else EXIT_UNDELIVERED


async def _reload(agent: Any, args: argparse.Namespace | None) -> None:
    """SIGHUP: read the configuration again (flags, environment, the TOML file) and apply
    what can be applied running: the log level here, the payload schemas, the agency
    manifest and the API keys in the agent. A configuration that does not load keeps the
    one in force."""
    if agent.state != "running":
        log.warning("SIGHUP ignored: the agent is %s", agent.state)
        return
    try:
        config = load_config(args) if args is not None else agent.config
    except ConfigError as exc:
        log.error("reload failed; what was in force stays in force", extra={"fields": {
            "trigger": "SIGHUP", "failed": {exc.setting: exc.message}}})
        return
    logs.set_level(config.log_level, access_log=config.access_log)
    await agent.reload(config, trigger="SIGHUP", also={"log_level": config.log_level})


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


def cmd_aggregate(args: argparse.Namespace) -> int:
    args.role = "aggregator"
    return cmd_run(args)


def cmd_run(args: argparse.Namespace) -> int:
    config = load_config(args)
    logs.setup(config.log_level, fmt=config.log_format, access_log=config.access_log)
    _tune_process()
    return _run_async(lambda: _serve(config, args))
