"""The pod patch: a pure function from a pod and the injector's configuration to the RFC
6902 JSON Patch that adds the agent (:func:`build_patch`); ``admission`` applies it."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from ..core.settings import AGENCY_SLUG
from .binding import bind, binds
from .config import (
    _DNS_SUBDOMAIN,
    ADMIN_PORT,
    ADMIN_PORT_NAME,
    AGENT_CONTAINER,
    ALWAYS_EXCLUDED,
    ANNOTATION_AGENCY,
    ANNOTATION_CPU,
    ANNOTATION_ERROR,
    ANNOTATION_IMAGE,
    ANNOTATION_INJECTED,
    ANNOTATION_MEMORY,
    ANNOTATION_SIDECAR_MODE,
    ANNOTATION_SPOOL_PVC,
    ANNOTATION_SPOOL_SIZE,
    DATABASE_DIR,
    DATABASE_FILE,
    DATABASE_VOLUME,
    DEFAULT_CONTAINER_ANNOTATION,
    EVENT_LISTEN,
    EVENT_URL,
    INJECT_LABEL,
    JWKS_DIR,
    JWKS_VOLUME,
    SIDECAR_MODES,
    SOCKET_DIR,
    SOCKET_PATH,
    SOCKET_VOLUME,
    STATE_DIR,
    STATE_VOLUME,
    TOKEN_AUDIENCE,
    TOKEN_DIR,
    TOKEN_SECONDS,
    TOKEN_VOLUME,
    UPSTREAM_AUDIENCE,
    UPSTREAM_CA_DIR,
    UPSTREAM_CA_FILE,
    UPSTREAM_CA_KEY,
    UPSTREAM_CA_VOLUME,
    UPSTREAM_TOKEN_DIR,
    UPSTREAM_TOKEN_FILE,
    UPSTREAM_TOKEN_VOLUME,
    InjectionError,
    InjectorConfig,
    _check_image,
    parse_quantity,
    spool_bytes,
)

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


def _plan(annotations: Mapping[str, Any], config: InjectorConfig, namespace: str,
          namespace_annotations: Mapping[str, Any] | None) -> _Plan:
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
    requested_image = get(ANNOTATION_IMAGE) if config.allow_image_override else None
    image = _check_image(requested_image or config.image, f"annotation {ANNOTATION_IMAGE}")
    agency = get(ANNOTATION_AGENCY) or ""
    if agency and not AGENCY_SLUG.match(agency):
        raise InjectionError(f"annotation {ANNOTATION_AGENCY}: {agency!r} is not an agency slug")
    if binds(config):
        agency = bind(agency, namespace, config, namespace_annotations)
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


def uses_database(config: InjectorConfig) -> bool:
    """Whether sidecars write to PostgreSQL themselves (and so hold its credentials)."""
    return config.upstream == "database"


def agent_container(plan: _Plan, config: InjectorConfig, state_volume: str,
                    namespace: str = "") -> dict[str, Any]:
    """The ``flux-agent`` container for this plan. Where pods are bound to their namespace's
    agency, the settings that decide who writes as what are plain ``env`` (which wins over
    the namespace's ConfigMap, which the pod's author may be able to edit)."""
    env: list[dict[str, Any]] = []
    if uses_database(config):
        # The URL holds the password: a file from the Secret, read by the agent alone, never
        # an environment variable (which `kubectl describe`, crash dumps and every child
        # process see).
        env.append({"name": "FLUX_AGENT_DATABASE_URL_FILE", "value": DATABASE_FILE})
    if config.aggregator_url:
        # To the aggregators: every record (upstream aggregator), or at a pod's end what the
        # drain could not deliver to PostgreSQL (handoff).
        env.append({"name": "FLUX_AGENT_UPSTREAM" if config.upstream == "aggregator"
                    else "FLUX_AGENT_HANDOFF", "value": config.aggregator_url})
        env.append({"name": "FLUX_AGENT_UPSTREAM_TOKEN_FILE", "value": UPSTREAM_TOKEN_FILE})
        if config.aggregator_ca_configmap:
            env.append({"name": "FLUX_AGENT_UPSTREAM_CA_FILE", "value": UPSTREAM_CA_FILE})
    env.extend([
        {"name": "FLUX_AGENT_STATE_DIR", "value": STATE_DIR},
        {"name": "FLUX_AGENT_SOCKET", "value": SOCKET_PATH},
        {"name": "FLUX_AGENT_LISTEN", "value": EVENT_LISTEN},
        {"name": "FLUX_AGENT_ADMIN_LISTEN", "value": f"0.0.0.0:{ADMIN_PORT}"},
        {"name": "FLUX_AGENT_SPOOL_MAX_BYTES", "value": str(plan.spool_max)},
    ])
    if binds(config):
        env.append({"name": "FLUX_AGENT_AUTH", "value": config.agent_auth})
    if config.agent_auth == "kubernetes":
        env.extend([
            {"name": "FLUX_AGENT_KUBE_BINDINGS", "value": f"{namespace}={plan.agency}"},
            {"name": "FLUX_AGENT_JWT_ISSUERS", "value": config.kube_issuer},
            {"name": "FLUX_AGENT_JWT_AUDIENCE", "value": TOKEN_AUDIENCE},
        ])
    elif plan.agency:
        env.append({"name": "FLUX_AGENT_AGENCY", "value": plan.agency})
    mounts: list[dict[str, Any]] = [
        {"name": SOCKET_VOLUME, "mountPath": SOCKET_DIR},
        {"name": state_volume, "mountPath": STATE_DIR},
    ]
    if uses_database(config):
        mounts.append({"name": DATABASE_VOLUME, "mountPath": DATABASE_DIR, "readOnly": True})
    if config.aggregator_url:
        mounts.append({"name": UPSTREAM_TOKEN_VOLUME, "mountPath": UPSTREAM_TOKEN_DIR,
                       "readOnly": True})
        if config.aggregator_ca_configmap:
            mounts.append({"name": UPSTREAM_CA_VOLUME, "mountPath": UPSTREAM_CA_DIR,
                           "readOnly": True})
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


def build_patch(pod: Mapping[str, Any], config: InjectorConfig, namespace: str = "",
                namespace_annotations: Mapping[str, Any] | None = None
                ) -> list[dict[str, Any]]:
    """The RFC 6902 patch that injects the agent into ``pod``; ``[]`` when it is not to be
    injected (no opt-in label, excluded namespace, already injected).

    Pure: reads ``pod``, ``config`` and the annotations of the pod's Namespace (when the
    caller looked them up). Raises :class:`InjectionError` for a bad annotation or a
    malformed pod, :class:`~flux_agent.kube.binding.BindingError` for an agency the pod's
    namespace is not bound to. Arrays the pod lacks are added whole; arrays it has are
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
    namespace = namespace or str(metadata.get("namespace") or "")
    plan = _plan(annotations, config, namespace, namespace_annotations)

    volume_names = {v["name"] for v in volumes}
    for taken in (SOCKET_VOLUME, STATE_VOLUME, JWKS_VOLUME, TOKEN_VOLUME, DATABASE_VOLUME,
                  UPSTREAM_TOKEN_VOLUME, UPSTREAM_CA_VOLUME):
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
    if uses_database(config):
        # The database URL, as one file mounted into the agent container only.
        # World-readable inside that container: a Secret volume's files belong to root (or to
        # the pod's fsGroup, which is the app's to choose), and the agent runs as its own uid.
        new_volumes.append({"name": DATABASE_VOLUME, "secret": {
            "secretName": config.database_secret,
            "items": [{"key": config.database_secret_key,
                       "path": DATABASE_FILE.rsplit("/", 1)[1]}],
            "defaultMode": 0o444}})
    if config.aggregator_url:
        # The pod's own service-account token for the aggregators' audience (the kubelet
        # rotates it; the aggregator maps its namespace to the agencies it may write), and
        # the CA that signed the aggregators' certificate.
        new_volumes.append({"name": UPSTREAM_TOKEN_VOLUME, "projected": {
            "sources": [{"serviceAccountToken": {"audience": UPSTREAM_AUDIENCE, "path": "token",
                                                 "expirationSeconds": TOKEN_SECONDS}}],
            "defaultMode": 0o444}})
        if config.aggregator_ca_configmap:
            new_volumes.append({"name": UPSTREAM_CA_VOLUME, "configMap": {
                "name": config.aggregator_ca_configmap,
                "items": [{"key": UPSTREAM_CA_KEY, "path": UPSTREAM_CA_KEY}]}})
    if config.jwks_configmap:
        new_volumes.append({"name": JWKS_VOLUME,
                            "configMap": {"name": config.jwks_configmap}})
    kube_identity = config.agent_auth == "kubernetes"
    if kube_identity:
        # The app's own service-account token, for the agent's audience only, rotated by
        # the kubelet: the client re-reads FLUX_AGENT_TOKEN_FILE when it changes.
        new_volumes.append({"name": TOKEN_VOLUME, "projected": {"sources": [
            {"serviceAccountToken": {"audience": TOKEN_AUDIENCE, "path": "token",
                                     "expirationSeconds": TOKEN_SECONDS}}]}})
    ops.extend(_append("/spec/volumes", "volumes" in spec and spec["volumes"] is not None,
                       new_volumes))

    # App containers: the socket mount and the two variables that find the agent.
    for i, container in enumerate(containers):
        base = f"/spec/containers/{i}"
        env = _named(_as_list(container.get("env"), f"containers[{i}].env"),
                     f"containers[{i}].env")
        have = {e["name"] for e in env}
        wanted = [("FLUX_AGENT_SOCKET", SOCKET_PATH), ("FLUX_AGENT_URL", EVENT_URL)]
        if kube_identity:
            wanted.append(("FLUX_AGENT_TOKEN_FILE", f"{TOKEN_DIR}/token"))
        add_env = [{"name": name, "value": value} for name, value in wanted if name not in have]
        ops.extend(_append(base + "/env", container.get("env") is not None, add_env))
        mounts = _named(_as_list(container.get("volumeMounts"), f"containers[{i}].volumeMounts"),
                        f"containers[{i}].volumeMounts")
        new_mounts: list[dict[str, Any]] = [{"name": SOCKET_VOLUME, "mountPath": SOCKET_DIR}]
        if kube_identity:
            new_mounts.append({"name": TOKEN_VOLUME, "mountPath": TOKEN_DIR, "readOnly": True})
        for mount in new_mounts:
            if any(str(m.get("mountPath", "")).rstrip("/") == mount["mountPath"]
                   for m in mounts):
                raise InjectionError(f"container {container['name']} already mounts "
                                     f"something at {mount['mountPath']}")
        ops.extend(_append(base + "/volumeMounts", container.get("volumeMounts") is not None,
                           new_mounts))

    # The agent itself.
    agent = agent_container(plan, config, state_volume, namespace)
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
