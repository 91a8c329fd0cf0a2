"""constraints.txt, the lock the image build and CI install from: every dependency of
pyproject.toml (and, for the runtime ones, everything they pull in) is pinned exactly, at a
version its range admits; the Dockerfile and the README's test command use it."""

from __future__ import annotations

import importlib.metadata
import re
import tomllib
from pathlib import Path

import pytest
from packaging.markers import default_environment
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

ROOT = Path(__file__).resolve().parent.parent
PROJECT = tomllib.loads((ROOT / "pyproject.toml").read_text())
LOCKED_EXTRAS = ("test", "embedded", "otlp")  # as .ci/constraints.py resolves them
# Left to their latest releases (see .ci/constraints.py).
UNPINNED = {"aiohttp", "aiohappyeyeballs", "aiosignal", "frozenlist", "multidict", "propcache",
            "yarl"}


def pins() -> dict[str, str]:
    found: dict[str, str] = {}
    for line in (ROOT / "constraints.txt").read_text().splitlines():
        line = line.split("#", 1)[0].strip()
        if not line:
            continue
        match = re.fullmatch(r"([A-Za-z0-9][A-Za-z0-9._-]*)==([^\s;]+)", line)
        assert match, f"not an exact pin: {line!r}"
        name = canonicalize_name(match[1])
        assert name not in found, f"{name} pinned twice"
        found[name] = match[2]
    return found


def applies(requirement: Requirement, extra: str = "") -> bool:
    if requirement.marker is None:
        return True
    return requirement.marker.evaluate({**default_environment(), "extra": extra})


def declared(*groups: str) -> list[Requirement]:
    out: list[Requirement] = []
    for group in groups:
        specs = (PROJECT["project"]["dependencies"] if group == "runtime"
                 else PROJECT["build-system"]["requires"] if group == "build"
                 else PROJECT["project"]["optional-dependencies"][group])
        out += [Requirement(spec) for spec in specs]
    return out


@pytest.mark.parametrize("group", ["runtime", "build", *LOCKED_EXTRAS])
def test_every_declared_dependency_is_pinned_inside_its_range(group: str):
    locked = pins()
    for requirement in declared(group):
        if not applies(requirement):
            continue
        name = canonicalize_name(requirement.name)
        if name in UNPINNED:
            continue
        assert name in locked, f"{requirement} ({group}) has no pin in constraints.txt"
        assert requirement.specifier.contains(locked[name], prereleases=True), (
            f"constraints.txt pins {name}=={locked[name]}, outside {requirement}")


def test_runtime_dependencies_are_pinned_transitively():
    """Everything the runtime dependencies pull in (extras included: pyjwt[crypto]), as the
    installed distributions declare it."""
    locked = pins()
    seen: set[tuple[str, str]] = set()
    pending = [(r, "") for r in declared("runtime") if applies(r)]
    while pending:
        requirement, extra = pending.pop()
        if not applies(requirement, extra):
            continue
        name = canonicalize_name(requirement.name)
        assert name in locked or name in UNPINNED, (
            f"{name} (needed by the runtime dependencies) is not pinned")
        for wanted in ["", *sorted(requirement.extras)]:
            if (name, wanted) in seen:
                continue
            seen.add((name, wanted))
            for spec in importlib.metadata.requires(name) or []:
                pending.append((Requirement(spec), wanted))
    assert len({n for n, _ in seen}) > len(declared("runtime"))


def test_the_image_build_and_ci_install_with_it():
    dockerfile = (ROOT / "Dockerfile").read_text()
    assert re.search(r"PIP_CONSTRAINT=/src/constraints\.txt pip wheel", dockerfile)
    assert re.search(r"^COPY [^\n]*\bconstraints\.txt\b", dockerfile, re.MULTILINE)
    readme = (ROOT / "README.md").read_text()
    block = readme.split("<!-- test-command -->", 1)[1].split("```sh", 1)[1].split("```")[0]
    assert "-c constraints.txt" in block


def test_aiohttp_takes_its_latest_release():
    """The HTTP edge uses aiohttp's public API only: no upper bound, no pin, so its security
    releases reach users, and CI tests the latest one."""
    locked = pins()
    assert not UNPINNED & set(locked), sorted(UNPINNED & set(locked))
    aiohttp = next(r for r in declared("runtime") if canonicalize_name(r.name) == "aiohttp")
    assert all(spec.operator in (">=", ">", "!=") for spec in aiohttp.specifier), aiohttp
