"""Backoff between retries: exponential, capped, with jitter, so that a fleet of agents does
not retry in step after an outage."""

from __future__ import annotations

import random


def backoff(attempt: int, cap: float, base: float = 0.1) -> float:
    """Seconds before retry ``attempt`` (1, 2, ...): ``base * 2**(attempt-1)``, at most
    ``cap``, then a random point in its upper half."""
    delay = min(cap, base * 2 ** min(max(attempt, 1) - 1, 30))
    return float(delay / 2 + random.uniform(0, delay / 2))
