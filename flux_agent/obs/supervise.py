"""Supervised background tasks: nothing the agent runs in the background dies silently.

Each long-running task (flusher, spool committer, snapshots, retention, pings, key reloads,
the embedded database watcher) runs under one :class:`Supervisor`. When a task raises, the
supervisor logs the traceback at ERROR (the first time, then at most once a minute with a
count), counts it (``flux_task_failures_total{task}``), waits a backoff with jitter and
starts the task again. A task that keeps failing shows on the probes: readiness fails at
once, liveness after ``dead_after`` seconds without recovery, so Kubernetes restarts a
container that would otherwise acknowledge events into a dead pipeline.

A task counts as recovered when it reports progress (:meth:`Supervisor.ok`) or when its
restart has run for ``stable_after`` seconds without raising.
"""

from __future__ import annotations

import asyncio
import enum
import logging
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

from ..core.retry import backoff

log = logging.getLogger("flux_agent.supervise")

LOG_EVERY = 60.0  # seconds between repeated failure lines of one task
STOP_WAIT = 5.0  # seconds a stop waits for a cancelled task to end, cancelling it again


class Task(enum.StrEnum):
    """Every supervised task, by name: the supervisor, the agent's teardown and the metric
    ``flux_task_failures_total{task}`` use these and no other names."""

    FLUSHER = "flusher"
    SPOOL_COMMIT = "spool-commit"
    SNAPSHOTS = "snapshots"
    PING = "ping"
    RETENTION = "retention"
    JWKS = "jwks"
    EMBEDDED_DB = "embedded-db"
    TLS = "tls"
    RELOAD = "reload"


@dataclass(slots=True)
class TaskState:
    name: Task
    factory: Callable[[], Awaitable[None]]
    critical: bool
    task: asyncio.Task[None] | None = None
    failures: int = 0  # since start
    consecutive: int = 0  # since the last recovery
    failing_since: float | None = None  # monotonic time of the first failure in a row
    last_error: str | None = None
    started_at: float = 0.0
    logged_at: float = -LOG_EVERY
    suppressed: int = 0
    done: bool = False  # returned normally (a task that is allowed to finish)
    runner: asyncio.Task[None] | None = field(default=None, repr=False)


class Supervisor:
    def __init__(
        self,
        *,
        on_failure: Callable[[Task], None] | None = None,
        backoff_max: float = 30.0,
        stable_after: float = 10.0,
        dead_after: float = 120.0,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.on_failure = on_failure
        self.backoff_max = backoff_max
        self.stable_after = stable_after
        self.dead_after = dead_after
        self.clock = clock
        self.tasks: dict[Task, TaskState] = {}
        self.closing = False

    def start(self, name: Task, factory: Callable[[], Awaitable[None]], *,
              critical: bool = True) -> None:
        """Run ``factory()`` as task ``name`` until :meth:`stop`, restarting it on failure.

        ``critical`` tasks fail readiness while they are failing (the flusher, the spool
        committer); the others (snapshots, retention) are only logged and counted.
        """
        if name in self.tasks:
            raise RuntimeError(f"task {name} is already supervised")
        state = TaskState(name, factory, critical)
        self.tasks[name] = state
        state.runner = asyncio.create_task(self._run(state), name=f"flux-{name}")

    def ok(self, name: Task) -> None:
        """The task made progress: whatever failed before has recovered."""
        state = self.tasks.get(name)
        if state is not None and state.consecutive:
            self._recovered(state)

    async def _run(self, state: TaskState) -> None:
        while True:
            state.started_at = self.clock()
            try:
                await state.factory()
            except asyncio.CancelledError:
                raise
            except Exception as exc:  # noqa: BLE001 - the point: nothing escapes unseen
                self._failed(state, exc)
            else:
                state.done = True
                return
            if self.closing:
                return
            await asyncio.sleep(backoff(state.consecutive, self.backoff_max))

    def _failed(self, state: TaskState, exc: BaseException) -> None:
        now = self.clock()
        if state.consecutive and now - state.started_at >= self.stable_after:
            self._recovered(state)  # it ran fine for a while: this is a new failure
        state.failures += 1
        state.consecutive += 1
        if state.failing_since is None:
            state.failing_since = now
        state.last_error = f"{type(exc).__name__}: {exc}"
        if self.on_failure is not None:
            self.on_failure(state.name)
        if now - state.logged_at >= LOG_EVERY:
            state.logged_at = now
            log.error("background task %s failed; restarting it", state.name, exc_info=exc,
                      extra={"fields": {"task": state.name, "failures": state.failures,
                                        "suppressed_since_last_line": state.suppressed}})
            state.suppressed = 0
        else:
            state.suppressed += 1

    def _recovered(self, state: TaskState) -> None:
        log.info("background task %s recovered", state.name,
                 extra={"fields": {"task": state.name, "failures": state.consecutive}})
        state.consecutive = 0
        state.failing_since = None

    # ---------------------------------------------------------------- probes

    def failing(self) -> list[Task]:
        """Critical tasks failing now (readiness)."""
        now = self.clock()
        out = []
        for state in self.tasks.values():
            if not state.consecutive:
                continue
            if now - state.started_at >= self.stable_after and state.runner is not None \
                    and not state.runner.done():
                self._recovered(state)
                continue
            if state.critical:
                out.append(state.name)
        return out

    def dead(self) -> list[Task]:
        """Tasks that have kept failing for longer than ``dead_after`` (liveness)."""
        failing = set(self.failing())
        now = self.clock()
        out = []
        for state in self.tasks.values():
            if state.name in failing and state.failing_since is not None \
                    and now - state.failing_since >= self.dead_after:
                out.append(state.name)
        return out

    def describe(self) -> dict[Task, dict[str, object]]:
        return {name: {"failures": s.failures, "failing": bool(s.consecutive),
                       "last_error": s.last_error}
                for name, s in self.tasks.items()}

    # ---------------------------------------------------------------- stop

    async def wait(self, name: Task, timeout: float) -> bool:
        """Wait (at most ``timeout`` s) for a task that is finishing by itself to end."""
        state = self.tasks.get(name)
        if state is None or state.runner is None:
            return True
        done, _ = await asyncio.wait({state.runner}, timeout=timeout)
        if not done:
            return False
        self.tasks.pop(name, None)
        return True

    async def stop(self, name: Task | None = None) -> None:
        """Cancel one task (or all of them, newest first) and wait for it to end."""
        if name is None:
            self.closing = True
            names = list(reversed(self.tasks))
        else:
            names = [name] if name in self.tasks else []
        for n in names:
            state = self.tasks.pop(n)
            if state.runner is not None:
                await _cancel_within(state.runner, n, STOP_WAIT)


async def _cancel_within(runner: asyncio.Task[None], name: Task, within: float) -> None:
    """Cancel ``runner`` and wait for it to end, at most ``within`` seconds. A task may
    swallow one cancellation (a ``suppress(CancelledError)`` around an await it happened to
    be in), so it is cancelled again every half second; one that still runs at the deadline
    is left behind, logged with where it is, and the stop goes on: a teardown must not hang.
    The wait is asyncio.wait, so a cancellation of the stop itself is not mistaken for the
    task's and goes through."""
    deadline = time.monotonic() + within
    while not runner.done():
        runner.cancel()
        await asyncio.wait({runner}, timeout=min(0.5, max(0.0, deadline - time.monotonic())))
        if not runner.done() and time.monotonic() >= deadline:
            log.error("background task %s did not end within %g s of its cancellation; "
                      "left behind", name, within,
                      extra={"fields": {"task": name, "awaiting": _awaiting(runner)}})
            return
    if not runner.cancelled() and runner.exception() is not None:
        log.warning("background task %s ended with an error as it stopped", name,
                    exc_info=runner.exception(), extra={"fields": {"task": name}})


def _awaiting(task: asyncio.Task[None]) -> list[str]:
    """Where a suspended task is, innermost last: its chain of awaited coroutines (the
    task's own stack shows only the outermost frame)."""
    where: list[str] = []
    coro: Any = task.get_coro()
    while coro is not None and len(where) < 50:
        frame = getattr(coro, "cr_frame", None) or getattr(coro, "gi_frame", None)
        if frame is None:
            break
        where.append(f"{frame.f_code.co_filename}:{frame.f_lineno} {frame.f_code.co_qualname}")
        coro = getattr(coro, "cr_await", None) or getattr(coro, "gi_yieldfrom", None)
    return where
