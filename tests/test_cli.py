"""The command line as an operator meets it: help per command, no abbreviations, `status`
against a healthy agent, one whose database is down and none at all, `validate`, shell
completion, and the messages that tell a person what to do next."""

from __future__ import annotations

import asyncio
import json
import os
import shutil
import subprocess
import sys
import tomllib
from datetime import datetime
from pathlib import Path

import pytest

from flux_agent import Agent
from flux_agent.cli import build_parser
from flux_agent.cli.completion import _commands
from flux_agent.core.errors import ConfigError
from flux_agent.core.settings import (
    SETTINGS,
    Secret,
    effective_settings,
    env_name,
    flag_name,
    load_config,
)
from flux_agent.postgres.embedded import free_port
from flux_agent.testing import make_event

from .support.agents import agent_config
from .support.faults import TcpProxy
from .support.http import post
from .support.paths import short_tempdir
from .support.postgres import PgServer, proxied

HELPER_FLAGS = {"-h", "--help", "--config"}
AUTH_MODES = next(f for f in SETTINGS if f.name == "auth").metadata["parse"].options
# What each command takes besides its own options: only the settings it uses.
SETTINGS_OF = {
    "migrate": {"--database-url", "--database-url-file"},
    "verify": {"--database-url", "--database-url-file", "--agency", "--agency-manifest",
               "--schema-profile", "--run"},
    "spool": {"--state-dir"},
    "status": {"--admin-listen", "--state-dir", "--agency", "--url", "--token", "--token-file",
               "--wait", "--timeout", "--json"},
}


def cli(*args: str, env: dict[str, str] | None = None, stdin: str | None = None
        ) -> subprocess.CompletedProcess[str]:
    base = {k: v for k, v in os.environ.items() if not k.startswith("FLUX_AGENT_")}
    # Free ports unless a test names its own: `validate` and `run` check that they can
    # listen, and other services on this machine may hold the defaults (8787, 9464).
    base.update({"FLUX_AGENT_LISTEN": f"127.0.0.1:{free_port()}",
                 "FLUX_AGENT_ADMIN_LISTEN": f"127.0.0.1:{free_port()}"})
    return subprocess.run([sys.executable, "-m", "flux_agent", *args], input=stdin,
                          env={**base, **(env or {})}, capture_output=True, text=True,
                          timeout=60)


def flags_of(command: str) -> set[str]:
    sub = _commands(build_parser())[command]
    return {flag for action in sub._actions for flag in action.option_strings}


# --------------------------------------------------------------------------- help


@pytest.mark.parametrize("command", sorted(SETTINGS_OF))
def test_each_command_takes_only_its_own_flags(command: str):
    assert flags_of(command) - HELPER_FLAGS == SETTINGS_OF[command]


def test_run_and_validate_take_every_setting_with_its_default_and_variable():
    every = {flag_name(f.name) for f in SETTINGS}
    assert every <= flags_of("run")
    assert every <= flags_of("validate")
    text = cli("run", "--help").stdout
    for f in SETTINGS:
        assert env_name(f.name) in text, f.name
    assert "[default: 1GiB; env FLUX_AGENT_SPOOL_MAX_BYTES]" in " ".join(text.split())
    assert "--auth {" + ",".join(AUTH_MODES) + "}" in text


def test_help_says_what_verify_and_migrate_need():
    verify = " ".join(cli("verify", "--help").stdout.split())
    assert "Only this agency (required when no agency manifest lists them). [default: every " \
        "agency in the manifest" in verify
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


# --------------------------------------------------------------------------- status


def status(agent: Agent | None, *args: str, **env: str) -> subprocess.CompletedProcess[str]:
    url = ["--url", agent.endpoints.admin_url] if agent and agent.endpoints.admin_url else []
    return cli("status", *url, *args, env=env)


async def test_status_of_a_healthy_agent(agent: Agent):
    status_, _, _ = await post(agent.endpoints.event_url + "/v1/events", make_event(),
                               headers={"Prefer": "wait=committed"})
    assert status_ == 200
    human = await asyncio.to_thread(status, agent)
    assert human.returncode == 0, human.stdout + human.stderr
    assert ": healthy" in human.stdout
    assert "database    up" in human.stdout
    machine = await asyncio.to_thread(status, agent, "--json")
    assert machine.returncode == 0
    report = json.loads(machine.stdout)
    assert (report["healthy"], report["ready"], report["problems"]) == (True, True, [])
    health = report["health"]
    assert health["spool"]["max_bytes"] == agent.config.spool_max_bytes
    # RFC 3339, like every other time the agent gives.
    assert datetime.fromisoformat(health["flush"]["last_flush_at"].replace("Z", "+00:00"))


async def test_status_of_an_agent_whose_database_is_down(database, proxy: TcpProxy,
                                                         state_dir: Path):
    config = agent_config(proxied(database, proxy), state_dir, drain_timeout=0.5)
    async with Agent(config) as running:
        proxy.cut()
        result = await asyncio.to_thread(status, running, "--json", "--wait", "1s")
        assert result.returncode == 1, result.stdout + result.stderr
        report = json.loads(result.stdout)
        assert report["ready"] is True  # events are still accepted, onto the spool
        assert report["healthy"] is False
        assert any(p.startswith("database ") for p in report["problems"]), report
        human = await asyncio.to_thread(status, running)
        assert human.returncode == 1
        assert "NOT HEALTHY" in human.stdout
        assert "database    down" in human.stdout or "database    timeout" in human.stdout


async def test_status_of_a_sidecar_forwarding_to_aggregators(database, state_dir: Path):
    """A sidecar whose upstream is aggregators has no database: status shows the
    aggregators instead, healthy while one answers and not once none does."""
    sidecar_state = short_tempdir("fa-fwd-")
    aggregator = Agent(agent_config(database, state_dir, role="aggregator", socket="off"))
    await aggregator.start()
    try:
        url = aggregator.endpoints.event_url
        assert url is not None
        config = agent_config(database, sidecar_state, database_url=None, socket="off",
                              drain_timeout=0.5, upstream=(url,))
        async with Agent(config) as sidecar:
            human = await asyncio.to_thread(status, sidecar, "--wait", "10s")
            assert human.returncode == 0, human.stdout + human.stderr
            assert ": healthy" in human.stdout
            assert "  aggregators up, " in human.stdout and f"({url})" in human.stdout
            assert "  database " not in human.stdout
            await aggregator.stop()
            result = await asyncio.to_thread(status, sidecar, "--json")
            assert result.returncode == 1, result.stdout + result.stderr
            report = json.loads(result.stdout)
            assert "aggregators down" in report["problems"], report
            assert report["health"]["upstream"]["aggregators"] == [url]
            human = await asyncio.to_thread(status, sidecar)
            assert human.returncode == 1
            assert f"  aggregators down ({url}): " in human.stdout, human.stdout
    finally:
        await aggregator.stop()
        shutil.rmtree(sidecar_state, ignore_errors=True)


async def test_status_with_no_agent_at_all(state_dir: Path):
    port = free_port()
    result = await asyncio.to_thread(cli, "status", env={
        "FLUX_AGENT_ADMIN_LISTEN": f"0.0.0.0:{port}", "FLUX_AGENT_STATE_DIR": str(state_dir)})
    assert result.returncode == 69
    assert f"no agent answers at http://127.0.0.1:{port}" in result.stderr  # asked on loopback
    assert f"no agent runs on the state dir {state_dir}" in result.stderr


async def test_status_names_the_agent_holding_the_state_dir(agent: Agent):
    """An agent that does not answer where asked (another port) but holds the state dir."""
    result = await asyncio.to_thread(
        cli, "status", "--url", f"http://127.0.0.1:{free_port()}",
        env={"FLUX_AGENT_STATE_DIR": str(agent.config.state_path)})
    assert result.returncode == 69
    assert f"an agent (pid {os.getpid()}) holds the state dir" in result.stderr


async def test_spool_inspect_warns_that_a_running_agents_spool_is_behind(agent: Agent):
    result = await asyncio.to_thread(cli, "spool", "inspect", env={
        "FLUX_AGENT_STATE_DIR": str(agent.config.state_path)})
    assert result.returncode == 0
    assert f"an agent (pid {os.getpid()}) is running" in result.stderr
    assert "flux-agent status" in result.stderr
    json.loads(result.stdout)


# --------------------------------------------------------------------------- validate


def test_validate_prints_the_effective_configuration_secrets_redacted(tmp_path: Path):
    env = {"FLUX_AGENT_AUTH": "none", "FLUX_AGENT_AGENCY": "noaa",
           "FLUX_AGENT_STATE_DIR": str(tmp_path / "state"),
           "FLUX_AGENT_DATABASE_URL": "postgresql://flux:hunter2-validate@db:5432/flux",
           "FLUX_AGENT_SPOOL_MAX_BYTES": "2GiB",
           "FLUX_AGENT_LISTEN": f"127.0.0.1:{free_port()}",
           "FLUX_AGENT_ADMIN_LISTEN": f"127.0.0.1:{free_port()}"}
    result = cli("validate", "--batch-max-age", "20ms", env=env)
    assert result.returncode == 0, result.stderr
    assert "the configuration is valid" in result.stderr
    assert "hunter2" not in result.stdout + result.stderr
    printed = tomllib.loads(result.stdout)
    assert printed["database_url"] == "postgresql://flux:***@db:5432/flux"
    assert printed["spool_max_bytes"] == 2 * 1024**3
    assert printed["batch_max_age"] == pytest.approx(0.02)
    assert printed["state_dir"] == str(tmp_path / "state")
    assert "# flush_lanes = 2  (default)" in result.stdout.splitlines()  # shown, not set
    # It reads back as the same configuration (but for the redacted secret).
    (tmp_path / "back.toml").write_text(result.stdout.replace("flux:***@", "flux:pw@"))
    again = load_config(["--config", str(tmp_path / "back.toml")], {})
    assert effective_settings(again) == effective_settings(
        load_config(["--batch-max-age", "20ms"], env))
    assert not (tmp_path / "state").exists()  # nothing was started or created
    machine = cli("validate", "--json", env=env)
    assert json.loads(machine.stdout)["valid"] is True


@pytest.mark.parametrize(("env", "setting"), [
    ({"FLUX_AGENT_AUTH": "none", "FLUX_AGENT_AGENCY": "cia",
      "FLUX_AGENT_SCHEMA_PROFILE": "flux"}, "FLUX_AGENT_AGENCY"),
    ({"FLUX_AGENT_JWT_ISSUERS": "idp", "FLUX_AGENT_JWT_PUBLIC_KEY_FILE": "/nonexistent.pem"},
     "FLUX_AGENT_JWT_PUBLIC_KEY_FILE"),
    ({"FLUX_AGENT_AUTH": "none", "FLUX_AGENT_AGENCY": "nasa",
      "FLUX_AGENT_AGENCY_MANIFEST": "/nonexistent.json"}, "FLUX_AGENT_AGENCY_MANIFEST"),
    ({"FLUX_AGENT_AUTH": "none", "FLUX_AGENT_AGENCY": "nasa", "FLUX_AGENT_TRACING": "zipkin"},
     "FLUX_AGENT_TRACING"),
    ({"FLUX_AGENT_AUTH": "none"}, "FLUX_AGENT_AGENCY"),
])
def test_validate_exits_78_naming_the_setting(env: dict[str, str], setting: str,
                                              tmp_path: Path):
    result = cli("validate", "--json", env={**env, "FLUX_AGENT_STATE_DIR": str(tmp_path)})
    assert result.returncode == 78, result.stdout + result.stderr
    assert f"configuration error: {setting}" in result.stderr
    assert json.loads(result.stdout)["setting"] == setting


async def test_validate_checks_the_database_when_asked(database, pg_template: PgServer,
                                                       tmp_path: Path):
    base = {"FLUX_AGENT_AUTH": "none", "FLUX_AGENT_AGENCY": "nasa",
            "FLUX_AGENT_STATE_DIR": str(tmp_path), "FLUX_AGENT_MIGRATE": "false"}
    good = await asyncio.to_thread(cli, "validate", "--check-database", env={
        **base, "FLUX_AGENT_DATABASE_URL": database.agent_dsn})
    assert good.returncode == 0, good.stderr
    assert "reachable as flux_test_sidecar" in good.stderr
    down = await asyncio.to_thread(cli, "validate", "--check-database", env={
        **base, "FLUX_AGENT_DATABASE_CONNECT_TIMEOUT": "2s",
        "FLUX_AGENT_DATABASE_URL": f"postgresql://nobody@127.0.0.1:{free_port()}/none"})
    assert down.returncode == 78
    assert "FLUX_AGENT_DATABASE_URL: cannot use the database" in down.stderr
    superuser = await asyncio.to_thread(cli, "validate", "--check-database", env={
        **base, "FLUX_AGENT_DATABASE_URL": database.admin_dsn})
    assert superuser.returncode == 78
    assert "bypasses row-level security" in superuser.stderr
    empty = await asyncio.to_thread(cli, "validate", "--check-database", env={
        **base, "FLUX_AGENT_DATABASE_URL": pg_template.dsn("postgres")})
    assert empty.returncode == 78  # a superuser, and no schema
    # Unasked, the database is not contacted.
    unasked = await asyncio.to_thread(cli, "validate", env={
        **base, "FLUX_AGENT_DATABASE_URL": f"postgresql://nobody@127.0.0.1:{free_port()}/x"})
    assert unasked.returncode == 0


async def test_validate_beside_a_running_agent(agent: Agent):
    result = await asyncio.to_thread(cli, "validate", env={
        "FLUX_AGENT_AUTH": "none", "FLUX_AGENT_AGENCY": "nasa",
        "FLUX_AGENT_STATE_DIR": str(agent.config.state_path)})
    assert result.returncode == 0
    assert f"an agent (pid {os.getpid()}) is running on the state dir" in result.stderr


# --------------------------------------------------------------------------- emit, token


async def test_emit_without_a_token_says_how_to_give_one(database, state_dir: Path):
    secret = "x" * 40
    config = agent_config(database, state_dir, auth="jwt", agency="",
                          jwt_algorithms=("HS256",), jwt_issuers=("idp",),
                          jwt_hs256_secret=Secret(secret))
    async with Agent(config) as running:
        result = await asyncio.to_thread(cli, "emit", "--url", running.endpoints.event_url,
                                         "--run", "r", "--kind", "run.aborted")
    assert result.returncode == 77
    assert "TOKEN_MISSING" in result.stderr
    assert "--token" in result.stderr
    assert "FLUX_AGENT_TOKEN" in result.stderr


def test_token_warns_about_an_agency_the_manifest_does_not_know():
    unknown = cli("token", "--api-key", "--agency", "cia", "--schema-profile", "flux")
    assert unknown.returncode == 0
    assert "'cia' is not in the agency manifest" in unknown.stderr
    known = cli("token", "--api-key", "--agency", "noaa", "--schema-profile", "flux")
    assert "not in the agency manifest" not in known.stderr
    # The neutral default serves every agency: nothing to warn about.
    anyone = cli("token", "--api-key", "--agency", "cia")
    assert anyone.returncode == 0 and "not in the agency manifest" not in anyone.stderr
    assert cli("token", "--api-key").returncode == 78  # but it must name one


# --------------------------------------------------------------------------- completion


def complete(*words: str) -> list[str]:
    script = cli("completion", "bash").stdout
    line = " ".join(f"'{w}'" for w in words)
    result = subprocess.run(
        ["bash", "-c", f"{script}\nCOMP_WORDS=({line}); COMP_CWORD={len(words) - 1}; "
         '_flux_agent; printf "%s\\n" "${COMPREPLY[@]}"'],
        capture_output=True, text=True, timeout=30, check=True)
    return [w for w in result.stdout.splitlines() if w]


def test_bash_completion_offers_the_commands_flags_and_choices():
    assert {"run", "status", "validate", "completion"} <= set(complete("flux-agent", ""))
    assert complete("flux-agent", "sta") == ["status"]
    assert "--spool-max-bytes" in complete("flux-agent", "run", "--spool-m")
    assert "--listen" not in complete("flux-agent", "verify", "--")
    assert complete("flux-agent", "run", "--auth", "") == list(AUTH_MODES)
    assert complete("flux-agent", "spool", "") == ["inspect", "verify"]
    assert complete("flux-agent", "run", "--access-log", "t") == ["true"]
    assert complete("flux-agent", "run", "--listen", "") == []  # a value: the shell's files
    zsh = cli("completion", "zsh").stdout
    assert zsh.startswith("autoload -U +X bashcompinit && bashcompinit\n")


def test_a_reader_that_goes_away_is_not_an_error():
    """flux-agent ... | head: the pipe closes before the output is written."""
    base = {k: v for k, v in os.environ.items() if not k.startswith("FLUX_AGENT_")}
    proc = subprocess.Popen([sys.executable, "-m", "flux_agent", "completion", "bash"],
                            env=base, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    assert proc.stdout is not None and proc.stderr is not None
    proc.stdout.close()  # before the command has even started to write
    assert proc.wait(60) == 141  # as if SIGPIPE had ended it
    assert proc.stderr.read() == b""
    proc.stderr.close()
