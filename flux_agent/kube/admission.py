"""AdmissionReview in, AdmissionReview out: the webhook's answer for a pod, with the
fail-open / fail-closed policy applied to pods that cannot be injected (pure), and the pod as
admitted (the answer's patch applied)."""

from __future__ import annotations

import base64
import copy
import importlib
import json
import logging
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from .binding import BindingError
from .config import (
    AGENT_UID,
    ANNOTATION_ERROR,
    ANNOTATION_IMAGE,
    ANNOTATION_SPOOL_PVC,
    InjectionError,
    InjectorConfig,
)
from .patch import _pointer, build_patch

log = logging.getLogger("flux_agent.inject")  # the name operators filter on, as before

ADMISSION_API = "admission.k8s.io/v1"


class MalformedReview(ValueError):
    """The request body is not an AdmissionReview admission.k8s.io/v1 request."""


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


def decide(pod: Any, config: InjectorConfig, namespace: str = "",
           namespace_annotations: Mapping[str, Any] | None = None) -> Outcome:
    """Build the patch, applying the fail-open / fail-closed policy to errors; an agency
    the pod's namespace is not bound to is refused whatever the policy."""
    try:
        try:
            patch = build_patch(pod, config, namespace, namespace_annotations)
        except InjectionError:
            raise
        except (TypeError, AttributeError, KeyError, IndexError, ValueError) as exc:
            # A shape this module did not anticipate: still the pod's fault, not ours.
            log.warning("unexpected pod shape", exc_info=True)
            raise InjectionError(f"malformed pod ({type(exc).__name__}: {exc})") from None
    except InjectionError as exc:
        message = f"flux-agent not injected: {exc}"
        if config.fail_closed or isinstance(exc, BindingError):
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
    return Outcome("injected", patch, advice(pod, config))


def advice(pod: Mapping[str, Any], config: InjectorConfig | None = None) -> list[str]:
    """Warnings for an injected pod that will probably work, but not as its author asked or
    not well."""
    out = []
    metadata = pod.get("metadata") or {}
    annotations = metadata.get("annotations") or {}
    if config is not None and not config.allow_image_override \
            and annotations.get(ANNOTATION_IMAGE) is not None:
        out.append(f"flux-agent: annotation {ANNOTATION_IMAGE} ignored: the injector's image "
                   f"{config.image} is injected (the chart's sidecar.allowImageOverride is "
                   "off)")
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


def admission_response(review: Any, config: InjectorConfig,
                       namespace_annotations: Mapping[str, Any] | None = None
                       ) -> tuple[dict[str, Any], Outcome]:
    """Answer an AdmissionReview request (raises :class:`MalformedReview`);
    ``namespace_annotations``: those of the request's Namespace, when looked up."""
    request = parse_review(review)
    kind = request.get("kind")
    is_pod = isinstance(kind, dict) and kind.get("group", "") == "" and kind.get("kind") == "Pod"
    operation = request.get("operation", "CREATE")
    if not is_pod or operation != "CREATE":
        outcome = Outcome("skipped", [], [])
    else:
        namespace = request.get("namespace")
        outcome = decide(request.get("object"), config,
                         namespace if isinstance(namespace, str) else "", namespace_annotations)
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


def inject_pod(pod: Mapping[str, Any], config: InjectorConfig, namespace: str = "",
               namespace_annotations: Mapping[str, Any] | None = None) -> Injected:
    """The webhook's answer for ``pod``, applied: the same code path as ``POST /mutate``
    (``namespace_annotations``: what the webhook would read from the Namespace)."""
    answer, outcome = admission_response(review_for(pod, namespace), config,
                                         namespace_annotations)
    response = answer["response"]
    patch: list[dict[str, Any]] = []
    if "patch" in response:
        patch = json.loads(base64.b64decode(response["patch"]))
    mutated = apply_patch(dict(pod), patch) if patch else copy.deepcopy(dict(pod))
    return Injected(mutated, patch, outcome)


def mutate_pod(pod: dict[str, Any], config: InjectorConfig, namespace: str = "",
               namespace_annotations: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """The pod as the webhook would admit it. Raises :class:`InjectionError` if the webhook
    would refuse it (fail closed, or an agency its namespace is not bound to)."""
    result = inject_pod(pod, config, namespace, namespace_annotations)
    if not result.outcome.allowed:
        raise InjectionError(result.outcome.message)
    return result.pod


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
