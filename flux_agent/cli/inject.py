"""``flux-agent inject`` and ``inject-webhook``: the sidecar injector's commands, which
parse their own arguments (see :mod:`flux_agent.kube.cli`)."""

from __future__ import annotations

import asyncio
import signal
import sys
from collections.abc import Sequence

from ..obs import logs
from .common import EXIT_FAILURE, EXIT_OK, _run_async


def cmd_inject(argv: Sequence[str]) -> int:
    from ..kube import cli_inject

    return cli_inject(argv)


def cmd_inject_webhook(argv: Sequence[str]) -> int:
    from ..kube import prepare_webhook, serve_webhook

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

