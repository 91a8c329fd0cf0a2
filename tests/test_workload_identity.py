"""Kubernetes workload identity: the agent verifies the pod's own projected service-account
token (``FLUX_AGENT_AUTH=kubernetes``) against the cluster's service-account issuer keys and
maps namespace and service account to an agency and a role. The tokens here are shaped
exactly as the kubelet issues them, signed by a test key in the issuer's JWKS."""

from __future__ import annotations

import asyncio
import time
import uuid
from pathlib import Path
from typing import Any

import jwt
import pytest

from flux_agent import Agent
from flux_agent.core.errors import ConfigError
from flux_agent.core.settings import load_config
from flux_agent.kube.admission import mutate_pod
from flux_agent.kube.config import InjectorConfig
from flux_agent.testing import make_event

from .support.agents import agent_config
from .support.capture import remember_secret
from .support.http import assert_problem, get, post
from .support.polling import wait_until
from .support.postgres import Database
from .support.tokens import jwks, private_key

CLUSTER_ISSUER = "https://kubernetes.default.svc.cluster.local"


def kubelet_token(key: Any, kid: str, *, namespace: str = "etl", account: str = "etl-runner",
                  audience: str = "flux-agent", issuer: str = CLUSTER_ISSUER,
                  issued: float | None = None, ttl: int = 3607, **change: Any) -> str:
    """A projected service-account token as the kubelet requests it (TokenRequest with the
    pod bound): audience list, iat = nbf, a jti, and the kubernetes.io claim block."""
    now = int(issued if issued is not None else time.time())
    claims: dict[str, Any] = {
        "aud": [audience], "exp": now + ttl, "iat": now, "nbf": now, "iss": issuer,
        "jti": str(uuid.uuid4()),
        "kubernetes.io": {
            "namespace": namespace,
            "node": {"name": "node-a1", "uid": str(uuid.uuid4())},
            "pod": {"name": f"{account}-7d9f8-abcde", "uid": str(uuid.uuid4())},
            "serviceaccount": {"name": account, "uid": str(uuid.uuid4())},
            "warnafter": now + 3600 * 4 // 5,
        },
        "sub": f"system:serviceaccount:{namespace}:{account}",
    }
    claims.update(change)
    token = jwt.encode(claims, key, algorithm="RS256", headers={"kid": kid})
    remember_secret(token)
    return token


@pytest.fixture(scope="module")
def cluster_key() -> Any:
    return private_key()


@pytest.fixture(scope="module")
def other_cluster_key() -> Any:
    return private_key()


def kube_config(database: Database, state_dir: Path, keys: str, **overrides: Any) -> Any:
    jwks_file = state_dir / "sa-jwks.json"
    jwks_file.write_text(keys)
    values: dict[str, Any] = {
        "auth": "kubernetes", "agency": "", "jwt_algorithms": ("RS256",),
        "jwt_issuers": (CLUSTER_ISSUER,), "jwt_jwks_file": str(jwks_file),
        "kube_bindings": ("etl=nasa", "etl/reporting=nasa:viewer", "batch/loader=noaa"),
    }
    values.update(overrides)
    return agent_config(database, state_dir, **values)


def bearer(token: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}"}


async def test_projected_service_account_tokens(database: Database, state_dir: Path,
                                                cluster_key: Any, other_cluster_key: Any):
    config = kube_config(database, state_dir, jwks(("sa-key-1", cluster_key)))
    async with Agent(config) as agent:
        url = agent.endpoints.event_url + "/v1/events"
        # The bound namespace: any of its service accounts writes as its agency.
        status, body, _ = await post(url, make_event(run_id="r-kube"), headers={
            **bearer(kubelet_token(cluster_key, "sa-key-1")), "Prefer": "wait=committed"})
        assert status == 200, body
        # A service account's own entry wins: reporting may only read.
        reporting = bearer(kubelet_token(cluster_key, "sa-key-1", account="reporting"))
        status, body, headers = await post(url, make_event(), headers=reporting)
        assert_problem(status, body, headers, 403, "FORBIDDEN")
        status, body, _ = await get(agent.endpoints.event_url + "/v1/runs/r-kube",
                                    headers=reporting)
        assert status == 200 and body["events"] == 1, body
        status, body, _ = await post(url, make_event(), headers=bearer(
            kubelet_token(cluster_key, "sa-key-1", namespace="batch", account="loader")))
        assert status == 202, body

        refused = {
            "an unbound namespace": (403, "SERVICE_ACCOUNT_NOT_BOUND", kubelet_token(
                cluster_key, "sa-key-1", namespace="sandbox", account="default")),
            "an unbound account of a namespace bound per account": (
                403, "SERVICE_ACCOUNT_NOT_BOUND",
                kubelet_token(cluster_key, "sa-key-1", namespace="batch", account="default")),
            "an expired token": (401, "TOKEN_EXPIRED", kubelet_token(
                cluster_key, "sa-key-1", issued=time.time() - 7200)),
            "a token for another audience": (401, "TOKEN_WRONG_AUDIENCE", kubelet_token(
                cluster_key, "sa-key-1", audience="https://kubernetes.default.svc")),
            "another cluster's token": (401, "TOKEN_UNKNOWN_KEY", kubelet_token(
                other_cluster_key, "other-cluster-1",
                issuer="https://oidc.other-cluster.example")),
            "another cluster's token under our kid": (401, "TOKEN_BAD_SIGNATURE", kubelet_token(
                other_cluster_key, "sa-key-1", issuer="https://oidc.other-cluster.example")),
            "our key, another issuer": (401, "TOKEN_WRONG_ISSUER", kubelet_token(
                cluster_key, "sa-key-1", issuer="https://oidc.other-cluster.example")),
            "a key the issuer never published": (401, "TOKEN_UNKNOWN_KEY", kubelet_token(
                other_cluster_key, "sa-key-9")),
            "sub and kubernetes.io disagree": (401, "TOKEN_INVALID_CLAIM", kubelet_token(
                cluster_key, "sa-key-1", sub="system:serviceaccount:batch:loader")),
            "not a service account": (401, "TOKEN_INVALID_CLAIM", kubelet_token(
                cluster_key, "sa-key-1", sub="system:node:node-a1")),
        }
        for name, (expect, code, token) in refused.items():
            status, body, headers = await post(url, make_event(agency=None),
                                               headers=bearer(token))
            assert (status, body.get("code")) == (expect, code), (name, body)

        # Rotation: the kubelet refreshes the token (new iat, jti, exp); the cluster adds
        # a signing key, and later retires the old one.
        fresh = kubelet_token(cluster_key, "sa-key-1", issued=time.time() - 60)
        assert (await post(url, make_event(), headers=bearer(fresh)))[0] == 202
        newer = kubelet_token(other_cluster_key, "sa-key-2")
        await asyncio.sleep(1.1)  # a new mtime for the rewritten JWKS
        (state_dir / "sa-jwks.json").write_text(jwks(("sa-key-1", cluster_key),
                                                     ("sa-key-2", other_cluster_key)))

        async def rotated() -> bool:
            return (await post(url, make_event(), headers=bearer(newer)))[0] == 202

        assert await wait_until(rotated, 15, interval=0.3)
    agencies = await database.fetch("SELECT agency_id, count(*) FROM flux.events "
                                    "GROUP BY 1 ORDER BY 1")
    assert [tuple(r) for r in agencies] == [("nasa", 3), ("noaa", 1)]


async def test_the_injected_sidecar_takes_its_namespaces_tokens_only(
        database: Database, state_dir: Path, cluster_key: Any, tmp_path: Path):
    """The injector binds the pod's namespace to its agency and hands that binding to the
    sidecar: the agent, configured from exactly the injected env, accepts the pod's own
    service-account tokens and refuses those of any other namespace."""
    config = InjectorConfig(agent_auth="kubernetes", jwks_configmap="cluster-sa-jwks",
                            kube_issuer=CLUSTER_ISSUER, agency_bindings=(("etl", ("nasa",)),))
    pod = mutate_pod({"metadata": {"labels": {"flux.io/inject": "true"}},
                      "spec": {"containers": [{"name": "app", "image": "etl:1"}]}},
                     config, "etl")
    agent = next(c for c in pod["spec"]["initContainers"] if c["name"] == "flux-agent")
    environ = {e["name"]: e["value"] for e in agent["env"] if "value" in e}
    jwks_file = state_dir / "jwks.json"
    jwks_file.write_text(jwks(("sa-key-1", cluster_key)))
    # Where this test runs, not where the pod would: paths, ports and the database.
    assert environ["FLUX_AGENT_DATABASE_URL_FILE"] == "/etc/flux-agent/database/url"
    url_file = tmp_path / "url"  # what the mounted Secret holds
    url_file.write_text(database.login_dsn + "\n")
    environ.update({"FLUX_AGENT_DATABASE_URL_FILE": str(url_file),
                    "FLUX_AGENT_STATE_DIR": str(state_dir), "FLUX_AGENT_SOCKET": "off",
                    "FLUX_AGENT_LISTEN": "127.0.0.1:0", "FLUX_AGENT_ADMIN_LISTEN": "off",
                    "FLUX_AGENT_JWT_JWKS_FILE": str(jwks_file), "FLUX_AGENT_MIGRATE": "false"})
    assert environ["FLUX_AGENT_KUBE_BINDINGS"] == "etl=nasa"
    async with Agent(load_config([], environ=environ)) as running:
        url = running.endpoints.event_url + "/v1/events"
        status, body, _ = await post(url, make_event(), headers={
            **bearer(kubelet_token(cluster_key, "sa-key-1", account="default")),
            "Prefer": "wait=committed"})
        assert status == 200, body
        status, body, headers = await post(url, make_event(), headers=bearer(kubelet_token(
            cluster_key, "sa-key-1", namespace="batch", account="default")))
        assert_problem(status, body, headers, 403, "SERVICE_ACCOUNT_NOT_BOUND")
    assert await database.fetchval("SELECT array_agg(agency_id) FROM flux.events") == ["nasa"]


@pytest.mark.parametrize(("change", "setting"), [
    ({"kube_bindings": ()}, "FLUX_AGENT_KUBE_BINDINGS"),
    ({"kube_bindings": ("etl=nasa:root",)}, "FLUX_AGENT_KUBE_BINDINGS"),
    # an agency the manifest does not list (the flux profile's five)
    ({"kube_bindings": ("etl=cia",), "schema_profile": "flux"}, "FLUX_AGENT_KUBE_BINDINGS"),
    ({"jwt_issuers": ()}, "FLUX_AGENT_JWT_ISSUERS"),
])
async def test_kubernetes_mode_configuration_errors(database: Database, state_dir: Path,
                                                    cluster_key: Any, change: dict[str, Any],
                                                    setting: str):
    from flux_agent.core.settings import _check

    config = kube_config(database, state_dir, jwks(("k", cluster_key)), **change)

    async def start() -> None:
        _check(config)  # what load_config checks, then what the start checks
        async with Agent(config):
            pass

    with pytest.raises(ConfigError) as info:
        await start()
    assert info.value.setting == setting
