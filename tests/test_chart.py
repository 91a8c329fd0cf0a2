"""The Helm chart: rendered offline with the Helm SDK (helm-python-sdk) for several value
sets, linted strictly, every manifest validated strictly against the Kubernetes 1.29 and 1.33
schemas, and what the chart configures checked against what the injector and the agent
really accept."""

from __future__ import annotations

import argparse
import base64
import copy
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import helm_python as helm
import kubernetes_validate
import pytest
import yaml
from cryptography import x509
from cryptography.hazmat.primitives.asymmetric import ec, padding, rsa

from flux_agent.core.settings import SETTINGS, env_name, load_config
from flux_agent.kube.admission import inject_pod, mutate_pod
from flux_agent.kube.cli import prepare_webhook
from flux_agent.kube.config import (
    ADMIN_PORT_NAME,
    INJECT_LABEL,
    STATE_DIR,
    InjectionError,
    InjectorConfig,
    config_from,
)

CHART = Path(__file__).resolve().parent.parent / "helm" / "flux-agent"
RELEASE, NAMESPACE = "flux", "flux-system"
KUBE_VERSIONS = ("1.29.0", "1.33.0")
# The annotations of the pods' Namespace, as a cluster admin set them (the injector reads them
# through the API with agent.namespaceBinding).
ETL_NAMESPACE = {"flux.io/agency": "nasa"}
CLUSTER_SCOPED = {"MutatingWebhookConfiguration", "ClusterRole", "ClusterRoleBinding"}
# Custom resources kubernetes-validate has no schema for (CRDs of cert-manager and the
# Prometheus operator). Only these kinds are exempt from strict validation.
CRD_KINDS = {
    ("cert-manager.io/v1", "Certificate"),
    ("cert-manager.io/v1", "Issuer"),
    ("monitoring.coreos.com/v1", "ServiceMonitor"),
    ("monitoring.coreos.com/v1", "PodMonitor"),
    ("monitoring.coreos.com/v1", "PrometheusRule"),
}

# The aggregator tier: the namespaces whose pods opt in, bound by the chart's values alone
# (the aggregator does not read Namespace objects), and the cluster's service-account keys.
AGGREGATOR_AGENT: dict[str, Any] = {
    "namespaces": ["etl", "batch"], "namespaceBinding": False,
    "agencyBindings": {"etl": "nasa", "batch": ["noaa", "nasa"]},
    "kubernetes": {"jwksConfigMap": "cluster-sa-jwks"}}
CLUSTER_CA = base64.b64encode(b"-----BEGIN CERTIFICATE-----\nMIIB\n-----END CERTIFICATE-----\n"
                              ).decode()

VALUE_SETS: dict[str, dict[str, Any]] = {
    "defaults": {},
    "cert-manager": {"tls": {"mode": "certManager"}},
    "cert-manager-issuer": {"tls": {"mode": "certManager", "certManager": {
        "issuerRef": {"name": "cluster-ca", "kind": "ClusterIssuer", "group": "cert-manager.io"}}}},
    "existing-secret": {"tls": {"mode": "secret", "secret": {
        "name": "my-webhook-tls", "caBundle": base64.b64encode(b"-----BEGIN CERT").decode()}}},
    "pvc-spool": {"sidecar": {"spoolVolume": "ephemeral", "spoolStorageClass": "fast-ssd",
                              "spoolSize": "4Gi"}},
    "legacy-sidecar": {"sidecar": {"mode": "legacy"}},
    "monitoring": {"metrics": {"serviceMonitor": {"enabled": True, "labels": {"release": "kp"}},
                               "podMonitor": {"enabled": True},
                               "prometheusRule": {"enabled": True}}},
    "namespaces-jwt": {
        "agent": {"namespaces": ["etl", "batch"], "auth": "jwt", "agency": "",
                  "jwt": {"issuers": ["https://idp.example"], "audience": "flux",
                          "jwksConfigMap": "flux-jwks"},
                  "extraEnv": {"FLUX_AGENT_BATCH_MAX_AGE": "10ms",
                               "FLUX_AGENT_DEDUPE_INDEX_SIZE": 100000}},
        "webhook": {"failurePolicy": "Ignore", "failClosed": True,
                    "excludedNamespaces": ["monitoring"]},
        "networkPolicy": {"webhookFrom": [{"ipBlock": {"cidr": "10.0.0.0/8"}}],
                          "metricsFrom": [{"namespaceSelector": {"matchLabels": {
                              "kubernetes.io/metadata.name": "monitoring"}}}]},
        "image": {"repository": "registry.example/flux-agent", "tag": "0.1.0"},
        "injector": {"replicas": 3, "nodeSelector": {"kubernetes.io/os": "linux"}},
    },
    "bindings": {"agent": {"namespaceBinding": False, "agencyBindings": {
        "etl": "nasa", "science": ["noaa", "nasa"], "*": "noaa"}}},
    "workload-identity": {"agent": {"auth": "kubernetes", "agencyBindings": {"etl": "nasa"},
                                    "kubernetes": {"jwksConfigMap": "cluster-sa-jwks"}}},
    "pinned-sidecar": {"image": {"repository": "registry.example/flux-agent",
                                 "digest": "sha256:" + "1" * 64},
                       "sidecar": {"image": {
                           "repository": "registry.example/flux-agent@sha256:" + "2" * 64}}},
    "aggregator": {"aggregator": {"enabled": True}, "agent": AGGREGATOR_AGENT,
                   "metrics": {"podMonitor": {"enabled": True},
                               "prometheusRule": {"enabled": True}}},
    "aggregator-plaintext": {"aggregator": {"enabled": True, "tls": {"enabled": False}},
                             "agent": AGGREGATOR_AGENT},
    "aggregator-cert-manager": {"aggregator": {"enabled": True}, "agent": AGGREGATOR_AGENT,
                                "tls": {"mode": "certManager"}},
    "aggregator-cert-manager-issuer": {
        "aggregator": {"enabled": True, "tls": {"caBundle": CLUSTER_CA}},
        "agent": AGGREGATOR_AGENT,
        "tls": {"mode": "certManager", "certManager": {"issuerRef": {
            "name": "cluster-ca", "kind": "ClusterIssuer", "group": "cert-manager.io"}}}},
    "aggregator-existing-secret": {
        "aggregator": {"enabled": True, "tls": {"secretName": "my-aggregator-tls",
                                                "caBundle": CLUSTER_CA}},
        "agent": AGGREGATOR_AGENT,
        "tls": {"mode": "secret", "secret": {"name": "my-webhook-tls",
                                             "caBundle": CLUSTER_CA}}},
    "aggregator-handoff": {
        "aggregator": {"enabled": True, "replicas": 3, "networkPolicy": {
            "clientNamespaceSelector": {"matchLabels": {"flux.io/opted-in": "true"}},
            "databaseTo": [{"ipBlock": {"cidr": "10.20.0.0/16"}}], "databasePort": 6432}},
        "sidecar": {"upstream": "database"},
        "agent": {"namespaceBinding": False, "agencyBindings": {"etl": "nasa"},
                  "kubernetes": {"jwksConfigMap": "cluster-sa-jwks"}}},
    "aggregator-workload-identity": {
        "aggregator": {"enabled": True},
        "agent": {**AGGREGATOR_AGENT, "auth": "kubernetes"}},
    "single-replica": {"injector": {"replicas": 1},
                       "agent": {"agency": "nasa"}, "networkPolicy": {"enabled": False},
                       "serviceAccount": {"create": False}},
}


@pytest.fixture(scope="module")
def chart() -> Iterator[helm.Chart]:
    with helm.Chart.load(str(CHART)) as loaded:
        yield loaded


_RENDERED: dict[str, list[dict[str, Any]]] = {}


def render(chart: helm.Chart, values: dict[str, Any]) -> list[dict[str, Any]]:
    """The chart's manifests (cached per value set: rendering generates RSA keys)."""
    key = repr(sorted(values.items()))
    if key not in _RENDERED:
        _RENDERED[key] = _render(chart, values)
    return copy.deepcopy(_RENDERED[key])


def _render(chart: helm.Chart, values: dict[str, Any]) -> list[dict[str, Any]]:
    rendered = chart.render(copy.deepcopy(values), name=RELEASE, namespace=NAMESPACE,
                            is_install=True)
    docs = []
    for path, text in sorted(rendered.items()):
        if path.endswith("NOTES.txt"):
            continue
        for doc in yaml.safe_load_all(text):
            if doc is not None:
                doc["__template"] = path
                docs.append(doc)
    return docs


def find(docs: list[dict[str, Any]], kind: str) -> list[dict[str, Any]]:
    return [d for d in docs if d["kind"] == kind]


def one(docs: list[dict[str, Any]], kind: str) -> dict[str, Any]:
    found = find(docs, kind)
    assert len(found) == 1, f"{len(found)} {kind}s"
    return found[0]


def strip(doc: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in doc.items() if k != "__template"}


def injector_env(docs: list[dict[str, Any]]) -> dict[str, str]:
    container = one(docs, "Deployment")["spec"]["template"]["spec"]["containers"][0]
    return {e["name"]: e["value"] for e in container["env"]}


def injector_config(docs: list[dict[str, Any]]) -> InjectorConfig:
    """The configuration the injector builds from the Deployment's environment."""
    env = injector_env(docs)
    assert all(k.startswith("FLUX_INJECTOR_") for k in env)
    return config_from(argparse.Namespace(), env)


# --------------------------------------------------------------------------- every value set


@pytest.mark.parametrize("name", sorted(VALUE_SETS))
def test_renders_lints_and_validates_strictly(chart: helm.Chart, name: str):
    values = VALUE_SETS[name]
    chart.validate_schema(copy.deepcopy(values))
    for version in KUBE_VERSIONS:
        report = helm.lint(str(CHART), copy.deepcopy(values), strict=True,
                           namespace=NAMESPACE, kube_version="v" + version)
        assert report["errors"] == [], report
        assert [m for m in report["messages"] if m["severity"] >= 1] == [], report
    docs = render(chart, values)
    kinds = {d["kind"] for d in docs}
    assert {"Deployment", "Service", "MutatingWebhookConfiguration", "ConfigMap"} <= kinds
    skipped = set()
    for doc in docs:
        key = (doc["apiVersion"], doc["kind"])
        if key in CRD_KINDS:
            skipped.add(key)
            assert doc["metadata"]["namespace"] == NAMESPACE
            continue
        for version in KUBE_VERSIONS:
            try:
                kubernetes_validate.validate(strip(doc), version, strict=True)
            except kubernetes_validate.ValidationError as exc:
                pytest.fail(f"{doc['__template']} ({doc['kind']}) is invalid for Kubernetes "
                            f"{version}: {exc.message} at {list(exc.absolute_path)}")
        if doc["kind"] not in CLUSTER_SCOPED:
            assert doc["metadata"].get("namespace"), f"{doc['kind']} without a namespace"
    # Only CRDs are ever skipped, and only when their feature is on.
    assert skipped <= CRD_KINDS
    # The injector accepts its configuration and the pods it injects are valid.
    config = injector_config(docs)
    pod = {"apiVersion": "v1", "kind": "Pod",
           "metadata": {"generateName": "etl-", "labels": {"flux.io/inject": "true"},
                        "annotations": {"flux.io/agency": "nasa"}},
           "spec": {"containers": [{"name": "app", "image": "etl:1"}]}}
    mutated = mutate_pod(pod, config, "etl", ETL_NAMESPACE)
    for version in KUBE_VERSIONS:
        kubernetes_validate.validate({**mutated, "metadata": {**mutated["metadata"],
                                                              "namespace": "etl"}},
                                     version, strict=True)
    agent = [c for c in mutated["spec"].get("initContainers", []) + mutated["spec"][
        "containers"] if c["name"] == "flux-agent"]
    assert len(agent) == 1
    # No Secret in any container's environment, the chart's or an injected pod's (Checkov
    # CKV_K8S_35): the database URL is a file the agent alone mounts.
    workloads = [d["spec"]["template"]["spec"] for d in docs if "template" in d.get("spec", {})]
    for spec in [*workloads, mutated["spec"]]:
        for c in spec.get("initContainers", []) + spec["containers"]:
            for e in c.get("env", []):
                assert "secretKeyRef" not in e.get("valueFrom", {}), (name, c["name"], e)
            assert not any("secretRef" in f for f in c.get("envFrom", [])), (name, c["name"])


# --------------------------------------------------------------------------- webhook and TLS


def test_webhook_configuration(chart: helm.Chart):
    docs = render(chart, {})
    mwc = one(docs, "MutatingWebhookConfiguration")
    (hook,) = mwc["webhooks"]
    assert hook["sideEffects"] == "None"
    assert hook["failurePolicy"] == "Fail"
    assert hook["timeoutSeconds"] == 5
    assert hook["reinvocationPolicy"] == "IfNeeded"
    assert hook["admissionReviewVersions"] == ["v1"]
    assert hook["objectSelector"] == {"matchLabels": {INJECT_LABEL: "true"}}
    (expr,) = hook["namespaceSelector"]["matchExpressions"]
    assert expr["key"] == "kubernetes.io/metadata.name" and expr["operator"] == "NotIn"
    assert set(expr["values"]) == {NAMESPACE, "kube-system", "kube-public"}
    assert hook["rules"] == [{"operations": ["CREATE"], "apiGroups": [""],
                              "apiVersions": ["v1"], "resources": ["pods"],
                              "scope": "Namespaced"}]
    service = one(docs, "Service")
    ref = hook["clientConfig"]["service"]
    assert ref == {"name": service["metadata"]["name"], "namespace": NAMESPACE,
                   "path": "/mutate", "port": 443}
    https = next(p for p in service["spec"]["ports"] if p["port"] == 443)
    deployment = one(docs, "Deployment")
    pod_spec = deployment["spec"]["template"]["spec"]
    container = pod_spec["containers"][0]
    ports = {p["name"]: p["containerPort"] for p in container["ports"]}
    assert https["targetPort"] in ports
    args = container["args"]
    assert args[0] == "inject-webhook"
    assert int(args[args.index("--port") + 1]) == ports[https["targetPort"]]
    # The injector's excluded namespaces agree with the webhook's selector.
    assert set(injector_config(docs).excluded_namespaces) == set(expr["values"])
    # The Service selects the injector pods.
    labels = deployment["spec"]["template"]["metadata"]["labels"]
    assert service["spec"]["selector"].items() <= labels.items()


def test_generated_certificate_is_signed_by_the_ca_bundle(chart: helm.Chart):
    docs = render(chart, {})
    secret = one(docs, "Secret")
    assert secret["type"] == "kubernetes.io/tls"
    hook = one(docs, "MutatingWebhookConfiguration")["webhooks"][0]
    assert hook["clientConfig"]["caBundle"] == secret["data"]["ca.crt"]
    ca = x509.load_pem_x509_certificate(base64.b64decode(secret["data"]["ca.crt"]))
    cert = x509.load_pem_x509_certificate(base64.b64decode(secret["data"]["tls.crt"]))
    public = ca.public_key()
    if isinstance(public, rsa.RSAPublicKey):
        assert cert.signature_hash_algorithm is not None
        public.verify(cert.signature, cert.tbs_certificate_bytes, padding.PKCS1v15(),
                      cert.signature_hash_algorithm)
    else:
        assert isinstance(public, ec.EllipticCurvePublicKey)
        assert cert.signature_hash_algorithm is not None
        public.verify(cert.signature, cert.tbs_certificate_bytes,
                      ec.ECDSA(cert.signature_hash_algorithm))
    service = one(docs, "Service")["metadata"]["name"]
    names = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert f"{service}.{NAMESPACE}.svc" in names.get_values_for_type(x509.DNSName)
    volumes = one(docs, "Deployment")["spec"]["template"]["spec"]["volumes"]
    assert {"name": "tls", "secret": {"secretName": secret["metadata"]["name"],
                                      "defaultMode": 0o440}} in volumes


def test_cert_manager_mode(chart: helm.Chart):
    docs = render(chart, VALUE_SETS["cert-manager"])
    assert find(docs, "Secret") == []
    certificate = one(docs, "Certificate")
    issuer = one(docs, "Issuer")
    assert issuer["spec"] == {"selfSigned": {}}
    assert certificate["spec"]["issuerRef"]["name"] == issuer["metadata"]["name"]
    mwc = one(docs, "MutatingWebhookConfiguration")
    assert mwc["metadata"]["annotations"]["cert-manager.io/inject-ca-from"] == \
        f"{NAMESPACE}/{certificate['metadata']['name']}"
    assert "caBundle" not in mwc["webhooks"][0]["clientConfig"]
    volumes = one(docs, "Deployment")["spec"]["template"]["spec"]["volumes"]
    assert volumes[0]["secret"]["secretName"] == certificate["spec"]["secretName"]
    service = one(docs, "Service")["metadata"]["name"]
    assert f"{service}.{NAMESPACE}.svc" in certificate["spec"]["dnsNames"]
    # With an issuer of the cluster's, the chart creates none.
    docs = render(chart, VALUE_SETS["cert-manager-issuer"])
    assert find(docs, "Issuer") == []
    assert one(docs, "Certificate")["spec"]["issuerRef"] == {
        "name": "cluster-ca", "kind": "ClusterIssuer", "group": "cert-manager.io"}


# --------------------------------------------------------------------------- what is injected


def test_legacy_and_pvc_value_sets_reach_the_injector(chart: helm.Chart):
    config = injector_config(render(chart, VALUE_SETS["legacy-sidecar"]))
    assert config.sidecar_mode == "legacy"
    config = injector_config(render(chart, VALUE_SETS["pvc-spool"]))
    assert (config.spool_volume, config.spool_storage_class, config.spool_size) == (
        "ephemeral", "fast-ssd", "4Gi")
    defaults = injector_config(render(chart, {}))
    assert defaults == InjectorConfig(
        image="flux-agent:0.1.0", excluded_namespaces=(NAMESPACE, "kube-system", "kube-public"),
        namespace_bindings=True)


DIGEST = "sha256:" + "ab" * 32


@pytest.mark.parametrize(("values", "image"), [
    ({}, "flux-agent:0.1.0"),
    ({"image": {"repository": "registry.example/flux-agent", "digest": DIGEST}},
     f"registry.example/flux-agent@{DIGEST}"),
    ({"sidecar": {"image": {"repository": "registry.example/agent", "tag": "0.2.0"}}},
     "registry.example/agent:0.2.0"),
    ({"sidecar": {"image": {"repository": "registry.example/agent", "digest": DIGEST}}},
     f"registry.example/agent@{DIGEST}"),
    ({"sidecar": {"image": {"repository": f"registry.example:5000/agent@{DIGEST}"}}},
     f"registry.example:5000/agent@{DIGEST}"),
    ({"image": {"repository": "registry.example/flux-agent"},
      "sidecar": {"image": {"digest": DIGEST}}}, f"registry.example/flux-agent@{DIGEST}"),
])
def test_the_sidecar_image_can_be_pinned_by_digest(chart: helm.Chart, values: dict[str, Any],
                                                   image: str):
    """sidecar.image had no digest, and its repository could not hold one (the chart
    appended `:<tag>` to whatever it was given)."""
    chart.validate_schema(copy.deepcopy(values))
    docs = render(chart, values)
    config = injector_config(docs)
    assert config.image == image
    assert config.allow_image_override is False
    pod = opted_in({"flux.io/image": "somebody.example/agent:latest"})
    result = inject_pod(pod, config, "etl", ETL_NAMESPACE)
    agent = next(c for c in result.pod["spec"]["initContainers"] if c["name"] == "flux-agent")
    assert agent["image"] == image  # the pod's annotation does not override it
    assert any("flux.io/image ignored" in w for w in result.outcome.warnings)
    notes = chart.render(copy.deepcopy(values), name=RELEASE, namespace=NAMESPACE)[
        "flux-agent/templates/NOTES.txt"]
    assert f"Injected agent image: {image} (pods cannot override it)" in notes


def test_pods_choose_their_image_only_where_the_chart_allows_it(chart: helm.Chart):
    values = {"sidecar": {"allowImageOverride": True}}
    config = injector_config(render(chart, values))
    assert config.allow_image_override is True
    pod = opted_in({"flux.io/image": f"mirror.example/flux-agent@{DIGEST}"})
    agent = next(c for c in mutate_pod(pod, config, "etl", ETL_NAMESPACE)["spec"][
        "initContainers"] if c["name"] == "flux-agent")
    assert agent["image"] == f"mirror.example/flux-agent@{DIGEST}"
    notes = chart.render(values, name=RELEASE, namespace=NAMESPACE)[
        "flux-agent/templates/NOTES.txt"]
    assert "flux.io/image: ..." in notes and "pods cannot override it" not in notes


def test_the_default_image_name_is_flagged(chart: helm.Chart):
    """The default `flux-agent` is a short name each node's runtime resolves on its own
    (containerd: docker.io/library/flux-agent, not this image): the chart says so."""
    notes = chart.render({}, name=RELEASE, namespace=NAMESPACE)["flux-agent/templates/NOTES.txt"]
    assert "WARNING: image.repository is the short name `flux-agent`" in notes
    notes = chart.render({"image": {"repository": "registry.example/flux-agent"}}, name=RELEASE,
                         namespace=NAMESPACE)["flux-agent/templates/NOTES.txt"]
    assert "WARNING" not in notes


DATABASE_URL = "postgresql://sidecar:pw@db.example:5432/flux"


def with_database_file(environ: dict[str, str], tmp_path: Path) -> dict[str, str]:
    """``environ`` with the database URL file where this test can write it: what the
    Secret volume holds at the path the injector gave the agent."""
    assert environ["FLUX_AGENT_DATABASE_URL_FILE"] == "/etc/flux-agent/database/url"
    assert "FLUX_AGENT_DATABASE_URL" not in environ
    url_file = tmp_path / "database-url"
    url_file.write_text(DATABASE_URL + "\n")
    return {**environ, "FLUX_AGENT_DATABASE_URL_FILE": str(url_file)}


def test_the_agent_accepts_the_configmap(chart: helm.Chart, tmp_path: Path):
    """Every key is a real agent setting, and the agent's own loader accepts the values
    together with what the injector sets per pod."""
    known = {env_name(f.name) for f in SETTINGS}
    for name in ("defaults", "namespaces-jwt", "single-replica"):
        docs = render(chart, VALUE_SETS[name])
        config = injector_config(docs)
        pod = {"metadata": {"labels": {"flux.io/inject": "true"},
                            "annotations": {"flux.io/agency": "nasa"}},
               "spec": {"containers": [{"name": "app", "image": "etl:1"}]}}
        mutated = mutate_pod(pod, config, "etl", ETL_NAMESPACE)
        agent = next(c for c in mutated["spec"].get("initContainers", []) if
                     c["name"] == "flux-agent")
        configmaps = find(docs, "ConfigMap")
        for cm in configmaps:
            assert cm["metadata"]["name"] == agent["envFrom"][0]["configMapRef"]["name"]
            assert set(cm["data"]) <= known, set(cm["data"]) - known
            environ = dict(cm["data"])
            for e in agent["env"]:  # env wins over envFrom, as in Kubernetes
                assert set(e) == {"name", "value"}, e  # no Secret in the environment
                environ[e["name"]] = e["value"]
            loaded = load_config([], environ=with_database_file(environ, tmp_path))
            assert str(loaded.state_path) == STATE_DIR
            assert str.__str__(loaded.database_url) == DATABASE_URL
    docs = render(chart, VALUE_SETS["namespaces-jwt"])
    assert {cm["metadata"]["namespace"] for cm in find(docs, "ConfigMap")} == {
        NAMESPACE, "etl", "batch"}
    data = find(docs, "ConfigMap")[0]["data"]
    assert data["FLUX_AGENT_AUTH"] == "jwt"
    assert data["FLUX_AGENT_JWT_ISSUERS"] == "https://idp.example"
    assert data["FLUX_AGENT_DEDUPE_INDEX_SIZE"] == "100000"
    hook = one(docs, "MutatingWebhookConfiguration")["webhooks"][0]
    assert {"key": "kubernetes.io/metadata.name", "operator": "In",
            "values": ["etl", "batch"]} in hook["namespaceSelector"]["matchExpressions"]
    config = injector_config(docs)
    assert config.jwks_configmap == "flux-jwks"
    assert config.fail_closed is True and config.agent_auth == "jwt"
    assert "monitoring" in config.excluded_namespaces


def test_injector_arguments_parse(chart: helm.Chart, capsys: pytest.CaptureFixture[str]):
    """The Deployment's args and env reach the real command line; it stops only at the
    missing certificate (there is no Secret volume here)."""
    docs = render(chart, VALUE_SETS["namespaces-jwt"])
    container = one(docs, "Deployment")["spec"]["template"]["spec"]["containers"][0]
    assert container["args"][0] == "inject-webhook"
    code = prepare_webhook(container["args"][1:], environ=injector_env(docs))
    assert code == 78
    assert "--cert: no such file: /etc/flux-agent-injector/tls/tls.crt" in \
        capsys.readouterr().err


def opted_in(annotations: dict[str, str] | None = None) -> dict[str, Any]:
    return {"apiVersion": "v1", "kind": "Pod",
            "metadata": {"generateName": "etl-", "labels": {"flux.io/inject": "true"},
                         "annotations": annotations or {}},
            "spec": {"containers": [{"name": "app", "image": "etl:1"}]}}


def agent_env(pod: dict[str, Any]) -> dict[str, str]:
    agent = next(c for c in pod["spec"]["initContainers"] if c["name"] == "flux-agent")
    return {e["name"]: e.get("value", "") for e in agent["env"]}


def test_the_webhook_binds_each_pod_to_its_namespaces_agency(chart: helm.Chart):
    """A pod's flux.io/agency annotation once chose its agency freely: anyone allowed to
    create pods in an opted-in namespace could write as any agency."""
    config = injector_config(render(chart, VALUE_SETS["bindings"]))
    assert config.fail_closed is False  # refused all the same: this check fails closed
    # A bound namespace: its agency, without any annotation.
    pod = mutate_pod(opted_in(), config, "etl")
    assert agent_env(pod)["FLUX_AGENT_AGENCY"] == "nasa"
    assert agent_env(pod)["FLUX_AGENT_AUTH"] == "none"  # env: the ConfigMap cannot flip it
    assert agent_env(mutate_pod(opted_in({"flux.io/agency": "nasa"}), config, "etl")) == \
        agent_env(pod)
    # An agency the namespace is not bound to: refused at admission, with the reason.
    for namespace, agency in (("etl", "noaa"), ("batch", "nasa")):
        with pytest.raises(InjectionError, match=f"'{agency}' is not an agency of "
                                                 f"namespace {namespace}"):
            mutate_pod(opted_in({"flux.io/agency": agency}), config, namespace)
    # Several agencies: the pod chooses among them, and must.
    assert agent_env(mutate_pod(opted_in({"flux.io/agency": "noaa"}), config, "science"))[
        "FLUX_AGENT_AGENCY"] == "noaa"
    with pytest.raises(InjectionError, match="choose one"):
        mutate_pod(opted_in(), config, "science")
    # The Namespace's own annotation binds it when the chart reads it (the default).
    config = injector_config(render(chart, {}))
    assert agent_env(mutate_pod(opted_in(), config, "etl", {"flux.io/agency": "noaa"}))[
        "FLUX_AGENT_AGENCY"] == "noaa"
    with pytest.raises(InjectionError, match="'nasa' is not an agency of namespace etl"):
        mutate_pod(opted_in({"flux.io/agency": "nasa"}), config, "etl",
                   {"flux.io/agency": "noaa"})
    with pytest.raises(InjectionError, match="namespace etl is bound to no agency"):
        mutate_pod(opted_in({"flux.io/agency": "nasa"}), config, "etl", {})


def test_workload_identity_value_set(chart: helm.Chart, tmp_path: Path):
    docs = render(chart, VALUE_SETS["workload-identity"])
    config = injector_config(docs)
    assert (config.agent_auth, config.jwks_configmap) == ("kubernetes", "cluster-sa-jwks")
    pod = mutate_pod(opted_in(), config, "etl")
    env = agent_env(pod)
    assert env["FLUX_AGENT_AUTH"] == "kubernetes"
    assert env["FLUX_AGENT_KUBE_BINDINGS"] == "etl=nasa"
    assert env["FLUX_AGENT_JWT_ISSUERS"] == "https://kubernetes.default.svc.cluster.local"
    app = pod["spec"]["containers"][0]
    assert {"name": "FLUX_AGENT_TOKEN_FILE", "value": "/var/run/secrets/flux-agent/token"} in \
        app["env"]
    token = next(v for v in pod["spec"]["volumes"] if v["name"] == "flux-agent-token")
    assert token["projected"]["sources"] == [{"serviceAccountToken": {
        "audience": "flux-agent", "path": "token", "expirationSeconds": 3600}}]
    cm = find(docs, "ConfigMap")[0]["data"]
    loaded = load_config([], environ=with_database_file({**cm, **env}, tmp_path))
    assert loaded.auth == "kubernetes" and loaded.kube_bindings == ("etl=nasa",)
    assert loaded.jwt_jwks_file == "/etc/flux-agent/jwks/jwks.json"


# --------------------------------------------------------------------------- hardening


def test_injector_pod_is_locked_down(chart: helm.Chart):
    docs = render(chart, {})
    deployment = one(docs, "Deployment")
    assert deployment["spec"]["replicas"] == 2
    assert deployment["spec"]["strategy"]["rollingUpdate"]["maxUnavailable"] == 0
    pod = deployment["spec"]["template"]["spec"]
    # Its one API call (agent.namespaceBinding): get on namespaces, nothing else.
    assert pod["automountServiceAccountToken"] is True
    (role,) = find(docs, "ClusterRole")
    assert role["rules"] == [{"apiGroups": [""], "resources": ["namespaces"], "verbs": ["get"]}]
    (binding,) = find(docs, "ClusterRoleBinding")
    assert binding["roleRef"]["name"] == role["metadata"]["name"]
    assert binding["subjects"] == [{"kind": "ServiceAccount", "namespace": NAMESPACE,
                                    "name": pod["serviceAccountName"]}]
    assert pod["securityContext"]["runAsNonRoot"] is True
    sc = pod["containers"][0]["securityContext"]
    assert sc["readOnlyRootFilesystem"] is True
    assert sc["allowPrivilegeEscalation"] is False
    assert sc["capabilities"] == {"drop": ["ALL"]}
    assert sc["seccompProfile"] == {"type": "RuntimeDefault"}
    assert pod["containers"][0]["readinessProbe"]["httpGet"]["scheme"] == "HTTPS"
    assert one(docs, "ServiceAccount")["automountServiceAccountToken"] is False
    assert not {"Role", "RoleBinding"} & {d["kind"] for d in docs}
    pdb = one(docs, "PodDisruptionBudget")
    assert pdb["spec"]["minAvailable"] == 1
    assert pdb["spec"]["selector"]["matchLabels"].items() <= \
        deployment["spec"]["template"]["metadata"]["labels"].items()
    policy = one(docs, "NetworkPolicy")
    assert policy["spec"]["egress"] == [{"ports": [{"port": 443, "protocol": "TCP"},
                                                   {"port": 6443, "protocol": "TCP"}]}]
    assert set(policy["spec"]["policyTypes"]) == {"Ingress", "Egress"}
    port_names = {p["name"] for p in pod["containers"][0]["ports"]}
    assert {p["port"] for rule in policy["spec"]["ingress"] for p in rule["ports"]} == \
        port_names
    # Bound by the chart's values alone, or with tokens (jwt): no API access at all.
    for values in (VALUE_SETS["bindings"], VALUE_SETS["namespaces-jwt"]):
        docs = render(chart, values)
        assert one(docs, "Deployment")["spec"]["template"]["spec"][
            "automountServiceAccountToken"] is False
        assert not {"ClusterRole", "ClusterRoleBinding"} & {d["kind"] for d in docs}
        assert one(docs, "NetworkPolicy")["spec"]["egress"] == []
    # One replica: no PodDisruptionBudget that would block node drains forever.
    docs = render(chart, VALUE_SETS["single-replica"])
    assert find(docs, "PodDisruptionBudget") == []
    assert find(docs, "NetworkPolicy") == []
    assert find(docs, "ServiceAccount") == []


def test_monitoring_objects(chart: helm.Chart):
    assert not {"ServiceMonitor", "PodMonitor", "PrometheusRule"} & {
        d["kind"] for d in render(chart, {})}
    docs = render(chart, VALUE_SETS["monitoring"])
    monitor = one(docs, "ServiceMonitor")
    assert monitor["metadata"]["labels"]["release"] == "kp"
    assert monitor["spec"]["endpoints"][0]["port"] == "metrics"
    service_ports = {p["name"] for p in one(docs, "Service")["spec"]["ports"]}
    assert "metrics" in service_ports
    pods = one(docs, "PodMonitor")
    assert pods["spec"]["selector"] == {"matchLabels": {"flux.io/inject": "true"}}
    assert pods["spec"]["podMetricsEndpoints"][0]["port"] == ADMIN_PORT_NAME
    rules = one(docs, "PrometheusRule")
    exprs = " ".join(r["expr"] for g in rules["spec"]["groups"] for r in g["rules"])
    for metric in ("flux_spool_bytes", "flux_spool_max_bytes", "flux_postgres_up",
                   "flux_flush_stalled_seconds", "flux_ready",
                   "flux_events_dead_lettered_total", "flux_injector_admissions_total"):
        assert metric in exprs


def test_notes_tell_how_to_opt_in(chart: helm.Chart):
    notes = chart.render({}, name=RELEASE, namespace=NAMESPACE)["flux-agent/templates/NOTES.txt"]
    assert 'flux.io/inject: "true"' in notes
    assert "flux.io/agency" in notes
    assert "create secret generic flux-agent-database" in notes


# --------------------------------------------------------------------------- the schema


@pytest.mark.parametrize("bad", [
    {"injector": {"replicas": "two"}},
    {"injector": {"replica": 2}},
    {"injector": {"replicas": 0}},
    {"tls": {"mode": "acme"}},
    {"tls": {"mode": "secret"}},
    {"webhook": {"failurePolicy": "Retry"}},
    {"webhook": {"timeoutSeconds": 31}},
    {"sidecar": {"mode": "sidecar"}},
    {"sidecar": {"spoolSize": "lots"}},
    {"sidecar": {"image": {"digest": "sha256:xyz"}}},
    {"sidecar": {"image": {"digest": "a" * 64}}},
    {"sidecar": {"image": {"repository": "registry.example/agent:0.1.0"}}},
    {"sidecar": {"image": {"repository": "registry.example/agent@sha256:" + "a" * 64,
                           "tag": "0.1.0"}}},
    {"sidecar": {"image": {"repository": "registry.example/agent@sha256:" + "a" * 64,
                           "digest": "sha256:" + "b" * 64}}},
    {"sidecar": {"allowImageOverride": "no"}},
    {"sidecar": {"upstream": "aggregator"}},  # without the aggregator
    {"sidecar": {"upstream": "postgres"}},
    {"aggregator": {"enabled": True}},  # without the cluster's service-account keys
    {"aggregator": {"replicas": 0}},
    {"aggregator": {"spool": {"size": "20GB"}}},
    {"aggregator": {"drainTimeout": "1h"}},
    {"aggregator": {"tls": {"enabled": "yes"}}},
    {"aggregator": {"tls": {"caConfigMapName": "Not A Name"}}},
    {"aggregator": {"networkPolicy": {"databasePort": 0}}},
    {"aggregator": {"extraEnv": {"FLUX_AGENT_DATABASE_URL": "postgresql://x"}}},
    {"aggregator": {"sidecars": 2}},
    {"agent": {"auth": "jwt"}},
    {"agent": {"agency": "NASA"}},
    {"agent": {"agencyBindings": {"etl": "NASA"}}},
    {"agent": {"agencyBindings": {"Not A Namespace": "nasa"}}},
    {"agent": {"agencyBindings": {"etl": []}}},
    {"agent": {"auth": "kubernetes"}},  # without the issuer's keys
    {"agent": {"extraEnv": {"FLUX_AGENT_DATABASE_URL": "postgresql://x"}}},
    {"agent": {"extraEnv": {"PATH": "/bin"}}},
    {"database": {"existingSecret": "Not_A_Name"}},
    {"metrics": {"serviceMonitor": {"enabled": "yes"}}},
    {"unknownTopLevel": True},
])
def test_schema_rejects_bad_values(chart: helm.Chart, bad: dict[str, Any]):
    with pytest.raises(helm.HelmValuesError):
        chart.validate_schema(bad)
    with pytest.raises(helm.HelmError):
        chart.render(bad, name=RELEASE, namespace=NAMESPACE)


def test_every_value_is_described_by_the_schema(chart: helm.Chart):
    """values.yaml and values.schema.json name the same keys."""
    schema = chart.schema
    assert schema is not None

    def walk(values: dict[str, Any], node: dict[str, Any], where: str) -> None:
        props = node.get("properties", {})
        assert node.get("additionalProperties") is False or not props, where
        for key, value in values.items():
            assert key in props, f"{where}.{key} is not in values.schema.json"
            if isinstance(value, dict) and props[key].get("properties"):
                walk(value, props[key], f"{where}.{key}")
        for key in node.get("required", []):
            assert key in values, f"{where}.{key} is required but has no default"

    walk(chart.values, schema, "values")


# --------------------------------------------------------------------------- the aggregator tier

AGGREGATOR = f"{RELEASE}-flux-agent-aggregator"
AGGREGATOR_URL = f"https://{AGGREGATOR}.{NAMESPACE}.svc:8788"
# Settings of the tiered topology that the agent's configuration may not know yet (the agent
# side is built to the same contract); every other FLUX_AGENT_* name the chart or the
# injector sets must be one of the agent's settings today.
def agent_settings() -> set[str]:
    """The FLUX_AGENT_* names the agent reads today (secrets also as NAME_FILE)."""
    names = {env_name(f.name) for f in SETTINGS}
    return names | {env_name(f.name) + "_FILE" for f in SETTINGS if f.metadata["secret"]}


def aggregator_pod(docs: list[dict[str, Any]]) -> dict[str, Any]:
    spec: dict[str, Any] = one(docs, "StatefulSet")["spec"]["template"]["spec"]
    return spec


def aggregator_env(docs: list[dict[str, Any]]) -> dict[str, str]:
    (container,) = aggregator_pod(docs)["containers"]
    assert all(set(e) == {"name", "value"} for e in container["env"])
    return {e["name"]: e["value"] for e in container["env"]}


def by_name(docs: list[dict[str, Any]], kind: str, name: str) -> list[dict[str, Any]]:
    return [d for d in docs if d["kind"] == kind and d["metadata"]["name"] == name]


def test_aggregator_is_off_by_default(chart: helm.Chart):
    docs = render(chart, {})
    assert not {"StatefulSet", "PersistentVolumeClaim"} & {d["kind"] for d in docs}
    assert not [d for d in docs if "aggregator" in d["metadata"]["name"]]
    config = injector_config(docs)
    assert (config.upstream, config.aggregator_url, config.aggregator_ca_configmap) == (
        "database", "", "")


def test_aggregator_statefulset(chart: helm.Chart):
    docs = render(chart, VALUE_SETS["aggregator"])
    statefulset = one(docs, "StatefulSet")
    spec = statefulset["spec"]
    assert statefulset["metadata"] == {**statefulset["metadata"], "name": AGGREGATOR,
                                       "namespace": NAMESPACE}
    assert spec["replicas"] == 2
    assert spec["podManagementPolicy"] == "Parallel"
    assert spec["persistentVolumeClaimRetentionPolicy"] == {"whenDeleted": "Retain",
                                                            "whenScaled": "Retain"}
    (claim,) = spec["volumeClaimTemplates"]
    assert claim["metadata"]["name"] == "spool"
    assert claim["spec"] == {"accessModes": ["ReadWriteOnce"],
                             "resources": {"requests": {"storage": "20Gi"}}}
    pod = spec["template"]["spec"]
    assert spec["selector"]["matchLabels"].items() <= spec["template"]["metadata"][
        "labels"].items()
    assert pod["automountServiceAccountToken"] is False
    (account,) = by_name(docs, "ServiceAccount", pod["serviceAccountName"])
    assert account["automountServiceAccountToken"] is False
    assert pod["securityContext"] == {"runAsNonRoot": True, "runAsUser": 10001,
                                      "runAsGroup": 10001, "fsGroup": 10001,
                                      "fsGroupChangePolicy": "OnRootMismatch",
                                      "seccompProfile": {"type": "RuntimeDefault"}}
    (container,) = pod["containers"]
    assert container["name"] == "flux-aggregator"
    assert container["image"] == "flux-agent:0.1.0"
    assert container["args"] == ["aggregate"]
    assert container["securityContext"] == {
        "runAsNonRoot": True, "runAsUser": 10001, "runAsGroup": 10001,
        "readOnlyRootFilesystem": True, "allowPrivilegeEscalation": False,
        "privileged": False, "capabilities": {"drop": ["ALL"]},
        "seccompProfile": {"type": "RuntimeDefault"}}
    ports = {p["name"]: p["containerPort"] for p in container["ports"]}
    assert ports == {"flux-records": 8788, "flux-admin": 9464}
    assert container["readinessProbe"]["httpGet"] == {"path": "/health/ready",
                                                      "port": "flux-admin"}
    assert container["livenessProbe"]["httpGet"] == {"path": "/health/live",
                                                     "port": "flux-admin"}
    assert container["startupProbe"]["httpGet"]["port"] == "flux-admin"
    env = aggregator_env(docs)
    assert env == {
        "FLUX_AGENT_LISTEN": "0.0.0.0:8788",
        "FLUX_AGENT_ADMIN_LISTEN": "0.0.0.0:9464",
        "FLUX_AGENT_SOCKET": "off",
        "FLUX_AGENT_STATE_DIR": "/var/lib/flux-agent",
        "FLUX_AGENT_SPOOL_MAX_BYTES": str(20 * 1024**3 - 2 * 1024**3),
        "FLUX_AGENT_SPOOL_DURABILITY": "fsync",
        "FLUX_AGENT_DRAIN_TIMEOUT": "60s",
        "FLUX_AGENT_DATABASE_URL_FILE": "/etc/flux-agent/database/url",
        "FLUX_AGENT_MIGRATE": "true",
        "FLUX_AGENT_DATABASE_PGBOUNCER": "false",
        "FLUX_AGENT_FLUSH_LANES": "4",
        "FLUX_AGENT_LOG_LEVEL": "info",
        "FLUX_AGENT_AUTH": "kubernetes",
        "FLUX_AGENT_KUBE_BINDINGS": "batch=noaa,batch=nasa,etl=nasa",
        "FLUX_AGENT_JWT_AUDIENCE": "flux-aggregator",
        "FLUX_AGENT_JWT_ISSUERS": "https://kubernetes.default.svc.cluster.local",
        "FLUX_AGENT_JWT_JWKS_FILE": "/etc/flux-agent/jwks/jwks.json",
        "FLUX_AGENT_TLS_CERT_FILE": "/etc/flux-agent/tls/tls.crt",
        "FLUX_AGENT_TLS_KEY_FILE": "/etc/flux-agent/tls/tls.key",
    }
    # Every path the env names is a mount of the right volume.
    mounts = {m["mountPath"]: m for m in container["volumeMounts"]}
    volumes = {v["name"]: v for v in pod["volumes"]}
    assert mounts["/var/lib/flux-agent"]["name"] == "spool"
    for path, volume in (("/etc/flux-agent/database", "database"),
                         ("/etc/flux-agent/jwks", "jwks"), ("/etc/flux-agent/tls", "tls")):
        assert mounts[path] == {"name": volume, "mountPath": path, "readOnly": True}
    assert volumes["database"]["secret"] == {"secretName": "flux-agent-database",
                                             "items": [{"key": "url", "path": "url"}],
                                             "defaultMode": 0o440}
    assert volumes["jwks"]["configMap"] == {"name": "cluster-sa-jwks"}
    assert volumes["tls"]["secret"]["secretName"] == f"{AGGREGATOR}-tls"
    # Drains before the kubelet kills it.
    assert pod["terminationGracePeriodSeconds"] > 60
    # Spread over nodes and zones, and preferably one per node.
    keys = {c["topologyKey"] for c in pod["topologySpreadConstraints"]}
    assert keys == {"kubernetes.io/hostname", "topology.kubernetes.io/zone"}
    assert pod["affinity"]["podAntiAffinity"]["preferredDuringSchedulingIgnoredDuringExecution"]
    # The Services: the records API for the sidecars, and the StatefulSet's headless one.
    (service,) = by_name(docs, "Service", AGGREGATOR)
    assert service["spec"]["type"] == "ClusterIP"
    assert service["spec"]["ports"] == [{"name": "flux-records", "port": 8788,
                                         "targetPort": "flux-records", "protocol": "TCP"}]
    assert service["spec"]["selector"].items() <= spec["template"]["metadata"]["labels"].items()
    (headless,) = by_name(docs, "Service", spec["serviceName"])
    assert headless["spec"]["clusterIP"] == "None"
    # The injector's Service does not select the aggregators, nor theirs the injector.
    injector = one(docs, "Deployment")["spec"]["template"]["metadata"]["labels"]
    assert not service["spec"]["selector"].items() <= injector.items()
    budget = by_name(docs, "PodDisruptionBudget", AGGREGATOR)[0]
    assert budget["spec"] == {"maxUnavailable": 1, "selector": spec["selector"]}


def test_the_agent_accepts_the_aggregators_settings(chart: helm.Chart, tmp_path: Path):
    """Every FLUX_AGENT_* name the aggregator is given is an agent setting (or one of the
    tiered topology's), and the agent's own loader accepts the values, files included."""
    from .test_auth import jwks, private_key

    known = agent_settings()
    for name in ("aggregator", "aggregator-plaintext", "aggregator-handoff"):
        env = aggregator_env(render(chart, VALUE_SETS[name]))
        assert set(env) <= known, set(env) - known
        jwks_file = tmp_path / "jwks.json"
        jwks_file.write_text(jwks(("k", private_key())))
        environ = {**with_database_file(env, tmp_path),
                   "FLUX_AGENT_JWT_JWKS_FILE": str(jwks_file),
                   "FLUX_AGENT_STATE_DIR": str(tmp_path / "state")}
        loaded = load_config([], environ=environ)
        assert loaded.auth == "kubernetes"
        assert loaded.listen == "0.0.0.0:8788" and loaded.admin_listen == "0.0.0.0:9464"
        assert loaded.socket_path is None
        assert loaded.jwt_audience == "flux-aggregator"
        assert loaded.jwt_issuers == ("https://kubernetes.default.svc.cluster.local",)
        assert str.__str__(loaded.database_url) == DATABASE_URL
        assert loaded.kube_bindings == tuple(env["FLUX_AGENT_KUBE_BINDINGS"].split(","))
        if name == "aggregator-plaintext":
            assert env["FLUX_AGENT_ALLOW_PLAINTEXT"] == "true"
            assert "FLUX_AGENT_TLS_CERT_FILE" not in env


@pytest.mark.parametrize(("agent", "bindings"), [
    ({"agencyBindings": {"etl": "nasa"}}, "etl=nasa"),
    ({"agencyBindings": {"etl": "nasa", "batch": ["noaa", "nasa"]}},
     "batch=noaa,batch=nasa,etl=nasa"),
    # "*" (and agent.agency) stands for every opted-in namespace not named.
    ({"namespaces": ["etl", "batch", "science"],
      "agencyBindings": {"etl": "nasa", "*": ["noaa", "nasa"]}},
     "etl=nasa,batch=noaa,batch=nasa,science=noaa,science=nasa"),
    ({"namespaces": ["etl", "batch"], "agency": "noaa"}, "etl=noaa,batch=noaa"),
])
def test_aggregator_bindings_are_the_injectors(chart: helm.Chart, agent: dict[str, Any],
                                               bindings: str):
    """The aggregator refuses a record whose agency its sender's namespace is not bound to:
    it is given the same bindings the injector binds pods by, one NAMESPACE=AGENCY entry per
    agency a namespace may write as."""
    values = {"aggregator": {"enabled": True},
              "agent": {"namespaces": ["etl"], "namespaceBinding": False,
                        "kubernetes": {"jwksConfigMap": "jwks"}, **agent}}
    docs = render(chart, values)
    env = aggregator_env(docs)
    assert env["FLUX_AGENT_KUBE_BINDINGS"] == bindings
    config = injector_config(docs)
    entries = [e.split("=") for e in bindings.split(",")]
    for namespace in {ns for ns, _ in entries}:
        allowed = {a for ns, a in entries if ns == namespace}
        for agency in ("nasa", "noaa"):
            pod = opted_in({"flux.io/agency": agency})
            if agency in allowed:
                assert agent_env(mutate_pod(pod, config, namespace))[
                    "FLUX_AGENT_AGENCY"] == agency
            else:
                with pytest.raises(InjectionError, match="is not an agency of"):
                    mutate_pod(pod, config, namespace)


@pytest.mark.parametrize(("values", "says"), [
    ({"agent": {"namespaces": ["etl"], "agencyBindings": {"etl": "nasa"},
                "kubernetes": {"jwksConfigMap": "jwks"}}},
     "set agent.namespaceBinding=false"),
    ({"agent": {"namespaces": ["etl"], "namespaceBinding": False,
                "kubernetes": {"jwksConfigMap": "jwks"}}},
     "binds no namespace"),
    ({"agent": {"namespaceBinding": False, "agencyBindings": {"*": "nasa"},
                "kubernetes": {"jwksConfigMap": "jwks"}},
      "aggregator": {"networkPolicy": {"clientNamespaceSelector": {"matchLabels": {"a": "b"}}}}},
     "set agent.namespaces, or bind each namespace"),
    ({"agent": {"namespaceBinding": False, "agencyBindings": {"etl": "nasa"},
                "kubernetes": {"jwksConfigMap": "jwks"}}},
     "list the namespaces whose pods opt in"),
    ({"agent": AGGREGATOR_AGENT,
      "aggregator": {"drainTimeout": "2m", "terminationGracePeriodSeconds": 90}},
     r"terminationGracePeriodSeconds \(90\) must exceed aggregator.drainTimeout \(2m\)"),
    ({"agent": AGGREGATOR_AGENT, "tls": {"mode": "secret", "secret": {
        "name": "webhook-tls", "caBundle": CLUSTER_CA}}},
     "aggregator.tls.caBundle: required"),
    ({"agent": AGGREGATOR_AGENT, "aggregator": {"tls": {"caBundle": CLUSTER_CA}},
      "tls": {"mode": "secret", "secret": {"name": "webhook-tls", "caBundle": CLUSTER_CA}}},
     "aggregator.tls.secretName: required"),
    ({"agent": AGGREGATOR_AGENT, "tls": {"mode": "certManager", "certManager": {
        "issuerRef": {"name": "cluster-ca", "kind": "ClusterIssuer"}}}},
     "aggregator.tls.caBundle: required"),
])
def test_aggregator_refuses_values_it_cannot_serve(chart: helm.Chart, values: dict[str, Any],
                                                   says: str):
    values = copy.deepcopy(values)
    values.setdefault("aggregator", {})["enabled"] = True
    chart.validate_schema(copy.deepcopy(values))  # each value alone is valid
    with pytest.raises(helm.HelmError, match=says):
        chart.render(values, name=RELEASE, namespace=NAMESPACE, is_install=True)


def _cert_and_ca(docs: list[dict[str, Any]], secret: str, ca_key: str = "ca.crt"
                 ) -> tuple[x509.Certificate, bytes]:
    (tls,) = by_name(docs, "Secret", secret)
    cert = x509.load_pem_x509_certificate(base64.b64decode(tls["data"]["tls.crt"]))
    return cert, base64.b64decode(tls["data"][ca_key])


def ca_configmaps(docs: list[dict[str, Any]]) -> dict[str, str]:
    return {d["metadata"]["namespace"]: d["data"]["ca.crt"]
            for d in by_name(docs, "ConfigMap", "flux-agent-aggregator-ca")}


def test_aggregator_tls_helm_mode(chart: helm.Chart):
    """The chart's CA signs the aggregators' certificate for their Service's names, and is
    what every opted-in namespace's sidecars are given to trust."""
    docs = render(chart, VALUE_SETS["aggregator"])
    cert, ca_pem = _cert_and_ca(docs, f"{AGGREGATOR}-tls")
    ca = x509.load_pem_x509_certificate(ca_pem)
    public = ca.public_key()
    assert isinstance(public, rsa.RSAPublicKey) and cert.signature_hash_algorithm is not None
    public.verify(cert.signature, cert.tbs_certificate_bytes, padding.PKCS1v15(),
                  cert.signature_hash_algorithm)
    names = cert.extensions.get_extension_for_class(
        x509.SubjectAlternativeName).value.get_values_for_type(x509.DNSName)
    assert f"{AGGREGATOR}.{NAMESPACE}.svc" in names  # the host of the sidecars' URL
    assert f"*.{AGGREGATOR}-pods.{NAMESPACE}.svc" in names  # each replica
    # Not the webhook's CA: a separate one.
    webhook_ca = base64.b64decode(by_name(docs, "Secret", f"{RELEASE}-flux-agent-injector-tls")[
        0]["data"]["ca.crt"])
    assert webhook_ca != ca_pem
    assert ca_configmaps(docs) == {ns: ca_pem.decode().strip() + "\n"
                                   for ns in (NAMESPACE, "etl", "batch")}


def test_aggregator_tls_cert_manager_modes(chart: helm.Chart):
    # The chart's own CA Issuer: the CA is known when the chart renders.
    docs = render(chart, VALUE_SETS["aggregator-cert-manager"])
    (certificate,) = by_name(docs, "Certificate", AGGREGATOR)
    (issuer,) = by_name(docs, "Issuer", f"{AGGREGATOR}-ca")
    assert issuer["spec"] == {"ca": {"secretName": f"{AGGREGATOR}-ca"}}
    assert certificate["spec"]["issuerRef"] == {"name": f"{AGGREGATOR}-ca", "kind": "Issuer",
                                                "group": "cert-manager.io"}
    assert certificate["spec"]["secretName"] == aggregator_pod(docs)["volumes"][-1]["secret"][
        "secretName"]
    assert f"{AGGREGATOR}.{NAMESPACE}.svc" in certificate["spec"]["dnsNames"]
    _, ca_pem = _cert_and_ca(docs, f"{AGGREGATOR}-ca", "tls.crt")
    x509.load_pem_x509_certificate(ca_pem)
    assert set(ca_configmaps(docs).values()) == {ca_pem.decode().strip() + "\n"}
    # An issuer of the cluster's: its CA comes from the values.
    docs = render(chart, VALUE_SETS["aggregator-cert-manager-issuer"])
    assert by_name(docs, "Issuer", f"{AGGREGATOR}-ca") == []
    (certificate,) = by_name(docs, "Certificate", AGGREGATOR)
    assert certificate["spec"]["issuerRef"]["name"] == "cluster-ca"
    assert set(ca_configmaps(docs).values()) == {
        base64.b64decode(CLUSTER_CA).decode().strip() + "\n"}


def test_aggregator_tls_existing_secret_and_plaintext(chart: helm.Chart):
    docs = render(chart, VALUE_SETS["aggregator-existing-secret"])
    assert by_name(docs, "Secret", f"{AGGREGATOR}-tls") == []
    volumes = {v["name"]: v for v in aggregator_pod(docs)["volumes"]}
    assert volumes["tls"]["secret"]["secretName"] == "my-aggregator-tls"
    assert set(ca_configmaps(docs)) == {NAMESPACE, "etl", "batch"}
    # Plain HTTP only by choice: no certificate, no CA, and the agent is told so.
    docs = render(chart, VALUE_SETS["aggregator-plaintext"])
    env = aggregator_env(docs)
    assert env["FLUX_AGENT_ALLOW_PLAINTEXT"] == "true"
    assert not {"FLUX_AGENT_TLS_CERT_FILE", "FLUX_AGENT_TLS_KEY_FILE"} & set(env)
    assert "tls" not in {v["name"] for v in aggregator_pod(docs)["volumes"]}
    assert ca_configmaps(docs) == {}
    assert not [d for d in docs if d["kind"] == "Secret" and "aggregator" in d["metadata"]["name"]]
    config = injector_config(docs)
    assert config.aggregator_url == f"http://{AGGREGATOR}.{NAMESPACE}.svc:8788"
    assert config.aggregator_ca_configmap == ""


def test_aggregator_network_policy(chart: helm.Chart):
    """Records only from opted-in pods of the opted-in namespaces; scrapes from the metrics
    peers; out only to DNS and PostgreSQL."""
    docs = render(chart, VALUE_SETS["aggregator"])
    (policy,) = by_name(docs, "NetworkPolicy", AGGREGATOR)
    spec = policy["spec"]
    assert spec["podSelector"]["matchLabels"].items() <= one(docs, "StatefulSet")["spec"][
        "template"]["metadata"]["labels"].items()
    assert set(spec["policyTypes"]) == {"Ingress", "Egress"}
    records, admin = spec["ingress"]
    assert records["ports"] == [{"port": "flux-records", "protocol": "TCP"}]
    assert records["from"] == [{
        "namespaceSelector": {"matchExpressions": [{
            "key": "kubernetes.io/metadata.name", "operator": "In", "values": ["etl", "batch"]}]},
        "podSelector": {"matchLabels": {"flux.io/inject": "true"}}}]
    assert admin == {"ports": [{"port": "flux-admin", "protocol": "TCP"}]}
    assert spec["egress"] == [
        {"ports": [{"port": 53, "protocol": "UDP"}, {"port": 53, "protocol": "TCP"}]},
        {"ports": [{"port": 5432, "protocol": "TCP"}]}]
    # A namespace selector instead of a list, PostgreSQL behind PgBouncer on its own network.
    docs = render(chart, VALUE_SETS["aggregator-handoff"])
    (policy,) = by_name(docs, "NetworkPolicy", AGGREGATOR)
    assert policy["spec"]["ingress"][0]["from"] == [{
        "namespaceSelector": {"matchLabels": {"flux.io/opted-in": "true"}},
        "podSelector": {"matchLabels": {"flux.io/inject": "true"}}}]
    assert policy["spec"]["egress"][1] == {"ports": [{"port": 6432, "protocol": "TCP"}],
                                           "to": [{"ipBlock": {"cidr": "10.20.0.0/16"}}]}


def test_aggregator_monitoring(chart: helm.Chart):
    docs = render(chart, VALUE_SETS["aggregator"])
    (monitor,) = by_name(docs, "PodMonitor", AGGREGATOR)
    assert monitor["spec"]["namespaceSelector"] == {"matchNames": [NAMESPACE]}
    assert monitor["spec"]["selector"]["matchLabels"].items() <= one(docs, "StatefulSet")[
        "spec"]["template"]["metadata"]["labels"].items()
    assert monitor["spec"]["podMetricsEndpoints"][0]["port"] == "flux-admin"
    groups = {g["name"] for g in one(docs, "PrometheusRule")["spec"]["groups"]}
    assert groups == {"flux-agent.sidecar", "flux-agent.injector", "flux-agent.aggregator"}


def injected(docs: list[dict[str, Any]], namespace: str = "etl", **annotations: str
             ) -> dict[str, Any]:
    config = injector_config(docs)
    pod = mutate_pod(opted_in({"flux.io/agency": "nasa", **annotations}), config, namespace)
    for version in KUBE_VERSIONS:
        kubernetes_validate.validate({**pod, "metadata": {**pod["metadata"],
                                                          "namespace": namespace}},
                                     version, strict=True)
    return pod


def the_agent_of(pod: dict[str, Any]) -> dict[str, Any]:
    return next(c for c in pod["spec"].get("initContainers", []) + pod["spec"]["containers"]
                if c["name"] == "flux-agent")


@pytest.mark.parametrize("mode", ["native", "legacy"])
def test_sidecars_deliver_to_the_aggregators_without_database_credentials(chart: helm.Chart,
                                                                           mode: str):
    docs = render(chart, VALUE_SETS["aggregator"])
    config = injector_config(docs)
    assert (config.upstream, config.aggregator_url, config.aggregator_ca_configmap) == (
        "aggregator", AGGREGATOR_URL, "flux-agent-aggregator-ca")
    pod = injected(docs, **{"flux.io/sidecar-mode": mode})
    agent = the_agent_of(pod)
    env = {e["name"]: e["value"] for e in agent["env"]}
    assert env["FLUX_AGENT_UPSTREAM"] == AGGREGATOR_URL
    assert env["FLUX_AGENT_UPSTREAM_TOKEN_FILE"] == "/var/run/secrets/flux-agent/upstream/token"
    assert env["FLUX_AGENT_UPSTREAM_CA_FILE"] == "/etc/flux-agent/upstream-ca/ca.crt"
    assert not {"FLUX_AGENT_DATABASE_URL", "FLUX_AGENT_DATABASE_URL_FILE",
                "FLUX_AGENT_HANDOFF"} & set(env)
    assert set(env) <= agent_settings(), set(env) - agent_settings()
    # No Secret at all in the pod: nothing of the database reaches an app namespace.
    assert not [v for v in pod["spec"]["volumes"] if "secret" in v]
    volumes = {v["name"]: v for v in pod["spec"]["volumes"]}
    mounts = {m["mountPath"]: m["name"] for m in agent["volumeMounts"]}
    token = volumes[mounts["/var/run/secrets/flux-agent/upstream"]]
    assert token["projected"]["sources"] == [{"serviceAccountToken": {
        "audience": "flux-aggregator", "path": "token", "expirationSeconds": 3600}}]
    assert aggregator_env(docs)["FLUX_AGENT_JWT_AUDIENCE"] == "flux-aggregator"
    ca = volumes[mounts["/etc/flux-agent/upstream-ca"]]
    assert ca["configMap"]["name"] in {d["metadata"]["name"] for d in find(docs, "ConfigMap")
                                       if d["metadata"]["namespace"] == "etl"}
    for app in pod["spec"]["containers"]:
        if app["name"] != "flux-agent":
            assert {m["name"] for m in app.get("volumeMounts", [])} == {"flux-agent-socket"}
    # The URL names the aggregators' Service and port, and its certificate covers the host.
    (service,) = by_name(docs, "Service", AGGREGATOR)
    meta, (port,) = service["metadata"], service["spec"]["ports"]
    assert env["FLUX_AGENT_UPSTREAM"] == \
        f"https://{meta['name']}.{meta['namespace']}.svc:{port['port']}"
    # Their ConfigMap of defaults carries no database settings.
    for cm in by_name(docs, "ConfigMap", "flux-agent-defaults"):
        assert not {k for k in cm["data"] if "DATABASE" in k or k == "FLUX_AGENT_MIGRATE"}


def test_the_database_secret_lives_in_the_aggregators_namespace_only(chart: helm.Chart):
    docs = render(chart, VALUE_SETS["aggregator"])
    references = []
    for doc in docs:
        text = yaml.safe_dump(strip(doc))
        if "flux-agent-database" in text and doc["kind"] != "Deployment":
            references.append((doc["kind"], doc["metadata"]["namespace"]))
    assert references == [("StatefulSet", NAMESPACE)]
    # The injector knows the Secret's name, and puts it in no pod in this mode.
    pod = injected(docs)
    assert "flux-agent-database" not in yaml.safe_dump(pod)


def test_sidecars_on_postgresql_hand_their_backlog_to_the_aggregators(chart: helm.Chart,
                                                                       tmp_path: Path):
    docs = render(chart, VALUE_SETS["aggregator-handoff"])
    config = injector_config(docs)
    assert config.upstream == "database"
    pod = injected(docs)
    agent = the_agent_of(pod)
    env = {e["name"]: e["value"] for e in agent["env"]}
    assert env["FLUX_AGENT_HANDOFF"] == AGGREGATOR_URL
    assert "FLUX_AGENT_UPSTREAM" not in env
    assert env["FLUX_AGENT_DATABASE_URL_FILE"] == "/etc/flux-agent/database/url"
    assert env["FLUX_AGENT_UPSTREAM_TOKEN_FILE"] == "/var/run/secrets/flux-agent/upstream/token"
    assert env["FLUX_AGENT_UPSTREAM_CA_FILE"] == "/etc/flux-agent/upstream-ca/ca.crt"
    assert {v["name"] for v in pod["spec"]["volumes"]} >= {
        "flux-agent-database", "flux-agent-upstream-token", "flux-agent-upstream-ca"}
    # The agent of today loads it: the database as before.
    environ = {**find(docs, "ConfigMap")[0]["data"], **env}
    loaded = load_config([], environ=with_database_file(environ, tmp_path))
    assert str.__str__(loaded.database_url) == DATABASE_URL
    # Its ConfigMap keeps the database settings.
    (defaults,) = [d for d in by_name(docs, "ConfigMap", "flux-agent-defaults")]
    assert defaults["data"]["FLUX_AGENT_MIGRATE"] == "true"


def test_plaintext_aggregators_get_no_ca(chart: helm.Chart):
    docs = render(chart, VALUE_SETS["aggregator-plaintext"])
    pod = injected(docs)
    env = {e["name"]: e["value"] for e in the_agent_of(pod)["env"]}
    assert env["FLUX_AGENT_UPSTREAM"] == f"http://{AGGREGATOR}.{NAMESPACE}.svc:8788"
    assert "FLUX_AGENT_UPSTREAM_CA_FILE" not in env
    assert "flux-agent-upstream-ca" not in {v["name"] for v in pod["spec"]["volumes"]}


def test_aggregator_notes(chart: helm.Chart):
    notes = chart.render(VALUE_SETS["aggregator"], name=RELEASE, namespace=NAMESPACE)[
        "flux-agent/templates/NOTES.txt"]
    assert f"at {AGGREGATOR_URL}" in notes
    assert f"kubectl -n {NAMESPACE} create secret generic flux-agent-database" in notes
    assert "create no database Secret where pods opt in" in notes
    assert "kubectl -n <namespace> create secret" not in notes
    notes = chart.render(VALUE_SETS["aggregator-handoff"], name=RELEASE, namespace=NAMESPACE)[
        "flux-agent/templates/NOTES.txt"]
    assert "hand their backlog to them" in notes
    assert "kubectl -n <namespace> create secret generic flux-agent-database" in notes
