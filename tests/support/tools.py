"""External tools some tests drive (PgBouncer, promtool, Prometheus).

A missing tool fails the test when its name is in ``FLUX_TEST_REQUIRE`` (CI sets it after
installing them); elsewhere the test is skipped with the reason, never counted as passed.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path
from typing import NoReturn

import pytest

from .markers import require_marker

SEARCH = ("/usr/sbin", "/usr/bin", "/usr/local/bin")


def require_tool(name: str) -> Path:
    found = shutil.which(name) or next(
        (str(Path(d) / name) for d in SEARCH if (Path(d) / name).exists()), None)
    if found:
        return Path(found)
    unavailable(name, f"{name} is not installed (Debian: apt-get install {name})")


def unavailable(name: str, message: str) -> NoReturn:
    """Fail when ``name`` is required (``FLUX_TEST_REQUIRE``), else skip, with ``message``."""
    required = {t.strip() for t in os.environ.get("FLUX_TEST_REQUIRE", "").split(",")}
    if name in required or "all" in required:
        pytest.fail(message, pytrace=False)
    pytest.skip(message)


def require_root(why: str) -> None:
    """Fault tests that mount filesystems need root (CI runs as root: there they fail)."""
    require_marker("fault", f"needs root ({why})")
    if os.geteuid() != 0:
        unavailable("root", f"needs root: {why}")
