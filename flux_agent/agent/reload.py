"""Key rotation: the JWKS file is re-read when it changes (checked every 2 s)."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING

from .setup import file_stamp

if TYPE_CHECKING:
    from ..intake.tokens import JwtAuthenticator, KeySet

log = logging.getLogger("flux_agent.agent")

JWKS_CHECK_INTERVAL = 2.0


class JwksWatcher:
    def __init__(self, authenticator: JwtAuthenticator, path: Path,
                 load: Callable[[], KeySet]) -> None:
        self.authenticator = authenticator
        self.path = path
        self.load = load

    async def run(self) -> None:
        loop = asyncio.get_running_loop()
        last = file_stamp(self.path)
        while True:
            await asyncio.sleep(JWKS_CHECK_INTERVAL)
            stamp = await loop.run_in_executor(None, file_stamp, self.path)
            if stamp == last:
                continue
            last = stamp
            try:
                keys = await loop.run_in_executor(None, self.load)
            except (OSError, ValueError) as exc:
                log.error("JWKS file unreadable; keeping the previous keys",
                          extra={"fields": {"path": str(self.path), "error": str(exc)}})
                continue
            self.authenticator.set_keys(keys)
            log.info("JWKS reloaded", extra={"fields": {"path": str(self.path),
                                                         "keys": len(keys.by_kid)}})
