"""Observability against a real agent and a real PostgreSQL: exact metric deltas of a scripted
scenario (outage included), readiness flipping and recovering, the exposition linted by
promtool, the alert rules (helm/flux-agent/rules) and the Grafana dashboard
(helm/flux-agent/dashboards) checked against what a real agent exports, and a real Prometheus
scraping the agent, evaluating the rules and answering the dashboard's queries."""

from __future__ import annotations

import asyncio
import contextlib
import copy
import json
import re
import shutil
import signal
import subprocess
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import aiohttp
import helm_python as helm
import kubernetes_validate
import pytest
import yaml
from prometheus_client import generate_latest
from prometheus_client.parser import text_string_to_metric_families

from flux_agent import Agent
from flux_agent.kube.config import InjectorConfig
from flux_agent.kube.webhook import WebhookServer
from flux_agent.obs.metrics import STATE
from flux_agent.postgres.embedded import free_port
from flux_agent.testing import make_event, make_events

from .support.agents import agent_config
from .support.faults import TcpProxy
from .support.http import get, post
from .support.paths import short_tempdir
from .support.polling import wait_until
from .support.postgres import Database, proxied
from .support.tools import require_tool

CHART = Path(__file__).resolve().parent.parent / "helm" / "flux-agent"
AGENT_RULES = CHART / "rules" / "flux-agent.rules.yaml"
AGGREGATOR_RULES = CHART / "rules" / "flux-aggregator.rules.yaml"
INJECTOR_RULES = CHART / "rules" / "flux-injector.rules.yaml"
RULE_FILES = sorted((CHART / "rules").glob("*.rules.yaml"))
DASHBOARD = CHART / "dashboards" / "flux-agent.json"
KUBE_VERSIONS = ("1.29.0", "1.33.0")

# Metrics the rules and the dashboard use that the agent does not export: Prometheus's own
# `up`, and kube-state-metrics (FluxAgentNotScraped only).
EXTERNAL = {"up", "kube_pod_init_container_info", "kube_pod_container_info",
            "kube_pod_status_phase"}
# Labels Prometheus (and prometheus-operator's monitors) attach to every scraped series.
TARGET_LABELS = {"job", "instance", "namespace", "pod", "container", "endpoint", "service"}

Samples = dict[tuple[str, frozenset[tuple[str, str]]], float]


# --------------------------------------------------------------------------- scraping


def parse(text: str) -> Samples:
    return {(s.name, frozenset(s.labels.items())): s.value
            for family in text_string_to_metric_families(text) for s in family.samples}


async def exposition(agent: Agent) -> str:
    status, text, headers = await get(agent.endpoints.admin_url + "/metrics")
    assert status == 200
    assert headers["Content-Type"].startswith("text/plain; version=0.0.4")
    return str(text)


async def scrape(agent: Agent) -> Samples:
    return parse(await exposition(agent))


def value(samples: Samples, name: str, **labels: str) -> float:
    """The sum of the samples of ``name`` carrying (at least) ``labels``; 0 when none."""
    want = set(labels.items())
    return sum(v for (n, ls), v in samples.items() if n == name and want <= ls)


def delta(before: Samples, after: Samples, name: str, **labels: str) -> float:
    return value(after, name, **labels) - value(before, name, **labels)


async def scrape_until(agent: Agent, check: Any, timeout: float = 10.0) -> Samples:
    """Scrape until ``check(samples)`` holds; the last scrape either way."""
    last: Samples = {}

    async def ok() -> bool:
        nonlocal last
        last = await scrape(agent)
        return bool(check(last))

    assert await wait_until(ok, timeout), "the metrics never reached the expected state"
    return last


async def settled(agent: Agent) -> Samples:
    """Nothing waits on the spool, the agent.start audit entry included: a batch has been
    flushed (the backlog alone does not count a record still queued for writing)."""
    return await scrape_until(agent, lambda s: value(s, "flux_spool_backlog_records") == 0
                              and value(s, "flux_flush_batches_total") >= 1)


async def ready(agent: Agent) -> tuple[int, dict[str, Any]]:
    status, body, _ = await get(agent.endpoints.admin_url + "/health/ready")
    return status, body


# --------------------------------------------------------------------------- the scenario


async def test_scripted_scenario_counts_exactly(database: Database, proxy: TcpProxy,
                                                state_dir: Path):
    config = agent_config(proxied(database, proxy), state_dir, flush_retry_max=0.2)
    async with Agent(config) as agent:
        url = agent.endpoints.event_url + "/v1/events"
        base = await settled(agent)
        assert value(base, "flux_postgres_up") == 1
        assert value(base, "flux_ready") == 1

        # N events, answered once they are in PostgreSQL.
        n = 7
        events = make_events(n)
        status, body, _ = await post(url, events, headers={"Prefer": "wait=committed"})
        assert status == 200 and body["accepted"] == n, body
        s1 = await scrape(agent)
        assert delta(base, s1, "flux_events_accepted_total", agency="nasa") == n
        assert delta(base, s1, "flux_events_flushed_total") == n
        assert delta(base, s1, "flux_requests_total", route="/v1/events", status="200",
                     agency="nasa") == 1
        assert delta(base, s1, "flux_request_duration_seconds_count", route="/v1/events") == 1
        assert delta(base, s1, "flux_flush_batch_size_events_sum") == n
        assert delta(base, s1, "flux_flush_batch_size_events_count") == \
            delta(base, s1, "flux_flush_batches_total") == \
            delta(base, s1, "flux_flush_duration_seconds_count") >= 1
        assert value(s1, "flux_spool_backlog_records") == 0

        # The same events again: duplicates, recognised at intake, nothing spooled.
        status, body, _ = await post(url, events)
        assert status == 202 and body["accepted"] == 0 and body["duplicates"] == n, body
        s2 = await scrape(agent)
        assert delta(s1, s2, "flux_events_duplicates_total", detected_by="intake") == n
        assert delta(s1, s2, "flux_events_duplicates_total", detected_by="database") == 0
        assert delta(s1, s2, "flux_events_accepted_total") == 0
        assert delta(s1, s2, "flux_events_flushed_total") == 0
        assert delta(s1, s2, "flux_requests_total", route="/v1/events", status="202",
                     agency="nasa") == 1
        assert value(s2, "flux_spool_backlog_records") == 0

        # A refused request: an event must say when it happened.
        bad = make_event("run.started")
        del bad["occurred_at"]
        status, body, _ = await post(url, [bad])
        assert status == 422 and body["code"] == "MISSING_FIELD", body
        s3 = await scrape(agent)
        assert delta(s2, s3, "flux_events_rejected_total", reason="MISSING_FIELD") == 1
        assert delta(s2, s3, "flux_events_rejected_total") == 1
        assert delta(s2, s3, "flux_errors_total", error_class="VALIDATION_ERROR",
                     agency="nasa") == 1
        assert delta(s2, s3, "flux_errors_total") == 1
        assert delta(s2, s3, "flux_requests_total", route="/v1/events", status="422",
                     agency="nasa") == 1
        assert delta(s2, s3, "flux_events_accepted_total") == 0

        # The line to PostgreSQL is cut: intake keeps accepting onto the spool.
        proxy.cut()
        outage = [make_events(4) for _ in range(5)]
        for batch in outage:
            status, body, _ = await post(url, batch)
            assert status == 202 and body["accepted"] == 4, body
        s4 = await scrape_until(agent, lambda s: value(s, "flux_postgres_up") == 0 and
                                value(s, "flux_flush_retries_total") >
                                value(s3, "flux_flush_retries_total"))
        assert delta(s3, s4, "flux_events_accepted_total", agency="nasa") == 20
        assert delta(s3, s4, "flux_events_flushed_total") == 0
        assert value(s4, "flux_spool_backlog_records") == 5  # one record per request
        assert value(s4, "flux_flush_stalled_seconds") > 0
        assert value(s4, "flux_spool_oldest_unflushed_age_seconds") > 0
        # The flusher keeps retrying (backoff capped at flush_retry_max).
        s5 = await scrape_until(agent, lambda s: value(s, "flux_flush_retries_total") >
                                value(s4, "flux_flush_retries_total"))
        assert delta(s4, s5, "flux_events_flushed_total") == 0
        status, body = await ready(agent)
        assert body["database"] == "down"

        # Restored: the backlog drains and flushed catches up exactly.
        proxy.restore()
        s6 = await scrape_until(agent, lambda s: value(s, "flux_spool_backlog_records") == 0)
        assert delta(s3, s6, "flux_events_flushed_total") == 20
        assert delta(base, s6, "flux_events_flushed_total") == n + 20
        assert delta(base, s6, "flux_events_accepted_total", agency="nasa") == n + 20
        assert delta(s3, s6, "flux_events_duplicates_total", detected_by="database") == 0
        assert value(s6, "flux_events_dead_lettered_total") == 0
        assert value(s6, "flux_postgres_up") == 1
        assert value(s6, "flux_flush_stalled_seconds") == 0
        assert value(s6, "flux_spool_oldest_unflushed_age_seconds") == 0
        assert value(s6, "flux_ready") == 1
        assert await database.fetchval("SELECT count(*) FROM flux.events") == n + 20


async def _replay_elsewhere(database: Database, state_dir: Path
                            ) -> tuple[dict[str, Any], Samples, Samples]:
    """Another agent (its own spool and duplicate index) posts events already stored, with
    ``Prefer: wait=committed``: PostgreSQL's primary key absorbs them."""
    events = make_events(6)
    async with Agent(agent_config(database, state_dir)) as agent:
        status, _, _ = await post(agent.endpoints.event_url + "/v1/events", events,
                                  headers={"Prefer": "wait=committed"})
        assert status == 200
    other = short_tempdir()
    try:
        async with Agent(agent_config(database, other)) as agent:
            base = await settled(agent)
            status, body, _ = await post(agent.endpoints.event_url + "/v1/events", events,
                                         headers={"Prefer": "wait=committed"})
            assert status == 200 and body["accepted"] == 0 and body["duplicates"] == 6, body
            after = await scrape(agent)
    finally:
        shutil.rmtree(other, ignore_errors=True)
    assert await database.fetchval("SELECT count(*) FROM flux.events") == 6
    return body, base, after


async def test_duplicates_found_by_postgresql_are_counted(database: Database, state_dir: Path):
    _, base, after = await _replay_elsewhere(database, state_dir)
    assert delta(base, after, "flux_events_duplicates_total", detected_by="database") == 6
    assert delta(base, after, "flux_events_flushed_total") == 0
    assert delta(base, after, "flux_events_accepted_total") == 0


async def test_a_duplicate_is_counted_once(database: Database, state_dir: Path):
    _, base, after = await _replay_elsewhere(database, state_dir)
    assert delta(base, after, "flux_events_duplicates_total") == 6


# --------------------------------------------------------------------------- readiness


async def test_readiness_fails_while_draining(agent: Agent):
    url = agent.endpoints.event_url
    status, body = await ready(agent)
    assert status == 200 and "reasons" not in body, body
    await post(url + "/v1/events", make_events(3))
    status, body, _ = await post(url + "/v1/drain", {})
    # Drained; what may be left is the drain's own audit entry, flushed when the agent stops.
    assert status == 200 and body["drained"] is True and body["backlog_records"] <= 1, body
    status, body = await ready(agent)
    assert status == 503 and body["reasons"] == ["draining"], body
    before = await scrape(agent)
    assert value(before, "flux_ready") == 0
    assert agent.exit_requested.is_set()
    status, body, _ = await post(url + "/v1/events", make_events(1))
    assert status == 503 and body["code"] == "DRAINING", body
    after = await scrape(agent)
    assert delta(before, after, "flux_errors_total", error_class="TRANSIENT_ERROR",
                 agency="nasa") == 1
    assert delta(before, after, "flux_requests_total", route="/v1/events", status="503",
                 agency="nasa") == 1
    assert delta(before, after, "flux_events_accepted_total") == 0


async def test_readiness_fails_while_the_spool_is_full(database: Database, proxy: TcpProxy,
                                                       state_dir: Path):
    kib = 1024
    config = agent_config(proxied(database, proxy), state_dir, spool_max_bytes=256 * kib,
                          spool_segment_bytes=64 * kib, request_max_bytes=32 * kib,
                          event_max_bytes=16 * kib, flush_retry_max=0.2)
    async with Agent(config) as agent:
        url = agent.endpoints.event_url + "/v1/events"
        await settled(agent)
        proxy.cut()  # nothing drains
        accepted = 0
        not_ready_at = None
        for _ in range(40):
            status, body, _ = await post(url, make_events(4, payload={"pad": "x" * 5000}))
            if status == 503:
                assert body["code"] == "SPOOL_FULL", body
                break
            assert status == 202, body
            accepted += 4
            ready_status, ready_body = await ready(agent)
            if ready_status == 503 and not_ready_at is None:
                assert ready_body["reasons"] == ["spool_full"], ready_body
                not_ready_at = accepted
        else:
            pytest.fail("the spool never filled")
        # Readiness failed before intake had to refuse (room for one largest request).
        assert not_ready_at is not None
        status, body = await ready(agent)
        assert status == 503 and "spool_full" in body["reasons"], body
        full = await scrape(agent)
        assert value(full, "flux_ready") == 0
        assert value(full, "flux_spool_max_bytes") == 256 * kib
        assert value(full, "flux_spool_bytes") / value(full, "flux_spool_max_bytes") > 0.85
        assert value(full, "flux_spool_segments") >= 4
        assert value(full, "flux_errors_total", error_class="TRANSIENT_ERROR") == 1

        proxy.restore()
        # Ready again once there is room; the bytes go down as the last windows commit.
        after = await scrape_until(agent, lambda s: value(s, "flux_ready") == 1
                                   and value(s, "flux_spool_backlog_records") == 0, 15)
        status, body = await ready(agent)
        assert status == 200, body
        assert value(after, "flux_spool_bytes") < 96 * kib
        assert value(after, "flux_spool_backlog_records") == 0
        assert delta(full, after, "flux_events_flushed_total") == accepted
        assert await database.fetchval("SELECT count(*) FROM flux.events") == accepted


async def test_readiness_fails_while_flushing_stalls(database: Database, proxy: TcpProxy,
                                                     state_dir: Path):
    config = agent_config(proxied(database, proxy), state_dir, ready_stall_after=1.0,
                          flush_retry_max=0.2)
    async with Agent(config) as agent:
        url = agent.endpoints.event_url + "/v1/events"
        await settled(agent)
        proxy.cut()
        status, _, _ = await post(url, make_events(3))
        assert status == 202
        posted = time.monotonic()
        status, body = await ready(agent)
        assert status == 200, body  # waiting, not yet stalled

        async def stalled() -> bool:
            return (await ready(agent))[0] == 503

        assert await wait_until(stalled, 10)
        assert time.monotonic() - posted > 0.5
        status, body = await ready(agent)
        assert status == 503 and body["reasons"] == ["flush_stalled"], body
        assert body["database"] == "down"
        samples = await scrape(agent)
        assert value(samples, "flux_ready") == 0
        assert value(samples, "flux_flush_stalled_seconds") > 1.0
        assert value(samples, "flux_spool_backlog_records") == 1

        proxy.restore()
        after = await scrape_until(agent, lambda s: value(s, "flux_ready") == 1)
        assert value(after, "flux_flush_stalled_seconds") == 0
        assert value(after, "flux_postgres_up") == 1
        status, body = await ready(agent)
        assert status == 200 and body["database"] == "up", body


async def _idle_then_cut(agent: Agent, proxy: TcpProxy, idle: float) -> tuple[int, Samples]:
    await settled(agent)
    await asyncio.sleep(idle)
    proxy.cut()
    status, _, _ = await post(agent.endpoints.event_url + "/v1/events", make_events(1))
    assert status == 202
    status, _ = await ready(agent)
    return status, await scrape(agent)


async def test_stall_clock_starts_when_events_start_waiting(database: Database,
                                                            proxy: TcpProxy, state_dir: Path):
    config = agent_config(proxied(database, proxy), state_dir, ready_stall_after=3.0,
                          drain_timeout=0.5)
    async with Agent(config) as agent:
        # Idle 5 s, then an event waits: the clock counts from the event, not from the
        # last commit 5 s ago.
        status, samples = await _idle_then_cut(agent, proxy, idle=5.0)
        assert value(samples, "flux_flush_stalled_seconds") < 3.0
        assert status == 200


async def test_oldest_unflushed_age_is_the_age_of_the_waiting_record(
        database: Database, proxy: TcpProxy, state_dir: Path):
    config = agent_config(proxied(database, proxy), state_dir, drain_timeout=0.5)
    async with Agent(config) as agent:
        _, samples = await _idle_then_cut(agent, proxy, idle=5.0)
        assert value(samples, "flux_spool_backlog_records") == 1
        assert value(samples, "flux_spool_oldest_unflushed_age_seconds") < 3.0


# --------------------------------------------------------------------------- the exposition


async def do_everything(agent: Agent) -> None:
    """Work that makes every labelled series exist: events, a run, duplicates, refusals,
    isolation violations (audited, and rate-limited past the audit burst) and checkpoints.
    (Retention rounds come from the agent's own short retention_interval.)"""
    url = agent.endpoints.event_url
    events = [make_event("run.started", run_id="obs-run"), *make_events(5)]
    status, _, _ = await post(url + "/v1/events", events, headers={"Prefer": "wait=committed"})
    assert status == 200
    assert (await post(url + "/v1/events", events))[0] == 202
    undated = make_event("run.started")
    del undated["occurred_at"]
    assert (await post(url + "/v1/events", [undated]))[0] == 422
    for _ in range(25):
        status, _, _ = await post(url + "/v1/events", [make_event(agency="noaa")])
        assert status == 403
    async with aiohttp.ClientSession() as session:
        for i in range(2):
            async with session.put(url + "/v1/runs/obs-run/checkpoint",
                                   json={"step": f"s{i}", "state": {"offset": i}}) as resp:
                assert resp.status == 201, await resp.text()
    await settled(agent)


def sample_names(text: str) -> dict[str, set[str]]:
    """Sample name -> the label names seen on it."""
    names: dict[str, set[str]] = {}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            names.setdefault(s.name, set()).update(s.labels)
    return names


async def test_exposition_passes_promtool_check_metrics(database: Database, state_dir: Path):
    promtool = require_tool("promtool")
    async with Agent(agent_config(database, state_dir, retention_interval=0.2)) as agent:
        await do_everything(agent)
        text = await exposition(agent)
    result = subprocess.run([str(promtool), "check", "metrics"], input=text.encode(),
                            capture_output=True, timeout=30)
    assert result.returncode == 0, (result.stdout + result.stderr).decode()
    assert (result.stdout + result.stderr).strip() == b""


async def test_rules_and_dashboard_name_only_exported_metrics(database: Database,
                                                              state_dir: Path):
    async with Agent(agent_config(database, state_dir, retention_interval=0.2)) as agent:
        await do_everything(agent)
        await scrape_until(agent, lambda s: any(  # after a retention round
            n == "flux_retention_purged_rows_total" for n, _ in s))
        exported = sample_names(await exposition(agent))
    # The labelled series the work created are all there.
    for name in ("flux_active_runs", "flux_audit_dropped_total", "flux_checkpoints_saved_total",
                 "flux_events_rejected_total", "flux_events_duplicates_total",
                 "flux_retention_purged_rows_total", "flux_errors_total"):
        assert name in exported, name
    # Some values exist in one mode only: a sidecar forwarding to aggregators reports
    # flux_upstream_up instead of flux_postgres_up. Such a sidecar's exposition counts too
    # (no aggregator answers it: the gauge is there all the same, at 0).
    forwarding = await _forwarding_sidecar_metrics(database)
    assert "flux_upstream_up" in forwarding and "flux_postgres_up" not in forwarding
    assert "flux_postgres_up" in exported and "flux_upstream_up" not in exported
    for name, labels in forwarding.items():
        exported.setdefault(name, set()).update(labels)
    # Every value metrics.py declares is exported, with its label, by one of the two.
    declared = _declared_state()
    assert set(declared) <= set(exported), \
        f"declared but exported in neither mode: {sorted(set(declared) - set(exported))}"
    for name, labels in declared.items():
        assert labels <= exported[name], name
    exported.update(_injector_metrics())

    # No label of the agent's own is one a scrape attaches to the target: Prometheus would
    # rename it exported_<name> under prometheus-operator (`endpoint`: the port's name), and
    # the rules and the dashboard would match the target's label instead of the agent's.
    collisions = {name: sorted(labels & TARGET_LABELS) for name, labels in exported.items()
                  if labels & TARGET_LABELS}
    assert not collisions, f"labels Prometheus attaches to targets: {collisions}"

    used: set[str] = set()
    for where, expr in [*(e for path in RULE_FILES for e in rule_exprs(path)),
                        *dashboard_exprs()]:
        for name, labels in referenced_metrics(expr).items():
            used.add(name)
            if name in EXTERNAL:
                continue
            assert name in exported, f"{where}: {name} is not exported by the agent"
            unknown = labels - exported[name] - TARGET_LABELS
            assert not unknown, f"{where}: {name} has no label {sorted(unknown)}"
        # What the rule or panel groups by, or keeps apart, is a label of its metrics (or one
        # Prometheus gives every target): `sum by (endpoint)` over a label that is not there
        # collapses every series into one.
        for clause in re.findall(r"\b(?:by|without)\s*\(([^)]*)\)", expr):
            for label in re.findall(r"[a-zA-Z_]\w*", clause):
                if label in TARGET_LABELS or label == "le":
                    continue
                owners = [n for n in referenced_metrics(expr) if label in exported.get(n, ())]
                assert owners, f"{where}: groups by {label!r}, a label of none of its metrics"
    # And every family the agent exports is alerted on or on the dashboard.
    unused = {_family(n) for n in exported if n.startswith("flux_")
              and not n.startswith("flux_injector_")} - {_family(n) for n in used}
    assert not unused, f"exported but neither alerted on nor on the dashboard: {unused}"


async def _forwarding_sidecar_metrics(database: Database) -> dict[str, set[str]]:
    """The exposition of a sidecar whose upstream is aggregators (none answers)."""
    state = short_tempdir("fa-fwd-")
    try:
        config = agent_config(database, state, database_url=None, drain_timeout=0.2,
                              upstream=(f"http://127.0.0.1:{free_port()}",))
        async with Agent(config) as sidecar:
            return sample_names(await exposition(sidecar))
    finally:
        shutil.rmtree(state, ignore_errors=True)


def _declared_state() -> dict[str, set[str]]:
    """The scrape-time values flux_agent/obs/metrics.py declares, as sample names with
    their labels. An agent reports those of its mode only."""
    return {g.name + ("_total" if g.kind == "counter" else ""): {g.label} - {""}
            for g in STATE}


def _family(name: str) -> str:
    return re.sub(r"_(bucket|sum|count|created|total)$", "", name)


def _injector_metrics() -> dict[str, set[str]]:
    server = WebhookServer(InjectorConfig(), cert_file="-", key_file="-")
    server.admissions.labels("injected").inc()
    server.duration.observe(0.01)
    return sample_names(generate_latest(server.registry).decode())


# --------------------------------------------------------------------------- PromQL parsing

PROMQL_WORDS = {
    # aggregations, functions and keywords the rules and the dashboard use
    "sum", "count", "max", "min", "avg", "rate", "increase", "histogram_quantile",
    "max_over_time", "predict_linear", "scalar", "vector", "and", "or", "unless", "by",
    "without", "on", "ignoring", "group_left", "group_right", "bool", "offset",
    "label_values",  # Grafana's variable query function
}


def referenced_metrics(expr: str) -> dict[str, set[str]]:
    """Metric name -> label names its matchers use. Fails on a word it cannot place."""
    found: dict[str, set[str]] = {}
    for m in re.finditer(r"\b([a-zA-Z_:][a-zA-Z0-9_:]*)\s*\{([^}]*)\}", expr):
        if m.group(1) not in PROMQL_WORDS:
            labels = set(re.findall(r"([a-zA-Z_][a-zA-Z0-9_]*)\s*(?:=~|!~|!=|=)", m.group(2)))
            found.setdefault(m.group(1), set()).update(labels)
    text = re.sub(r'"[^"]*"', '""', expr)  # label values and Grafana strings
    text = re.sub(r"\{[^}]*\}", "", text)  # matchers
    text = re.sub(r"\[[^\]]*\]", "", text)  # ranges
    text = re.sub(r"\b(by|without|on|ignoring|group_left|group_right)\s*\([^)]*\)", r"\1", text)
    text = re.sub(r"\$\w+", "", text)  # Grafana variables
    text = re.sub(r"(?<![\w.])\d+(\.\d+)?(e[+-]?\d+)?[smhdwy]?\b", "", text)  # numbers
    for word in re.findall(r"[a-zA-Z_:][a-zA-Z0-9_:]*", text):
        if word in PROMQL_WORDS:
            continue
        if word in {"job", "namespace", "instance"} and "label_values" in expr:
            continue  # label_values(metric, label)
        assert re.fullmatch(r"flux_[a-z0-9_]+|up|kube_[a-z0-9_]+", word), \
            f"{word!r} in {expr!r}: not a known metric, function or keyword"
        found.setdefault(word, set())
    return found


def rule_exprs(path: Path) -> list[tuple[str, str]]:
    doc = yaml.safe_load(path.read_text())
    return [(f"{path.name}: {rule['alert']}", rule["expr"])
            for group in doc["groups"] for rule in group["rules"]]


def dashboard() -> dict[str, Any]:
    return json.loads(DASHBOARD.read_text())


def panels() -> list[dict[str, Any]]:
    return [p for p in dashboard()["panels"] if p["type"] != "row"]


# The dashboard's row of the aggregator tier: its panels read the aggregators
# (container="flux-aggregator", the chart's PodMonitor target label) and the sidecars that
# forward to them, so they find data where those run (an agent writing to PostgreSQL
# itself exports flux_records_received_total at zero, and no flux_upstream_up).
AGGREGATOR_ROW = "Aggregator tier"
AGGREGATOR_TIER = re.compile(r'container="flux-aggregator"|\bflux_upstream_up\b'
                             r'|\bflux_records_received_total\b')


def row_of() -> dict[int, str]:
    """Panel id -> the title of the row it sits under."""
    out: dict[int, str] = {}
    row = ""
    for p in sorted(dashboard()["panels"], key=lambda p: (p["gridPos"]["y"], p["gridPos"]["x"])):
        if p["type"] == "row":
            row = p["title"]
        else:
            out[p["id"]] = row
    return out


def panel_exprs(*, aggregator_tier: bool) -> list[tuple[str, str]]:
    """The panels' queries: of the aggregator tier's row, or of the others."""
    rows = row_of()
    return [(f"dashboard: {p['title']}", t["expr"]) for p in panels() for t in p["targets"]
            if (rows[p["id"]] == AGGREGATOR_ROW) == aggregator_tier]


def dashboard_exprs() -> list[tuple[str, str]]:
    out = [(f"dashboard: {p['title']}", t["expr"]) for p in panels() for t in p["targets"]]
    for var in dashboard()["templating"]["list"]:
        if var["type"] == "query":
            out.append((f"dashboard variable {var['name']}", var["query"]["query"]))
    return out


# --------------------------------------------------------------------------- the chart


@pytest.fixture(scope="module")
def chart() -> Any:
    with helm.Chart.load(str(CHART)) as loaded:
        yield loaded


def _render(chart: Any, values: dict[str, Any]) -> list[dict[str, Any]]:
    out = chart.render(copy.deepcopy(values), name="flux", namespace="flux-system",
                       is_install=True)
    return [doc for path, text in sorted(out.items()) if not path.endswith("NOTES.txt")
            for doc in yaml.safe_load_all(text) if doc is not None]


def test_prometheus_rule_renders_the_rule_files(chart: Any):
    docs = _render(chart, {"metrics": {"prometheusRule": {"enabled": True,
                                                          "labels": {"release": "kp"}}}})
    (rule,) = [d for d in docs if d["kind"] == "PrometheusRule"]
    assert rule["metadata"]["labels"]["release"] == "kp"
    expected = [g for p in (AGENT_RULES, INJECTOR_RULES)
                for g in yaml.safe_load(p.read_text())["groups"]]
    assert rule["spec"]["groups"] == expected


def test_dashboard_configmap(chart: Any):
    assert not [d for d in _render(chart, {}) if d["kind"] == "ConfigMap"
                and "flux-agent.json" in d.get("data", {})]
    values = {"metrics": {"grafanaDashboard": {
        "enabled": True, "namespace": "monitoring", "labels": {"grafana_dashboard": "1"},
        "annotations": {"grafana_folder": "Flux"}}}}
    chart.validate_schema(copy.deepcopy(values))
    for version in KUBE_VERSIONS:
        report = helm.lint(str(CHART), copy.deepcopy(values), strict=True,
                           namespace="flux-system", kube_version="v" + version)
        assert report["errors"] == [], report
    (cm,) = [d for d in _render(chart, values) if d["kind"] == "ConfigMap"
             and "flux-agent.json" in d.get("data", {})]
    for version in KUBE_VERSIONS:
        kubernetes_validate.validate(cm, version, strict=True)
    assert cm["metadata"]["namespace"] == "monitoring"
    assert cm["metadata"]["labels"]["grafana_dashboard"] == "1"
    assert cm["metadata"]["annotations"] == {"grafana_folder": "Flux"}
    assert json.loads(cm["data"]["flux-agent.json"]) == dashboard()
    (cm,) = [d for d in _render(chart, {"metrics": {"grafanaDashboard": {"enabled": True}}})
             if d["kind"] == "ConfigMap" and "flux-agent.json" in d.get("data", {})]
    assert cm["metadata"]["namespace"] == "flux-system"
    for bad in ({"enabled": "yes"}, {"namespace": "Not_A_Namespace"}, {"labels": {"a": 1}}):
        with pytest.raises(helm.HelmValuesError):
            chart.validate_schema({"metrics": {"grafanaDashboard": bad}})


# --------------------------------------------------------------------------- the dashboard


def test_dashboard_is_well_formed():
    board = dashboard()
    assert board["uid"] == "flux-agent"
    variables = {v["name"]: v for v in board["templating"]["list"]}
    assert variables["datasource"]["type"] == "datasource"
    assert variables["datasource"]["query"] == "prometheus"
    allowed = {"$" + name for name in variables} | {"$__rate_interval", "$__range"}
    ids = [p["id"] for p in board["panels"]]
    assert len(ids) == len(set(ids))
    cells: set[tuple[int, int]] = set()
    for p in board["panels"]:
        g = p["gridPos"]
        assert g["x"] >= 0 and g["x"] + g["w"] <= 24, p["title"]
        area = {(x, y) for x in range(g["x"], g["x"] + g["w"])
                for y in range(g["y"], g["y"] + g["h"])}
        assert not area & cells, f"{p['title']} overlaps another panel"
        cells |= area
        if p["type"] == "row":
            continue
        assert p["datasource"] == {"type": "prometheus", "uid": "${datasource}"}, p["title"]
        assert p["description"], p["title"]
        refs = [t["refId"] for t in p["targets"]]
        assert refs and len(refs) == len(set(refs)), p["title"]
        for t in p["targets"]:
            assert t["datasource"] == p["datasource"]
            assert set(re.findall(r"\$\w+", t["expr"])) <= allowed, t["expr"]
            for label in re.findall(r"\{\{\s*(\w+)\s*\}\}", t["legendFormat"]):
                assert re.search(rf"\bby \([^)]*\b{label}\b", t["expr"]), \
                    f"{p['title']}: legend {{{{{label}}}}} is not kept by the query"
    titles = " | ".join(p["title"].lower() for p in panels())
    for topic in ("accepted", "rejected", "flush rate", "batch size", "flush duration",
                  "spool bytes vs capacity", "backlog and oldest unflushed age",
                  "postgresql up", "readiness", "request rate", "latency", "error ratio",
                  "checkpoint saves", "checkpoint sizes", "active runs", "dead letters",
                  "retention", "aggregators reachable", "records received / s by agency",
                  "upstream up", "aggregator backlog", "aggregator spool use"):
        assert topic in titles, topic
    # The aggregator tier's panels, and only they, read what the aggregators and the
    # sidecars forwarding to them export: the real-Prometheus tests check each row against
    # the agents that feed it.
    rows = row_of()
    assert AGGREGATOR_ROW in rows.values()
    for p in panels():
        tier = [bool(AGGREGATOR_TIER.search(t["expr"])) for t in p["targets"]]
        if rows[p["id"]] == AGGREGATOR_ROW:
            assert all(tier), f"{p['title']}: not about the aggregator tier"
        else:
            assert not any(tier), f"{p['title']}: belongs in the row {AGGREGATOR_ROW!r}"


# --------------------------------------------------------------------------- real Prometheus


@contextlib.asynccontextmanager
async def prometheus(targets: dict[str, dict[str, str]],
                     rule_files: list[Path]) -> AsyncIterator[str]:
    """A real Prometheus scraping ``targets`` (address -> the labels it gives the target,
    as prometheus-operator's monitors do) every second and evaluating ``rule_files``.

    Prometheus (2.42, Debian) runs as root without complaint, unlike PgBouncer, so it runs
    as whoever runs the tests."""
    binary = require_tool("prometheus")
    root = short_tempdir("fa-prom-")
    port = free_port()
    (root / "prometheus.yml").write_text(yaml.safe_dump({
        "global": {"scrape_interval": "1s", "evaluation_interval": "1s"},
        "rule_files": [str(p) for p in rule_files],
        "scrape_configs": [{"job_name": "flux-agent", "static_configs": [
            {"targets": [target], **({"labels": labels} if labels else {})}
            for target, labels in targets.items()]}],
    }))
    log = (root / "prometheus.log").open("wb")
    proc = subprocess.Popen([str(binary), f"--config.file={root / 'prometheus.yml'}",
                             f"--storage.tsdb.path={root / 'data'}",
                             f"--web.listen-address=127.0.0.1:{port}"],
                            stdout=log, stderr=subprocess.STDOUT)
    log.close()
    base = f"http://127.0.0.1:{port}"
    try:
        async def started() -> bool:
            if proc.poll() is not None:
                return True
            with contextlib.suppress(aiohttp.ClientError, OSError):
                async with aiohttp.ClientSession() as session, \
                        session.get(base + "/-/ready") as resp:
                    return resp.status == 200
            return False

        assert await wait_until(started, 30, 0.1)
        assert proc.poll() is None, (root / "prometheus.log").read_text()[-3000:]
        yield base
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(15)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(5)
        shutil.rmtree(root, ignore_errors=True)


async def api(base: str, path: str, **params: str) -> Any:
    async with aiohttp.ClientSession() as session, session.get(base + path,
                                                               params=params) as resp:
        body = await resp.json()
    assert body["status"] == "success", body
    return body["data"]


async def prom_value(base: str, query: str) -> float | None:
    result = (await api(base, "/api/v1/query", query=query))["result"]
    return float(result[0]["value"][1]) if result else None


def grafana_to_promql(expr: str) -> str:
    values = {"__rate_interval": "1m", "__range": "5m", "job": ".*", "namespace": ".*",
              "instance": ".*"}
    return re.sub(r"\$(\w+)", lambda m: values[m.group(1)], expr)


async def without_data(base: str, exprs: list[tuple[str, str]]) -> list[str]:
    """The dashboard queries among ``exprs`` that Prometheus answers with nothing."""
    empty = []
    for where, expr in exprs:
        result = (await api(base, "/api/v1/query", query=grafana_to_promql(expr)))["result"]
        if not result:
            empty.append(where)
    return empty


async def test_real_prometheus_scrapes_the_agent_and_evaluates_the_rules(database: Database,
                                                                        state_dir: Path):
    agent = Agent(agent_config(database, state_dir, retention_interval=0.2))
    await agent.start()
    try:
        target = agent.endpoints.admin_url.removeprefix("http://")
        async with prometheus({target: {}}, [AGENT_RULES]) as base:
            url = agent.endpoints.event_url + "/v1/events"
            status, _, _ = await post(url, make_events(5), headers={"Prefer": "wait=committed"})
            assert status == 200
            # Violations in two rounds: a labelled counter is born at its first increment,
            # and increase() only sees what happens after Prometheus has seen the series.
            # 30 at once also overflow the audit burst (20): audit entries are dropped.
            for _ in range(30):
                assert (await post(url, [make_event(agency="noaa")]))[0] == 403

            async def seen(query: str, want: float | None = None) -> bool:
                got = await prom_value(base, query)
                return got is not None and (want is None or got == want)

            flushed = value(await scrape(agent), "flux_events_flushed_total")
            assert flushed >= 5
            assert await wait_until(lambda: seen(
                'flux_events_flushed_total{job="flux-agent"}', flushed), 20, 0.2)
            assert await wait_until(lambda: seen(
                'flux_errors_total{error_class="DATA_ISOLATION_ERROR"}'), 10, 0.2)
            assert await wait_until(lambda: seen(
                'flux_audit_dropped_total{reason="rate_limited"}'), 10, 0.2)
            await do_everything(agent)  # 25 more violations: some audits are rate-limited
            # Prometheus has the agent's values.
            final = await scrape(agent)
            assert await wait_until(lambda: seen(
                "flux_events_flushed_total", value(final, "flux_events_flushed_total")),
                10, 0.2)
            assert await prom_value(base, 'up{job="flux-agent"}') == 1
            assert await prom_value(
                base, 'flux_events_accepted_total{agency="nasa"}') == value(
                final, "flux_events_accepted_total", agency="nasa")

            # The rules loaded, evaluate cleanly, and the two that the violations trip fire.
            names = {r["alert"] for g in yaml.safe_load(AGENT_RULES.read_text())["groups"]
                     for r in g["rules"]}

            async def evaluated() -> bool:
                groups = (await api(base, "/api/v1/rules"))["groups"]
                rules = [r for g in groups for r in g["rules"]]
                return {r["name"] for r in rules} == names and all(
                    r["health"] == "ok" for r in rules)

            assert await wait_until(evaluated, 10, 0.2)
            for group in (await api(base, "/api/v1/rules"))["groups"]:
                assert group["file"] == str(AGENT_RULES)
                for rule in group["rules"]:
                    assert rule["health"] == "ok" and not rule.get("lastError"), rule

            def alerts_now(alerts: list[dict[str, Any]], state: str) -> set[str]:
                return {a["labels"]["alertname"] for a in alerts if a["state"] == state}

            expected_firing = {"FluxAgentIsolationViolations", "FluxAgentAuditDropped"}
            alerts: list[dict[str, Any]] = []

            async def fired() -> bool:
                nonlocal alerts
                alerts = (await api(base, "/api/v1/alerts"))["alerts"]
                return alerts_now(alerts, "firing") == expected_firing

            assert await wait_until(fired, 15, 0.2), alerts
            # The error share of DATA_ISOLATION_ERROR is far above 5%: pending for 10m.
            assert alerts_now(alerts, "pending") <= {"FluxAgentErrorRate"}
            for a in alerts:
                assert a["labels"]["job"] == "flux-agent"
                if a["labels"]["alertname"] == "FluxAgentErrorRate":
                    assert a["labels"]["error_class"] == "DATA_ISOLATION_ERROR"

            # Every dashboard query is valid PromQL and finds data (once Prometheus holds
            # two samples of the series born during the work: rate() needs two); the
            # aggregator tier's row, on an aggregator and a forwarding sidecar, below.
            empty: list[str] = []

            async def all_found() -> bool:
                empty[:] = await without_data(base, panel_exprs(aggregator_tier=False))
                return not empty

            assert await wait_until(all_found, 10, 0.5), \
                f"dashboard queries without data: {empty}"
            # The template variables' label_values() find the agent.
            for var in dashboard()["templating"]["list"]:
                if var["type"] != "query":
                    continue
                m = re.fullmatch(r"label_values\((.+), (\w+)\)", var["query"]["query"])
                assert m, var["query"]
                found = await api(base, f"/api/v1/label/{m.group(2)}/values",
                                  **{"match[]": grafana_to_promql(m.group(1))})
                assert {"job": ["flux-agent"], "instance": [target],
                        "namespace": []}[var["name"]] == found, var["name"]

            # The agent goes away: FluxAgentDown, pending for its 5 minutes.
            await agent.stop()

            async def down() -> bool:
                nonlocal alerts
                alerts = (await api(base, "/api/v1/alerts"))["alerts"]
                return "FluxAgentDown" in alerts_now(alerts, "pending")

            assert await wait_until(down, 10, 0.2), alerts
            (gone,) = [a for a in alerts if a["labels"]["alertname"] == "FluxAgentDown"]
            assert gone["labels"] == {"alertname": "FluxAgentDown", "job": "flux-agent",
                                      "instance": target, "severity": "critical"}
            assert gone["annotations"]["summary"] == f"flux-agent {target} cannot be scraped"
    finally:
        await agent.stop()


# The target labels of the chart's PodMonitors: the aggregators' and a sidecar's.
AGGREGATOR_TARGET = {"namespace": "flux-system", "pod": "flux-flux-agent-aggregator-0",
                     "container": "flux-aggregator", "endpoint": "flux-admin"}
SIDECAR_TARGET = {"namespace": "etl", "pod": "etl-1", "container": "flux-agent",
                  "endpoint": "flux-admin"}


async def test_real_prometheus_sees_the_aggregator_tier(database: Database, state_dir: Path):
    """An aggregator and a sidecar forwarding to it, scraped with the PodMonitors' target
    labels: the dashboard's aggregator tier finds data, the sidecar counts as reaching its
    aggregators, and once the aggregator is gone FluxAgentUpstreamDown is pending for that
    sidecar (and the dashboard counts it)."""
    sidecar_state = short_tempdir("fa-fwd-")
    aggregator = Agent(agent_config(database, state_dir, role="aggregator", socket="off"))
    sidecar: Agent | None = None
    await aggregator.start()
    try:
        sidecar = Agent(agent_config(
            database, sidecar_state, database_url=None, socket="off", drain_timeout=0.5,
            upstream=(aggregator.endpoints.event_url,), database_ping_interval=0.5))
        await sidecar.start()
        at_aggregator = aggregator.endpoints.admin_url.removeprefix("http://")
        at_sidecar = sidecar.endpoints.admin_url.removeprefix("http://")
        async with prometheus({at_aggregator: AGGREGATOR_TARGET, at_sidecar: SIDECAR_TARGET},
                              [AGENT_RULES, AGGREGATOR_RULES]) as base:
            status, _, _ = await post(sidecar.endpoints.event_url + "/v1/events",
                                      make_events(5), headers={"Prefer": "wait=committed"})
            assert status == 200

            async def seen(query: str, want: float) -> bool:
                return await prom_value(base, query) == want

            # The aggregator took the sidecar's records and wrote them.
            final = await scrape_until(aggregator, lambda s: value(
                s, "flux_events_flushed_total") >= 5 and value(
                s, "flux_spool_backlog_records") == 0)
            received = value(final, "flux_records_received_total", agency="nasa")
            assert received >= 1
            assert await wait_until(lambda: seen(
                'flux_records_received_total{container="flux-aggregator", agency="nasa"}',
                received), 20, 0.2)

            # Every query of the aggregator tier's row finds data.
            exprs = panel_exprs(aggregator_tier=True)
            assert exprs
            empty: list[str] = []

            async def all_found() -> bool:
                empty[:] = await without_data(base, exprs)
                return not empty

            assert await wait_until(all_found, 15, 0.5), \
                f"dashboard queries without data: {empty}"
            (reachable,) = [p for p in panels()
                            if p["title"] == "Aggregators reachable (sidecars)"]
            queries = {t["legendFormat"]: grafana_to_promql(t["expr"])
                       for t in reachable["targets"]}
            assert await prom_value(base, queries["reachable"]) == 1
            assert await prom_value(base, queries["unreachable"]) == 0

            # The aggregator goes away: the sidecar's next check fails.
            await aggregator.stop()
            assert await wait_until(lambda: seen(queries["unreachable"], 1), 15, 0.2)
            alerts: list[dict[str, Any]] = []

            async def pending() -> bool:
                nonlocal alerts
                alerts = (await api(base, "/api/v1/alerts"))["alerts"]
                return any(a["labels"]["alertname"] == "FluxAgentUpstreamDown"
                           and a["state"] == "pending" for a in alerts)

            assert await wait_until(pending, 10, 0.2), alerts
            (down,) = [a for a in alerts if a["labels"]["alertname"] == "FluxAgentUpstreamDown"]
            assert down["labels"] == {"alertname": "FluxAgentUpstreamDown", "job": "flux-agent",
                                      "instance": at_sidecar, **SIDECAR_TARGET,
                                      "severity": "critical"}
            assert down["annotations"]["summary"] == \
                "flux-agent etl/etl-1 cannot reach its aggregators"
            groups = (await api(base, "/api/v1/rules"))["groups"]
            for rule in (r for g in groups for r in g["rules"]):
                assert rule["health"] == "ok" and not rule.get("lastError"), rule
    finally:
        if sidecar is not None:
            await sidecar.stop()
        await aggregator.stop()
        shutil.rmtree(sidecar_state, ignore_errors=True)
