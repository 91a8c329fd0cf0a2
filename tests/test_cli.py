"""The command line as an operator meets it: help per command, no abbreviations."""

from __future__ import annotations

import argparse
import os
import subprocess
import sys

import pytest

from flux_agent.cli import build_parser
from flux_agent.config import (
    SETTINGS,
    env_name,
    flag_name,
    load_config,
)
from flux_agent.errors import ConfigError

HELPER_FLAGS = {"-h", "--help", "--config"}
AUTH_MODES = next(f for f in SETTINGS if f.name == "auth").metadata["parse"].options
# What each command takes besides its own options: only the settings it uses.
SETTINGS_OF = {
    "migrate": {"--database-url", "--database-url-file"},
    "verify": {"--database-url", "--database-url-file", "--agency", "--agency-manifest", "--run"},
    "spool": {"--state-dir"},
}


def cli(*args: str, env: dict[str, str] | None = None, stdin: str | None = None
        ) -> subprocess.CompletedProcess[str]:
    base = {k: v for k, v in os.environ.items() if not k.startswith("FLUX_AGENT_")}
    return subprocess.run([sys.executable, "-m", "flux_agent", *args], input=stdin,
                          env={**base, **(env or {})}, capture_output=True, text=True,
                          timeout=60)


def flags_of(command: str) -> set[str]:
    sub = next(a for a in build_parser()._actions
               if isinstance(a, argparse._SubParsersAction)).choices[command]
    return {flag for action in sub._actions for flag in action.option_strings}


# --------------------------------------------------------------------------- help


@pytest.mark.parametrize("command", sorted(SETTINGS_OF))
def test_each_command_takes_only_its_own_flags(command: str):
    assert flags_of(command) - HELPER_FLAGS == SETTINGS_OF[command]


def test_run_takes_every_setting_with_its_default_and_variable():
    every = {flag_name(f.name) for f in SETTINGS}
    assert every <= flags_of("run")
    text = cli("run", "--help").stdout
    for f in SETTINGS:
        assert env_name(f.name) in text, f.name
    assert "[default: 1GiB; env FLUX_AGENT_SPOOL_MAX_BYTES]" in " ".join(text.split())
    assert "--auth {" + ",".join(AUTH_MODES) + "}" in text


def test_help_says_what_verify_and_migrate_need():
    verify = " ".join(cli("verify", "--help").stdout.split())
    assert "Only this agency. [default: every agency in the manifest" in verify
    assert "fixed agency" not in verify
    for command in ("verify", "migrate"):
        text = " ".join(cli(command, "--help").stdout.split())
        assert "PostgreSQL URL, required" in text
        assert "embedded)" not in text  # the embedded default does not apply here
    assert "development JWT, key pair or API key" in cli("--help").stdout


def test_abbreviated_flags_are_refused():
    result = cli("spool", "inspect", "--state-d", "/nonexistent")
    assert result.returncode == 2
    assert "unrecognized arguments: --state-d" in result.stderr
    injector = cli("inject", "--forc", "pod.yaml")
    assert injector.returncode == 78
    assert "unrecognized arguments: --forc" in injector.stderr
    with pytest.raises(ConfigError, match="--spool-max-byte"):
        load_config(["--spool-max-byte", "1"], {"FLUX_AGENT_AUTH": "none",
                                                "FLUX_AGENT_AGENCY": "nasa"})
