"""The alerting rules (helm/flux-agent/rules) on their own: promtool checks every rule file,
runs the shipped `promtool test rules` file (rules/tests/), and that file is held to proving
every alert under prometheus-operator's target labels, which are the labels the chart's
PodMonitor and ServiceMonitor give every series they scrape. Every alert is labelled,
annotated and has its runbook section.

promtool is Debian's (`apt-get install prometheus`); without it these tests skip with the
reason, and fail in CI (``FLUX_TEST_REQUIRE``)."""

from __future__ import annotations

import copy
import re
import subprocess
from pathlib import Path
from typing import Any

import helm_python as helm
import pytest
import yaml

from .support.tools import require_tool

CHART = Path(__file__).resolve().parent.parent / "helm" / "flux-agent"
RULES = CHART / "rules"
RULE_FILES = sorted(RULES.glob("*.rules.yaml"))
RULE_TESTS = RULES / "tests" / "flux-agent.rules.test.yaml"
RUNBOOK = RULES / "RUNBOOK.md"
DOCS = [CHART.parent.parent / "README.md", *sorted((CHART.parent.parent / "docs").glob("*.md"))]

# What prometheus-operator attaches to a scraped series: a PodMonitor target has these, a
# ServiceMonitor target `service` too. `endpoint` is the name of the scraped port.
OPERATOR_TARGET_LABELS = {"job", "instance", "namespace", "pod", "container", "endpoint"}
# Alerts about a whole tier rather than one pod: their cases prove them on series that all
# carry the operator's labels.
AGGREGATED = {"FluxAggregatorsUnavailable"}


def alerts() -> dict[str, dict[str, Any]]:
    out: dict[str, dict[str, Any]] = {}
    for path in RULE_FILES:
        for group in yaml.safe_load(path.read_text())["groups"]:
            for rule in group["rules"]:
                assert rule["alert"] not in out, f"{rule['alert']} defined twice"
                out[rule["alert"]] = {**rule, "__file": path.name}
    return out


def rule_tests() -> dict[str, Any]:
    doc: dict[str, Any] = yaml.safe_load(RULE_TESTS.read_text())
    return doc


def promtool(*args: str, cwd: Path | None = None) -> subprocess.CompletedProcess[bytes]:
    binary = require_tool("promtool")
    return subprocess.run([str(binary), *args], cwd=cwd, capture_output=True, timeout=120)


# --------------------------------------------------------------------------- promtool


def test_promtool_checks_every_rule_file():
    assert RULE_FILES, "no rule files"
    result = promtool("check", "rules", *map(str, RULE_FILES))
    assert result.returncode == 0, (result.stdout + result.stderr).decode()
    for path in RULE_FILES:
        count = sum(len(g["rules"]) for g in yaml.safe_load(path.read_text())["groups"])
        assert f"SUCCESS: {count} rules found".encode() in result.stdout, path.name


def test_promtool_test_rules_passes_on_the_shipped_file():
    """The file an operator runs (`promtool test rules rules/tests/...`), as shipped."""
    result = promtool("test", "rules", RULE_TESTS.name, cwd=RULE_TESTS.parent)
    out = (result.stdout + result.stderr).decode()
    assert result.returncode == 0, out
    assert "SUCCESS" in out


def test_the_shipped_rule_tests_fail_when_an_alert_misbehaves(tmp_path: Path):
    """The rule tests can fail: the same cases against a rule file whose request label is
    the one prometheus-operator overwrites (the label the agent once exported) do."""
    for path in RULE_FILES:
        text = path.read_text().replace("route", "endpoint")
        (tmp_path / path.name).write_text(text)
    (tmp_path / "tests").mkdir()
    (tmp_path / "tests" / RULE_TESTS.name).write_text(RULE_TESTS.read_text())
    result = promtool("test", "rules", RULE_TESTS.name, cwd=tmp_path / "tests")
    out = (result.stdout + result.stderr).decode()
    assert result.returncode != 0, out
    assert "alertname: FluxAgentErrorRate" in out


# --------------------------------------------------------------------------- what the tests cover


def test_the_rule_tests_cover_every_rule_file_and_alert():
    doc = rule_tests()
    assert sorted(doc["rule_files"]) == sorted(f"../{p.name}" for p in RULE_FILES)
    tested: dict[str, list[dict[str, Any]]] = {}
    for case in doc["tests"]:
        for check in case["alert_rule_test"]:
            tested.setdefault(check["alertname"], []).append(check)
    assert set(tested) == set(alerts()), "every alert needs a case, and only alerts have one"
    for name, checks in tested.items():
        assert any(c["exp_alerts"] for c in checks), f"{name}: no case where it fires"


def test_every_alert_fires_under_prometheus_operator_target_labels():
    """A PodMonitor/ServiceMonitor target carries `endpoint` (its port name), `namespace`,
    `pod`, `container` and `job`: each alert has a case whose input series carry them all
    and whose alert keeps them (one alert names one pod). The agent's own labels never
    collide with them."""
    chart_ports = _monitor_ports()
    proven: set[str] = set()
    for case in rule_tests()["tests"]:
        series_labels = [_labels(s["series"]) for s in case["input_series"]]
        for s in series_labels:
            if "endpoint" in s:
                assert s["endpoint"] in chart_ports, \
                    f"endpoint {s['endpoint']!r} is no port the chart's monitors scrape " \
                    f"({sorted(chart_ports)})"
        for check in case["alert_rule_test"]:
            name = check["alertname"]
            for alert in check["exp_alerts"]:
                labels = alert["exp_labels"]
                if set(labels) >= OPERATOR_TARGET_LABELS:
                    # One alert per pod: it names the pod its series came from.
                    assert any(set(s) >= OPERATOR_TARGET_LABELS and s["pod"] == labels["pod"]
                               for s in series_labels), name
                    proven.add(name)
                elif name in AGGREGATED and all(
                        set(s) >= OPERATOR_TARGET_LABELS for s in series_labels):
                    proven.add(name)
    # FluxAgentNotScraped is the one alert about kube-state-metrics' series (a pod that
    # Prometheus does not scrape has no target labels of its own): namespace and pod.
    missing = set(alerts()) - proven - {"FluxAgentNotScraped"}
    assert not missing, f"no case proves these fire under prometheus-operator: {missing}"


def _labels(selector: str) -> dict[str, str]:
    return dict(re.findall(r'(\w+)="([^"]*)"', selector))


MONITORED = {
    "metrics": {"serviceMonitor": {"enabled": True}, "podMonitor": {"enabled": True},
                "prometheusRule": {"enabled": True}},
    "aggregator": {"enabled": True},
    "agent": {"namespaces": ["etl"], "namespaceBinding": False, "agencyBindings": {"etl": "nasa"},
              "kubernetes": {"jwksConfigMap": "cluster-sa-jwks"}},
}


def _rendered(values: dict[str, Any]) -> list[dict[str, Any]]:
    with helm.Chart.load(str(CHART)) as chart:
        rendered = chart.render(copy.deepcopy(values), name="flux", namespace="flux-system",
                                is_install=True)
    return [doc for path, text in sorted(rendered.items()) if not path.endswith("NOTES.txt")
            for doc in yaml.safe_load_all(text) if doc]


def _monitor_ports() -> set[str]:
    """The port names the chart's PodMonitors and ServiceMonitor scrape (the `endpoint`
    label of their targets)."""
    ports: set[str] = set()
    for doc in _rendered(MONITORED):
        if doc["kind"] == "PodMonitor":
            ports |= {e["port"] for e in doc["spec"]["podMetricsEndpoints"]}
        if doc["kind"] == "ServiceMonitor":
            ports |= {e["port"] for e in doc["spec"]["endpoints"]}
    assert ports, "the chart renders no monitors"
    return ports


def test_the_aggregator_rules_select_the_charts_aggregator_container():
    """The aggregator alerts and the sidecar rules that leave aggregators to them tell the two
    apart by the `container` target label: the name of the StatefulSet's container, which
    the chart's aggregator PodMonitor scrapes on a port of that container."""
    docs = _rendered(MONITORED)
    (statefulset,) = [d for d in docs if d["kind"] == "StatefulSet"]
    (container,) = statefulset["spec"]["template"]["spec"]["containers"]
    monitors = [d for d in docs if d["kind"] == "PodMonitor"
                and d["spec"]["selector"]["matchLabels"].items()
                <= statefulset["spec"]["template"]["metadata"]["labels"].items()]
    assert len(monitors) == 1
    assert {e["port"] for e in monitors[0]["spec"]["podMetricsEndpoints"]} <= {
        p["name"] for p in container["ports"]}
    matchers: set[str] = set()
    for name, rule in alerts().items():
        # (kube-state-metrics' container="flux-agent" of FluxAgentNotScraped is the
        # sidecar's name in pods, not a target label.)
        found = set(re.findall(r'\b(?:flux_\w+|up)\{[^}]*\bcontainer\s*(?:!=|=)\s*"([^"]*)"',
                               rule["expr"]))
        if rule["__file"] == "flux-aggregator.rules.yaml":
            assert found, f"{name} does not select the aggregators"
        matchers |= found
    assert matchers == {container["name"]}
    # The PrometheusRule carries the aggregator's rules only with the aggregator.
    (rule,) = [d for d in docs if d["kind"] == "PrometheusRule"]
    assert "flux-agent.aggregator" in {g["name"] for g in rule["spec"]["groups"]}
    (rule,) = [d for d in _rendered({"metrics": {"prometheusRule": {"enabled": True}}})
               if d["kind"] == "PrometheusRule"]
    assert "flux-agent.aggregator" not in {g["name"] for g in rule["spec"]["groups"]}


def test_no_rule_matches_the_agents_request_label_by_the_target_labels_name():
    """`endpoint` in a rule is the operator's target label (a port name); the agent's own
    label of the route it answered is `route`. A matcher like endpoint=~"/..." is the bug
    that kept FluxAgentErrorRate from ever firing."""
    for name, rule in alerts().items():
        for m in re.finditer(r'\bendpoint\s*(=~|!~|!=|=)\s*"([^"]*)"', rule["expr"]):
            assert not m.group(2).startswith("/"), f"{name}: {m.group(0)}"
        assert not re.search(r"\b(by|without)\s*\([^)]*\bendpoint\b", rule["expr"]), name


# --------------------------------------------------------------------------- the runbook


def test_every_alert_is_labelled_annotated_and_in_the_runbook():
    runbook = RUNBOOK.read_text()
    anchors = {re.sub(r"[^a-z0-9-]", "", h.lower()) for h in
               re.findall(r"^## (.+)$", runbook, re.MULTILINE)}
    found = alerts()
    for name, rule in found.items():
        assert rule["labels"]["severity"] in {"critical", "warning", "info"}, name
        notes = rule["annotations"]
        assert set(notes) == {"summary", "description", "runbook_url"}, name
        assert notes["runbook_url"].endswith(
            f"/helm/flux-agent/rules/RUNBOOK.md#{name.lower()}"), name
        assert name.lower() in anchors, f"RUNBOOK.md has no section {name}"
        assert "{{" not in notes["description"], name  # static text; see summary
    assert len(anchors) == len(found), "a runbook section without its alert"


def test_the_files_the_docs_name_are_shipped():
    """The rule files, the runbook, the README and docs/ name the promtool test file; it exists
    where they say (it once was named but not shipped)."""
    named = 0
    for path in [*RULE_FILES, RUNBOOK, *DOCS, CHART / "README.md"]:
        for m in re.finditer(r"promtool test rules ([\w./-]+\.ya?ml)", path.read_text()):
            target = m.group(1)
            candidates = [CHART.parent.parent / target, path.parent / target]
            assert any(c.is_file() for c in candidates), f"{path.name} names {target}"
            named += 1
    assert named, "no document says how to run the rule tests"


@pytest.mark.parametrize("path", RULE_FILES, ids=lambda p: p.name)
def test_each_rule_file_says_where_its_tests_are(path: Path):
    assert "rules/tests/flux-agent.rules.test.yaml" in path.read_text()
