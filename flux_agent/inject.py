"""Kubernetes sidecar injection: a mutating admission webhook, and the same logic as a CLI.

A pod opts in with the label ``flux.io/inject: "true"`` and may tune the agent with
annotations:

=============================  ===============================================================
``flux.io/agency``             the agent's fixed agency (``FLUX_AGENT_AGENCY``; auth ``none``)
``flux.io/spool-size``         spool volume size (``2Gi``): the emptyDir ``sizeLimit``; the
                               agent's ``FLUX_AGENT_SPOOL_MAX_BYTES`` is that minus headroom
``flux.io/cpu``                ``REQUEST`` or ``REQUEST/LIMIT`` (``100m`` or ``100m/1``)
``flux.io/memory``             ``REQUEST`` or ``REQUEST/LIMIT`` (``128Mi/256Mi``)
``flux.io/image``              the agent image
``flux.io/spool-pvc``          keep the spool on this PersistentVolumeClaim (or on the pod's
                               volume of that name, e.g. a StatefulSet volumeClaimTemplate)
``flux.io/sidecar-mode``       ``native`` (default: an init container with ``restartPolicy:
                               Always``, Kubernetes >= 1.29) or ``legacy`` (a regular container)
=============================  ===============================================================

What is injected (see :func:`build_patch`):

* the agent container ``flux-agent``: in ``native`` mode appended to ``initContainers`` with
  ``restartPolicy: Always`` and a startup probe on ``/health/ready``, so the app containers
  start only once the agent accepts events and the agent outlives them (it drains on
  SIGTERM after they exit); in ``legacy`` mode inserted first in ``containers`` with a
  ``postStart`` hook that waits for readiness (the app should end with ``POST /v1/drain``,
  or a Job never completes);
* an emptyDir for the Unix socket at ``/var/run/flux-agent``, mounted in every app container,
  and the spool volume (emptyDir with ``sizeLimit``, or a PVC) at ``/var/lib/flux-agent``;
* ``FLUX_AGENT_SOCKET`` and ``FLUX_AGENT_URL`` in every app container (existing values win);
* the pod's ``supplementalGroups`` gain the agent's group (10001) so app containers, whatever
  their uid, may connect to the socket (mode 0660);
* the agent's settings: fixed ones as ``env``, ``FLUX_AGENT_DATABASE_URL`` from a Secret, the
  rest from a ConfigMap (``envFrom``); both must exist in the pod's namespace.

Pods in excluded namespaces (kube-system, kube-public), pods without the label, and pods that
already have a ``flux-agent`` container are left alone, so re-invocation
(``reinvocationPolicy: IfNeeded``) never injects twice. A bad annotation or a malformed pod is
answered ``allowed: true`` with a warning and a ``flux.io/injection-error`` annotation (fail
open), or ``allowed: false`` when the injector is configured to fail closed.

The patch is computed by a pure function (:func:`build_patch`); :func:`admission_response`
wraps it in an AdmissionReview answer; :func:`mutate_pod` applies it, which is what
``flux-agent inject POD_FILE`` prints. ``flux-agent inject-webhook`` serves ``POST /mutate``
over HTTPS (plus ``GET /healthz``, and ``/metrics`` on an optional plain-HTTP port).
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import contextlib
import copy
import importlib
import json
import logging
import os
import re
import ssl
import sys
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field, fields
from decimal import ROUND_FLOOR, Decimal, InvalidOperation
from pathlib import Path
from typing import Any

from ._version import __version__
from .config import AGENCY_SLUG

log = logging.getLogger("flux_agent.inject")

EXIT_OK = 0
EXIT_FAILURE = 1
EXIT_CONFIG = 78

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
ALWAYS_EXCLUDED = ("kube-system", "kube-public")  # whatever the configuration says
MIN_SPOOL_BYTES = 64 * 1024**2
SPOOL_HEADROOM_MIN = 32 * 1024**2  # seen-ids snapshot, cursor, the segment being written

ADMISSION_API = "admission.k8s.io/v1"

# Legacy mode: kubelet starts containers in order and runs each postStart hook to completion
# before starting the next container, so the app starts once the agent is ready.
WAIT_READY_SCRIPT = (
    "import sys,time,urllib.request\n"
    "deadline=time.monotonic()+120\n"
    "while time.monotonic()<deadline:\n"
    "    try:\n"
    f"        urllib.request.urlopen('http://127.0.0.1:{ADMIN_PORT}/health/ready',timeout=2)\n"
    "        sys.exit(0)\n"
    "    except Exception:\n"
    "        time.sleep(0.5)\n"
    "sys.exit(1)\n"
)

_DNS_SUBDOMAIN = re.compile(r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*$")
_SECRET_KEY = re.compile(r"^[-._a-zA-Z0-9]+$")
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

    image: str = _opt(f"flux-agent:{__version__}", "Agent image (flux.io/image overrides).")
    image_pull_policy: str = _opt("IfNotPresent", "Agent imagePullPolicy.")
    sidecar_mode: str = _opt("native", "native (init container, restartPolicy Always) or "
                             "legacy (regular container); flux.io/sidecar-mode overrides.")
    configmap: str = _opt("flux-agent-defaults", "ConfigMap (in the pod's namespace) with the "
                          "agent's FLUX_AGENT_* defaults, used as envFrom.")
    database_secret: str = _opt("flux-agent-database", "Secret (in the pod's namespace) "
                                "holding FLUX_AGENT_DATABASE_URL.")
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
    require_agency: bool = _opt(False, "Refuse to inject without flux.io/agency (set when "
                                "the agent runs with auth none and no default agency).",
                                kind="bool")
    jwks_configmap: str = _opt("", "ConfigMap with jwks.json for FLUX_AGENT_AUTH=jwt, mounted "
                               "at /etc/flux-agent/jwks (empty: none).")
    run_as_user: int = _opt(AGENT_UID, "The agent's uid.", kind="int")
    run_as_group: int = _opt(AGENT_UID, "The agent's gid; added to the pod's "
                             "supplementalGroups so app containers can use the socket.",
                             kind="int")

    def check(self) -> None:
        """Raise ValueError (naming the option) if the configuration itself is wrong."""
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


class MalformedReview(ValueError):
    """The request body is not an AdmissionReview admission.k8s.io/v1 request."""


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


def _resources(spec: str | None, default_request: str, default_limit: str,
               what: str) -> tuple[str, str]:
    """(request, limit) from an annotation ``REQUEST`` or ``REQUEST/LIMIT``; "" = none."""
    if spec is None:
        request, limit = default_request, default_limit
    else:
        if not isinstance(spec, str) or not spec.strip():
            raise InjectionError(f"{what}: expected REQUEST or REQUEST/LIMIT")
        request, _, explicit = (p.strip() for p in spec.partition("/"))
        if explicit:
            limit = explicit
        elif default_limit and parse_quantity(default_limit, what) >= parse_quantity(
                request, what):
            limit = default_limit
        else:
            # No default limit, or one below the requested amount: the request is the limit
            # when a limit is configured at all.
            limit = request if default_limit else ""
    req = parse_quantity(request, what) if request else None
    lim = parse_quantity(limit, what) if limit else None
    if req is not None and req <= 0:
        raise InjectionError(f"{what}: the request must be positive")
    if req is not None and lim is not None and lim < req:
        raise InjectionError(f"{what}: the limit {limit} is below the request {request}")
    return request, limit


def _check_image(image: Any, what: str) -> str:
    if not isinstance(image, str) or not image.strip() or any(c.isspace() for c in image) \
            or len(image) > 512:
        raise InjectionError(f"{what}: {image!r} is not an image reference")
    return image


# --------------------------------------------------------------------------- the patch


def _pointer(*parts: str | int) -> str:
    """An RFC 6901 JSON pointer (``/`` inside a key becomes ``~1``)."""
    return "".join("/" + str(p).replace("~", "~0").replace("/", "~1") for p in parts)


def _as_dict(value: Any, what: str) -> dict[str, Any]:
    if value is None:
        return {}
    if not isinstance(value, dict):
        raise InjectionError(f"{what} must be an object")
    return value


def _as_list(value: Any, what: str) -> list[Any]:
    if value is None:
        return []
    if not isinstance(value, list):
        raise InjectionError(f"{what} must be a list")
    return value


def _named(items: list[Any], what: str) -> list[dict[str, Any]]:
    out = []
    for i, item in enumerate(items):
        if not isinstance(item, dict) or not isinstance(item.get("name"), str):
            raise InjectionError(f"{what}[{i}] must be an object with a name")
        out.append(item)
    return out


def is_injected(pod: Mapping[str, Any]) -> bool:
    spec = pod.get("spec")
    if not isinstance(spec, dict):
        return False
    for key in ("containers", "initContainers"):
        items = spec.get(key)
        if isinstance(items, list) and any(
                isinstance(c, dict) and c.get("name") == AGENT_CONTAINER for c in items):
            return True
    return False


def skip_reason(pod: Mapping[str, Any], config: InjectorConfig, namespace: str = ""
                ) -> str | None:
    """Why this pod is not to be injected, or None if it is."""
    metadata = pod.get("metadata")
    metadata = metadata if isinstance(metadata, dict) else {}
    namespace = namespace or str(metadata.get("namespace") or "")
    if namespace in ALWAYS_EXCLUDED or namespace in config.excluded_namespaces:
        return f"namespace {namespace} is excluded"
    labels = metadata.get("labels")
    if not isinstance(labels, dict) or labels.get(INJECT_LABEL) != "true":
        return f"no {INJECT_LABEL}=true label"
    if is_injected(pod):
        return "already injected"
    return None


@dataclass(frozen=True, slots=True)
class _Plan:
    """What the annotations asked for, checked."""

    mode: str
    image: str
    agency: str
    volume_size: str
    spool_max: int
    pvc: str
    cpu: tuple[str, str]
    memory: tuple[str, str]


def _plan(annotations: Mapping[str, Any], config: InjectorConfig) -> _Plan:
    def get(name: str) -> str | None:
        value = annotations.get(name)
        if value is None:
            return None
        if not isinstance(value, str):
            raise InjectionError(f"annotation {name} must be a string")
        return value.strip()

    mode = get(ANNOTATION_SIDECAR_MODE) or config.sidecar_mode
    if mode not in SIDECAR_MODES:
        raise InjectionError(f"annotation {ANNOTATION_SIDECAR_MODE}: expected native or "
                             f"legacy, got {mode!r}")
    image = _check_image(get(ANNOTATION_IMAGE) or config.image, f"annotation {ANNOTATION_IMAGE}")
    agency = get(ANNOTATION_AGENCY) or ""
    if agency and not AGENCY_SLUG.match(agency):
        raise InjectionError(f"annotation {ANNOTATION_AGENCY}: {agency!r} is not an agency slug")
    if config.require_agency and not agency:
        raise InjectionError(f"annotation {ANNOTATION_AGENCY} is required (the agent runs "
                             "without authentication and has no default agency)")
    size = get(ANNOTATION_SPOOL_SIZE) or config.spool_size
    try:
        _, spool_max = spool_bytes(size)
    except InjectionError as exc:
        raise InjectionError(f"annotation {ANNOTATION_SPOOL_SIZE}: {exc}") from None
    pvc = get(ANNOTATION_SPOOL_PVC) or ""
    if pvc and not _DNS_SUBDOMAIN.match(pvc):
        raise InjectionError(f"annotation {ANNOTATION_SPOOL_PVC}: {pvc!r} is not a claim name")
    cpu = _resources(get(ANNOTATION_CPU), config.cpu_request, config.cpu_limit,
                     f"annotation {ANNOTATION_CPU}")
    memory = _resources(get(ANNOTATION_MEMORY), config.memory_request, config.memory_limit,
                        f"annotation {ANNOTATION_MEMORY}")
    return _Plan(mode, image, agency, size, spool_max, pvc, cpu, memory)


def agent_container(plan: _Plan, config: InjectorConfig, state_volume: str) -> dict[str, Any]:
    """The ``flux-agent`` container for this plan."""
    env: list[dict[str, Any]] = [
        {"name": "FLUX_AGENT_DATABASE_URL", "valueFrom": {"secretKeyRef": {
            "name": config.database_secret, "key": config.database_secret_key}}},
        {"name": "FLUX_AGENT_STATE_DIR", "value": STATE_DIR},
        {"name": "FLUX_AGENT_SOCKET", "value": SOCKET_PATH},
        {"name": "FLUX_AGENT_LISTEN", "value": EVENT_LISTEN},
        {"name": "FLUX_AGENT_ADMIN_LISTEN", "value": f"0.0.0.0:{ADMIN_PORT}"},
        {"name": "FLUX_AGENT_SPOOL_MAX_BYTES", "value": str(plan.spool_max)},
    ]
    if plan.agency:
        env.append({"name": "FLUX_AGENT_AGENCY", "value": plan.agency})
    mounts: list[dict[str, Any]] = [
        {"name": SOCKET_VOLUME, "mountPath": SOCKET_DIR},
        {"name": state_volume, "mountPath": STATE_DIR},
    ]
    if config.jwks_configmap:
        env.append({"name": "FLUX_AGENT_JWT_JWKS_FILE", "value": f"{JWKS_DIR}/jwks.json"})
        mounts.append({"name": JWKS_VOLUME, "mountPath": JWKS_DIR, "readOnly": True})
    requests: dict[str, str] = {}
    limits: dict[str, str] = {}
    for resource, (req, lim) in (("cpu", plan.cpu), ("memory", plan.memory)):
        if req:
            requests[resource] = req
        if lim:
            limits[resource] = lim
    resources: dict[str, Any] = {}
    if requests:
        resources["requests"] = requests
    if limits:
        resources["limits"] = limits

    def probe(path: str, period: int, failures: int) -> dict[str, Any]:
        return {"httpGet": {"path": path, "port": ADMIN_PORT_NAME}, "periodSeconds": period,
                "timeoutSeconds": 3, "failureThreshold": failures}

    container: dict[str, Any] = {
        "name": AGENT_CONTAINER,
        "image": plan.image,
        "imagePullPolicy": config.image_pull_policy,
        "args": ["run"],
        "ports": [{"name": ADMIN_PORT_NAME, "containerPort": ADMIN_PORT, "protocol": "TCP"}],
        "envFrom": [{"configMapRef": {"name": config.configmap}}],
        "env": env,
        "volumeMounts": mounts,
        "resources": resources,
        "startupProbe": {**probe("/health/ready", 1, 120), "timeoutSeconds": 2},
        "livenessProbe": probe("/health/live", 10, 3),
        "readinessProbe": probe("/health/ready", 5, 2),
        "securityContext": {
            "runAsNonRoot": True,
            "runAsUser": config.run_as_user,
            "runAsGroup": config.run_as_group,
            "readOnlyRootFilesystem": True,
            "allowPrivilegeEscalation": False,
            "privileged": False,
            "capabilities": {"drop": ["ALL"]},
            "seccompProfile": {"type": "RuntimeDefault"},
        },
        "terminationMessagePolicy": "FallbackToLogsOnError",
    }
    if plan.mode == "native":
        container["restartPolicy"] = "Always"
    else:
        container["lifecycle"] = {"postStart": {"exec": {
            "command": ["python", "-c", WAIT_READY_SCRIPT]}}}
    return container


def build_patch(pod: Mapping[str, Any], config: InjectorConfig, namespace: str = ""
                ) -> list[dict[str, Any]]:
    """The RFC 6902 patch that injects the agent into ``pod``; ``[]`` when it is not to be
    injected (no opt-in label, excluded namespace, already injected).

    Pure: reads ``pod`` and ``config`` only. Raises :class:`InjectionError` for a bad
    annotation or a malformed pod. Arrays the pod lacks are added whole; arrays it has are
    appended to with ``/-``.
    """
    if not isinstance(pod, Mapping):
        raise InjectionError("the object is not a pod")
    if skip_reason(pod, config, namespace) is not None:
        return []
    metadata = _as_dict(pod.get("metadata"), "metadata")
    spec = _as_dict(pod.get("spec"), "spec")
    if not spec:
        raise InjectionError("the pod has no spec")
    annotations = _as_dict(metadata.get("annotations"), "metadata.annotations")
    containers = _named(_as_list(spec.get("containers"), "spec.containers"), "spec.containers")
    if not containers:
        raise InjectionError("the pod has no containers")
    _named(_as_list(spec.get("initContainers"), "spec.initContainers"), "spec.initContainers")
    volumes = _named(_as_list(spec.get("volumes"), "spec.volumes"), "spec.volumes")
    if spec.get("hostNetwork") is True:
        raise InjectionError("hostNetwork pods share the node's loopback; the agent's port "
                             "would clash between pods")
    os_spec = spec.get("os")
    if isinstance(os_spec, dict) and os_spec.get("name") == "windows":
        raise InjectionError("Windows pods are not supported")
    plan = _plan(annotations, config)

    volume_names = {v["name"] for v in volumes}
    for taken in (SOCKET_VOLUME, STATE_VOLUME, JWKS_VOLUME):
        if taken in volume_names and not (taken == STATE_VOLUME and plan.pvc == STATE_VOLUME):
            raise InjectionError(f"the pod already has a volume named {taken}")
    ops: list[dict[str, Any]] = []

    # Annotations: what was injected (kubectl describe shows it).
    new_annotations = {ANNOTATION_INJECTED: plan.mode}
    if plan.mode == "legacy" and DEFAULT_CONTAINER_ANNOTATION not in annotations:
        # The agent goes first in containers; keep kubectl logs/exec on the app.
        new_annotations[DEFAULT_CONTAINER_ANNOTATION] = containers[0]["name"]
    if ANNOTATION_ERROR in annotations:
        ops.append({"op": "remove", "path": _pointer("metadata", "annotations",
                                                     ANNOTATION_ERROR)})
    if metadata.get("annotations") is None:
        ops.append({"op": "add", "path": "/metadata/annotations", "value": new_annotations})
    else:
        for key, value in new_annotations.items():
            ops.append({"op": "add", "path": _pointer("metadata", "annotations", key),
                        "value": value})

    # Pod security context: the agent's group, so app containers may use the socket.
    pod_security = _as_dict(spec.get("securityContext"), "spec.securityContext")
    groups = _as_list(pod_security.get("supplementalGroups"),
                      "spec.securityContext.supplementalGroups")
    if "securityContext" not in spec or spec.get("securityContext") is None:
        ops.append({"op": "add", "path": "/spec/securityContext",
                    "value": {"supplementalGroups": [config.run_as_group]}})
    elif "supplementalGroups" not in pod_security or pod_security["supplementalGroups"] is None:
        ops.append({"op": "add", "path": "/spec/securityContext/supplementalGroups",
                    "value": [config.run_as_group]})
    elif config.run_as_group not in groups:
        ops.append({"op": "add", "path": "/spec/securityContext/supplementalGroups/-",
                    "value": config.run_as_group})

    # Volumes: the socket, the spool, the JWKS.
    state_volume = STATE_VOLUME
    new_volumes: list[dict[str, Any]] = [{"name": SOCKET_VOLUME, "emptyDir": {}}]
    if plan.pvc and plan.pvc in volume_names:
        state_volume = plan.pvc  # the pod's own volume, e.g. a StatefulSet claim template
    elif plan.pvc:
        new_volumes.append({"name": STATE_VOLUME,
                            "persistentVolumeClaim": {"claimName": plan.pvc}})
    elif config.spool_volume == "ephemeral":
        claim: dict[str, Any] = {"accessModes": ["ReadWriteOnce"],
                                 "resources": {"requests": {"storage": plan.volume_size}}}
        if config.spool_storage_class:
            claim["storageClassName"] = config.spool_storage_class
        new_volumes.append({"name": STATE_VOLUME, "ephemeral": {"volumeClaimTemplate": {
            "metadata": {"labels": {"app.kubernetes.io/part-of": "flux-agent"}},
            "spec": claim}}})
    else:
        new_volumes.append({"name": STATE_VOLUME, "emptyDir": {"sizeLimit": plan.volume_size}})
    if config.jwks_configmap:
        new_volumes.append({"name": JWKS_VOLUME,
                            "configMap": {"name": config.jwks_configmap}})
    ops.extend(_append("/spec/volumes", "volumes" in spec and spec["volumes"] is not None,
                       new_volumes))

    # App containers: the socket mount and the two variables that find the agent.
    for i, container in enumerate(containers):
        base = f"/spec/containers/{i}"
        env = _named(_as_list(container.get("env"), f"containers[{i}].env"),
                     f"containers[{i}].env")
        have = {e["name"] for e in env}
        add_env = [{"name": name, "value": value}
                   for name, value in (("FLUX_AGENT_SOCKET", SOCKET_PATH),
                                       ("FLUX_AGENT_URL", EVENT_URL))
                   if name not in have]
        ops.extend(_append(base + "/env", container.get("env") is not None, add_env))
        mounts = _named(_as_list(container.get("volumeMounts"), f"containers[{i}].volumeMounts"),
                        f"containers[{i}].volumeMounts")
        if any(str(m.get("mountPath", "")).rstrip("/") == SOCKET_DIR for m in mounts):
            raise InjectionError(f"container {container['name']} already mounts something at "
                                 f"{SOCKET_DIR}")
        ops.extend(_append(base + "/volumeMounts", container.get("volumeMounts") is not None,
                           [{"name": SOCKET_VOLUME, "mountPath": SOCKET_DIR}]))

    # The agent itself.
    agent = agent_container(plan, config, state_volume)
    if plan.mode == "native":
        # Appended: existing init containers (network or volume setup) run before it.
        ops.extend(_append("/spec/initContainers",
                           spec.get("initContainers") is not None, [agent]))
    else:
        # First: kubelet starts containers in order and waits for each postStart hook.
        ops.append({"op": "add", "path": "/spec/containers/0", "value": agent})
    return ops


def _append(path: str, exists: bool, items: Sequence[Any]) -> list[dict[str, Any]]:
    if not items:
        return []
    if not exists:
        return [{"op": "add", "path": path, "value": list(items)}]
    return [{"op": "add", "path": path + "/-", "value": item} for item in items]


# --------------------------------------------------------------------------- applying a patch


def apply_patch(document: Any, patch: Sequence[Mapping[str, Any]]) -> Any:
    """Apply an RFC 6902 patch (with the ``jsonpatch`` library when installed)."""
    try:
        jsonpatch: Any = importlib.import_module("jsonpatch")
    except ImportError:
        return _apply_patch(document, patch)
    return jsonpatch.apply_patch(document, list(patch), in_place=False)


def _apply_patch(document: Any, patch: Sequence[Mapping[str, Any]]) -> Any:
    """The subset of RFC 6902 this module emits: ``add``, ``remove``, ``replace``."""
    doc = copy.deepcopy(document)
    for op in patch:
        parts = [p.replace("~1", "/").replace("~0", "~") for p in op["path"].split("/")[1:]]
        if not parts:
            if op["op"] in ("add", "replace"):
                doc = copy.deepcopy(op["value"])
                continue
            raise ValueError("cannot remove the whole document")
        parent = doc
        for part in parts[:-1]:
            parent = parent[int(part)] if isinstance(parent, list) else parent[part]
        last = parts[-1]
        if op["op"] == "add":
            value = copy.deepcopy(op["value"])
            if isinstance(parent, list):
                index = len(parent) if last == "-" else int(last)
                if not 0 <= index <= len(parent):
                    raise ValueError(f"index out of range: {op['path']}")
                parent.insert(index, value)
            else:
                parent[last] = value
        elif op["op"] == "replace":
            if isinstance(parent, list):
                parent[int(last)] = copy.deepcopy(op["value"])
            else:
                if last not in parent:
                    raise ValueError(f"nothing to replace at {op['path']}")
                parent[last] = copy.deepcopy(op["value"])
        elif op["op"] == "remove":
            if isinstance(parent, list):
                del parent[int(last)]
            else:
                del parent[last]
        else:
            raise ValueError(f"unsupported patch operation {op['op']!r}")
    return doc


# --------------------------------------------------------------------------- AdmissionReview


@dataclass(slots=True)
class Outcome:
    """What the injector decided for one pod."""

    result: str  # injected | skipped | failed_open | denied
    patch: list[dict[str, Any]]
    warnings: list[str]
    message: str = ""

    @property
    def allowed(self) -> bool:
        return self.result != "denied"


def decide(pod: Any, config: InjectorConfig, namespace: str = "") -> Outcome:
    """Build the patch, applying the fail-open / fail-closed policy to errors."""
    try:
        try:
            patch = build_patch(pod, config, namespace)
        except InjectionError:
            raise
        except (TypeError, AttributeError, KeyError, IndexError, ValueError) as exc:
            # A shape this module did not anticipate: still the pod's fault, not ours.
            log.warning("unexpected pod shape", exc_info=True)
            raise InjectionError(f"malformed pod ({type(exc).__name__}: {exc})") from None
    except InjectionError as exc:
        message = f"flux-agent not injected: {exc}"
        if config.fail_closed:
            return Outcome("denied", [], [], message)
        patch = []
        if isinstance(pod, Mapping) and isinstance(pod.get("metadata"), dict):
            annotations = pod["metadata"].get("annotations")
            if annotations is None:
                patch = [{"op": "add", "path": "/metadata/annotations",
                          "value": {ANNOTATION_ERROR: str(exc)[:1000]}}]
            elif isinstance(annotations, dict):
                patch = [{"op": "add",
                          "path": _pointer("metadata", "annotations", ANNOTATION_ERROR),
                          "value": str(exc)[:1000]}]
        return Outcome("failed_open", patch, [message[:250]], message)
    if not patch:
        return Outcome("skipped", [], [])
    return Outcome("injected", patch, advice(pod))


def advice(pod: Mapping[str, Any]) -> list[str]:
    """Warnings for an injected pod that will probably work, but not well."""
    out = []
    metadata = pod.get("metadata") or {}
    annotations = metadata.get("annotations") or {}
    spec = pod.get("spec") or {}
    security = spec.get("securityContext") or {}
    if annotations.get(ANNOTATION_SPOOL_PVC) and security.get("fsGroup") is None:
        out.append(f"flux-agent: {ANNOTATION_SPOOL_PVC} without spec.securityContext.fsGroup: "
                   f"the agent (uid {AGENT_UID}) may not be allowed to write the claim; "
                   f"set fsGroup: {AGENT_UID}")
    return out


def parse_review(review: Any) -> dict[str, Any]:
    """The ``request`` of an AdmissionReview, checked; raises :class:`MalformedReview`."""
    if not isinstance(review, dict):
        raise MalformedReview("the body must be a JSON object (an AdmissionReview)")
    if review.get("apiVersion") != ADMISSION_API or review.get("kind") != "AdmissionReview":
        raise MalformedReview(f"expected apiVersion {ADMISSION_API} and kind AdmissionReview, "
                              f"got {review.get('apiVersion')!r} {review.get('kind')!r}")
    request = review.get("request")
    if not isinstance(request, dict):
        raise MalformedReview("the AdmissionReview has no request")
    uid = request.get("uid")
    if not isinstance(uid, str) or not uid:
        raise MalformedReview("request.uid is missing")
    return request


def admission_response(review: Any, config: InjectorConfig) -> tuple[dict[str, Any], Outcome]:
    """Answer an AdmissionReview request (raises :class:`MalformedReview`)."""
    request = parse_review(review)
    kind = request.get("kind")
    is_pod = isinstance(kind, dict) and kind.get("group", "") == "" and kind.get("kind") == "Pod"
    operation = request.get("operation", "CREATE")
    if not is_pod or operation != "CREATE":
        outcome = Outcome("skipped", [], [])
    else:
        namespace = request.get("namespace")
        outcome = decide(request.get("object"), config,
                         namespace if isinstance(namespace, str) else "")
    response: dict[str, Any] = {"uid": request["uid"], "allowed": outcome.allowed}
    if outcome.patch:
        response["patchType"] = "JSONPatch"
        response["patch"] = base64.b64encode(
            json.dumps(outcome.patch, separators=(",", ":")).encode()).decode()
    if outcome.warnings:
        response["warnings"] = outcome.warnings
    if not outcome.allowed:
        response["status"] = {"code": 403, "reason": "Forbidden",
                              "message": outcome.message}
    return {"apiVersion": ADMISSION_API, "kind": "AdmissionReview",
            "response": response}, outcome


def review_for(pod: Mapping[str, Any], namespace: str = "", uid: str = "flux-agent-cli"
               ) -> dict[str, Any]:
    """A CREATE AdmissionReview for ``pod``, as the API server would send it."""
    metadata = pod.get("metadata")
    ns = namespace or (metadata.get("namespace") if isinstance(metadata, dict) else "") \
        or "default"
    return {
        "apiVersion": ADMISSION_API,
        "kind": "AdmissionReview",
        "request": {
            "uid": uid,
            "kind": {"group": "", "version": "v1", "kind": "Pod"},
            "resource": {"group": "", "version": "v1", "resource": "pods"},
            "requestKind": {"group": "", "version": "v1", "kind": "Pod"},
            "operation": "CREATE",
            "namespace": ns,
            "object": pod,
            "dryRun": False,
        },
    }


@dataclass(slots=True)
class Injected:
    pod: dict[str, Any]
    patch: list[dict[str, Any]]
    outcome: Outcome


def inject_pod(pod: Mapping[str, Any], config: InjectorConfig, namespace: str = "") -> Injected:
    """The webhook's answer for ``pod``, applied: the same code path as ``POST /mutate``."""
    answer, outcome = admission_response(review_for(pod, namespace), config)
    response = answer["response"]
    patch: list[dict[str, Any]] = []
    if "patch" in response:
        patch = json.loads(base64.b64decode(response["patch"]))
    mutated = apply_patch(dict(pod), patch) if patch else copy.deepcopy(dict(pod))
    return Injected(mutated, patch, outcome)


def mutate_pod(pod: dict[str, Any], config: InjectorConfig, namespace: str = ""
               ) -> dict[str, Any]:
    """The pod as the webhook would admit it. Raises :class:`InjectionError` if the webhook
    would refuse it (fail closed)."""
    result = inject_pod(pod, config, namespace)
    if not result.outcome.allowed:
        raise InjectionError(result.outcome.message)
    return result.pod


# --------------------------------------------------------------------------- HTTPS server


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
                 metrics_host: str | None = None, reload_interval: float = 10.0) -> None:
        self.config = config
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
                answer, outcome = admission_response(review, self.config)
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
        self.port = _bound_port(site)
        if self.metrics_port is not None:
            side_runner = web.AppRunner(side, access_log=None, handle_signals=False)
            await side_runner.setup()
            self._runners.append(side_runner)
            side_site = web.TCPSite(side_runner, self.metrics_host, self.metrics_port,
                                    reuse_address=True)
            await side_site.start()
            self.metrics_port = _bound_port(side_site)
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

    async def __aenter__(self) -> WebhookServer:
        await self.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.stop()


def _bound_port(site: Any) -> int:
    server = site._server  # aiohttp keeps the asyncio server here; the port may be ephemeral
    sockets = getattr(server, "sockets", None) or []
    return int(sockets[0].getsockname()[1])


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


# --------------------------------------------------------------------------- command line


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


def _parse_bool(text: str) -> bool:
    lowered = text.strip().lower()
    if lowered in ("1", "true", "yes", "on"):
        return True
    if lowered in ("0", "false", "no", "off"):
        return False
    raise ValueError(f"expected true or false, got {text!r}")


_WORKLOAD_TEMPLATE: dict[str, tuple[str, ...]] = {
    "Deployment": ("spec", "template"),
    "StatefulSet": ("spec", "template"),
    "DaemonSet": ("spec", "template"),
    "ReplicaSet": ("spec", "template"),
    "Job": ("spec", "template"),
    "CronJob": ("spec", "jobTemplate", "spec", "template"),
}


def _inject_document(doc: Any, config: InjectorConfig, namespace: str, force: bool,
                     warn: Callable[[str], None]) -> tuple[Any, list[dict[str, Any]]]:
    """Inject a Pod, or the pod template of a workload (Deployment, Job, ...)."""
    if not isinstance(doc, dict):
        raise InjectionError("a document is not a Kubernetes object")
    kind = doc.get("kind")
    path: tuple[str, ...] = ()
    if kind in _WORKLOAD_TEMPLATE:
        path = _WORKLOAD_TEMPLATE[str(kind)]
    elif kind != "Pod":
        warn(f"{kind or 'an object without a kind'}: not a pod or a workload; left as is")
        return doc, []
    node: Any = doc
    for part in path:
        node = node.get(part) if isinstance(node, dict) else None
    if not isinstance(node, dict):
        raise InjectionError(f"the {kind} has no pod template")
    pod: dict[str, Any] = node
    if force:
        pod = copy.deepcopy(pod)
        meta = pod.setdefault("metadata", {})
        if not isinstance(meta, dict):
            raise InjectionError("metadata must be an object")
        labels = meta.get("labels")
        if labels is None:
            meta["labels"] = {INJECT_LABEL: "true"}
        elif isinstance(labels, dict):
            labels[INJECT_LABEL] = "true"
    doc_ns = doc.get("metadata", {}).get("namespace") if isinstance(doc.get("metadata"),
                                                                     dict) else None
    result = inject_pod(pod, config, namespace or doc_ns or "")
    for message in result.outcome.warnings:
        warn(message)
    if not result.outcome.allowed:
        raise InjectionError(result.outcome.message)
    reason = skip_reason(pod, config, namespace or doc_ns or "")
    if result.outcome.result == "skipped" and reason:
        warn(f"{kind} {doc.get('metadata', {}).get('name', '')}: not injected: {reason}")
    if not path:
        return result.pod, result.patch
    out = copy.deepcopy(doc)
    target: Any = out
    for part in path[:-1]:
        target = target[part]
    target[path[-1]] = result.pod
    return out, result.patch


def _load_documents(text: str, fmt: str) -> tuple[list[Any], str]:
    stripped = text.lstrip()
    if fmt == "json" or (fmt == "auto" and stripped.startswith(("{", "["))):
        doc = json.loads(text)
        docs = doc.get("items") if isinstance(doc, dict) and doc.get("kind") == "List" else None
        return (docs if isinstance(docs, list) else [doc]), "json"
    yaml = _yaml()
    try:
        return [d for d in yaml.safe_load_all(text) if d is not None], "yaml"
    except yaml.YAMLError as exc:
        raise ValueError(str(exc)) from None


def _yaml() -> Any:
    try:
        return importlib.import_module("yaml")
    except ImportError:
        raise InjectionError("reading YAML needs PyYAML (pip install pyyaml); or pass JSON") \
            from None


def _dump(docs: Sequence[Any], fmt: str) -> str:
    if fmt == "json":
        if len(docs) == 1:
            return json.dumps(docs[0], indent=2) + "\n"
        return json.dumps({"apiVersion": "v1", "kind": "List", "items": list(docs)},
                          indent=2) + "\n"
    yaml = _yaml()
    return str(yaml.safe_dump_all(list(docs), sort_keys=False, default_flow_style=False))


def cli_inject(argv: Sequence[str], *, stdin: Any = None, stdout: Any = None,
               stderr: Any = None, environ: Mapping[str, str] | None = None) -> int:
    """``flux-agent inject POD_FILE``: print the pod (or workload) as the webhook would admit
    it. Exit 0 when done, 78 on a bad option, 1 when the webhook would refuse the pod."""
    stdin = stdin or sys.stdin
    stdout = stdout or sys.stdout
    stderr = stderr or sys.stderr
    parser = argparse.ArgumentParser(
        prog="flux-agent inject",
        description="Show what the sidecar injector does to a Pod or a workload's pod "
                    "template (YAML or JSON; - for stdin).")
    parser.add_argument("file", metavar="POD_FILE", help="YAML or JSON file, - for stdin")
    parser.add_argument("--namespace", "-n", default="", help="namespace the pod is created in")
    parser.add_argument("--force", action="store_true",
                        help=f"inject even without the {INJECT_LABEL}=true label")
    parser.add_argument("--patch", action="store_true",
                        help="print the JSON Patch instead of the mutated object")
    parser.add_argument("--output", "-o", choices=["auto", "json", "yaml"], default="auto",
                        help="output format (auto: as the input)")
    parser.add_argument("--input-format", choices=["auto", "json", "yaml"], default="auto")
    _add_config_flags(parser)
    try:
        args = parser.parse_args(list(argv))
    except SystemExit as exc:
        return EXIT_OK if exc.code == 0 else EXIT_CONFIG
    try:
        config = config_from(args, os.environ if environ is None else environ)
    except ValueError as exc:
        print(f"flux-agent inject: configuration error: {exc}", file=stderr)
        return EXIT_CONFIG
    try:
        text = stdin.read() if args.file == "-" else Path(args.file).read_text()
    except OSError as exc:
        print(f"flux-agent inject: cannot read {args.file}: {exc.strerror}", file=stderr)
        return EXIT_FAILURE

    def warn(message: str) -> None:
        print(f"flux-agent inject: warning: {message}", file=stderr)

    try:
        docs, fmt = _load_documents(text, args.input_format)
        outputs: list[Any] = []
        patches: list[Any] = []
        for doc in docs:
            out, patch = _inject_document(doc, config, args.namespace, args.force, warn)
            outputs.append(out)
            patches.append(patch)
    except InjectionError as exc:
        print(f"flux-agent inject: {exc}", file=stderr)
        return EXIT_FAILURE
    except ValueError as exc:  # JSON or YAML syntax
        print(f"flux-agent inject: cannot parse {args.file}: {exc}", file=stderr)
        return EXIT_FAILURE
    out_fmt = fmt if args.output == "auto" else args.output
    if args.patch:
        stdout.write(json.dumps(patches[0] if len(patches) == 1 else patches, indent=2) + "\n")
    else:
        stdout.write(_dump(outputs, out_fmt))
    return EXIT_OK


@dataclass(frozen=True)
class WebhookPlan:
    """What ``flux-agent inject-webhook`` serves, once its arguments were checked."""

    config: InjectorConfig
    host: str
    port: int
    cert: str
    key: str
    metrics_port: int | None
    grace: float
    log_level: str


def prepare_webhook(argv: Sequence[str], *, environ: Mapping[str, str] | None = None
                    ) -> WebhookPlan | int:
    """Parse and check ``flux-agent inject-webhook --cert F --key F [--port 8443]``.

    Returns the plan to serve, or an exit code (0 after ``--help``, 78 on bad configuration
    including a missing or unusable certificate). ``cli.py`` serves the plan until
    SIGTERM/SIGINT."""
    environ = os.environ if environ is None else environ
    parser = argparse.ArgumentParser(
        prog="flux-agent inject-webhook",
        description="Serve the sidecar-injection admission webhook (POST /mutate) over HTTPS.")
    parser.add_argument("--cert", default=environ.get("FLUX_INJECTOR_CERT"),
                        help="PEM certificate (chain) [env FLUX_INJECTOR_CERT]")
    parser.add_argument("--key", default=environ.get("FLUX_INJECTOR_KEY"),
                        help="PEM private key [env FLUX_INJECTOR_KEY]")
    parser.add_argument("--host", default=environ.get("FLUX_INJECTOR_HOST", "0.0.0.0"))
    parser.add_argument("--port", default=environ.get("FLUX_INJECTOR_PORT", "8443"))
    parser.add_argument("--metrics-port", default=environ.get("FLUX_INJECTOR_METRICS_PORT"),
                        help="plain-HTTP port for /metrics and /healthz (unset: off)")
    parser.add_argument("--shutdown-grace", default=environ.get(
        "FLUX_INJECTOR_SHUTDOWN_GRACE", "3"),
                        help="seconds to keep answering after SIGTERM (endpoint removal)")
    parser.add_argument("--log-level", default=environ.get("FLUX_INJECTOR_LOG_LEVEL", "info"),
                        choices=["debug", "info", "warning", "error"])
    _add_config_flags(parser)
    try:
        args = parser.parse_args(list(argv))
    except SystemExit as exc:
        return EXIT_OK if exc.code == 0 else EXIT_CONFIG

    def config_error(message: str) -> int:
        print(f"flux-agent inject-webhook: configuration error: {message}", file=sys.stderr)
        return EXIT_CONFIG

    try:
        config = config_from(args, environ)
    except ValueError as exc:
        return config_error(str(exc))
    if not args.cert or not args.key:
        return config_error("--cert and --key are required (a PEM certificate and its key)")
    for flag, path in (("--cert", args.cert), ("--key", args.key)):
        if not os.path.isfile(path):
            return config_error(f"{flag}: no such file: {path}")
    try:
        tls_context(args.cert, args.key)
    except (OSError, ssl.SSLError) as exc:
        return config_error(f"--cert/--key: cannot load the certificate: {exc}")
    try:
        port = _port(args.port, "--port")
        metrics_port = _port(args.metrics_port, "--metrics-port") \
            if args.metrics_port not in (None, "", "off") else None
        grace = float(args.shutdown_grace)
    except ValueError as exc:
        return config_error(str(exc))

    return WebhookPlan(config, args.host, port, args.cert, args.key, metrics_port, grace,
                       args.log_level)


def _port(raw: Any, flag: str) -> int:
    try:
        port = int(raw)
    except (TypeError, ValueError):
        raise ValueError(f"{flag}: expected a port number, got {raw!r}") from None
    if not 0 <= port <= 65535:
        raise ValueError(f"{flag}: port out of range: {port}")
    return port


__all__ = [
    "ANNOTATION_AGENCY",
    "ANNOTATION_CPU",
    "ANNOTATION_IMAGE",
    "ANNOTATION_MEMORY",
    "ANNOTATION_SIDECAR_MODE",
    "ANNOTATION_SPOOL_PVC",
    "ANNOTATION_SPOOL_SIZE",
    "INJECT_LABEL",
    "InjectionError",
    "InjectorConfig",
    "MalformedReview",
    "WebhookPlan",
    "WebhookServer",
    "admission_response",
    "apply_patch",
    "build_patch",
    "cli_inject",
    "mutate_pod",
    "prepare_webhook",
    "serve_webhook",
]

