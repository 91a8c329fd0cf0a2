"""What a running agent re-reads without a restart.

- The JWKS file (key rotation), checked every 2 s.
- The payload schemas (``FLUX_AGENT_SCHEMA_DIR``), the agency manifest and the API keys
  file: when one of their files changes (checked every 2 s), and all of them on SIGHUP
  (``flux-agent run`` also re-reads the configuration then, for the log level).

A reload that fails (a schema that does not compile, a manifest that no longer lists the
fixed agency, a keys file that does not parse) keeps what is in force and logs ERROR with
the setting at fault; one that works logs what it reloaded. Settings that changed but only
take effect at a restart are named in a warning.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ..core.errors import ConfigError
from ..core.settings import SETTINGS, AgentConfig, env_name
from ..intake.auth import ApiKeyAuthenticator, Authenticator, load_api_keys
from ..intake.schemas import Contract
from .setup import bound_agencies, file_stamp, load_schemas

if TYPE_CHECKING:
    from ..intake.tokens import JwtAuthenticator, KeySet

log = logging.getLogger("flux_agent.agent")

JWKS_CHECK_INTERVAL = 2.0
FILES_CHECK_INTERVAL = 2.0
# Applied by a reload; any other setting that changes waits for a restart.
RELOADABLE = frozenset({"schema_dir", "schema_profile", "agency_manifest", "api_keys_file",
                        "log_level"})


class JwksWatcher:
    def __init__(self, authenticator: JwtAuthenticator, path: Path,
                 load: Callable[[], KeySet]) -> None:
        self.authenticator = authenticator
        self.path = path
        self.load = load

    async def run(self) -> None:
        loop = asyncio.get_running_loop()
        last = file_stamp(self.path)
        while True:
            await asyncio.sleep(JWKS_CHECK_INTERVAL)
            stamp = await loop.run_in_executor(None, file_stamp, self.path)
            if stamp == last:
                continue
            last = stamp
            try:
                keys = await loop.run_in_executor(None, self.load)
            except (OSError, ValueError) as exc:
                log.error("JWKS file unreadable; keeping the previous keys",
                          extra={"fields": {"path": str(self.path), "error": str(exc)}})
                continue
            self.authenticator.set_keys(keys)
            log.info("JWKS reloaded", extra={"fields": {"path": str(self.path),
                                                         "keys": len(keys.by_kid)}})


def dir_stamp(path: Path) -> tuple[Any, ...]:
    """What changes when a schema file is added, removed or rewritten."""
    try:
        return tuple((p.name, *file_stamp(p)) for p in sorted(path.glob("*.json")))
    except OSError:
        return ()


def stamps(config: AgentConfig) -> dict[str, Any]:
    """The files a reload reads, by part (worker thread)."""
    out: dict[str, Any] = {}
    if config.schema_dir:
        out["payload_schemas"] = dir_stamp(Path(config.schema_dir))
    if config.agency_manifest:
        out["agency_manifest"] = file_stamp(Path(config.agency_manifest))
    if config.api_keys_file:
        out["api_keys"] = file_stamp(Path(config.api_keys_file))
    return out


class Reloader:
    """Re-reads the schemas, the manifest and the API keys into the running agent."""

    def __init__(self, config: AgentConfig, contract: Contract,
                 authenticator: Authenticator) -> None:
        self.config = config
        self.contract = contract
        self.authenticator = authenticator
        self._stamps: dict[str, Any] = {}
        self._lock = asyncio.Lock()

    async def run(self) -> None:
        """Reload a part when one of its files changes."""
        loop = asyncio.get_running_loop()
        self._stamps = await loop.run_in_executor(None, stamps, self.config)
        while True:
            await asyncio.sleep(FILES_CHECK_INTERVAL)
            now = await loop.run_in_executor(None, stamps, self.config)
            changed = {part for part, stamp in now.items() if stamp != self._stamps.get(part)}
            if changed:
                await self.reload(trigger="file changed", parts=changed)

    async def reload(self, config: AgentConfig | None = None, *, trigger: str = "SIGHUP",
                     parts: set[str] | None = None,
                     also: Mapping[str, Any] | None = None) -> dict[str, Any]:
        """Reload ``parts`` (all by default) from ``config`` (default: the one in force);
        ``also``: what the caller reloaded itself (the log level), said in the same line.
        Returns {"reloaded": {...}, "failed": {setting: message}}."""
        async with self._lock:
            return await self._reload(config or self.config, trigger, parts, dict(also or {}))

    async def _reload(self, config: AgentConfig, trigger: str, parts: set[str] | None,
                      done: dict[str, Any]) -> dict[str, Any]:
        loop = asyncio.get_running_loop()
        # Stamps first: a file that changes while it is read is read again next round.
        self._stamps = await loop.run_in_executor(None, stamps, config)
        failed: dict[str, str] = {}
        applied = set(done)
        if parts is None or parts & {"payload_schemas", "agency_manifest"}:
            try:
                schemas = await loop.run_in_executor(None, self._schemas, config)
            except ConfigError as exc:
                failed[exc.setting] = exc.message
            else:
                self.contract.replace(schemas)
                kinds = ", ".join(sorted(schemas.payloads)) or "any JSON object"
                done["payload_schemas"] = f"{schemas.payload_source} ({kinds})"
                done["agency_manifest"] = schemas.manifest.source
                applied |= {"schema_dir", "schema_profile", "agency_manifest"}
        if (parts is None or "api_keys" in parts) and config.api_keys_file \
                and isinstance(self.authenticator, ApiKeyAuthenticator):
            try:
                keys = await loop.run_in_executor(None, _read_keys, Path(config.api_keys_file))
            except (OSError, ValueError) as exc:
                failed[env_name("api_keys_file")] = f"cannot load API keys: {exc}"
            else:
                self.authenticator.set_keys(keys)
                done["api_keys"] = len(keys)
                applied.add("api_keys_file")
        restart = sorted(env_name(f.name) for f in SETTINGS if f.name not in RELOADABLE
                         and getattr(config, f.name) != getattr(self.config, f.name))
        self.config = self.config.replace(**{
            name: getattr(config, name) for name in RELOADABLE if name in applied})
        if failed:
            log.error("reload failed; what was in force stays in force", extra={"fields": {
                "trigger": trigger, "failed": failed}})
        if done:
            log.info("reloaded: %s", ", ".join(sorted(done)), extra={"fields": {
                "trigger": trigger, "reloaded": done}})
        if restart:
            log.warning("settings changed that take effect only at a restart",
                        extra={"fields": {"trigger": trigger, "settings": restart}})
        return {"reloaded": done, "failed": failed, "restart_needed": restart}

    def _schemas(self, config: AgentConfig) -> Any:
        """New schemas, which must still serve the agencies this agent is bound to."""
        schemas = load_schemas(config)
        for agency in bound_agencies(config):
            if not schemas.manifest.knows(agency):
                raise ConfigError(env_name("kube_bindings"), schemas.manifest.refusal(agency))
        return schemas


def _read_keys(path: Path) -> dict[str, Any]:
    return load_api_keys(path.read_text())
