"""The agent's PostgreSQL: the configured URL, or the embedded default (started, bootstrapped
and watched as the agent's child), and the schema check at start (PostgreSQL being down is
not fatal: events are spooled)."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable
from urllib.parse import urlsplit

from ..core.errors import ConfigError, Fault, SchemaNotReady, UnsafeRole, describe, fault_of
from ..core.settings import AgentConfig, env_name
from ..obs import logs
from ..postgres.embedded import LocalPostgres
from ..postgres.migrations import bootstrap_database
from ..postgres.sink import Sink
from .setup import (
    EMBEDDED_DATABASE,
    EMBEDDED_LOGIN_ROLE,
    SUPERUSER_NOTE,
    bounded,
    embedded_connect,
)

log = logging.getLogger("flux_agent.agent")

EMBEDDED_CHECK_INTERVAL = 5.0


def configured_dsn(config: AgentConfig) -> str:
    assert config.database_url
    dsn = config.database_url.reveal()
    logs.register_secret(urlsplit(dsn).password)
    return dsn


async def start_embedded(config: AgentConfig) -> tuple[LocalPostgres, str]:
    """Start (and on first use create) the embedded PostgreSQL under the state dir."""
    pg = LocalPostgres(config.state_path / "postgres")
    await asyncio.get_running_loop().run_in_executor(None, pg.start)
    await bootstrap_database(pg.dsn(), pg.dsn(database=EMBEDDED_DATABASE),
                             EMBEDDED_DATABASE, EMBEDDED_LOGIN_ROLE)
    log.info("embedded PostgreSQL running", extra={"fields": {
        "data_dir": str(pg.data_dir), "binaries": str(pg.bin_dir),
        "url": pg.dsn(database=EMBEDDED_DATABASE),
        **embedded_connect(pg, config.agency if config.auth == "none" else ""),
        "warning": f"url and connect_superuser log in as postgres: {SUPERUSER_NOTE}; "
                   "connect is the agent's own role, under row-level security",
    }})
    return pg, pg.dsn(user=EMBEDDED_LOGIN_ROLE, database=EMBEDDED_DATABASE)


class EmbeddedWatcher:
    """The embedded PostgreSQL is the agent's child: restarted when it stops."""

    def __init__(self, embedded: LocalPostgres, on_progress: Callable[[], None]) -> None:
        self.embedded = embedded
        self.on_progress = on_progress
        self.restarts = 0

    async def run(self) -> None:
        loop = asyncio.get_running_loop()
        embedded = self.embedded
        while True:
            await asyncio.sleep(EMBEDDED_CHECK_INTERVAL)
            if await loop.run_in_executor(None, embedded.running_pid) is not None:
                continue
            log.error("the embedded PostgreSQL stopped; restarting it",
                      extra={"fields": {"data_dir": str(embedded.data_dir)}})
            await loop.run_in_executor(None, embedded.start)  # raises: supervisor retries
            self.restarts += 1
            log.info("the embedded PostgreSQL is running again",
                     extra={"fields": {"restarts": self.restarts}})
            self.on_progress()


async def check_schema(sink: Sink) -> None:
    """Migrate and check the login role now if PostgreSQL is up; later if it is not.
    A login role that bypasses row-level security is refused in every mode."""
    try:
        applied = await bounded(sink.ensure_schema(), 30)
    except UnsafeRole as exc:
        raise ConfigError(env_name("database_url"), str(exc)) from None
    except (SchemaNotReady, TimeoutError) as exc:
        log.warning("PostgreSQL schema not ready at start; events will be spooled",
                    extra={"fields": {"error": describe(exc)}})
        return
    except Exception as exc:
        if fault_of(exc) is not Fault.TRANSIENT:
            log.error("PostgreSQL check failed at start; events will be spooled",
                      exc_info=exc, extra={"fields": {"error": describe(exc)}})
        else:
            log.warning("PostgreSQL not reachable at start; events will be spooled",
                        extra={"fields": {"error": describe(exc)}})
        return
    if applied:
        log.info("migrations applied", extra={"fields": {"versions": applied}})
