"""Refresh constraints.txt: the exact versions the image ships and CI tests.

    .venv/bin/python .ci/constraints.py            # rewrite constraints.txt
    .venv/bin/python .ci/constraints.py --stdout   # print it instead

One resolution, by this interpreter's pip (``pip install --dry-run --ignore-installed
--report``: nothing is installed), of the package with the extras CI installs (``test``,
``embedded``, ``otlp``) and of its build backend (``[build-system].requires``), so the
runtime dependencies are pinned at versions the test tools accept, and CI (``pip install -c
constraints.txt``) runs the suite on exactly what the image (``pip wheel`` under
``PIP_CONSTRAINT``) installs. The ``bench`` extra is left out (matplotlib and its numeric
stack are not needed by CI or the image). The pins are for CPython 3.11 on Linux, the
image's platform: run this with such an interpreter. pip's own configuration (index,
mirrors) is used as it is.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import tomllib
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
EXTRAS = ("test", "embedded", "otlp")
# Left to their latest releases: aiohttp (the HTTP edge uses its public API only, so its
# security releases reach users and CI tests each one) and the aio-libs packages released
# with it.
UNPINNED = frozenset({"aiohttp", "aiohappyeyeballs", "aiosignal", "frozenlist", "multidict",
                      "propcache", "yarl"})
HEADER = """\
# Exact versions of all of flux-agent's dependencies: runtime, the extras {extras},
# and the build backend, resolved together for CPython {python} on Linux. Constraints for
# the image build (the Dockerfile's PIP_CONSTRAINT) and for CI (the README's test command).
# aiohttp and the aio-libs packages released with it are left to their latest releases.
# Generated, do not edit; refresh with:  .venv/bin/python .ci/constraints.py
"""


def resolve() -> dict[str, str]:
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())
    name = project["project"]["name"]
    build = project["build-system"]["requires"]
    with tempfile.TemporaryDirectory() as tmp:
        report = Path(tmp) / "report.json"
        subprocess.run(
            [sys.executable, "-m", "pip", "install", "--dry-run", "--ignore-installed",
             "--quiet", "--report", str(report), f".[{','.join(EXTRAS)}]", *build],
            cwd=ROOT, check=True)
        items = json.loads(report.read_text())["install"]
    pins: dict[str, str] = {}
    for item in items:
        metadata = item["metadata"]
        if normalise(metadata["name"]) == normalise(name) or \
                normalise(metadata["name"]) in UNPINNED:
            continue
        pins[normalise(metadata["name"])] = metadata["version"]
    return dict(sorted(pins.items()))


def normalise(name: str) -> str:
    return name.lower().replace("_", "-").replace(".", "-")


def render(pins: dict[str, str]) -> str:
    python = ".".join(map(str, sys.version_info[:2]))
    lines = [HEADER.format(extras=", ".join(EXTRAS), python=python)]
    lines += [f"{name}=={version}\n" for name, version in pins.items()]
    return "".join(lines)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--stdout", action="store_true", help="print instead of writing")
    args = parser.parse_args()
    text = render(resolve())
    if args.stdout:
        sys.stdout.write(text)
    else:
        (ROOT / "constraints.txt").write_text(text)
        print(f"wrote constraints.txt ({text.count('==')} pins)", file=sys.stderr)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
