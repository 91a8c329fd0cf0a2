"""The injector's configuration and the names it shares with the pod it patches.

:class:`InjectorConfig` says how the sidecar is built; :func:`config_from` reads it from flags
and ``FLUX_INJECTOR_*`` variables. Kubernetes quantities (``100m``, ``1.5Gi``) are parsed
here too, because checking the configuration needs them.
"""

from __future__ import annotations

import argparse
import json
import re
from collections.abc import Mapping
from dataclasses import dataclass, field, fields
from decimal import ROUND_FLOOR, Decimal, InvalidOperation
from typing import Any

from .._version import __version__
from ..core.settings import AGENCY_SLUG

# --------------------------------------------------------------------------- names

INJECT_LABEL = "flux.io/inject"
ANNOTATION_AGENCY = "flux.io/agency"
ANNOTATION_SPOOL_SIZE = "flux.io/spool-size"
ANNOTATION_CPU = "flux.io/cpu"
ANNOTATION_MEMORY = "flux.io/memory"
ANNOTATION_IMAGE = "flux.io/image"
ANNOTATION_SPOOL_PVC = "flux.io/spool-pvc"
ANNOTATION_SIDECAR_MODE = "flux.io/sidecar-mode"
ANNOTATION_INJECTED = "flux.io/injected"  # set by the injector: the mode it used
ANNOTATION_ERROR = "flux.io/injection-error"  # set by the injector when it failed open
DEFAULT_CONTAINER_ANNOTATION = "kubectl.kubernetes.io/default-container"

AGENT_CONTAINER = "flux-agent"
SOCKET_VOLUME = "flux-agent-socket"
STATE_VOLUME = "flux-agent-state"
JWKS_VOLUME = "flux-agent-jwks"
DATABASE_VOLUME = "flux-agent-database"
DATABASE_DIR = "/etc/flux-agent/database"
DATABASE_FILE = DATABASE_DIR + "/url"  # FLUX_AGENT_DATABASE_URL_FILE: never an env value
# Tiered topology: the sidecar's own credential and trust for the aggregator, in the agent
# container only (the app's token for the agent, TOKEN_DIR, is a different one).
UPSTREAM_TOKEN_VOLUME = "flux-agent-upstream-token"
UPSTREAM_TOKEN_DIR = "/var/run/secrets/flux-agent/upstream"
UPSTREAM_TOKEN_FILE = UPSTREAM_TOKEN_DIR + "/token"  # FLUX_AGENT_UPSTREAM_TOKEN_FILE
UPSTREAM_AUDIENCE = "flux-aggregator"  # the aggregator's FLUX_AGENT_JWT_AUDIENCE
UPSTREAM_CA_VOLUME = "flux-agent-upstream-ca"
UPSTREAM_CA_DIR = "/etc/flux-agent/upstream-ca"
UPSTREAM_CA_KEY = "ca.crt"
UPSTREAM_CA_FILE = UPSTREAM_CA_DIR + "/" + UPSTREAM_CA_KEY  # FLUX_AGENT_UPSTREAM_CA_FILE
UPSTREAMS = ("database", "aggregator")
TOKEN_VOLUME = "flux-agent-token"
TOKEN_DIR = "/var/run/secrets/flux-agent"
TOKEN_AUDIENCE = "flux-agent"  # what the sidecar requires in auth kubernetes (config's too)
TOKEN_SECONDS = 3600
SOCKET_DIR = "/var/run/flux-agent"
SOCKET_PATH = SOCKET_DIR + "/agent.sock"
STATE_DIR = "/var/lib/flux-agent"
JWKS_DIR = "/etc/flux-agent/jwks"
EVENT_LISTEN = "127.0.0.1:8787"
EVENT_URL = "http://127.0.0.1:8787"
ADMIN_PORT = 9464
ADMIN_PORT_NAME = "flux-admin"
AGENT_UID = 10001

SIDECAR_MODES = ("native", "legacy")
AGENT_AUTHS = ("none", "kubernetes", "jwt")
ANY_NAMESPACE = "*"  # in agency_bindings: every namespace not named
ALWAYS_EXCLUDED = ("kube-system", "kube-public")  # whatever the configuration says
MIN_SPOOL_BYTES = 64 * 1024**2
SPOOL_HEADROOM_MIN = 32 * 1024**2  # seen-ids snapshot, cursor, the segment being written


_DNS_SUBDOMAIN = re.compile(r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*$")
_DNS_LABEL = re.compile(r"^[a-z0-9]([-a-z0-9]{0,61}[a-z0-9])?$")
_SECRET_KEY = re.compile(r"^[-._a-zA-Z0-9]+$")
_AGGREGATOR_URL = re.compile(r"^https?://[a-z0-9]([-a-z0-9.]*[a-z0-9])?(:[0-9]{1,5})?/?$")
_QUANTITY = re.compile(
    r"^(?P<num>[+]?(?:\d+(?:\.\d*)?|\.\d+))"
    r"(?P<suffix>Ki|Mi|Gi|Ti|Pi|Ei|n|u|m|k|M|G|T|P|E|[eE][+-]?\d+)?$"
)
_BINARY = {"Ki": 1024, "Mi": 1024**2, "Gi": 1024**3, "Ti": 1024**4, "Pi": 1024**5,
           "Ei": 1024**6}
_DECIMAL = {"n": Decimal("1e-9"), "u": Decimal("1e-6"), "m": Decimal("1e-3"), "": Decimal(1),
            "k": Decimal(10**3), "M": Decimal(10**6), "G": Decimal(10**9),
            "T": Decimal(10**12), "P": Decimal(10**15), "E": Decimal(10**18)}


# --------------------------------------------------------------------------- configuration


def _opt(default: Any, help_text: str, *, kind: str = "str") -> Any:
    return field(default=default, metadata={"help": help_text, "kind": kind})


@dataclass(frozen=True, slots=True)
class InjectorConfig:
    """How the injector builds the sidecar. Flags ``--kebab-name``, environment
    ``FLUX_INJECTOR_UPPER_NAME`` (flag > environment > default)."""

    image: str = _opt(f"flux-agent:{__version__}", "Agent image: REPOSITORY:TAG or, pinned, "
                      "REPOSITORY@sha256:DIGEST. A short name such as the default resolves to "
                      "whatever registry the node's container runtime is configured for.")
    allow_image_override: bool = _opt(False, "Let a pod choose its agent image with the "
                                      "annotation flux.io/image; off, the annotation is "
                                      "ignored with a warning and the image above is "
                                      "injected.", kind="bool")
    image_pull_policy: str = _opt("IfNotPresent", "Agent imagePullPolicy.")
    sidecar_mode: str = _opt("native", "native (init container, restartPolicy Always) or "
                             "legacy (regular container); flux.io/sidecar-mode overrides.")
    configmap: str = _opt("flux-agent-defaults", "ConfigMap (in the pod's namespace) with the "
                          "agent's FLUX_AGENT_* defaults, used as envFrom.")
    database_secret: str = _opt("flux-agent-database", "Secret (in the pod's namespace) "
                                "holding the database URL, mounted into the agent "
                                "container only, as the file FLUX_AGENT_DATABASE_URL_FILE "
                                "names (never an environment variable).")
    database_secret_key: str = _opt("url", "Key of the database URL in that Secret.")
    spool_size: str = _opt("1Gi", "Default spool volume size (flux.io/spool-size overrides).")
    spool_volume: str = _opt("emptyDir", "emptyDir (sizeLimit = spool size), or ephemeral: a "
                             "PersistentVolumeClaim per pod (generic ephemeral volume) of the "
                             "spool size. flux.io/spool-pvc names a claim instead.")
    spool_storage_class: str = _opt("", "StorageClass of ephemeral spool volumes (empty: the "
                                    "cluster default).")
    cpu_request: str = _opt("50m", "Agent CPU request.")
    cpu_limit: str = _opt("", "Agent CPU limit (empty: none).")
    memory_request: str = _opt("128Mi", "Agent memory request.")
    memory_limit: str = _opt("256Mi", "Agent memory limit (empty: none).")
    fail_closed: bool = _opt(False, "Refuse pods whose injection fails instead of admitting "
                             "them without the agent.", kind="bool")
    excluded_namespaces: tuple[str, ...] = _opt(
        ("kube-system", "kube-public"), "Namespaces never injected (comma list).", kind="list")
    agent_auth: str = _opt("none", "The sidecars' FLUX_AGENT_AUTH. none and kubernetes bind "
                           "each pod to its namespace's agency (agency_bindings, and the "
                           "Namespace's flux.io/agency annotation); jwt takes the agency from "
                           "each caller's token.")
    agency_bindings: tuple[tuple[str, tuple[str, ...]], ...] = _opt(
        (), 'Which agencies each namespace may write as, JSON: {"etl": "nasa", "batch": '
        '["noaa", "nasa"], "*": "nasa"} ("*": every namespace not named); a pod\'s '
        'flux.io/agency may only choose among them.', kind="bindings")
    namespace_bindings: bool = _opt(False, "Also read a namespace's agencies from its "
                                    "flux.io/agency annotation (comma list) through the "
                                    "Kubernetes API (RBAC: get on namespaces).", kind="bool")
    kube_issuer: str = _opt("https://kubernetes.default.svc.cluster.local",
                            "The cluster's service-account token issuer (agent_auth "
                            "kubernetes): the sidecar's FLUX_AGENT_JWT_ISSUERS.")
    jwks_configmap: str = _opt("", "ConfigMap with jwks.json for FLUX_AGENT_AUTH=jwt, mounted "
                               "at /etc/flux-agent/jwks (empty: none).")
    upstream: str = _opt("database", "Where sidecars deliver: database (PostgreSQL, with the "
                         "database Secret mounted as a file) or aggregator (aggregator_url; no "
                         "database credentials in the pod).")
    aggregator_url: str = _opt("", "The aggregators' URL (https://SERVICE.NAMESPACE.svc:8788; "
                               "http:// only where the aggregators run without TLS): the "
                               "sidecars' FLUX_AGENT_UPSTREAM with upstream aggregator, else "
                               "their FLUX_AGENT_HANDOFF (where a draining sidecar hands what "
                               "it could not deliver). Empty: no aggregator.")
    aggregator_ca_configmap: str = _opt("", "ConfigMap (in the pod's namespace) whose ca.crt "
                                        "signed the aggregators' certificate, mounted as "
                                        "FLUX_AGENT_UPSTREAM_CA_FILE (empty: the image's "
                                        "trust store).")
    run_as_user: int = _opt(AGENT_UID, "The agent's uid.", kind="int")
    run_as_group: int = _opt(AGENT_UID, "The agent's gid; added to the pod's "
                             "supplementalGroups so app containers can use the socket.",
                             kind="int")

    def check(self) -> None:
        """Raise ValueError (naming the option) if the configuration itself is wrong."""
        if self.agent_auth not in AGENT_AUTHS:
            raise ValueError(f"agent_auth: expected none, kubernetes or jwt, got "
                             f"{self.agent_auth!r}")
        if self.agent_auth == "kubernetes" and not self.jwks_configmap:
            raise ValueError("jwks_configmap: required by agent_auth kubernetes (the "
                             "service-account issuer's keys)")
        if self.sidecar_mode not in SIDECAR_MODES:
            raise ValueError(f"sidecar_mode: expected native or legacy, got {self.sidecar_mode!r}")
        if self.spool_volume not in ("emptyDir", "ephemeral"):
            raise ValueError(f"spool_volume: expected emptyDir or ephemeral, got "
                             f"{self.spool_volume!r}")
        if self.spool_storage_class and not _DNS_SUBDOMAIN.match(self.spool_storage_class):
            raise ValueError("spool_storage_class: not a valid object name")
        if self.image_pull_policy not in ("Always", "IfNotPresent", "Never"):
            raise ValueError(f"image_pull_policy: {self.image_pull_policy!r}")
        for name in ("configmap", "database_secret"):
            if not _DNS_SUBDOMAIN.match(getattr(self, name)):
                raise ValueError(f"{name}: not a valid object name")
        if self.jwks_configmap and not _DNS_SUBDOMAIN.match(self.jwks_configmap):
            raise ValueError("jwks_configmap: not a valid object name")
        if self.upstream not in UPSTREAMS:
            raise ValueError(f"upstream: expected database or aggregator, got "
                             f"{self.upstream!r}")
        if self.upstream == "aggregator" and not self.aggregator_url:
            raise ValueError("aggregator_url: required by upstream aggregator")
        if self.aggregator_url and not _AGGREGATOR_URL.match(self.aggregator_url):
            raise ValueError(f"aggregator_url: {self.aggregator_url!r} is not an http(s)://HOST"
                             "[:PORT] URL")
        if self.aggregator_ca_configmap and not _DNS_SUBDOMAIN.match(
                self.aggregator_ca_configmap):
            raise ValueError("aggregator_ca_configmap: not a valid object name")
        if self.aggregator_ca_configmap and not self.aggregator_url.startswith("https://"):
            raise ValueError("aggregator_ca_configmap: only for an https:// aggregator_url")
        if not _SECRET_KEY.match(self.database_secret_key):
            raise ValueError("database_secret_key: not a valid Secret key")
        _check_image(self.image, "image")
        spool_bytes(self.spool_size)
        for name in ("cpu_request", "cpu_limit", "memory_request", "memory_limit"):
            value = getattr(self, name)
            if value:
                parse_quantity(value, name)
        for name in ("run_as_user", "run_as_group"):
            if getattr(self, name) <= 0:
                raise ValueError(f"{name}: must be a non-root id")


class InjectionError(ValueError):
    """The pod cannot be injected (bad annotation, malformed pod); the message says why."""


# --------------------------------------------------------------------------- quantities


def parse_quantity(text: Any, what: str) -> Decimal:
    """A Kubernetes resource quantity (``100m``, ``1.5Gi``, ``2e3``) as a Decimal."""
    if not isinstance(text, str):
        raise InjectionError(f"{what}: expected a quantity string, got {type(text).__name__}")
    m = _QUANTITY.match(text.strip())
    if not m:
        raise InjectionError(f"{what}: {text!r} is not a Kubernetes quantity")
    try:
        number = Decimal(m.group("num"))
    except InvalidOperation:
        raise InjectionError(f"{what}: {text!r} is not a Kubernetes quantity") from None
    suffix = m.group("suffix") or ""
    if suffix in _BINARY:
        return number * _BINARY[suffix]
    if suffix in _DECIMAL:
        return number * _DECIMAL[suffix]
    return number * (Decimal(10) ** int(suffix[1:]))


def spool_bytes(size: str) -> tuple[int, int]:
    """(volume bytes, spool max bytes) for a spool volume of ``size``.

    The spool stops short of the volume: exceeding an emptyDir's ``sizeLimit`` gets the whole
    pod evicted, while a full spool only answers 503 until the flusher catches up.
    """
    total = int(parse_quantity(size, "spool size").to_integral_value(ROUND_FLOOR))
    if total < MIN_SPOOL_BYTES:
        raise InjectionError(f"spool size {size!r} is below the minimum of 64Mi")
    return total, total - max(total // 10, SPOOL_HEADROOM_MIN)


_IMAGE_DIGEST = re.compile(r"^sha256:[a-f0-9]{64}$")


def _check_image(image: Any, what: str) -> str:
    """An image reference: ``NAME[:TAG]`` or ``NAME[:TAG]@sha256:HEX``."""
    if not isinstance(image, str) or not image.strip() or any(c.isspace() for c in image) \
            or len(image) > 512:
        raise InjectionError(f"{what}: {image!r} is not an image reference")
    name, at, digest = image.partition("@")
    if not name or (at and not _IMAGE_DIGEST.match(digest)):
        raise InjectionError(f"{what}: {image!r} is not an image reference (a digest is "
                             "@sha256: and 64 hex digits)")
    return image


# --------------------------------------------------------------------------- flags, environment


def _env_name(name: str) -> str:
    return "FLUX_INJECTOR_" + name.upper()


def _add_config_flags(parser: argparse.ArgumentParser) -> None:
    for f in fields(InjectorConfig):
        flag = "--" + f.name.replace("_", "-")
        help_text = f"{f.metadata['help']} [env {_env_name(f.name)}]".replace("%", "%%")
        if f.metadata["kind"] == "bool":
            parser.add_argument(flag, dest=f.name, default=None,
                                action=argparse.BooleanOptionalAction, help=help_text)
        else:
            parser.add_argument(flag, dest=f.name, default=None, help=help_text)


def config_from(args: argparse.Namespace, environ: Mapping[str, str]) -> InjectorConfig:
    """Flags > ``FLUX_INJECTOR_*`` environment > defaults; raises ValueError naming the
    option."""
    values: dict[str, Any] = {}
    for f in fields(InjectorConfig):
        raw = getattr(args, f.name, None)
        source = "--" + f.name.replace("_", "-")
        if raw is None:
            raw = environ.get(_env_name(f.name))
            source = _env_name(f.name)
        if raw is None:
            continue
        kind = f.metadata["kind"]
        try:
            if kind == "bool":
                values[f.name] = raw if isinstance(raw, bool) else _parse_bool(str(raw))
            elif kind == "int":
                values[f.name] = int(raw)
            elif kind == "list":
                values[f.name] = tuple(x.strip() for x in str(raw).split(",") if x.strip())
            elif kind == "bindings":
                values[f.name] = parse_bindings(str(raw))
            else:
                values[f.name] = str(raw).strip()
        except ValueError as exc:
            raise ValueError(f"{source}: {exc}") from None
    config = InjectorConfig(**values)
    try:
        config.check()
    except InjectionError as exc:
        raise ValueError(str(exc)) from None
    return config


def parse_bindings(text: str) -> tuple[tuple[str, tuple[str, ...]], ...]:
    """``{"etl": "nasa", "batch": ["noaa", "nasa"]}`` -> (("etl", ("nasa",)), ...)."""
    if not text.strip():
        return ()
    try:
        data = json.loads(text)
    except ValueError as exc:
        raise ValueError(f"not JSON: {exc}") from None
    if not isinstance(data, dict):
        raise ValueError('expected a JSON object {"namespace": "agency" or [agencies]}')
    out = []
    for namespace, agencies in data.items():
        listed = [agencies] if isinstance(agencies, str) else agencies
        if not isinstance(listed, list) or not listed or not all(
                isinstance(a, str) and AGENCY_SLUG.match(a) for a in listed):
            raise ValueError(f"{namespace}: expected an agency slug or a list of them")
        if namespace != ANY_NAMESPACE and not _DNS_LABEL.match(namespace):
            raise ValueError(f"{namespace!r} is not a namespace name")
        out.append((namespace, tuple(listed)))
    return tuple(out)


def _parse_bool(text: str) -> bool:
    lowered = text.strip().lower()
    if lowered in ("1", "true", "yes", "on"):
        return True
    if lowered in ("0", "false", "no", "off"):
        return False
    raise ValueError(f"expected true or false, got {text!r}")
