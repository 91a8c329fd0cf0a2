"""The container test's figures, printed at the end of the run (and written as JSON to
``FLUX_IMAGE_TEST_REPORT`` when set)."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from .test_image import FIGURES


def pytest_terminal_summary(terminalreporter: pytest.TerminalReporter) -> None:
    if not FIGURES:
        return
    text = json.dumps(FIGURES, indent=1, sort_keys=True)
    terminalreporter.write_sep("-", "image test figures")
    terminalreporter.write_line(text)
    path = os.environ.get("FLUX_IMAGE_TEST_REPORT")
    if path:
        Path(path).write_text(text + "\n")
