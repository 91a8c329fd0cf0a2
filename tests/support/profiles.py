"""Hypothesis profiles: ``default``, quick, for every run on a developer's machine, and
``ci``, thorough, selected by ``HYPOTHESIS_PROFILE=ci`` (``.ci/run`` exports it).

Neither has a deadline: a 2-core machine shared with other test runs makes timings noise,
and a deadline there fails tests for the machine's load, not for the code. A property test
states the number of examples it wants in CI with :func:`examples`; the quick profile runs
at most ``QUICK`` of them.
"""

from __future__ import annotations

import os

from hypothesis import HealthCheck, settings

QUICK = 25
PROFILE = os.environ.get("HYPOTHESIS_PROFILE", "default")

settings.register_profile("default", max_examples=QUICK, deadline=None, print_blob=True,
                          suppress_health_check=[HealthCheck.too_slow])
settings.register_profile("ci", max_examples=1000, deadline=None, print_blob=True,
                          suppress_health_check=[HealthCheck.too_slow])


def load() -> None:
    """Load ``HYPOTHESIS_PROFILE``'s profile (an unknown name fails the run)."""
    settings.load_profile(PROFILE)


def examples(thorough: int) -> int:
    """How many examples a test that wants ``thorough`` of them in CI runs now: all under
    the ci profile, at most the loaded profile's own number otherwise."""
    if PROFILE == "ci":
        return thorough
    return min(thorough, settings.get_profile(PROFILE).max_examples)
