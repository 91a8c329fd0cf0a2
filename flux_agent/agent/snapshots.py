"""What the agent remembers across restarts besides the spool: recently seen event ids
(duplicate reporting) and checkpoint versions (version assignment), saved every half minute
and at stop, read back at start."""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Callable
from pathlib import Path

from ..checkpoints.ledger import Checkpoints
from ..core.files import is_resource_error, reason, write_atomic
from ..intake.seen import SeenIndex

log = logging.getLogger("flux_agent.agent")

SNAPSHOT_INTERVAL = 30.0


class Snapshots:
    def __init__(self, state_dir: Path, seen: SeenIndex, checkpoints: Checkpoints, *,
                 on_progress: Callable[[], None]) -> None:
        self.seen_path = state_dir / "seen.idx"
        self.checkpoints_path = state_dir / "checkpoints.idx"
        self.seen = seen
        self.checkpoints = checkpoints
        self.on_progress = on_progress
        self._warned = False

    async def restore(self) -> None:
        """Read both snapshots (worker thread); a missing or damaged one costs nothing.
        Versions known before the restart come first; saves still on the spool then
        replace them as recovery finds them."""
        loop = asyncio.get_running_loop()
        for path, load in ((self.seen_path, self.seen.load),
                           (self.checkpoints_path, self.checkpoints.load_snapshot)):
            data = await loop.run_in_executor(None, _read, path)
            if data is not None:
                with contextlib.suppress(ValueError):  # damaged: filled again by requests
                    load(data)

    async def save(self) -> None:
        """The copies are taken here, on the loop, where those indexes change; only the
        bytes go to a worker thread."""
        files = [(self.seen_path, self.seen.dump()),
                 (self.checkpoints_path, self.checkpoints.dump())]
        loop = asyncio.get_running_loop()
        for path, data in files:
            await loop.run_in_executor(None, write_atomic, path, data)

    async def run(self) -> None:
        while True:
            await asyncio.sleep(SNAPSHOT_INTERVAL)
            try:
                await self.save()
            except OSError as exc:
                if not is_resource_error(exc):
                    raise
                # A full disk: the snapshot only saves work at the next start. Say it once.
                if not self._warned:
                    log.warning("could not save the agent's snapshots; retrying",
                                extra={"fields": {"error": reason(exc)}})
                self._warned = True
            else:
                if self._warned:
                    log.info("the agent's snapshots are saved again")
                self._warned = False
                self.on_progress()


def _read(path: Path) -> bytes | None:
    try:
        return path.read_bytes()
    except OSError:
        return None
