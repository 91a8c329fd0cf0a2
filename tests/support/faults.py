"""Real faults for tests, the soak script and bench: a TCP proxy that cuts the line, and a
load generator that remembers exactly which events the agent acknowledged."""

from __future__ import annotations

import asyncio
import contextlib
import json
import random
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

import aiohttp

from flux_agent.testing import make_event

from .markers import require_marker
from .polling import wait_until

if TYPE_CHECKING:
    from .postgres import Database


class TcpProxy:
    """Forwards 127.0.0.1:<port> to a target. ``cut()`` resets every connection and refuses
    new ones until ``restore()``; ``black_hole()`` stops carrying bytes without closing
    anything (new connections are accepted and then hear nothing), as a dead network path
    does, until ``restore()``. What was sent into the hole is dropped."""

    def __init__(self, target_host: str, target_port: int) -> None:
        self.target = (target_host, target_port)
        self.port = 0
        self._server: asyncio.Server | None = None
        self._conns: set[asyncio.StreamWriter] = set()
        self.cut_now = False
        self.hole = False
        self.cuts = 0

    async def start(self) -> None:
        require_marker("fault", "puts a TCP proxy (a line to cut) in a path")
        self._server = await asyncio.start_server(self._handle, "127.0.0.1", 0)
        self.port = self._server.sockets[0].getsockname()[1]

    async def stop(self) -> None:
        self.cut()
        if self._server is not None:
            self._server.close()
            await self._server.wait_closed()

    def cut(self) -> None:
        self.cut_now = True
        self.cuts += 1
        for writer in list(self._conns):
            transport = writer.transport
            with contextlib.suppress(Exception):
                transport.abort()  # RST: the line is gone mid-whatever
        self._conns.clear()

    def black_hole(self) -> None:
        self.hole = True

    def restore(self) -> None:
        self.cut_now = False
        self.hole = False

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        if self.cut_now:
            writer.transport.abort()
            return
        if self.hole:  # the handshake completes (the kernel did it), then silence
            self._conns.add(writer)
            try:
                with contextlib.suppress(OSError, asyncio.IncompleteReadError):
                    while await reader.read(65536):
                        pass
            finally:
                self._conns.discard(writer)
                writer.transport.abort()
            return
        try:
            up_reader, up_writer = await asyncio.open_connection(*self.target)
        except OSError:
            writer.transport.abort()
            return
        self._conns.update((writer, up_writer))

        async def pipe(src: asyncio.StreamReader, dst: asyncio.StreamWriter) -> None:
            try:
                while data := await src.read(65536):
                    if self.cut_now:
                        break
                    if self.hole:
                        continue  # swallowed: nothing is forwarded, nothing is closed
                    dst.write(data)
                    await dst.drain()
            except (OSError, asyncio.IncompleteReadError):
                pass
            finally:
                with contextlib.suppress(Exception):
                    dst.transport.abort()

        await asyncio.gather(pipe(reader, up_writer), pipe(up_reader, writer))
        self._conns.discard(writer)
        self._conns.discard(up_writer)


@dataclass
class Ledger:
    """What was sent and what was acknowledged (2xx), by event id."""

    attempted: set[str] = field(default_factory=set)
    acked: set[str] = field(default_factory=set)
    refused: int = 0  # 503s
    failed: int = 0  # connection errors (agent killed mid-request)
    statuses: dict[int, int] = field(default_factory=dict)

    def check(self, stored: Iterable[str]) -> tuple[int, int]:
        """(lost, foreign): acknowledged but not stored, and stored but never sent."""
        stored_set = set(stored)
        return len(self.acked - stored_set), len(stored_set - self.attempted)


class LoadGen:
    """Posts batches of fresh events at a steady pace until stopped."""

    def __init__(self, url: str, ledger: Ledger, *, batch: int = 20, concurrency: int = 4,
                 pause: float = 0.0, socket: Path | None = None) -> None:
        self.url = url
        self.ledger = ledger
        self.batch = batch
        self.concurrency = concurrency
        self.pause = pause
        self.socket = socket
        self._stop = asyncio.Event()
        self._tasks: list[asyncio.Task[None]] = []

    def start(self) -> None:
        self._stop.clear()
        self._tasks = [asyncio.create_task(self._worker()) for _ in range(self.concurrency)]

    async def stop(self) -> None:
        """Stop the workers; a worker that died of anything but the expected connection
        errors fails the test here, instead of silently posting nothing."""
        self._stop.set()
        results = await asyncio.gather(*self._tasks, return_exceptions=True)
        for result in results:
            if isinstance(result, BaseException):
                raise result

    async def _worker(self) -> None:
        connector = aiohttp.UnixConnector(path=str(self.socket)) if self.socket else None
        timeout = aiohttp.ClientTimeout(total=10)
        async with aiohttp.ClientSession(connector=connector, timeout=timeout) as session:
            while not self._stop.is_set():
                events = [make_event() for _ in range(self.batch)]
                ids = [e["event_id"] for e in events]
                self.ledger.attempted.update(ids)
                try:
                    async with session.post(self.url, data=json.dumps(events),
                                            headers={"Content-Type": "application/json"}) as r:
                        await r.read()
                        self.ledger.statuses[r.status] = self.ledger.statuses.get(r.status, 0) + 1
                        if 200 <= r.status < 300:
                            self.ledger.acked.update(ids)
                        elif r.status == 503:
                            self.ledger.refused += 1
                            await asyncio.sleep(0.05)
                except (aiohttp.ClientError, OSError, TimeoutError):
                    self.ledger.failed += 1
                    await asyncio.sleep(0.05)
                if self.pause:
                    await asyncio.sleep(self.pause * random.uniform(0.5, 1.5))


async def stored_ids(db: Database) -> list[str]:
    return [str(r[0]) for r in await db.fetch("SELECT event_id FROM flux.events")]


async def assert_exactly_once(db: Database, ledger: Ledger, timeout: float = 30) -> None:
    """Every acknowledged event lands (within ``timeout``), and nothing that was never sent."""
    async def landed() -> bool:
        return ledger.acked <= set(await stored_ids(db))

    assert await wait_until(landed, timeout), "acknowledged events are missing"
    stored = await stored_ids(db)
    lost, foreign = ledger.check(stored)
    assert lost == 0
    assert foreign == 0
    assert ledger.acked, "the scenario acknowledged nothing"
