"""The admission webhook server: ``POST /mutate`` and ``GET /healthz`` over HTTPS, with the
certificate reloaded when it is rotated; ``/metrics`` on an optional plain-HTTP port."""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import ssl
import time
from typing import TYPE_CHECKING, Any

from .admission import MalformedReview, admission_response, parse_review
from .binding import binds
from .config import InjectorConfig

if TYPE_CHECKING:
    from aiohttp import web

log = logging.getLogger("flux_agent.inject")  # the name operators filter on, as before


class Reloader:
    """Keeps an SSLContext's certificate in step with its files (cert-manager rotates them
    in place); new handshakes use the new certificate."""

    def __init__(self, context: ssl.SSLContext, cert_file: str, key_file: str) -> None:
        self.context = context
        self.cert_file = cert_file
        self.key_file = key_file
        self.stamp = self._stamp()

    def _stamp(self) -> tuple[float, float]:
        try:
            return (os.stat(self.cert_file).st_mtime, os.stat(self.key_file).st_mtime)
        except OSError:
            return (0.0, 0.0)

    def check(self) -> bool:
        stamp = self._stamp()
        if stamp == self.stamp or stamp == (0.0, 0.0):
            return False
        try:
            self.context.load_cert_chain(self.cert_file, self.key_file)
        except (OSError, ssl.SSLError) as exc:
            log.warning("TLS certificate reload failed; keeping the previous one",
                        extra={"fields": {"error": str(exc)}})
            return False
        self.stamp = stamp
        log.info("TLS certificate reloaded", extra={"fields": {"cert": self.cert_file}})
        return True


SERVICE_ACCOUNT_DIR = "/var/run/secrets/kubernetes.io/serviceaccount"


class NamespaceUnavailable(RuntimeError):
    """The Namespace could not be read (the API is away, or RBAC refuses)."""


class NamespaceReader:
    """Reads a Namespace's annotations through the Kubernetes API with the injector's own
    service-account token (RBAC: ``get`` on ``namespaces``, nothing else), caching each
    for ``ttl`` seconds. The token file is re-read on every call: the kubelet rotates it."""

    def __init__(self, api: str, token_file: str, ca_file: str | None = None, *,
                 ttl: float = 30.0, timeout: float = 3.0) -> None:
        self.api = api.rstrip("/")
        self.token_file = token_file
        self.ca_file = ca_file
        self.ttl = ttl
        self.timeout = timeout
        self._cache: dict[str, tuple[float, dict[str, str]]] = {}
        self._session: Any = None

    @classmethod
    def in_cluster(cls, environ: Any = os.environ) -> NamespaceReader:
        host = environ.get("KUBERNETES_SERVICE_HOST", "kubernetes.default.svc")
        port = environ.get("KUBERNETES_SERVICE_PORT", "443")
        host = f"[{host}]" if ":" in host else host
        return cls(f"https://{host}:{port}", f"{SERVICE_ACCOUNT_DIR}/token",
                   f"{SERVICE_ACCOUNT_DIR}/ca.crt")

    async def annotations(self, name: str) -> dict[str, str]:
        now = time.monotonic()
        cached = self._cache.get(name)
        if cached is not None and now - cached[0] < self.ttl:
            return cached[1]
        from aiohttp import ClientError, ClientSession, ClientTimeout, TCPConnector

        try:
            token = await asyncio.to_thread(self._token)
            if self._session is None:
                ssl_context = ssl.create_default_context(cafile=self.ca_file) \
                    if self.ca_file else None
                self._session = ClientSession(
                    connector=TCPConnector(ssl=ssl_context) if ssl_context else None,
                    timeout=ClientTimeout(total=self.timeout))
            async with self._session.get(f"{self.api}/api/v1/namespaces/{name}", headers={
                    "Authorization": f"Bearer {token}", "Accept": "application/json"}) as resp:
                if resp.status != 200:
                    raise NamespaceUnavailable(f"the API answered {resp.status}")
                body = await resp.json()
        except (OSError, ClientError, TimeoutError, ValueError) as exc:
            raise NamespaceUnavailable(f"{type(exc).__name__}: {exc}") from None
        metadata = body.get("metadata") if isinstance(body, dict) else None
        annotations = metadata.get("annotations") if isinstance(metadata, dict) else None
        found = {str(k): str(v) for k, v in (annotations or {}).items()}
        self._cache[name] = (now, found)
        return found

    def _token(self) -> str:
        with open(self.token_file) as fh:
            return fh.read().strip()

    async def close(self) -> None:
        if self._session is not None:
            await self._session.close()
            self._session = None


def tls_context(cert_file: str, key_file: str) -> ssl.SSLContext:
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    context.load_cert_chain(cert_file, key_file)
    return context


class WebhookServer:
    """``POST /mutate`` and ``GET /healthz`` over HTTPS; ``/metrics`` and ``/healthz`` on an
    optional plain-HTTP port (``metrics_port``; 0 = ephemeral, None = off)."""

    def __init__(self, config: InjectorConfig, *, host: str = "0.0.0.0", port: int = 8443,
                 cert_file: str, key_file: str, metrics_port: int | None = None,
                 metrics_host: str | None = None, reload_interval: float = 10.0,
                 namespaces: NamespaceReader | None = None) -> None:
        self.config = config
        if namespaces is None and config.namespace_bindings and binds(config):
            namespaces = NamespaceReader.in_cluster()
        self.namespaces = namespaces
        self.host = host
        self.port = port
        self.cert_file = cert_file
        self.key_file = key_file
        self.metrics_port = metrics_port
        self.metrics_host = metrics_host or host
        self.reload_interval = reload_interval
        self._runners: list[Any] = []
        self._reload_task: asyncio.Task[None] | None = None
        from prometheus_client import CollectorRegistry, Counter, Histogram

        self.registry = CollectorRegistry(auto_describe=True)
        self.admissions = Counter("flux_injector_admissions",
                                  "Admission requests answered, by result.", ["result"],
                                  registry=self.registry)
        self.duration = Histogram("flux_injector_admission_duration_seconds",
                                  "Time to answer an admission request.",
                                  buckets=(0.001, 0.005, 0.01, 0.05, 0.1, 0.5, 1),
                                  registry=self.registry)

    def apps(self) -> tuple[Any, Any]:
        from aiohttp import web

        async def mutate(request: web.Request) -> web.Response:
            started = time.perf_counter()
            try:
                media = request.content_type
                if media not in ("application/json", ""):
                    raise MalformedReview(f"Content-Type {media} is not application/json")
                try:
                    review = json.loads(await request.read())
                except (ValueError, UnicodeDecodeError) as exc:
                    raise MalformedReview(f"the body is not valid JSON: {exc}") from None
                answer, outcome = admission_response(
                    review, self.config, await self._namespace_annotations(review))
            except MalformedReview as exc:
                self.admissions.labels("malformed").inc()
                log.warning("malformed admission request", extra={"fields": {"error": str(exc)}})
                return web.json_response(
                    {"type": "urn:flux-agent:problem:malformed-admission-review",
                     "title": "Malformed AdmissionReview", "status": 400, "detail": str(exc)},
                    status=400, content_type="application/problem+json")
            self.admissions.labels(outcome.result).inc()
            self.duration.observe(time.perf_counter() - started)
            request_info = review.get("request", {})
            fields_ = {"uid": request_info.get("uid"), "namespace": request_info.get("namespace"),
                       "result": outcome.result}
            if outcome.result in ("failed_open", "denied"):
                log.warning("pod not injected: %s", outcome.message,
                            extra={"fields": fields_})
            elif outcome.result == "injected":
                log.info("pod injected", extra={"fields": fields_})
            return web.json_response(answer)

        async def healthz(request: web.Request) -> web.Response:
            return web.json_response({"status": "ok"})

        async def metrics(request: web.Request) -> web.Response:
            from prometheus_client import generate_latest

            return web.Response(body=generate_latest(self.registry),
                                headers={"Content-Type": "text/plain; version=0.0.4; "
                                                         "charset=utf-8"})

        main = web.Application(client_max_size=16 * 1024**2)
        main.router.add_post("/mutate", mutate)
        main.router.add_get("/healthz", healthz)
        side = web.Application()
        side.router.add_get("/metrics", metrics)
        side.router.add_get("/healthz", healthz)
        return main, side

    async def _namespace_annotations(self, review: Any) -> dict[str, str] | None:
        """The request's Namespace annotations, when the binding reads them. One that
        cannot be read binds to nothing, so the pod is refused (fail closed) unless the
        chart's own bindings name its namespace."""
        if self.namespaces is None:
            return None
        namespace = parse_review(review).get("namespace")
        if not isinstance(namespace, str) or not namespace:
            return None
        try:
            return await self.namespaces.annotations(namespace)
        except NamespaceUnavailable as exc:
            log.warning("cannot read the namespace's agency binding", extra={"fields": {
                "namespace": namespace, "error": str(exc)}})
            return None

    async def start(self) -> None:
        from aiohttp import web

        context = tls_context(self.cert_file, self.key_file)
        reloader = Reloader(context, self.cert_file, self.key_file)
        main, side = self.apps()
        runner = web.AppRunner(main, access_log=None, handle_signals=False)
        await runner.setup()
        self._runners.append(runner)
        site = web.TCPSite(runner, self.host, self.port, ssl_context=context,
                           reuse_address=True)
        await site.start()
        self.port = tcp_port(runner)
        if self.metrics_port is not None:
            side_runner = web.AppRunner(side, access_log=None, handle_signals=False)
            await side_runner.setup()
            self._runners.append(side_runner)
            side_site = web.TCPSite(side_runner, self.metrics_host, self.metrics_port,
                                    reuse_address=True)
            await side_site.start()
            self.metrics_port = tcp_port(side_runner)
        self._reload_task = asyncio.create_task(self._reload(reloader), name="flux-tls-reload")
        log.info("injector listening", extra={"fields": {
            "port": self.port, "metrics_port": self.metrics_port,
            "sidecar_mode": self.config.sidecar_mode, "image": self.config.image}})

    async def _reload(self, reloader: Reloader) -> None:
        while True:
            await asyncio.sleep(self.reload_interval)
            reloader.check()

    async def stop(self) -> None:
        if self._reload_task is not None:
            self._reload_task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._reload_task
            self._reload_task = None
        for runner in reversed(self._runners):
            await runner.cleanup()
        self._runners.clear()
        if self.namespaces is not None:
            await self.namespaces.close()

    async def __aenter__(self) -> WebhookServer:
        await self.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.stop()


async def serve_webhook(config: InjectorConfig, host: str, port: int, cert_file: str,
                        key_file: str, *, metrics_port: int | None = None,
                        stop: asyncio.Event | None = None, grace: float = 0.0) -> None:
    """Serve until ``stop`` is set (or the task is cancelled). ``grace`` keeps answering for
    that long after ``stop``, while Kubernetes removes the pod from the Service."""
    server = WebhookServer(config, host=host, port=port, cert_file=cert_file,
                           key_file=key_file, metrics_port=metrics_port)
    await server.start()
    try:
        await (stop or asyncio.Event()).wait()
        if grace > 0:
            await asyncio.sleep(grace)
    finally:
        await server.stop()


def tcp_port(runner: web.BaseRunner) -> int:
    """The TCP port a runner's site is bound to (ports may be ephemeral), by public API."""
    for address in runner.addresses:
        if isinstance(address, tuple):
            return int(address[1])
    raise RuntimeError("the runner has no TCP site")
