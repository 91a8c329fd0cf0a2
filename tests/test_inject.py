"""Sidecar injection: real AdmissionReview requests, the JSON Patch applied with the jsonpatch
library, and the result validated strictly against the Kubernetes 1.29 and 1.33 schemas; the
HTTPS webhook server over real TLS; the `inject` and `inject-webhook` command lines."""

from __future__ import annotations

import asyncio
import base64
import copy
import datetime as dt
import io
import ipaddress
import json
import os
import signal
import socket
import ssl
import subprocess
import sys
import tempfile
import time
from decimal import Decimal
from pathlib import Path
from typing import Any

import aiohttp
import aiohttp.web
import jsonpatch
import kubernetes_validate
import pytest
import yaml
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from flux_agent.core.settings import load_config
from flux_agent.kube import patch as kube_patch
from flux_agent.kube.admission import (
    MalformedReview,
    _apply_patch,
    admission_response,
    advice,
    mutate_pod,
)
from flux_agent.kube.cli import cli_inject, prepare_webhook
from flux_agent.kube.config import (
    AGENT_CONTAINER,
    InjectionError,
    InjectorConfig,
    parse_quantity,
    spool_bytes,
)
from flux_agent.kube.patch import build_patch
from flux_agent.kube.webhook import NamespaceReader, WebhookServer

KUBE_VERSIONS = ("1.29.0", "1.33.0")
# Pods are bound to their namespace's agency: these tests' namespaces may write as either.
BOUND = (("etl", ("nasa", "noaa")), ("batch", ("nasa",)), ("*", ("nasa", "noaa")))
CONFIG = InjectorConfig(image="registry.example/flux-agent:0.1.0", agency_bindings=BOUND)


def cfg(**options: Any) -> InjectorConfig:
    return InjectorConfig(**{"agency_bindings": BOUND, **options})


# --------------------------------------------------------------------------- pods


def deployment_pod() -> dict[str, Any]:
    """A pod as a ReplicaSet controller creates it from a Deployment's template: no name
    yet (generateName), no namespace in the object (it is in the request)."""
    return {
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {
            "generateName": "extract-7d9f8b6c5-",
            "labels": {"app": "extract", "pod-template-hash": "7d9f8b6c5",
                       "flux.io/inject": "true"},
            "annotations": {"flux.io/agency": "nasa"},
            "ownerReferences": [{"apiVersion": "apps/v1", "kind": "ReplicaSet",
                                 "name": "extract-7d9f8b6c5", "uid": "5f1d0c1e-0000-4000-8000-"
                                 "000000000001", "controller": True,
                                 "blockOwnerDeletion": True}],
        },
        "spec": {
            "serviceAccountName": "etl",
            "containers": [
                {"name": "extract", "image": "registry.example/etl/extract:2.4.1",
                 "args": ["--source", "s3://bucket/in"],
                 "env": [{"name": "LOG_LEVEL", "value": "info"}],
                 "volumeMounts": [{"name": "scratch", "mountPath": "/scratch"}],
                 "resources": {"requests": {"cpu": "500m", "memory": "1Gi"},
                               "limits": {"memory": "1Gi"}}},
                {"name": "uploader", "image": "registry.example/etl/uploader:1.0"},
            ],
            "volumes": [{"name": "scratch", "emptyDir": {}}],
            "restartPolicy": "Always",
            "terminationGracePeriodSeconds": 30,
        },
    }


def job_pod() -> dict[str, Any]:
    return {
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {
            "generateName": "nightly-2026-11-23-",
            "labels": {"batch.kubernetes.io/job-name": "nightly-2026-11-23",
                       "job-name": "nightly-2026-11-23", "flux.io/inject": "true"},
            "annotations": {"flux.io/agency": "noaa", "flux.io/spool-size": "2Gi",
                            "flux.io/cpu": "100m/500m", "flux.io/memory": "512Mi"},
        },
        "spec": {
            "restartPolicy": "Never",
            "containers": [{"name": "job", "image": "registry.example/etl/nightly:5",
                            "command": ["python", "-m", "nightly"]}],
        },
    }


def busy_pod() -> dict[str, Any]:
    """Existing init containers, volumes, a pod security context and supplemental groups."""
    return {
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {"name": "busy", "namespace": "etl",
                     "labels": {"flux.io/inject": "true"}},
        "spec": {
            "securityContext": {"runAsNonRoot": True, "runAsUser": 2000, "fsGroup": 2000,
                                "supplementalGroups": [3000]},
            "initContainers": [{"name": "fetch-config", "image": "busybox:1.36",
                                "command": ["true"],
                                "volumeMounts": [{"name": "config", "mountPath": "/config"}]}],
            "containers": [{"name": "app", "image": "registry.example/app:1",
                            "env": [{"name": "FLUX_AGENT_URL",
                                     "value": "http://127.0.0.1:8787"}],
                            "volumeMounts": [{"name": "config", "mountPath": "/config"}]}],
            "volumes": [{"name": "config", "emptyDir": {}}],
        },
    }


def review(pod: dict[str, Any], namespace: str = "etl", uid: str = "0c6a4f2e-uid",
           operation: str = "CREATE") -> dict[str, Any]:
    """An AdmissionReview as the API server sends it."""
    return {
        "apiVersion": "admission.k8s.io/v1",
        "kind": "AdmissionReview",
        "request": {
            "uid": uid,
            "kind": {"group": "", "version": "v1", "kind": "Pod"},
            "resource": {"group": "", "version": "v1", "resource": "pods"},
            "requestKind": {"group": "", "version": "v1", "kind": "Pod"},
            "requestResource": {"group": "", "version": "v1", "resource": "pods"},
            "name": pod.get("metadata", {}).get("name", ""),
            "namespace": namespace,
            "operation": operation,
            "userInfo": {"username": "system:serviceaccount:kube-system:replicaset-controller",
                         "groups": ["system:serviceaccounts", "system:authenticated"]},
            "object": pod,
            "oldObject": None,
            "dryRun": False,
            "options": {"apiVersion": "meta.k8s.io/v1", "kind": "CreateOptions"},
        },
    }


# --------------------------------------------------------------------------- checks


def answer(pod: dict[str, Any], config: InjectorConfig = CONFIG, namespace: str = "etl"
           ) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    """The webhook's response for ``pod``, after a JSON round trip, and its decoded patch."""
    body, _ = admission_response(json.loads(json.dumps(review(pod, namespace))), config)
    body = json.loads(json.dumps(body))
    assert body["apiVersion"] == "admission.k8s.io/v1"
    assert body["kind"] == "AdmissionReview"
    response = body["response"]
    assert response["uid"] == "0c6a4f2e-uid"
    patch: list[dict[str, Any]] = []
    if "patch" in response:
        assert response["patchType"] == "JSONPatch"
        patch = json.loads(base64.b64decode(response["patch"]))
    else:
        assert "patchType" not in response
    return response, patch


def admit(pod: dict[str, Any], config: InjectorConfig = CONFIG, namespace: str = "etl",
          warnings: list[str] | None = None) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    """Inject ``pod`` through the AdmissionReview path and check the result strictly."""
    response, patch = answer(pod, config, namespace)
    assert response["allowed"] is True
    assert response.get("warnings", []) == (warnings or []), response.get("warnings")
    mutated = jsonpatch.apply_patch(pod, patch)
    # The module's own applier (used without jsonpatch) must agree with the library.
    assert _apply_patch(pod, patch) == mutated
    validate(mutated, namespace)
    return mutated, patch


def validate(pod: dict[str, Any], namespace: str = "etl") -> None:
    """Strict OpenAPI validation for every Kubernetes version, and the rules the schema
    cannot express (the API server's own validation)."""
    obj = copy.deepcopy(pod)
    obj.setdefault("metadata", {}).setdefault("namespace", namespace)
    for version in KUBE_VERSIONS:
        kubernetes_validate.validate(obj, version, strict=True)
    spec = pod["spec"]
    containers = spec["containers"]
    inits = spec.get("initContainers", [])
    names = [c["name"] for c in inits + containers]
    assert len(names) == len(set(names)), names
    volumes = [v["name"] for v in spec.get("volumes", [])]
    assert len(volumes) == len(set(volumes)), volumes
    for c in inits + containers:
        mounts = c.get("volumeMounts", [])
        assert {m["name"] for m in mounts} <= set(volumes), c["name"]
        paths = [m["mountPath"] for m in mounts]
        assert len(paths) == len(set(paths)), c["name"]
        env = [e["name"] for e in c.get("env", [])]
        assert len(env) == len(set(env)), c["name"]
        if c.get("restartPolicy") is not None:
            assert c in inits and c["restartPolicy"] == "Always"
        ports = [p["containerPort"] for p in c.get("ports", [])]
        assert len(ports) == len(set(ports))


def agents(pod: dict[str, Any]) -> list[tuple[str, int, dict[str, Any]]]:
    found = []
    for key in ("initContainers", "containers"):
        for i, c in enumerate(pod["spec"].get(key, [])):
            if c["name"] == AGENT_CONTAINER:
                found.append((key, i, c))
    return found


def the_agent(pod: dict[str, Any]) -> tuple[str, int, dict[str, Any]]:
    found = agents(pod)
    assert len(found) == 1, f"expected exactly one agent, found {len(found)}"
    return found[0]


def env_of(container: dict[str, Any]) -> dict[str, Any]:
    return {e["name"]: e.get("value", e.get("valueFrom")) for e in container.get("env", [])}


def volume(pod: dict[str, Any], name: str) -> dict[str, Any]:
    return next(v for v in pod["spec"]["volumes"] if v["name"] == name)


def assert_apps_wired(pod: dict[str, Any]) -> None:
    for c in pod["spec"]["containers"]:
        if c["name"] == AGENT_CONTAINER:
            continue
        env = env_of(c)
        assert env["FLUX_AGENT_SOCKET"] == "/var/run/flux-agent/agent.sock"
        assert env["FLUX_AGENT_URL"] == "http://127.0.0.1:8787"
        assert {"name": "flux-agent-socket", "mountPath": "/var/run/flux-agent"} in \
            c["volumeMounts"]


def assert_agent_starts(container: dict[str, Any], defaults: dict[str, str] | None = None
                        ) -> None:
    """The agent's own configuration loader accepts what the injector gives it (plain env
    values, the ConfigMap's defaults, the database URL the Secret would supply)."""
    environ = {"FLUX_AGENT_AUTH": "none", "FLUX_AGENT_AGENCY": "nasa", **(defaults or {})}
    for e in container["env"]:
        assert set(e) == {"name", "value"}, f"{e['name']}: not a plain value (a Secret?)"
        environ[e["name"]] = e["value"]
    assert environ["FLUX_AGENT_DATABASE_URL_FILE"] == "/etc/flux-agent/database/url"
    assert {"name": "flux-agent-database", "mountPath": "/etc/flux-agent/database",
            "readOnly": True} in container["volumeMounts"]
    with tempfile.TemporaryDirectory() as mounted:  # what the Secret volume holds
        url_file = Path(mounted) / "url"
        url_file.write_text("postgresql://sidecar:pw@db.example:5432/flux\n")
        environ["FLUX_AGENT_DATABASE_URL_FILE"] = str(url_file)
        config = load_config([], environ=environ)
    assert str.__str__(config.database_url) == "postgresql://sidecar:pw@db.example:5432/flux"
    assert config.listen == "127.0.0.1:8787"
    assert config.admin_listen == "0.0.0.0:9464"
    assert str(config.socket_path) == "/var/run/flux-agent/agent.sock"
    assert str(config.state_path) == "/var/lib/flux-agent"


# --------------------------------------------------------------------------- injection


def test_deployment_pod_gets_a_native_sidecar():
    pod = deployment_pod()
    mutated, patch = admit(pod)
    key, index, agent = the_agent(mutated)
    # No initContainers and no securityContext before: whole arrays and objects are added.
    paths = [op["path"] for op in patch]
    assert "/spec/initContainers" in paths
    assert "/spec/volumes/-" in paths  # the pod had volumes: appended
    assert "/spec/containers/0/env/-" in paths
    assert "/spec/containers/1/env" in paths  # the uploader had no env
    assert "/spec/securityContext" in paths
    assert key == "initContainers" and index == 0
    assert agent["restartPolicy"] == "Always"
    assert agent["startupProbe"]["httpGet"] == {"path": "/health/ready", "port": "flux-admin"}
    assert agent["livenessProbe"]["httpGet"]["path"] == "/health/live"
    assert agent["readinessProbe"]["httpGet"]["path"] == "/health/ready"
    assert agent["ports"] == [{"name": "flux-admin", "containerPort": 9464, "protocol": "TCP"}]
    assert "lifecycle" not in agent
    assert agent["image"] == "registry.example/flux-agent:0.1.0"
    sc = agent["securityContext"]
    assert sc["runAsNonRoot"] is True and sc["runAsUser"] == 10001
    assert sc["readOnlyRootFilesystem"] is True
    assert sc["allowPrivilegeEscalation"] is False
    assert sc["capabilities"] == {"drop": ["ALL"]}
    assert sc["seccompProfile"] == {"type": "RuntimeDefault"}
    env = env_of(agent)
    assert env["FLUX_AGENT_AGENCY"] == "nasa"
    assert env["FLUX_AGENT_SOCKET"] == "/var/run/flux-agent/agent.sock"
    assert env["FLUX_AGENT_STATE_DIR"] == "/var/lib/flux-agent"
    assert env["FLUX_AGENT_ADMIN_LISTEN"] == "0.0.0.0:9464"
    assert env["FLUX_AGENT_LISTEN"] == "127.0.0.1:8787"
    # The database URL: a file from the Secret, in the agent container alone (CKV_K8S_35).
    assert "FLUX_AGENT_DATABASE_URL" not in env
    assert env["FLUX_AGENT_DATABASE_URL_FILE"] == "/etc/flux-agent/database/url"
    assert volume(mutated, "flux-agent-database") == {"name": "flux-agent-database", "secret": {
        "secretName": "flux-agent-database", "items": [{"key": "url", "path": "url"}],
        "defaultMode": 0o444}}
    for app in mutated["spec"]["containers"]:
        assert all(m["name"] != "flux-agent-database" for m in app.get("volumeMounts", []))
    assert agent["envFrom"] == [{"configMapRef": {"name": "flux-agent-defaults"}}]
    assert agent["resources"] == {"requests": {"cpu": "50m", "memory": "128Mi"},
                                  "limits": {"memory": "256Mi"}}
    assert volume(mutated, "flux-agent-state") == {"name": "flux-agent-state",
                                                   "emptyDir": {"sizeLimit": "1Gi"}}
    assert volume(mutated, "flux-agent-socket") == {"name": "flux-agent-socket", "emptyDir": {}}
    assert mutated["spec"]["securityContext"] == {"supplementalGroups": [10001]}
    assert mutated["metadata"]["annotations"]["flux.io/injected"] == "native"
    assert_apps_wired(mutated)
    # The app's own settings are untouched.
    assert env_of(mutated["spec"]["containers"][0])["LOG_LEVEL"] == "info"
    assert_agent_starts(agent)


def test_job_pod_with_tuning_annotations():
    mutated, _ = admit(job_pod())
    _, _, agent = the_agent(mutated)
    assert agent["restartPolicy"] == "Always"  # the Job completes when its app exits
    assert mutated["spec"]["restartPolicy"] == "Never"
    env = env_of(agent)
    assert env["FLUX_AGENT_AGENCY"] == "noaa"
    two_gib = 2 * 1024**3
    assert volume(mutated, "flux-agent-state")["emptyDir"] == {"sizeLimit": "2Gi"}
    assert int(env["FLUX_AGENT_SPOOL_MAX_BYTES"]) == two_gib - two_gib // 10
    # cpu REQUEST/LIMIT; memory above the default limit becomes request and limit.
    assert agent["resources"] == {"requests": {"cpu": "100m", "memory": "512Mi"},
                                  "limits": {"cpu": "500m", "memory": "512Mi"}}
    assert mutated["metadata"]["annotations"]["flux.io/injected"] == "native"
    assert mutated["metadata"]["annotations"]["flux.io/agency"] == "noaa"
    assert_apps_wired(mutated)
    assert_agent_starts(agent)


def test_pod_with_init_containers_volumes_and_security_context():
    pod = busy_pod()
    mutated, patch = admit(pod, namespace="batch")  # one agency: no annotation needed
    paths = [op["path"] for op in patch]
    assert "/spec/initContainers/-" in paths
    assert "/spec/volumes/-" in paths
    assert "/spec/securityContext/supplementalGroups/-" in paths
    assert "/metadata/annotations" in paths  # the pod had no annotations
    inits = mutated["spec"]["initContainers"]
    # Appended: the existing init container still runs first.
    assert [c["name"] for c in inits] == ["fetch-config", AGENT_CONTAINER]
    assert mutated["spec"]["securityContext"]["supplementalGroups"] == [3000, 10001]
    assert mutated["spec"]["securityContext"]["fsGroup"] == 2000
    app = mutated["spec"]["containers"][0]
    # The app's own FLUX_AGENT_URL wins; only the socket is added.
    assert [e["name"] for e in app["env"]] == ["FLUX_AGENT_URL", "FLUX_AGENT_SOCKET"]
    assert [v["name"] for v in mutated["spec"]["volumes"]] == [
        "config", "flux-agent-socket", "flux-agent-state", "flux-agent-database"]
    assert_apps_wired(mutated)


def test_already_injected_pod_is_left_alone():
    once, _ = admit(deployment_pod())
    response, patch = answer(once)
    assert response["allowed"] is True
    assert patch == []
    # Also when only the container's name gives it away (legacy mode, or by hand).
    legacy = mutate_pod(deployment_pod(), cfg(sidecar_mode="legacy"))
    assert build_patch(legacy, CONFIG, "etl") == []
    assert len(agents(legacy)) == 1


def test_reinvocation_after_another_webhook_changed_the_pod():
    once, _ = admit(deployment_pod())
    # Another webhook appends a container; reinvocationPolicy IfNeeded calls us again.
    once["spec"]["containers"].append({"name": "proxy", "image": "envoy:1.30"})
    response, patch = answer(once)
    assert response["allowed"] is True and patch == []
    assert len(agents(once)) == 1


@pytest.mark.parametrize("namespace", ["kube-system", "kube-public"])
def test_system_namespaces_are_never_injected(namespace: str):
    pod = deployment_pod()
    response, patch = answer(pod, namespace=namespace)
    assert response["allowed"] is True
    assert patch == []
    # The namespace inside the object counts too (flux-agent inject, no request namespace).
    pod["metadata"]["namespace"] = namespace
    assert build_patch(pod, CONFIG) == []
    # Whatever the configuration lists.
    assert build_patch(pod, cfg(excluded_namespaces=("other",))) == []
    assert build_patch(pod, cfg(excluded_namespaces=("other",)), "other") == []
    assert build_patch(pod, cfg(excluded_namespaces=()), "etl") != []


@pytest.mark.parametrize("labels", [None, {"app": "x"}, {"flux.io/inject": "false"},
                                    {"flux.io/inject": "True"}])
def test_pods_without_the_opt_in_label_are_left_alone(labels: dict[str, str] | None):
    pod = deployment_pod()
    if labels is None:
        del pod["metadata"]["labels"]
    else:
        pod["metadata"]["labels"] = labels
    response, patch = answer(pod)
    assert response == {"uid": "0c6a4f2e-uid", "allowed": True}
    assert patch == []


def test_other_operations_and_kinds_pass_through():
    body, _ = admission_response(review(deployment_pod(), operation="UPDATE"), CONFIG)
    assert body["response"] == {"uid": "0c6a4f2e-uid", "allowed": True}
    not_a_pod = review(deployment_pod())
    not_a_pod["request"]["kind"] = {"group": "apps", "version": "v1", "kind": "Deployment"}
    body, _ = admission_response(not_a_pod, CONFIG)
    assert body["response"] == {"uid": "0c6a4f2e-uid", "allowed": True}


def test_legacy_sidecar_shape():
    pod = job_pod()
    pod["metadata"]["annotations"]["flux.io/sidecar-mode"] = "legacy"
    mutated, _ = admit(pod)
    key, index, agent = the_agent(mutated)
    assert (key, index) == ("containers", 0)  # first: kubelet starts containers in order
    assert "restartPolicy" not in agent
    assert "initContainers" not in mutated["spec"]
    hook = agent["lifecycle"]["postStart"]["exec"]["command"]
    assert hook[:2] == ["python", "-c"] and "/health/ready" in hook[2]
    compile(hook[2], "postStart", "exec")  # the hook is valid Python
    assert agent["startupProbe"]["httpGet"]["path"] == "/health/ready"
    annotations = mutated["metadata"]["annotations"]
    assert annotations["flux.io/injected"] == "legacy"
    assert annotations["kubectl.kubernetes.io/default-container"] == "job"
    # App containers were wired before the agent was inserted in front of them.
    assert env_of(mutated["spec"]["containers"][1])["FLUX_AGENT_SOCKET"]
    assert_apps_wired(mutated)
    # The injector's default mode is used when the pod does not choose.
    mutated2, _ = admit(job_pod(), cfg(sidecar_mode="legacy"))
    assert the_agent(mutated2)[0] == "containers"
    # ... and a pod may choose native under a legacy default.
    pod3 = job_pod()
    pod3["metadata"]["annotations"]["flux.io/sidecar-mode"] = "native"
    mutated3, _ = admit(pod3, cfg(sidecar_mode="legacy"))
    assert the_agent(mutated3)[0] == "initContainers"


def test_spool_on_a_named_claim_or_a_statefulset_volume():
    pod = deployment_pod()
    pod["metadata"]["annotations"]["flux.io/spool-pvc"] = "extract-spool"
    # Without fsGroup the agent may not be able to write the claim: a warning says so.
    mutated, _ = admit(copy.deepcopy(pod), warnings=[advice(pod)[0]])
    assert "set fsGroup: 10001" in advice(pod)[0]
    assert volume(mutated, "flux-agent-state") == {
        "name": "flux-agent-state", "persistentVolumeClaim": {"claimName": "extract-spool"}}
    pod["spec"]["securityContext"] = {"fsGroup": 10001}
    admit(pod)
    # A StatefulSet pod already has the claim template's volume: the agent mounts it.
    sts = deployment_pod()
    sts["spec"]["volumes"].append({"name": "spool", "persistentVolumeClaim": {
        "claimName": "spool-extract-0"}})
    sts["metadata"]["annotations"]["flux.io/spool-pvc"] = "spool"
    sts["spec"]["securityContext"] = {"fsGroup": 2000}
    mutated, _ = admit(sts)
    names = [v["name"] for v in mutated["spec"]["volumes"]]
    assert "flux-agent-state" not in names
    _, _, agent = the_agent(mutated)
    assert {"name": "spool", "mountPath": "/var/lib/flux-agent"} in agent["volumeMounts"]


def test_ephemeral_spool_volume_and_jwks():
    config = cfg(spool_volume="ephemeral", spool_storage_class="fast-ssd",
                            jwks_configmap="flux-jwks")
    mutated, _ = admit(deployment_pod(), config)
    claim = volume(mutated, "flux-agent-state")["ephemeral"]["volumeClaimTemplate"]["spec"]
    assert claim == {"accessModes": ["ReadWriteOnce"], "storageClassName": "fast-ssd",
                     "resources": {"requests": {"storage": "1Gi"}}}
    _, _, agent = the_agent(mutated)
    assert env_of(agent)["FLUX_AGENT_JWT_JWKS_FILE"] == "/etc/flux-agent/jwks/jwks.json"
    assert volume(mutated, "flux-agent-jwks") == {"name": "flux-agent-jwks",
                                                  "configMap": {"name": "flux-jwks"}}


AGGREGATOR_URL = "https://flux-aggregator.flux-system.svc:8788"
TIERED = {"upstream": "aggregator", "aggregator_url": AGGREGATOR_URL,
          "aggregator_ca_configmap": "flux-agent-aggregator-ca"}
UPSTREAM_TOKEN = {"name": "flux-agent-upstream-token", "projected": {
    "sources": [{"serviceAccountToken": {"audience": "flux-aggregator", "path": "token",
                                         "expirationSeconds": 3600}}],
    "defaultMode": 0o444}}


@pytest.mark.parametrize("mode", ["native", "legacy"])
def test_a_sidecar_delivering_to_the_aggregators_holds_no_database_credentials(mode: str):
    config = cfg(**TIERED, sidecar_mode=mode)
    mutated, _ = admit(deployment_pod(), config)
    _, _, agent = the_agent(mutated)
    env = env_of(agent)
    assert env["FLUX_AGENT_UPSTREAM"] == AGGREGATOR_URL
    assert env["FLUX_AGENT_UPSTREAM_TOKEN_FILE"] == "/var/run/secrets/flux-agent/upstream/token"
    assert env["FLUX_AGENT_UPSTREAM_CA_FILE"] == "/etc/flux-agent/upstream-ca/ca.crt"
    assert not {"FLUX_AGENT_DATABASE_URL", "FLUX_AGENT_DATABASE_URL_FILE",
                "FLUX_AGENT_HANDOFF"} & set(env)
    assert all(set(e) == {"name", "value"} for e in agent["env"])
    assert not [v for v in mutated["spec"]["volumes"] if "secret" in v]
    assert volume(mutated, "flux-agent-upstream-token") == UPSTREAM_TOKEN
    assert volume(mutated, "flux-agent-upstream-ca") == {
        "name": "flux-agent-upstream-ca", "configMap": {
            "name": "flux-agent-aggregator-ca", "items": [{"key": "ca.crt", "path": "ca.crt"}]}}
    assert {"name": "flux-agent-upstream-token", "readOnly": True,
            "mountPath": "/var/run/secrets/flux-agent/upstream"} in agent["volumeMounts"]
    assert {"name": "flux-agent-upstream-ca", "readOnly": True,
            "mountPath": "/etc/flux-agent/upstream-ca"} in agent["volumeMounts"]
    # The app containers see neither the token nor the CA: they are the agent's.
    for app in mutated["spec"]["containers"]:
        if app["name"] != AGENT_CONTAINER:
            assert not {m["name"] for m in app.get("volumeMounts", [])} & {
                "flux-agent-upstream-token", "flux-agent-upstream-ca"}
    assert_apps_wired(mutated)


def test_workload_identity_and_the_aggregators_use_two_tokens():
    """The app's token for its agent (audience flux-agent, in the app containers) and the
    pod's token for the aggregators (audience flux-aggregator, in the agent container)."""
    config = cfg(**TIERED, agent_auth="kubernetes", jwks_configmap="cluster-sa-jwks")
    mutated, _ = admit(deployment_pod(), config)
    _, _, agent = the_agent(mutated)
    audiences = {v["name"]: v["projected"]["sources"][0]["serviceAccountToken"]["audience"]
                 for v in mutated["spec"]["volumes"] if "projected" in v}
    assert audiences == {"flux-agent-token": "flux-agent",
                         "flux-agent-upstream-token": "flux-aggregator"}
    assert "flux-agent-upstream-token" in {m["name"] for m in agent["volumeMounts"]}
    assert "flux-agent-token" not in {m["name"] for m in agent["volumeMounts"]}
    app = mutated["spec"]["containers"][0]
    assert "flux-agent-token" in {m["name"] for m in app["volumeMounts"]}
    assert env_of(agent)["FLUX_AGENT_KUBE_BINDINGS"] == "etl=nasa"


def test_a_sidecar_on_postgresql_hands_off_to_the_aggregators():
    config = cfg(**{**TIERED, "upstream": "database"})
    mutated, _ = admit(job_pod(), config)
    _, _, agent = the_agent(mutated)
    env = env_of(agent)
    assert env["FLUX_AGENT_HANDOFF"] == AGGREGATOR_URL
    assert "FLUX_AGENT_UPSTREAM" not in env
    assert env["FLUX_AGENT_DATABASE_URL_FILE"] == "/etc/flux-agent/database/url"
    assert env["FLUX_AGENT_UPSTREAM_TOKEN_FILE"] == "/var/run/secrets/flux-agent/upstream/token"
    assert volume(mutated, "flux-agent-upstream-token") == UPSTREAM_TOKEN
    assert volume(mutated, "flux-agent-database")["secret"]["secretName"] == \
        "flux-agent-database"
    assert_agent_starts(agent)  # today's agent: the database, as before
    # Plain HTTP aggregators: no CA.
    mutated, _ = admit(job_pod(), cfg(upstream="database",
                                      aggregator_url="http://flux-aggregator.flux-system.svc:8788"))
    _, _, agent = the_agent(mutated)
    assert env_of(agent)["FLUX_AGENT_HANDOFF"] == "http://flux-aggregator.flux-system.svc:8788"
    assert "FLUX_AGENT_UPSTREAM_CA_FILE" not in env_of(agent)
    assert "flux-agent-upstream-ca" not in {v["name"] for v in mutated["spec"]["volumes"]}
    # No aggregator: nothing of it.
    mutated, _ = admit(job_pod(), CONFIG)
    assert not [e for e in env_of(the_agent(mutated)[2]) if "UPSTREAM" in e or "HANDOFF" in e]


@pytest.mark.parametrize(("options", "says"), [
    ({"upstream": "aggregator"}, "aggregator_url: required"),
    ({"upstream": "s3"}, "upstream: expected database or aggregator"),
    ({"aggregator_url": "ftp://flux-aggregator:8788"}, "not an http"),
    ({"aggregator_url": "https://Flux_Aggregator:8788"}, "not an http"),
    ({"aggregator_url": "https://flux-aggregator:8788/v1/records"}, "not an http"),
    ({"aggregator_url": "http://flux-aggregator:8788",
      "aggregator_ca_configmap": "flux-agent-aggregator-ca"}, "only for an https://"),
    ({**TIERED, "aggregator_ca_configmap": "Bad Name"}, "not a valid object name"),
])
def test_aggregator_configuration_checks(options: dict[str, Any], says: str):
    with pytest.raises(ValueError, match=says):
        InjectorConfig(**options).check()


def test_a_pod_with_the_upstream_volumes_names_is_not_injected():
    pod = deployment_pod()
    pod["spec"]["volumes"].append({"name": "flux-agent-upstream-token", "emptyDir": {}})
    response, _ = answer(pod, cfg(**TIERED))
    assert response["allowed"] is True
    assert "already has a volume named flux-agent-upstream-token" in response["warnings"][0]


def test_cli_inject_with_an_aggregator():
    code, out, err = run_inject(["-", "--upstream", "aggregator", "--aggregator-url",
                                 AGGREGATOR_URL, "--aggregator-ca-configmap",
                                 "flux-agent-aggregator-ca"], json.dumps(job_pod()))
    assert code == 0, err
    env = env_of(the_agent(json.loads(out))[2])
    assert env["FLUX_AGENT_UPSTREAM"] == AGGREGATOR_URL
    code, _, err = run_inject(["-", "--upstream", "aggregator"], json.dumps(job_pod()))
    assert code == 78
    assert "aggregator_url: required" in err


PINNED = "registry.example/flux-agent@sha256:" + "e" * 64


def test_a_pod_cannot_override_a_pinned_image_unless_allowed():
    """flux.io/image once replaced the injector's image, pinned or not: any pod author could
    run an image of their choosing as the agent, with the agent's database credentials. The
    annotation is now ignored (the pod is injected, and warned) unless the injector allows
    overrides."""
    pod = job_pod()
    pod["metadata"]["annotations"] = {"flux.io/image": "mirror.example/flux-agent:evil",
                                      "flux.io/memory": "200Mi"}
    config = cfg(image=PINNED, memory_limit="", cpu_request="", memory_request="64Mi")
    warning = ("flux-agent: annotation flux.io/image ignored: the injector's image "
               f"{PINNED} is injected (the chart's sidecar.allowImageOverride is off)")
    mutated, _ = admit(pod, config, namespace="batch", warnings=[warning])
    _, _, agent = the_agent(mutated)
    assert agent["image"] == PINNED
    assert agent["resources"] == {"requests": {"memory": "200Mi"}}
    # Without the annotation: the image, and no warning.
    del pod["metadata"]["annotations"]["flux.io/image"]
    mutated, _ = admit(pod, config, namespace="batch")
    assert the_agent(mutated)[2]["image"] == PINNED
    # Allowed: the annotation chooses (a digest too).
    allowed = cfg(image=PINNED, allow_image_override=True)
    pod["metadata"]["annotations"]["flux.io/image"] = "mirror.example/flux-agent@sha256:" \
        + "a" * 64
    mutated, _ = admit(pod, allowed, namespace="batch")
    assert the_agent(mutated)[2]["image"] == "mirror.example/flux-agent@sha256:" + "a" * 64


@pytest.mark.parametrize("image", ["has space:1", "repo@sha256:abc", "repo@md5:" + "a" * 32,
                                   "@sha256:" + "a" * 64])
def test_a_bad_image_annotation_fails_where_overrides_are_allowed(image: str):
    pod = deployment_pod()
    pod["metadata"]["annotations"]["flux.io/image"] = image
    response, _ = answer(pod, cfg(allow_image_override=True))
    assert response["allowed"] is True
    assert response["warnings"][0].startswith("flux-agent not injected: annotation "
                                              "flux.io/image")
    response, _ = answer(pod, cfg(allow_image_override=True, fail_closed=True))
    assert response["allowed"] is False
    # Where they are not, the bad value is never used: ignored, with the warning.
    mutated, _ = admit(pod, CONFIG, warnings=[
        "flux-agent: annotation flux.io/image ignored: the injector's image "
        f"{CONFIG.image} is injected (the chart's sidecar.allowImageOverride is off)"])
    assert the_agent(mutated)[2]["image"] == CONFIG.image


# --------------------------------------------------------------------------- errors


BAD_ANNOTATIONS = [
    ("flux.io/spool-size", "lots", "flux.io/spool-size"),
    ("flux.io/spool-size", "10Mi", "minimum"),
    ("flux.io/cpu", "fast", "flux.io/cpu"),
    ("flux.io/memory", "512Mi/128Mi", "below the request"),
    ("flux.io/sidecar-mode", "sidecar", "flux.io/sidecar-mode"),
    ("flux.io/agency", "NASA!", "agency slug"),
    ("flux.io/spool-pvc", "Bad_Claim", "claim name"),
]


@pytest.mark.parametrize(("name", "value", "says"), BAD_ANNOTATIONS)
def test_bad_annotation_fails_open_with_a_warning(name: str, value: str, says: str):
    pod = deployment_pod()
    pod["metadata"]["annotations"][name] = value
    response, patch = answer(pod)
    assert response["allowed"] is True
    assert len(response["warnings"]) == 1
    assert response["warnings"][0].startswith("flux-agent not injected:")
    assert says in response["warnings"][0]
    mutated = jsonpatch.apply_patch(pod, patch)
    validate(mutated)
    assert agents(mutated) == []
    assert says in mutated["metadata"]["annotations"]["flux.io/injection-error"]


@pytest.mark.parametrize(("name", "value", "says"), BAD_ANNOTATIONS[:3])
def test_bad_annotation_fails_closed_when_configured(name: str, value: str, says: str):
    pod = deployment_pod()
    pod["metadata"]["annotations"][name] = value
    response, patch = answer(pod, cfg(fail_closed=True))
    assert response["allowed"] is False
    assert patch == []
    assert response["status"]["code"] == 403
    assert says in response["status"]["message"]
    assert "warnings" not in response


def mount_conflict() -> dict[str, Any]:
    pod = deployment_pod()
    pod["spec"]["containers"][0]["volumeMounts"].append(
        {"name": "scratch", "mountPath": "/var/run/flux-agent"})
    return pod


def host_network() -> dict[str, Any]:
    pod = deployment_pod()
    pod["spec"]["hostNetwork"] = True
    return pod


def no_agency() -> dict[str, Any]:
    pod = deployment_pod()
    del pod["metadata"]["annotations"]["flux.io/agency"]
    return pod


@pytest.mark.parametrize(("make", "config", "says"), [
    (lambda: {**deployment_pod(), "spec": {"containers": "app"}}, CONFIG, "must be a list"),
    (lambda: {**deployment_pod(), "spec": {"containers": []}}, CONFIG, "no containers"),
    (lambda: {**deployment_pod(), "spec": None}, CONFIG, "no spec"),
    (lambda: {**deployment_pod(), "spec": {"containers": [{"image": "x"}]}}, CONFIG,
     "with a name"),
    (mount_conflict, CONFIG, "already mounts"),
    (host_network, CONFIG, "hostNetwork"),
])
def test_malformed_or_unsuitable_pods(make, config: InjectorConfig, says: str):
    response, patch = answer(make(), config)
    assert response["allowed"] is True
    assert says in response["warnings"][0]
    assert all(op["path"].startswith("/metadata/annotations") for op in patch)
    closed = InjectorConfig(**{**{f: getattr(config, f) for f in config.__slots__},
                               "fail_closed": True})
    response, _ = answer(make(), closed)
    assert response["allowed"] is False and says in response["status"]["message"]


def test_a_fixed_pod_loses_its_error_annotation():
    pod = deployment_pod()
    pod["metadata"]["annotations"]["flux.io/injection-error"] = "old news"
    mutated, _ = admit(pod)
    assert "flux.io/injection-error" not in mutated["metadata"]["annotations"]


@pytest.mark.parametrize("body", [
    [], "text", {"kind": "AdmissionReview"},
    {"apiVersion": "admission.k8s.io/v1beta1", "kind": "AdmissionReview",
     "request": {"uid": "x"}},
    {"apiVersion": "admission.k8s.io/v1", "kind": "AdmissionReview"},
    {"apiVersion": "admission.k8s.io/v1", "kind": "AdmissionReview", "request": {"uid": ""}},
])
def test_malformed_review_is_refused(body: Any):
    with pytest.raises(MalformedReview):
        admission_response(body, CONFIG)


def test_quantities_and_config_checks():
    q = parse_quantity
    assert q("100m", "x") == Decimal("0.1")
    assert q("1.5Gi", "x") == 1.5 * 1024**3
    assert q("2e3", "x") == 2000
    assert q("1E3", "x") == 1000
    assert q("128M", "x") == 128 * 10**6
    for bad in ("", "1.2.3", "-1", "10 Mi", "Mi", "1ki"):
        with pytest.raises(InjectionError):
            q(bad, "x")
    assert spool_bytes("64Mi") == (64 * 1024**2, 32 * 1024**2)
    InjectorConfig().check()
    for bad_config in (InjectorConfig(sidecar_mode="x"), InjectorConfig(spool_size="1Mi"),
                       InjectorConfig(configmap="Bad Name"), InjectorConfig(image=""),
                       InjectorConfig(memory_limit="lots"), InjectorConfig(run_as_user=0),
                       InjectorConfig(spool_volume="hostPath"),
                       InjectorConfig(image="flux-agent@sha256:123")):
        with pytest.raises(ValueError):  # noqa: PT011 - each names its own option
            bad_config.check()


def test_probe_paths_exist_on_the_admin_listener():
    from flux_agent.intake.admin import admin_app
    from flux_agent.obs.metrics import Metrics

    app = admin_app(object(), Metrics())  # type: ignore[arg-type]
    routes = {r.resource.canonical for r in app.router.routes() if r.resource is not None}
    _, _, agent = the_agent(mutate_pod(deployment_pod(), CONFIG, "etl"))
    for probe in ("startupProbe", "livenessProbe", "readinessProbe"):
        assert agent[probe]["httpGet"]["path"] in routes


# --------------------------------------------------------------------------- HTTPS server


def make_cert(directory: Path, cn: str = "flux-injector.flux-system.svc") -> tuple[Path, Path]:
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, cn)])
    now = dt.datetime.now(dt.UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(name).issuer_name(name).public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(minutes=5))
        .not_valid_after(now + dt.timedelta(days=1))
        .add_extension(x509.SubjectAlternativeName([
            x509.DNSName("localhost"), x509.DNSName(cn),
            x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]), critical=False)
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .sign(key, hashes.SHA256())
    )
    cert_file, key_file = directory / "tls.crt", directory / "tls.key"
    cert_file.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    key_file.write_bytes(key.private_bytes(serialization.Encoding.PEM,
                                           serialization.PrivateFormat.PKCS8,
                                           serialization.NoEncryption()))
    return cert_file, key_file


def client_tls(cert_file: Path) -> ssl.SSLContext:
    return ssl.create_default_context(cafile=str(cert_file))


async def test_https_webhook_server(tmp_path: Path):
    cert_file, key_file = make_cert(tmp_path)
    async with WebhookServer(CONFIG, host="127.0.0.1", port=0, cert_file=str(cert_file),
                             key_file=str(key_file), metrics_port=0) as server:
        base = f"https://127.0.0.1:{server.port}"
        tls = client_tls(cert_file)
        async with aiohttp.ClientSession() as session:
            pod = deployment_pod()
            async with session.post(base + "/mutate", json=review(pod), ssl=tls) as resp:
                assert resp.status == 200
                body = await resp.json()
            response = body["response"]
            assert response["uid"] == "0c6a4f2e-uid" and response["allowed"] is True
            mutated = jsonpatch.apply_patch(pod, json.loads(base64.b64decode(response["patch"])))
            validate(mutated)
            assert len(agents(mutated)) == 1

            async with session.post(base + "/mutate", data=b"{not json", ssl=tls,
                                    headers={"Content-Type": "application/json"}) as resp:
                assert resp.status == 400
                assert resp.content_type == "application/problem+json"
                problem = await resp.json(content_type=None)
                assert problem["status"] == 400 and "not valid JSON" in problem["detail"]
            async with session.post(base + "/mutate", json={"kind": "Pod"}, ssl=tls) as resp:
                assert resp.status == 400
                assert "AdmissionReview" in (await resp.json(content_type=None))["detail"]
            async with session.get(base + "/healthz", ssl=tls) as resp:
                assert resp.status == 200
            async with session.get(base + "/mutate", ssl=tls) as resp:
                assert resp.status == 405
            # Plain HTTP is refused on the TLS port.
            with pytest.raises(aiohttp.ClientError):
                async with session.post(f"http://127.0.0.1:{server.port}/mutate",
                                        json=review(pod)) as resp:
                    await resp.read()
            async with session.get(f"http://127.0.0.1:{server.metrics_port}/metrics") as resp:
                metrics = await resp.text()
            assert 'flux_injector_admissions_total{result="injected"} 1.0' in metrics
            assert 'flux_injector_admissions_total{result="malformed"} 2.0' in metrics


async def fake_kube_api(token: str, namespaces: dict[str, dict[str, str]]
                        ) -> tuple[Any, int, list[str]]:
    """A Kubernetes API that serves GET /api/v1/namespaces/NAME to the holder of ``token``
    (a real HTTP server on loopback); returns its runner, its port and the names asked for."""
    asked: list[str] = []

    async def namespace(request: aiohttp.web.Request) -> aiohttp.web.Response:
        if request.headers.get("Authorization") != f"Bearer {token}":
            return aiohttp.web.json_response({"kind": "Status", "code": 401}, status=401)
        name = request.match_info["name"]
        asked.append(name)
        if name not in namespaces:
            return aiohttp.web.json_response({"kind": "Status", "code": 404}, status=404)
        return aiohttp.web.json_response({"apiVersion": "v1", "kind": "Namespace", "metadata": {
            "name": name, "annotations": namespaces[name]}})

    app = aiohttp.web.Application()
    app.router.add_get("/api/v1/namespaces/{name}", namespace)
    runner = aiohttp.web.AppRunner(app)
    await runner.setup()
    site = aiohttp.web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    return runner, site._server.sockets[0].getsockname()[1], asked  # type: ignore[union-attr]


async def test_the_webhook_reads_the_namespaces_agency_through_the_api(tmp_path: Path):
    """The agency is bound to the Namespace's flux.io/agency annotation, which cluster
    admins set: a pod annotation naming another agency is refused (fail closed, although
    this injector otherwise fails open), a pod without one gets the namespace's."""
    token_file = tmp_path / "token"
    token_file.write_text("injector-sa-token-1\n")
    api, port, asked = await fake_kube_api("injector-sa-token-1", {
        "science": {"flux.io/agency": "noaa"}, "shared": {"flux.io/agency": "nasa, noaa"},
        "unbound": {}})
    cert_file, key_file = make_cert(tmp_path)
    config = InjectorConfig(namespace_bindings=True)
    reader = NamespaceReader(f"http://127.0.0.1:{port}", str(token_file))
    try:
        async with WebhookServer(config, host="127.0.0.1", port=0, cert_file=str(cert_file),
                                 key_file=str(key_file), namespaces=reader) as server:
            tls = client_tls(cert_file)

            async def admission(pod: dict[str, Any], namespace: str) -> dict[str, Any]:
                async with aiohttp.ClientSession() as session, session.post(
                        f"https://127.0.0.1:{server.port}/mutate", json=review(pod, namespace),
                        ssl=tls) as resp:
                    assert resp.status == 200
                    return (await resp.json())["response"]

            plain = deployment_pod()
            del plain["metadata"]["annotations"]["flux.io/agency"]
            response = await admission(plain, "science")
            mutated = jsonpatch.apply_patch(plain, json.loads(base64.b64decode(
                response["patch"])))
            assert env_of(the_agent(mutated)[2])["FLUX_AGENT_AGENCY"] == "noaa"
            validate(mutated, "science")
            response = await admission(deployment_pod(), "science")  # asks for nasa
            assert response["allowed"] is False and "patch" not in response
            assert "'nasa' is not an agency of namespace science" in \
                response["status"]["message"]
            assert (await admission(deployment_pod(), "shared"))["allowed"] is True
            assert (await admission(plain, "shared"))["allowed"] is False  # must choose
            for namespace in ("unbound", "missing"):
                response = await admission(deployment_pod(), namespace)
                assert response["allowed"] is False
                assert f"namespace {namespace} is bound to no agency" in \
                    response["status"]["message"]
            # Each Namespace is read once per cache period; the token is re-read each time.
            assert asked.count("science") == 1
            token_file.write_text("injector-sa-token-2\n")  # the kubelet rotated it
            reader._cache.clear()
            assert (await admission(plain, "science"))["allowed"] is False  # 401: unbound
    finally:
        await api.cleanup()


async def test_the_server_picks_up_a_rotated_certificate(tmp_path: Path):
    cert_file, key_file = make_cert(tmp_path, "first.example")
    server = WebhookServer(CONFIG, host="127.0.0.1", port=0, cert_file=str(cert_file),
                           key_file=str(key_file), reload_interval=0.05)
    await server.start()
    try:
        assert "first.example" in await peer_cn(server.port)
        new_dir = tmp_path / "new"
        new_dir.mkdir()
        new_cert, new_key = make_cert(new_dir, "second.example")
        # Written as kubelet does for Secret volumes: the files change under the same names.
        os.replace(new_key, key_file)
        os.replace(new_cert, cert_file)
        future = time.time() + 5
        os.utime(cert_file, (future, future))
        for _ in range(100):  # reloads are checked every 50 ms here
            if "second.example" in await peer_cn(server.port):
                break
            await asyncio.sleep(0.05)
        assert "second.example" in await peer_cn(server.port)
    finally:
        await server.stop()


async def peer_cn(port: int) -> str:
    def fetch() -> str:
        context = ssl.create_default_context()
        context.check_hostname = False
        context.verify_mode = ssl.CERT_NONE
        with socket.create_connection(("127.0.0.1", port), timeout=5) as raw, \
                context.wrap_socket(raw) as tls:
            der = tls.getpeercert(binary_form=True)
        assert der is not None
        cert = x509.load_der_x509_certificate(der)
        return cert.subject.rfc4514_string()

    return await asyncio.to_thread(fetch)


# --------------------------------------------------------------------------- command line


def run_inject(args: list[str], stdin: str = "") -> tuple[int, str, str]:
    out, err = io.StringIO(), io.StringIO()
    code = cli_inject(args, stdin=io.StringIO(stdin), stdout=out, stderr=err, environ={
        "FLUX_INJECTOR_AGENCY_BINDINGS": json.dumps({ns: list(a) for ns, a in BOUND})})
    return code, out.getvalue(), err.getvalue()


def test_cli_inject_yaml_pod(tmp_path: Path):
    path = tmp_path / "pod.yaml"
    path.write_text(yaml.safe_dump(job_pod()))
    code, out, err = run_inject([str(path), "--namespace", "etl"])
    assert code == 0, err
    pod = yaml.safe_load(out)
    validate(pod)
    assert the_agent(pod)[0] == "initContainers"
    # The same answer as the webhook's.
    assert pod == mutate_pod(job_pod(), cfg(), "etl")


def test_cli_inject_json_from_stdin_and_options():
    code, out, err = run_inject(["-", "--sidecar-mode", "legacy", "--image", "my/agent:1"],
                                json.dumps(job_pod()))
    assert code == 0, err
    pod = json.loads(out)
    key, _, agent = the_agent(pod)
    assert key == "containers" and agent["image"] == "my/agent:1"
    code, out, _ = run_inject(["-", "--patch"], json.dumps(job_pod()))
    assert code == 0
    assert {op["path"] for op in json.loads(out)} >= {"/spec/initContainers", "/spec/volumes"}


def test_cli_inject_workloads(tmp_path: Path):
    template = deployment_pod()
    template["metadata"] = {"labels": {"app": "extract", "flux.io/inject": "true"},
                            "annotations": {"flux.io/agency": "nasa"}}
    deployment = {"apiVersion": "apps/v1", "kind": "Deployment",
                  "metadata": {"name": "extract", "namespace": "etl"},
                  "spec": {"replicas": 2, "selector": {"matchLabels": {"app": "extract"}},
                           "template": {k: template[k] for k in ("metadata", "spec")}}}
    service = {"apiVersion": "v1", "kind": "Service", "metadata": {"name": "extract"},
               "spec": {"ports": [{"port": 80}]}}
    path = tmp_path / "app.yaml"
    path.write_text(yaml.safe_dump_all([deployment, service]))
    code, out, err = run_inject([str(path)])
    assert code == 0, err
    docs = list(yaml.safe_load_all(out))
    assert docs[1] == service
    assert "Service: not a pod or a workload" in err
    for version in KUBE_VERSIONS:
        kubernetes_validate.validate(docs[0], version, strict=True)
    tpl = docs[0]["spec"]["template"]
    assert len(agents(tpl)) == 1
    # Without the label nothing happens, unless forced.
    del deployment["spec"]["template"]["metadata"]["labels"]["flux.io/inject"]
    path.write_text(yaml.safe_dump(deployment))
    code, out, err = run_inject([str(path)])
    assert code == 0 and agents(yaml.safe_load(out)["spec"]["template"]) == []
    assert "no flux.io/inject=true label" in err
    code, out, _ = run_inject([str(path), "--force"])
    assert code == 0 and len(agents(yaml.safe_load(out)["spec"]["template"])) == 1


def test_cli_inject_errors(tmp_path: Path):
    assert run_inject([str(tmp_path / "missing.yaml")])[0] == 1
    code, _, err = run_inject(["-", "--sidecar-mode", "sideways"], "{}")
    assert code == 78 and "sidecar_mode" in err
    assert run_inject(["-", "--spool-size", "1Mi"], "{}")[0] == 78
    assert run_inject(["-", "--bogus"], "{}")[0] == 78
    code, _, err = run_inject(["-"], "kind: [unclosed")
    assert code == 1 and "cannot parse" in err
    bad = job_pod()
    bad["metadata"]["annotations"]["flux.io/spool-size"] = "tiny"
    code, out, err = run_inject(["-", "--fail-closed"], json.dumps(bad))
    assert code == 1 and "flux.io/spool-size" in err
    code, out, err = run_inject(["-"], json.dumps(bad))  # fail open: a warning, no agent
    assert code == 0 and "warning: flux-agent not injected" in err
    assert agents(json.loads(out)) == []


def test_cli_inject_webhook_configuration_errors(tmp_path: Path,
                                                 capsys: pytest.CaptureFixture[str]):
    def cli_inject_webhook(argv: list[str], environ: dict[str, str]) -> object:
        return prepare_webhook(argv, environ=environ)

    assert cli_inject_webhook([], environ={}) == 78
    assert "--cert and --key are required" in capsys.readouterr().err
    assert cli_inject_webhook(["--cert", str(tmp_path / "no.crt"), "--key",
                               str(tmp_path / "no.key")], environ={}) == 78
    assert "no such file" in capsys.readouterr().err
    (tmp_path / "junk.crt").write_text("not a certificate")
    assert cli_inject_webhook(["--cert", str(tmp_path / "junk.crt"), "--key",
                               str(tmp_path / "junk.crt")], environ={}) == 78
    assert "cannot load the certificate" in capsys.readouterr().err
    cert_file, key_file = make_cert(tmp_path)
    common = ["--cert", str(cert_file), "--key", str(key_file)]
    assert cli_inject_webhook([*common, "--port", "http"], environ={}) == 78
    assert cli_inject_webhook(common, environ={"FLUX_INJECTOR_SIDECAR_MODE": "x"}) == 78
    assert "sidecar_mode" in capsys.readouterr().err
    assert cli_inject_webhook([*common, "--nope"], environ={}) == 78


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


async def test_cli_inject_webhook_serves_until_sigterm(tmp_path: Path):
    cert_file, key_file = make_cert(tmp_path)
    port, metrics_port = free_port(), free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith("FLUX_INJECTOR_")}
    env["FLUX_INJECTOR_SIDECAR_MODE"] = "legacy"  # configuration by environment
    env["FLUX_INJECTOR_AGENCY_BINDINGS"] = '{"etl": "noaa"}'
    proc = subprocess.Popen(
        [sys.executable, "-m", "flux_agent", "inject-webhook", "--cert", str(cert_file),
         "--key", str(key_file),
         "--host", "127.0.0.1", "--port", str(port), "--metrics-port", str(metrics_port),
         "--shutdown-grace", "0"],
        env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    try:
        tls = client_tls(cert_file)
        async with aiohttp.ClientSession() as session:
            deadline = time.monotonic() + 30
            while True:
                assert proc.poll() is None, proc.stdout.read() if proc.stdout else ""
                try:
                    async with session.get(f"https://127.0.0.1:{port}/healthz", ssl=tls) as r:
                        if r.status == 200:
                            break
                except aiohttp.ClientError:
                    pass
                assert time.monotonic() < deadline, "the webhook did not start"
                await asyncio.sleep(0.1)
            async with session.post(f"https://127.0.0.1:{port}/mutate", json=review(job_pod()),
                                    ssl=tls) as resp:
                body = await resp.json()
        patch = json.loads(base64.b64decode(body["response"]["patch"]))
        mutated = jsonpatch.apply_patch(job_pod(), patch)
        assert the_agent(mutated)[0] == "containers"  # legacy, from the environment
        proc.send_signal(signal.SIGTERM)
        assert await asyncio.to_thread(proc.wait, 20) == 0
        logs = proc.stdout.read().decode() if proc.stdout else ""
        assert '"message":"pod injected"' in logs
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(10)
        if proc.stdout:
            proc.stdout.close()


def test_an_unexpected_pod_shape_is_still_answered(monkeypatch: pytest.MonkeyPatch):
    def broken(*args: Any) -> Any:
        raise TypeError("'int' object is not subscriptable")

    monkeypatch.setattr(kube_patch, "_plan", broken)
    response, _ = answer(deployment_pod())
    assert response["allowed"] is True
    assert "malformed pod (TypeError" in response["warnings"][0]
    response, _ = answer(deployment_pod(), cfg(fail_closed=True))
    assert response["allowed"] is False
