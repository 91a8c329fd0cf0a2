"""Configuration: precedence, parsing, secrets, and what a bad value does to the CLI."""

from __future__ import annotations

import re
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from flux_agent.core.errors import ConfigError
from flux_agent.core.settings import (
    SETTINGS,
    AgentConfig,
    Secret,
    env_name,
    flag_name,
    load_config,
    redact_dsn,
    settings_table,
)
from flux_agent.postgres.embedded import free_port

ROOT = Path(__file__).resolve().parent.parent
BASE_ENV = {"FLUX_AGENT_AUTH": "none", "FLUX_AGENT_AGENCY": "nasa"}


def test_defaults(tmp_path: Path):
    config = load_config([], {"FLUX_AGENT_JWT_ISSUERS": "https://idp.example",
                              "FLUX_AGENT_JWT_PUBLIC_KEY_FILE": "/keys/idp.pem"})
    assert config.auth == "jwt"
    assert config.jwt_algorithms == ("RS256", "ES256")
    assert config.listen == "127.0.0.1:8787"
    assert config.admin_listen == "127.0.0.1:9464"
    assert config.spool_durability == "fsync"
    assert config.database_url is None
    assert config.socket_path == config.state_path / "agent.sock"


def test_precedence_flag_over_env_over_file_over_default(tmp_path: Path):
    toml = tmp_path / "agent.toml"
    toml.write_text('batch_max_events = 10\nspool_max_bytes = "2GiB"\n'
                    'drain_timeout = "7s"\nlog_level = "warning"\n')
    env = {**BASE_ENV, "FLUX_AGENT_BATCH_MAX_EVENTS": "20", "FLUX_AGENT_SPOOL_MAX_BYTES": "3GiB"}
    config = load_config(["--batch-max-events", "30", "--config", str(toml)], env)
    assert config.batch_max_events == 30  # flag
    assert config.spool_max_bytes == 3 * 1024**3  # env beats file
    assert config.drain_timeout == 7.0  # file beats default
    assert config.log_level == "warning"
    assert config.flush_lanes == 2  # default


def test_config_file_from_environment_and_section(tmp_path: Path):
    toml = tmp_path / "agent.toml"
    toml.write_text('[flux-agent]\nbatch-max-age = "20ms"\n')
    config = load_config([], {**BASE_ENV, "FLUX_AGENT_CONFIG": str(toml)})
    assert config.batch_max_age == pytest.approx(0.02)


def test_secret_from_file_and_never_in_repr(tmp_path: Path):
    secret_file = tmp_path / "dsn"
    secret_file.write_text("postgresql://flux:hunter2-pw@db:5432/flux\n")
    config = load_config([], {**BASE_ENV, "FLUX_AGENT_DATABASE_URL_FILE": str(secret_file)})
    assert isinstance(config.database_url, Secret)
    assert config.database_url.reveal() == "postgresql://flux:hunter2-pw@db:5432/flux"
    assert "hunter2" not in repr(config)
    assert "hunter2" not in repr(config.database_url)
    assert "flux:***@db:5432" in repr(config)


def test_redact_dsn():
    assert redact_dsn("postgresql://u:p%40ss@h/db?sslmode=require&password=x") == (
        "postgresql://u:***@h/db?sslmode=require&password=***")
    assert redact_dsn(None) == "<embedded>"
    assert redact_dsn("postgresql://h/db") == "postgresql://h/db"


@pytest.mark.parametrize(
    ("env", "setting"),
    [
        ({"FLUX_AGENT_SPOOL_MAX_BYTES": "lots"}, "FLUX_AGENT_SPOOL_MAX_BYTES"),
        ({"FLUX_AGENT_DRAIN_TIMEOUT": "-1s"}, "FLUX_AGENT_DRAIN_TIMEOUT"),
        ({"FLUX_AGENT_SPOOL_DURABILITY": "sometimes"}, "FLUX_AGENT_SPOOL_DURABILITY"),
        ({"FLUX_AGENT_LISTEN": "localhost"}, "FLUX_AGENT_LISTEN"),
        ({"FLUX_AGENT_LISTEN": "0.0.0.0:8787"}, "FLUX_AGENT_LISTEN"),  # auth none: loopback
        ({"FLUX_AGENT_AGENCY": "Not A Slug"}, "FLUX_AGENT_AGENCY"),
        ({"FLUX_AGENT_AGENCY": ""}, "FLUX_AGENT_AGENCY"),
        ({"FLUX_AGENT_DATABASE_URL": "mysql://x"}, "FLUX_AGENT_DATABASE_URL"),
        ({"FLUX_AGENT_MIGRATE": "perhaps"}, "FLUX_AGENT_MIGRATE"),
        ({"FLUX_AGENT_BATCH_MAX_EVENTS": "0"}, "FLUX_AGENT_BATCH_MAX_EVENTS"),
        ({"FLUX_AGENT_DATABASE_URL_FILE": "/nonexistent/file"}, "FLUX_AGENT_DATABASE_URL_FILE"),
        ({"FLUX_AGENT_EVENT_MAX_BYTES": "8MiB"}, "FLUX_AGENT_EVENT_MAX_BYTES"),
    ],
)
def test_bad_values_name_the_setting(env: dict[str, str], setting: str):
    with pytest.raises(ConfigError) as info:
        load_config([], {**BASE_ENV, **env})
    assert info.value.setting == setting


@pytest.mark.parametrize("host", ["127.example.com", "127.0.0.1.example", "0.0.0.0", "10.0.0.1",
                                  "[::ffff:10.0.0.1]", "no-such-host.invalid"])
def test_auth_none_listens_on_loopback_addresses_only(host: str):
    """Loopback is decided by address: a name beginning with 127. once passed."""
    with pytest.raises(ConfigError) as info:
        load_config([], {**BASE_ENV, "FLUX_AGENT_LISTEN": f"{host}:8787"})
    assert info.value.setting == "FLUX_AGENT_LISTEN"
    for loopback in ("127.0.0.1", "127.3.4.5", "[::1]", "[::ffff:127.0.0.1]", "localhost"):
        assert load_config([], {**BASE_ENV, "FLUX_AGENT_LISTEN": f"{loopback}:8787"})


def test_cli_refuses_a_loopback_lookalike_with_78(tmp_path: Path):
    env = {"PATH": "/usr/bin:/bin", **BASE_ENV, "FLUX_AGENT_STATE_DIR": str(tmp_path),
           "FLUX_AGENT_LISTEN": "127.example.com:8787"}
    result = subprocess.run([sys.executable, "-m", "flux_agent", "run"], env=env,
                            capture_output=True, text=True, timeout=60)
    assert result.returncode == 78, result.stderr
    assert "FLUX_AGENT_LISTEN" in result.stderr


def test_unknown_flag_and_unknown_file_key(tmp_path: Path):
    with pytest.raises(ConfigError):
        load_config(["--no-such-thing", "1"], BASE_ENV)
    toml = tmp_path / "agent.toml"
    toml.write_text("colour = 'blue'\n")
    with pytest.raises(ConfigError, match="colour"):
        load_config([], BASE_ENV, toml)
    toml.write_text("this is = not toml =\n")
    with pytest.raises(ConfigError, match="not valid TOML"):
        load_config([], BASE_ENV, toml)


def test_every_setting_has_a_flag_an_env_name_and_a_row_in_the_docs():
    page = (ROOT / "docs" / "configuration.md").read_text()
    for f in SETTINGS:
        assert f.metadata["doc"], f.name
        assert f"`{env_name(f.name)}`" in page, f"docs/configuration.md lacks {env_name(f.name)}"
        assert f"`{flag_name(f.name)}`" in page
    # The table is exactly the generated one.
    assert settings_table() in page


def test_config_is_frozen():
    config = AgentConfig(auth="none", agency="nasa")
    with pytest.raises(AttributeError):
        config.listen = "x"  # type: ignore[misc]


def test_cli_exits_78_naming_the_setting_and_binds_nothing(tmp_path: Path):
    port = free_port()
    env = {"PATH": "/usr/bin:/bin", "FLUX_AGENT_AUTH": "none", "FLUX_AGENT_AGENCY": "nasa",
           "FLUX_AGENT_LISTEN": f"127.0.0.1:{port}", "FLUX_AGENT_STATE_DIR": str(tmp_path),
           "FLUX_AGENT_SPOOL_MAX_BYTES": "a lot"}
    result = subprocess.run([sys.executable, "-m", "flux_agent", "run"], env=env,
                            capture_output=True, text=True, timeout=60)
    assert result.returncode == 78, result.stderr
    assert "FLUX_AGENT_SPOOL_MAX_BYTES" in result.stderr
    assert not (tmp_path / "agent.sock").exists()
    assert not (tmp_path / "spool").exists()
    with socket.socket() as s:  # the port was never taken
        s.bind(("127.0.0.1", port))


def test_cli_rejects_unknown_agency_with_78(tmp_path: Path):
    """The flux profile serves its five agencies only; the refusal says which manifest and
    the setting that replaces it."""
    env = {"PATH": "/usr/bin:/bin", "FLUX_AGENT_AUTH": "none", "FLUX_AGENT_AGENCY": "cia",
           "FLUX_AGENT_SCHEMA_PROFILE": "flux", "FLUX_AGENT_STATE_DIR": str(tmp_path),
           "FLUX_AGENT_DATABASE_URL": "postgresql://nobody@127.0.0.1:1/none"}
    result = subprocess.run([sys.executable, "-m", "flux_agent", "run"], env=env,
                            capture_output=True, text=True, timeout=60)
    assert result.returncode == 78, result.stderr
    assert re.search(r"FLUX_AGENT_AGENCY: 'cia' is not in the agency manifest \(the flux "
                     r"profile's\).*FLUX_AGENT_AGENCY_MANIFEST", result.stderr)
