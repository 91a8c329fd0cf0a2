"""A sidecar pays in every pod for what it loads: the agent loads only what its
configuration uses. Checked in a fresh interpreter running a real agent, so an import that
creeps back in (OpenTelemetry with tracing off, the JWT crypto backend with auth off, the
injector, YAML, OpenLineage's schemas before the first lineage request) fails here."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

from .support.postgres import Database

PROBE = r"""
import asyncio, json, sys
from flux_agent.core.settings import load_config
from flux_agent.agent import Agent

async def main():
    env = {"FLUX_AGENT_AUTH": "none", "FLUX_AGENT_AGENCY": "nasa",
           "FLUX_AGENT_STATE_DIR": sys.argv[1], "FLUX_AGENT_DATABASE_URL": sys.argv[2],
           "FLUX_AGENT_LISTEN": "127.0.0.1:0", "FLUX_AGENT_ADMIN_LISTEN": "127.0.0.1:0",
           "FLUX_AGENT_MIGRATE": "false"}
    async with Agent(load_config([], environ=env)) as agent:
        lineage_loaded = agent.api.lineage.lineage is not None
        print(json.dumps({"modules": sorted(sys.modules), "lineage": lineage_loaded}))

asyncio.run(main())
"""

# What the default configuration (auth none, tracing off, the event API) must not load.
ABSENT = ("opentelemetry", "jwt", "cryptography", "yaml", "jsonschema",
          "flux_agent.kube", "flux_agent.intake.tokens", "flux_agent.client", "flux_agent.cli",
          "crc32c", "importlib.metadata")


def test_the_default_configuration_loads_no_optional_machinery(database: Database,
                                                               state_dir: Path):
    result = subprocess.run([sys.executable, "-c", PROBE, str(state_dir), database.agent_dsn],
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr[-3000:]
    seen = json.loads(result.stdout.strip().splitlines()[-1])
    loaded = set(seen["modules"])
    unwanted = sorted(m for m in loaded for prefix in ABSENT
                      if m == prefix or m.startswith(prefix + "."))
    assert not unwanted, unwanted
    assert seen["lineage"] is False  # OpenLineage's schemas wait for the first RunEvent
