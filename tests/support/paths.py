"""Directories for agents' state."""

from __future__ import annotations

import tempfile
from pathlib import Path


def short_tempdir(prefix: str = "fa-") -> Path:
    # Unix socket paths must stay under ~107 bytes: keep state dirs short.
    path = Path(tempfile.mkdtemp(prefix=prefix, dir="/tmp"))
    path.chmod(0o755)
    return path
