"""An asyncio event loop on virtual time, for unit tests of code that waits (windows by
age, backoff, deadlines) without waiting in real time.

Its clock (``loop.time()``) moves only when the loop has nothing else to do: no callback
ready, no I/O ready, and no work of its executors under way. Then it jumps straight to its
earliest timer. So a sleep of an hour costs nothing, timers fire in the order a real clock
would fire them, and a test can assert *when* (in loop time) something happened, exactly.
Work handed to threads (``run_in_executor``, ``asyncio.to_thread``: the spool's file I/O)
is waited for in real time, so the clock never jumps past a thread that is still working.

Built on public API only: ``SelectorEventLoop(selector)``, ``time()`` and
``run_in_executor()`` overridden in a subclass.
"""

from __future__ import annotations

import asyncio
import selectors
from collections.abc import Callable
from concurrent.futures import Executor
from typing import Any, TypeVar

T = TypeVar("T")


class _Selector(selectors.DefaultSelector):
    def __init__(self, loop: VirtualTimeLoop) -> None:
        super().__init__()
        self._loop = loop

    def select(self, timeout: float | None = None) -> list[tuple[selectors.SelectorKey, int]]:
        if timeout is None or timeout <= 0:  # nothing scheduled, or something ready
            return super().select(timeout)
        if self._loop.threads_busy:
            # Waiting for a timer while a thread works: wait for the thread, in real time (it
            # wakes the loop through the loop's self-pipe when it is done).
            return super().select(None)
        ready = super().select(0)
        if not ready:  # idle until the next timer: go there at once
            self._loop.advance(timeout)
        return ready


class VirtualTimeLoop(asyncio.SelectorEventLoop):
    def __init__(self, start: float = 1000.0) -> None:
        self._now = start
        self.threads_busy = 0
        super().__init__(_Selector(self))

    def time(self) -> float:
        return self._now

    def advance(self, seconds: float) -> None:
        self._now += seconds

    def run_in_executor(self, executor: Executor | None, func: Callable[..., T],
                        *args: Any) -> asyncio.Future[T]:
        future = super().run_in_executor(executor, func, *args)
        self.threads_busy += 1
        future.add_done_callback(self._thread_done)
        return future

    def _thread_done(self, _: object) -> None:
        self.threads_busy -= 1


def run(main: Any) -> Any:
    """Run the coroutine ``main`` to completion on a new virtual-time loop."""
    with asyncio.Runner(loop_factory=VirtualTimeLoop) as runner:
        return runner.run(main)
