"""The distribution's name, and every ``pip install`` the documentation tells users to run.

On the public index, ``flux-agent`` is an unrelated project that ships its own top-level
``flux_agent`` package: a README line that installs it puts someone else's code into every
ETL image that copies the line. The distribution is ``flux-etl-agent``; every install
command in the README, docs/, the chart's docs, the Dockerfile and the agent's own messages
names this project (by that name or a wheel built from the checkout), a local path, or one of
its declared dependencies.
"""

from __future__ import annotations

import re
import shlex
import tomllib
from collections.abc import Iterator
from pathlib import Path

import pytest
from packaging.requirements import InvalidRequirement, Requirement
from packaging.utils import canonicalize_name

ROOT = Path(__file__).resolve().parent.parent
PROJECT = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
BUILD = tomllib.loads((ROOT / "pyproject.toml").read_text())["build-system"]
NAME = canonicalize_name(PROJECT["name"])
EXTRAS = set(PROJECT["optional-dependencies"])
DEPENDENCIES = {canonicalize_name(Requirement(spec).name)
                for spec in [*PROJECT["dependencies"], *BUILD["requires"],
                             *(s for g in PROJECT["optional-dependencies"].values() for s in g)]}
# The project's own wheel, as built from the checkout: flux_etl_agent-<version>-....whl
WHEEL = re.compile(re.escape(NAME.replace("-", "_")) + r"-[^/\s]*\.whl$")

# `pip install` in any spelling (pip, pip3, .venv/bin/pip, python -m pip), up to where the
# command ends in prose, markdown or a shell line.
_COMMAND = re.compile(r"\bpip3?(?:\.exe)?\s+install\b(?P<args>[^`\n;|&#()]*)")
# Options of `pip install` that take a value (the value is not a requirement).
_WITH_VALUE = {"-c", "--constraint", "-r", "--requirement", "-t", "--target", "--prefix",
               "--root", "-i", "--index-url", "--extra-index-url", "-f", "--find-links",
               "--platform", "--python-version", "--implementation", "--abi", "--src",
               "--log", "--cache-dir", "--upgrade-strategy", "--only-binary",
               "--no-binary", "-C", "--config-settings", "--report", "--progress-bar",
               "--trusted-host", "--python", "--proxy", "--cert", "--client-cert",
               "--timeout", "--retries"}
NOT_OURS = (
    "the project does not own this name: install flux-etl-agent, a wheel built from the "
    "checkout, a local path, or one of pyproject.toml's dependencies")


def documents() -> list[Path]:
    """What tells users what to run: the README, docs/, the chart's docs, the Dockerfile,
    CI's script, and the agent's own messages (its Python sources)."""
    found = [ROOT / "README.md", ROOT / "Dockerfile", ROOT / ".ci" / "run"]
    found += sorted((ROOT / "docs").rglob("*.md")) if (ROOT / "docs").is_dir() else []
    found += sorted(p for p in (ROOT / "helm").rglob("*")
                    if p.suffix in (".md", ".txt", ".yaml", ".tpl") and p.is_file())
    found += sorted((ROOT / "flux_agent").rglob("*.py"))
    found += sorted((ROOT / "bench").rglob("*.py"))
    return [p for p in found if p.exists()]


def logical_lines(text: str) -> Iterator[tuple[int, str]]:
    """Lines with shell and Dockerfile continuations (a trailing backslash) joined."""
    pending, start = "", 0
    for number, line in enumerate(text.splitlines(), start=1):
        if not pending:
            start = number
        if line.rstrip().endswith("\\"):
            pending += line.rstrip()[:-1] + " "
            continue
        yield start, pending + line
        pending = ""
    if pending:
        yield start, pending


def requirements(args: str) -> Iterator[str]:
    """The requirement specifiers and paths of one `pip install` command's arguments."""
    try:
        tokens = shlex.split(args.replace("'", " ' ").replace(" ' ", "'"), posix=True)
    except ValueError:  # an unbalanced quote in prose: take the words as they are
        tokens = args.split()
    skip = False
    for token in tokens:
        if skip:
            skip = False
            continue
        if token in ("-e", "--editable"):
            continue  # the next token is the (local) project itself
        if token.startswith("-"):
            skip = token in _WITH_VALUE
            continue
        token = token.strip("'\"")
        if token:
            yield token


def problem(spec: str) -> str | None:
    """None when `spec` is this project, a local path or wheel of it, or a declared
    dependency; else why not."""
    if re.match(r"^[a-z+]+://", spec) or spec.startswith("git+"):
        return f"{spec}: a remote archive: {NOT_OURS}"
    if spec.endswith((".whl", ".tar.gz", ".zip")):
        base = spec.rsplit("/", 1)[-1]
        if spec.endswith(".whl") and not WHEEL.match(base):
            return f"{spec}: not this project's wheel ({NAME.replace('-', '_')}-*.whl)"
        return None
    if spec.startswith((".", "/", "~", "$")) or "/" in spec:
        return None  # a path: the checkout itself (".", ".[test]") or a directory of it
    try:
        requirement = Requirement(spec)
    except InvalidRequirement:
        return f"{spec}: not a requirement pip understands"
    name = canonicalize_name(requirement.name)
    if name == NAME:
        unknown = set(requirement.extras) - EXTRAS
        return f"{spec}: no such extra {sorted(unknown)}" if unknown else None
    if name in DEPENDENCIES:
        return None
    return f"{spec}: {NOT_OURS}"


def install_lines(path: Path) -> Iterator[tuple[int, str, list[str]]]:
    for number, line in logical_lines(path.read_text()):
        for match in _COMMAND.finditer(line):
            yield number, match.group(0), list(requirements(match.group("args")))


def test_the_distribution_has_its_own_name():
    assert NAME == "flux-etl-agent"
    assert canonicalize_name("flux-agent") != NAME
    # The import package and the command keep their names.
    assert PROJECT["scripts"] == {"flux-agent": "flux_agent.cli:main"}
    pyproject = tomllib.loads((ROOT / "pyproject.toml").read_text())
    assert pyproject["tool"]["hatch"]["build"]["targets"]["wheel"]["packages"] == ["flux_agent"]


def test_every_documented_install_names_what_the_project_owns():
    seen, problems = 0, []
    for path in documents():
        for number, command, specs in install_lines(path):
            seen += 1
            for spec in specs:
                why = problem(spec)
                if why:
                    problems.append(f"{path.relative_to(ROOT)}:{number}: {command.strip()}: "
                                     f"{why}")
    assert seen >= 5  # the scan still finds the README's and the Dockerfile's installs
    assert not problems, "\n".join(problems)


@pytest.mark.parametrize(("line", "flagged"), [
    ("RUN pip install --no-deps flux-agent==0.1.0   # the sync client", ["flux-agent==0.1.0"]),
    ("(`pip install 'flux-agent[otlp]'`)", ["flux-agent[otlp]"]),
    ("python -m pip install requests", ["requests"]),
    ("pip install --no-index --find-links=/wheels /wheels/flux_agent-*.whl", [
        "/wheels/flux_agent-*.whl"]),
    ("pip install https://example.invalid/x.tar.gz", ["https://example.invalid/x.tar.gz"]),
    ("pip install 'flux-etl-agent[nope]'", ["flux-etl-agent[nope]"]),
    (".venv/bin/pip install -c constraints.txt -e '.[test,embedded]' && pytest", []),
    ("RUN pip install aiohttp                       # only for AsyncFluxClient", []),
    ("pip install --no-deps flux-etl-agent==0.1.0", []),
    ("pip install 'flux-etl-agent[otlp]'", []),
    ("pip install --no-deps /dist/flux_etl_agent-0.1.0-py3-none-any.whl", []),
    ("PIP_CONSTRAINT=/src/constraints.txt pip wheel --no-cache-dir --wheel-dir /wheels .", []),
])
def test_the_check_finds_what_it_must(tmp_path: Path, line: str, flagged: list[str]):
    doc = tmp_path / "doc.md"
    doc.write_text(line + "\n")
    found = [spec for _, _, specs in install_lines(doc) for spec in specs if problem(spec)]
    assert found == flagged
