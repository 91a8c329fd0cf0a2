"""The CLI verbs: ``flux-agent inject POD_FILE`` (what the webhook does to a manifest,
offline) and the argument checking of ``flux-agent inject-webhook`` (``cli.py`` serves it)."""

from __future__ import annotations

import argparse
import copy
import importlib
import json
import os
import ssl
import sys
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .admission import inject_pod
from .config import INJECT_LABEL, InjectionError, InjectorConfig, _add_config_flags, config_from
from .patch import skip_reason
from .webhook import tls_context

EXIT_OK = 0
EXIT_FAILURE = 1
EXIT_CONFIG = 78


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
        prog="flux-agent inject", allow_abbrev=False,
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
        prog="flux-agent inject-webhook", allow_abbrev=False,
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
