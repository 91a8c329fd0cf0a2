"""The README and every page of docs/ run as written: each page's shell and Python examples
marked for it run, in order, in one shell of their own, against a real agent on the embedded
default, and must work as written and leave nothing behind.

Marks, on the line right before a ```sh or ```python fence (every such block has one):

- ``<!-- example -->``: run it; ``<!-- example: output contains TEXT -->``: run it, and its
  output must contain TEXT;
- ``<!-- not run: WHY -->``: not run (set-up commands, a cluster), saying why in the source
  and not on the rendered page.

A page says where its agent listens once, in the first example that names those places (the
state dir and the listen addresses); the walk puts a temporary directory and free ports there,
and nowhere else: any later example that names them itself would not follow a change of
them, and fails the walk. The walk runs in a scratch directory, and a file left there after
the page's last example (a key, a log, a state dir) fails it: every page cleans up after
itself, as a newcomer's checkout would need.
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
PAGES = [README, *sorted((ROOT / "docs").glob("*.md"))]
RUN = re.compile(r"^<!-- example(?:: output contains (?P<expect>.+?))? -->$")
NOT_RUN = re.compile(r"^<!-- not run: (?P<why>.+) -->$")
FENCE = re.compile(r"^```(?P<lang>\S*)")
MARK = "@@readme-example@@"
# What a page's first example that names them defines, and what the walk puts there instead.
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


def examples(text: str, name: str = "README.md") -> list[Example]:
    """Every sh and python block of a page, in order, with its mark."""
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
                f"{name}:{i + 1}: a {lang} block without a mark ({RUN.pattern} or "
                f"{NOT_RUN.pattern}) on the line before it")
            out.append(Example(i + 1, heading, lang, "\n".join(lines[i + 1:end]),
                               run is not None, run.group("expect") if run else None))
        i = end + 1
    return out


def _name(page: Path) -> str:
    return str(page.relative_to(ROOT))


def _uncommented(body: str) -> str:
    return "\n".join(line.split(" #")[0] for line in body.splitlines()
                     if not line.lstrip().startswith("#"))


def _defining(walk: list[Example]) -> int | None:
    """The index of the page's first example that names where the agent is, if any."""
    return next((n for n, e in enumerate(walk)
                 if any(d in e.body for d in DEFAULTS.values())), None)


def _walk_dir(tmp: Path) -> None:
    """What the pages' commands expect around them: ``.venv/bin/`` (this interpreter, with
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
    first = _defining(walk)
    for n, example in enumerate(walk):
        body = example.body
        if n == first:
            for key, default in DEFAULTS.items():
                body = body.replace(default, values[key])
        parts.append(f"printf '\\n{MARK} {n}\\n'")
        if example.lang == "python":
            body = f".venv/bin/python - <<'FLUX_README_PYTHON'\n{body}\nFLUX_README_PYTHON"
        parts.append(body)
    parts.append(f"printf '\\n{MARK} end\\n'")
    return "\n".join(parts) + "\n"


def test_the_readme_starts_small_and_every_page_is_walked():
    readme = README.read_text()
    quick = readme[readme.index("## Quick start"):readme.index("## Run the tests")]
    assert len(quick.splitlines()) <= 45, "the quick start grew past a screen"
    assert len(readme.splitlines()) <= 120, "the README is an index: reference goes to docs/"
    linked = set(re.findall(r"\]\((docs/[\w-]+\.md)\)", readme))
    assert linked == {_name(p) for p in PAGES[1:]}, "every docs page, and only those, in Read on"
    walked = sum(1 for page in PAGES for e in examples(page.read_text(), _name(page)) if e.run)
    assert walked >= 25, "the walk lost its examples"


@pytest.mark.parametrize("page", PAGES, ids=_name)
def test_every_example_is_marked_and_follows_the_defined_addresses(page: Path):
    found = examples(page.read_text(), _name(page))
    walk = [e for e in found if e.run]
    first = _defining(walk)
    starts = [e for e in walk if re.search(r"flux-agent (run|aggregate)\b", e.body)]
    if starts:
        assert first is not None and first <= walk.index(starts[0]), (
            f"{_name(page)}: an example starts an agent before one says where it listens")
        for key in ("state_dir", "listen", "admin"):
            assert DEFAULTS[key] in walk[first].body, (
                f"{_name(page)}:{walk[first].line} does not define {DEFAULTS[key]}")
    for n, example in enumerate(walk):
        if n == first:
            continue
        for default in DEFAULTS.values():
            assert default not in _uncommented(example.body), (
                f"{_name(page)}:{example.line} names {default} itself: use the variable the "
                "page's first example defines")


def test_links_between_pages_resolve():
    """Relative links and anchors of the README and docs/ lead somewhere (GitHub's anchors)."""
    def anchors(page: Path) -> set[str]:
        heads = re.findall(r"^#+ (.+)$", page.read_text(), flags=re.M)
        return {re.sub(r"[^\w\- ]", "", h.strip().lower()).replace(" ", "-") for h in heads}

    for page in PAGES:
        text = re.sub(r"```.*?```", "", page.read_text(), flags=re.S)
        for target in re.findall(r"\]\(([^)\s]+)\)", text):
            if re.match(r"[a-z]+:", target):
                continue
            path, _, anchor = target.partition("#")
            dest = (page.parent / path).resolve() if path else page
            assert dest.exists(), f"{_name(page)}: link to {target}: no such file"
            if anchor and dest.suffix == ".md":
                assert anchor in anchors(dest), f"{_name(page)}: link to {target}: no such heading"


@pytest.mark.db
@pytest.mark.slow
@pytest.mark.parametrize("page", [p for p in PAGES
                                  if any(e.run for e in examples(p.read_text(), _name(p)))],
                         ids=_name)
def test_the_page_runs_top_to_bottom(page: Path):
    walk = [e for e in examples(page.read_text(), _name(page)) if e.run]
    tmp = short_tempdir("fa-readme-")
    state = tmp / "state"
    values = {"state_dir": str(state), "listen": f"127.0.0.1:{free_port()}",
              "admin": f"127.0.0.1:{free_port()}", "aggregator": f"127.0.0.1:{free_port()}"}
    _walk_dir(tmp)
    env = {k: v for k, v in os.environ.items()
           if not k.startswith(("FLUX_AGENT_", "OPENLINEAGE_", "PG"))}
    logs = {name: "" for name in ("agent.log", "aggregator.log")}
    proc = subprocess.Popen(["bash", "-c", script(walk, values)], cwd=tmp, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            start_new_session=True)
    try:
        try:
            output, _ = proc.communicate(timeout=240)
        finally:
            for name in logs:  # read before the page's clean-up could remove them
                with contextlib.suppress(OSError):
                    logs[name] = (tmp / name).read_text(errors="replace")
        CAPTURED.extend([output, *logs.values()])
        pieces = re.split(rf"^{re.escape(MARK)} (\w+)$", output, flags=re.M)
        outputs = dict(zip(pieces[1::2], pieces[2::2], strict=True))
        ran = [key for key in outputs if key != "end"]

        def where(n: int) -> str:
            example = walk[n]
            return (f"{_name(page)}:{example.line} ({example.heading}):\n{example.body}\n"
                    f"--- its output:\n{outputs.get(str(n), '')[-3000:]}\n"
                    f"--- agent.log (end):\n{logs['agent.log'][-3000:]}")

        assert proc.returncode == 0 and "end" in outputs, (
            f"exit {proc.returncode} in " + where(int(ran[-1]) if ran else 0))
        for n, example in enumerate(walk):
            answer = outputs[str(n)]
            assert "urn:flux-agent:problem:" not in answer, "an error answer in " + where(n)
            if example.expect:
                assert example.expect in answer, f"no {example.expect!r} in " + where(n)
        # The page stopped its agents (and they their embedded PostgreSQL) and removed what
        # it made: the scratch directory holds what the walk put there, and nothing else.
        assert not (state / "postgres" / "postmaster.pid").exists()
        left = sorted(p.name for p in tmp.iterdir() if p.name not in (".venv", "helm"))
        assert not left, f"{_name(page)} leaves {left} behind: its last example must remove them"
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
        if (state / "postgres" / "postmaster.pid").exists():
            LocalPostgres(state / "postgres").kill()
        shutil.rmtree(tmp, ignore_errors=True)
