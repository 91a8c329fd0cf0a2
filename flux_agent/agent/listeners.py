"""The agent's listeners: sockets bound before anything else starts (a taken port is a
configuration error, found in a second, not after the database has started), served once
the pipeline behind them runs."""

from __future__ import annotations

import asyncio
import contextlib
import errno
import logging
import socket
import ssl
from dataclasses import dataclass, field
from pathlib import Path

from aiohttp import web

from ..core.errors import ConfigError
from ..core.settings import AgentConfig, env_name, split_hostport
from ..intake.server import HttpLimits, HttpServer, address_of, bind_tcp, bind_unix
from .setup import clear_stale_socket, connection_caps

log = logging.getLogger("flux_agent.agent")
# The admin listener's requests (probes, scrapes) are not logged one by one.
_QUIET = logging.Logger("flux_agent.admin.access", logging.CRITICAL + 1)
CERT_CHECK_INTERVAL = 10.0


@dataclass(slots=True)
class Endpoints:
    """Where the agent listens (None for a listener that is off)."""

    event_url: str | None = None
    socket_path: Path | None = None
    admin_url: str | None = None


@dataclass(slots=True)
class Sockets:
    """Bound sockets, by listener (``tcp``, ``unix``, ``admin``)."""

    bound: dict[str, socket.socket] = field(default_factory=dict)
    endpoints: Endpoints = field(default_factory=Endpoints)

    def close(self) -> None:
        for sock in self.bound.values():
            with contextlib.suppress(OSError):
                sock.close()
        self.bound.clear()


def bind(config: AgentConfig) -> Sockets:
    """Bind every listener the configuration asks for (a worker thread: the Unix socket's
    check may wait a second). Raises ConfigError naming the setting of a taken address."""
    out = Sockets()
    try:
        if config.listen:
            out.bound["tcp"] = _bind_tcp(config.listen, "listen")
            out.endpoints.event_url = address_of(out.bound["tcp"])
            if config.tls_cert_file:
                out.endpoints.event_url = out.endpoints.event_url.replace("http:", "https:", 1)
        path = config.socket_path
        if path is not None:
            clear_stale_socket(path)
            try:
                out.bound["unix"] = bind_unix(str(path))
            except OSError as exc:
                raise ConfigError(env_name("socket"), f"cannot listen on {path}: "
                                  f"{exc.strerror or exc}") from None
            out.endpoints.socket_path = path
        if config.admin_listen:
            out.bound["admin"] = _bind_tcp(config.admin_listen, "admin_listen")
            out.endpoints.admin_url = address_of(out.bound["admin"])
    except BaseException:
        out.close()
        raise
    return out


def check_addresses(config: AgentConfig) -> None:
    """Bind each TCP address the configuration asks for, and let go (``flux-agent
    validate``): a taken one is a ConfigError naming its setting, as at start."""
    for setting in ("listen", "admin_listen"):
        address = getattr(config, setting)
        if address:
            _bind_tcp(address, setting).close()


def _bind_tcp(address: str, setting: str) -> socket.socket:
    host, port = split_hostport(address)
    try:
        return bind_tcp(host, port)
    except OSError as exc:
        why = ("another process listens there" if exc.errno == errno.EADDRINUSE
               else exc.strerror or str(exc))
        raise ConfigError(env_name(setting), f"cannot listen on {address}: {why}") from None


def tls_context(config: AgentConfig) -> ssl.SSLContext | None:
    """The event listener's TLS (reads files: a worker thread); a ConfigError names the
    setting of a file that does not load."""
    if not config.tls_cert_file:
        return None
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    try:
        context.load_cert_chain(config.tls_cert_file, config.tls_key_file)
    except (OSError, ssl.SSLError) as exc:
        raise ConfigError(env_name("tls_cert_file"), f"cannot load the certificate and key: "
                          f"{exc}") from None
    return context


class CertReloader:
    """A rotated certificate (cert-manager renews it in place) is taken by new connections
    within a reload interval; a pair that does not load keeps the previous one, loudly."""

    def __init__(self, context: ssl.SSLContext, cert: str, key: str) -> None:
        self.context = context
        self.cert = Path(cert)
        self.key = Path(key)

    async def run(self) -> None:
        loop = asyncio.get_running_loop()
        last = await loop.run_in_executor(None, self._stamp)
        while True:
            await asyncio.sleep(CERT_CHECK_INTERVAL)
            stamp = await loop.run_in_executor(None, self._stamp)
            if stamp == last:
                continue
            try:
                await loop.run_in_executor(None, self.context.load_cert_chain, str(self.cert),
                                           str(self.key))
            except (OSError, ssl.SSLError) as exc:
                log.error("the listener's new certificate does not load; keeping the previous "
                          "one", extra={"fields": {"cert": str(self.cert), "error": str(exc)}})
                continue
            last = stamp
            log.info("listener certificate reloaded", extra={"fields": {"cert": str(self.cert)}})

    def _stamp(self) -> tuple[float, float]:
        def mtime(path: Path) -> float:
            try:
                return path.stat().st_mtime
            except OSError:
                return 0.0
        return mtime(self.cert), mtime(self.key)


async def serve(config: AgentConfig, sockets: Sockets, events: web.Application,
                admin: web.Application, tls: ssl.SSLContext | None = None
                ) -> list[HttpServer]:
    """Start serving on the bound sockets; the servers, to close in reverse order."""
    caps = await asyncio.get_running_loop().run_in_executor(
        None, connection_caps, config, config.flush_lanes + 2)
    limits = HttpLimits(idle_timeout=config.http_idle_timeout,
                        header_timeout=config.http_header_timeout,
                        max_connections={"tcp": caps["tcp"], "unix": caps["unix"]},
                        max_chunk=max(config.request_max_bytes, config.lineage_max_bytes))
    log.info("HTTP connection limits", extra={"fields": caps})
    servers: list[HttpServer] = []
    bound = sockets.bound
    event_socks = [bound[k] for k in ("tcp", "unix") if k in bound]
    if event_socks:
        server = HttpServer(events, limits=limits, access_log=logging.getLogger("aiohttp.access"))
        servers.append(server)
        await server.start(event_socks, tls=tls)
    if "admin" in bound:
        admin_limits = HttpLimits(idle_timeout=limits.idle_timeout,
                                  header_timeout=limits.header_timeout,
                                  max_connections={"tcp": caps["admin"]},
                                  max_chunk=limits.max_chunk)
        server = HttpServer(admin, limits=admin_limits, access_log=_QUIET)
        servers.append(server)
        await server.start([bound["admin"]])
    return servers
