"""Which agency a pod's sidecar writes as: bound to what the pod's author does not control
(pure).

A namespace's agencies come from the injector's ``agency_bindings`` (the chart's values,
set by whoever installs the chart), else from the Namespace object's ``flux.io/agency``
annotation (a comma list; cluster admins set it, pod authors cannot), else from the
bindings' ``*`` entry. A pod's own ``flux.io/agency`` annotation may only choose among them;
a pod in a namespace bound to exactly one agency needs no annotation. Anything else is a
:class:`BindingError`, which the webhook refuses whatever its failure policy: admitting the
pod without its agent would be the only alternative, and admitting it with an agency of its
author's choosing is what this exists to prevent.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from ..core.settings import AGENCY_SLUG
from .config import ANNOTATION_AGENCY, ANY_NAMESPACE, InjectionError, InjectorConfig


class BindingError(InjectionError):
    """The pod may not write as the agency it asks for (or its namespace is bound to none)."""


def binds(config: InjectorConfig) -> bool:
    """Whether pods are bound to their namespace's agency (``jwt`` callers bring their own)."""
    return config.agent_auth != "jwt"


def namespace_agencies(namespace: str, config: InjectorConfig,
                       namespace_annotations: Mapping[str, Any] | None) -> tuple[str, ...]:
    """The agencies pods in ``namespace`` may write as (empty: bound to none)."""
    bindings = dict(config.agency_bindings)
    if namespace in bindings:
        return bindings[namespace]
    raw = (namespace_annotations or {}).get(ANNOTATION_AGENCY)
    if isinstance(raw, str) and raw.strip():
        agencies = tuple(a.strip() for a in raw.split(",") if a.strip())
        bad = [a for a in agencies if not AGENCY_SLUG.match(a)]
        if bad:
            raise BindingError(f"namespace {namespace}: its {ANNOTATION_AGENCY} annotation "
                               f"names {bad[0]!r}, which is not an agency slug")
        return agencies
    return bindings.get(ANY_NAMESPACE, ())


def bind(requested: str, namespace: str, config: InjectorConfig,
         namespace_annotations: Mapping[str, Any] | None) -> str:
    """The agency for a pod that asks for ``requested`` ("" when it names none)."""
    allowed = namespace_agencies(namespace, config, namespace_annotations)
    if not allowed:
        raise BindingError(
            f"namespace {namespace} is bound to no agency: a cluster admin annotates the "
            f"Namespace {ANNOTATION_AGENCY}=<agency>, or the chart maps it in "
            "agent.agencyBindings")
    if requested:
        if requested not in allowed:
            raise BindingError(f"annotation {ANNOTATION_AGENCY}: {requested!r} is not an "
                               f"agency of namespace {namespace} (it may write as "
                               f"{', '.join(allowed)})")
        return requested
    if len(allowed) > 1:
        raise BindingError(f"namespace {namespace} may write as {', '.join(allowed)}: choose "
                           f"one with the annotation {ANNOTATION_AGENCY}")
    return allowed[0]
