"""The README runs top to bottom: every shell and Python example marked for it runs, in order,
in one shell, against a real agent on the embedded default, and must work as written.

Marks, on the line right before a ```sh or ```python fence (every such block has one):

- ``<!-- example -->``: run it; ``<!-- example: output contains TEXT -->``: run it, and its
  output must contain TEXT;
- ``*Not run by the README walk: WHY.*``: visibly not run (set-up commands, a cluster).

The README defines where the examples find the agent once, in its first example (the state
dir and the two listen addresses); the walk puts a temporary directory and free ports there,
and nowhere else: any other example that names those addresses itself would not follow a
change of them, and fails the walk.
"""

from __future__ import annotations

import contextlib
import os
import re
import shutil
import signal
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest

from flux_agent.postgres.embedded import LocalPostgres, free_port

from .support.capture import CAPTURED
from .support.paths import short_tempdir

ROOT = Path(__file__).resolve().parent.parent
README = ROOT / "README.md"
RUN = re.compile(r"^<!-- example(?:: output contains (?P<expect>.+?))? -->$")
NOT_RUN = re.compile(r"^\*Not run by the README walk: (?P<why>.+)\.\*$")
FENCE = re.compile(r"^```(?P<lang>\S*)")
MARK = "@@readme-example@@"
# What the first example defines, and what the walk puts there instead.
DEFAULTS = {"state_dir": "/tmp/flux-agent-demo", "listen": "127.0.0.1:8787",
            "admin": "127.0.0.1:9464", "aggregator": "127.0.0.1:8788"}


@dataclass(frozen=True)
class Example:
    line: int  # of the opening fence, 1-based
    heading: str
    lang: str
    body: str
    run: bool
    expect: str | None = None


def examples(text: str) -> list[Example]:
    """Every sh and python block of the README, in order, with its mark."""
    lines = text.splitlines()
    out: list[Example] = []
    heading, i = "", 0
    while i < len(lines):
        fence = FENCE.match(lines[i])
        if not fence:
            if lines[i].startswith("#"):
                heading = lines[i].lstrip("# ")
            i += 1
            continue
        end = next(k for k in range(i + 1, len(lines)) if lines[k].startswith("```"))
        lang = fence.group("lang")
        if lang in ("sh", "python"):
            mark = next((lines[k] for k in range(i - 1, -1, -1) if lines[k].strip()), "")
            run, not_run = RUN.match(mark), NOT_RUN.match(mark)
            assert run or not_run, (
                f"README.md:{i + 1}: a {lang} block without a mark ({RUN.pattern} or "
                f"{NOT_RUN.pattern}) on the line before it")
            out.append(Example(i + 1, heading, lang, "\n".join(lines[i + 1:end]),
                               run is not None, run.group("expect") if run else None))
        i = end + 1
    return out


def _uncommented(body: str) -> str:
    return "\n".join(line.split(" #")[0] for line in body.splitlines()
                     if not line.lstrip().startswith("#"))


def _walk_dir(tmp: Path) -> None:
    """What the README's commands expect around them: ``.venv/bin/`` (this interpreter, with
    this checkout installed) and the chart."""
    bin_dir = tmp / ".venv" / "bin"
    bin_dir.mkdir(parents=True)
    for name, command in (("python", f'exec "{sys.executable}" "$@"'),
                          ("flux-agent", f'exec "{sys.executable}" -m flux_agent "$@"')):
        (bin_dir / name).write_text(f"#!/bin/sh\n{command}\n")
        (bin_dir / name).chmod(0o755)
    (tmp / "helm").symlink_to(ROOT / "helm")


def script(walk: list[Example], values: dict[str, str]) -> str:
    """One bash script: each example after a marker line, Python ones through the venv."""
    parts = ["set -eo pipefail"]
    for n, example in enumerate(walk):
        body = example.body
        if n == 0:
            for key, default in DEFAULTS.items():
                assert default in body, f"the first example no longer defines {default}"
                body = body.replace(default, values[key])
        parts.append(f"printf '\\n{MARK} {n}\\n'")
        if example.lang == "python":
            body = f".venv/bin/python - <<'FLUX_README_PYTHON'\n{body}\nFLUX_README_PYTHON"
        parts.append(body)
    parts.append(f"printf '\\n{MARK} end\\n'")
    return "\n".join(parts) + "\n"


def test_every_example_is_marked_and_follows_the_defined_addresses():
    found = examples(README.read_text())
    walk = [e for e in found if e.run]
    assert len(walk) >= 15, "the README walk lost its examples"
    assert all(not e.run for e in found if e.line < walk[0].line)
    for example in walk[1:]:
        for default in DEFAULTS.values():
            assert default not in _uncommented(example.body), (
                f"README.md:{example.line} names {default} itself: use the variable the "
                "first example defines")


@pytest.mark.db
@pytest.mark.slow
def test_the_readme_runs_top_to_bottom():
    walk = [e for e in examples(README.read_text()) if e.run]
    tmp = short_tempdir("fa-readme-")
    state = tmp / "state"
    values = {"state_dir": str(state), "listen": f"127.0.0.1:{free_port()}",
              "admin": f"127.0.0.1:{free_port()}", "aggregator": f"127.0.0.1:{free_port()}"}
    _walk_dir(tmp)
    env = {k: v for k, v in os.environ.items()
           if not k.startswith(("FLUX_AGENT_", "OPENLINEAGE_", "PG"))}
    proc = subprocess.Popen(["bash", "-c", script(walk, values)], cwd=tmp, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            start_new_session=True)
    try:
        output, _ = proc.communicate(timeout=240)
        log = (tmp / "agent.log").read_text(errors="replace") if (tmp / "agent.log").exists() \
            else ""
        CAPTURED.extend([output, log])
        pieces = re.split(rf"^{re.escape(MARK)} (\w+)$", output, flags=re.M)
        outputs = dict(zip(pieces[1::2], pieces[2::2], strict=True))
        ran = [key for key in outputs if key != "end"]

        def where(n: int) -> str:
            example = walk[n]
            return (f"README.md:{example.line} ({example.heading}):\n{example.body}\n"
                    f"--- its output:\n{outputs.get(str(n), '')[-3000:]}\n"
                    f"--- agent.log (end):\n{log[-3000:]}")

        assert proc.returncode == 0 and "end" in outputs, (
            f"exit {proc.returncode} in " + where(int(ran[-1]) if ran else 0))
        for n, example in enumerate(walk):
            answer = outputs[str(n)]
            assert "urn:flux-agent:problem:" not in answer, "an error answer in " + where(n)
            if example.expect:
                assert example.expect in answer, f"no {example.expect!r} in " + where(n)
        # The walk stopped its agent, and the agent its embedded PostgreSQL.
        assert not (state / "postgres" / "postmaster.pid").exists(), log[-3000:]
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
        if (state / "postgres" / "postmaster.pid").exists():
            LocalPostgres(state / "postgres").kill()
        shutil.rmtree(tmp, ignore_errors=True)
