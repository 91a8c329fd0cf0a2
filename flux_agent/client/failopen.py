"""Events that must not fail the job: ``fail_open=True`` (or ``FLUX_AGENT_CLIENT_FAIL_OPEN``).

When the agent cannot take events (unreachable, or 503/5xx still after the retries), an
event post logs a warning and drops the events instead of raising, and for a cool-down
after that drops further events at once rather than paying the retries' delay on every
step of the job. The next post after the cool-down tries again; when one gets through, the
client says how many it dropped. Checkpoints, resumes and drains stay fail-closed (a job
must not resume from a checkpoint that was never saved), and a 4xx still raises: a refused
event is the job's bug, which the switch must not hide.

Why drop rather than buffer to a local file: the sidecar's spool is already the durable
buffer (fsync'ed, recovered after crashes, delivered exactly once); a second one in the
job's container would share the pod's fate, which is also the sidecar's (an ``emptyDir``
goes with the pod), would need the same guarantees to be worth its name, and would resend
only if the same job lived long enough to see the sidecar back. Jobs whose events must not
be lost keep the default, fail-closed.
"""

from __future__ import annotations

import logging
import os
import threading
import time
from collections.abc import Mapping, Sequence

from .core import PostResult
from .errors import FluxClientError, FluxConnectionError, FluxServerError, FluxUnavailableError

log = logging.getLogger("flux_agent.client")

ENV = "FLUX_AGENT_CLIENT_FAIL_OPEN"
COOLDOWN = 10.0  # seconds during which events are dropped at once after a failure
NOT_COMMITTED = "COMMIT_TIMEOUT"


def enabled(fail_open: bool | None, environ: Mapping[str, str] | None = None) -> bool:
    """The argument, else ``FLUX_AGENT_CLIENT_FAIL_OPEN`` (true/false), else off."""
    if fail_open is not None:
        return fail_open
    raw = (os.environ if environ is None else environ).get(ENV, "").strip().lower()
    if raw in ("1", "true", "yes", "on"):
        return True
    if raw in ("", "0", "false", "no", "off"):
        return False
    raise ValueError(f"{ENV} must be true or false, got {raw!r}")


def unavailable(exc: FluxClientError) -> bool:
    """A failure of the agent, not of the events: what fail-open drops."""
    return isinstance(exc, FluxConnectionError | FluxUnavailableError | FluxServerError)


class FailOpen:
    """The switch's state, shared by every post of one client (thread-safe)."""

    def __init__(self, on: bool, cooldown: float | None = None) -> None:
        self.on = on
        self.cooldown = COOLDOWN if cooldown is None else cooldown
        self.dropped = 0  # events dropped in all
        self._open_until = 0.0
        self._episode = 0  # events dropped since the agent last took some
        self._lock = threading.Lock()

    def skip(self) -> bool:
        """True while failing fast: drop without trying."""
        return self.on and time.monotonic() < self._open_until

    def drop(self, event_ids: Sequence[str], exc: FluxClientError | None) -> PostResult:
        """Count and log ``event_ids`` as dropped; the answer a post returns for them."""
        with self._lock:
            first = self._episode == 0
            self.dropped += len(event_ids)
            self._episode += len(event_ids)
            if exc is not None:
                self._open_until = time.monotonic() + self.cooldown
        if first:
            log.warning("flux-agent cannot take events; dropping them (fail_open) until it "
                        "answers again: %s", exc or "failing fast",
                        extra={"fields": {"dropped": len(event_ids),
                                          "cooldown_s": self.cooldown}})
        return PostResult(0, 0, list(event_ids), committed=False, dropped=True)

    def delivered(self) -> None:
        """A post got through: close the episode, saying what it cost."""
        with self._lock:
            lost, self._episode, self._open_until = self._episode, 0, 0.0
        if lost:
            log.warning("flux-agent takes events again; %d were dropped meanwhile (fail_open)",
                        lost, extra={"fields": {"dropped": lost}})
