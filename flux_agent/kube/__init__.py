"""Kubernetes sidecar injection: a mutating admission webhook, and the same logic as a CLI.

A pod opts in with the label ``flux.io/inject: "true"`` and may tune the agent with
annotations:

=============================  ===============================================================
``flux.io/agency``             which of its namespace's agencies the pod writes as (needed
                               only where the namespace is bound to several; see ``binding``)
``flux.io/spool-size``         spool volume size (``2Gi``): the emptyDir ``sizeLimit``; the
                               agent's ``FLUX_AGENT_SPOOL_MAX_BYTES`` is that minus headroom
``flux.io/cpu``                ``REQUEST`` or ``REQUEST/LIMIT`` (``100m`` or ``100m/1``)
``flux.io/memory``             ``REQUEST`` or ``REQUEST/LIMIT`` (``128Mi/256Mi``)
``flux.io/image``              the agent image, only where the injector allows pods to choose
                               it (``allow_image_override``, off by default: the annotation
                               is then ignored with a warning)
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
* the agent's settings: fixed ones as ``env``, the rest from a ConfigMap (``envFrom``); the
  database URL from a Secret mounted as a file into the agent container alone
  (``FLUX_AGENT_DATABASE_URL_FILE=/etc/flux-agent/database/url``, never an environment
  variable); the ConfigMap and the Secret must exist in the pod's namespace;
* with an aggregator tier (``aggregator_url``): upstream ``aggregator`` replaces the database
  Secret by ``FLUX_AGENT_UPSTREAM=<aggregator_url>``; upstream ``database`` keeps it and adds
  ``FLUX_AGENT_HANDOFF=<aggregator_url>`` (where a draining sidecar hands what it could not
  deliver). Both give the agent container the pod's projected service-account token for
  the audience ``flux-aggregator`` (``FLUX_AGENT_UPSTREAM_TOKEN_FILE=/var/run/secrets/
  flux-agent/upstream/token``, one hour, rotated by the kubelet) and, for ``https://``, the
  CA of the aggregators' certificate from a ConfigMap in the pod's namespace
  (``FLUX_AGENT_UPSTREAM_CA_FILE=/etc/flux-agent/upstream-ca/ca.crt``).

Pods in excluded namespaces (kube-system, kube-public), pods without the label, and pods that
already have a ``flux-agent`` container are left alone, so re-invocation
(``reinvocationPolicy: IfNeeded``) never injects twice. A bad annotation or a malformed pod is
answered ``allowed: true`` with a warning and a ``flux.io/injection-error`` annotation (fail
open), or ``allowed: false`` when the injector is configured to fail closed.

The patch is computed by a pure function (:func:`build_patch`); :func:`admission_response`
wraps it in an AdmissionReview answer; :func:`mutate_pod` applies it, which is what
``flux-agent inject POD_FILE`` prints. ``flux-agent inject-webhook`` serves ``POST /mutate``
over HTTPS (plus ``GET /healthz``, and ``/metrics`` on an optional plain-HTTP port).

Modules, low to high: ``config`` (names, :class:`InjectorConfig`, quantities), ``binding``
(which agency a pod may write as: its namespace's, never one its author picks), ``patch``
(the pure pod patch), ``admission`` (AdmissionReview answers), ``webhook`` (the HTTPS
server, and the Namespace reader), ``cli`` (``flux-agent inject`` and ``inject-webhook``'s
arguments).
"""

from __future__ import annotations

from .admission import MalformedReview, admission_response, apply_patch, mutate_pod
from .cli import WebhookPlan, cli_inject, prepare_webhook
from .config import (
    ANNOTATION_AGENCY,
    ANNOTATION_CPU,
    ANNOTATION_IMAGE,
    ANNOTATION_MEMORY,
    ANNOTATION_SIDECAR_MODE,
    ANNOTATION_SPOOL_PVC,
    ANNOTATION_SPOOL_SIZE,
    INJECT_LABEL,
    InjectionError,
    InjectorConfig,
)
from .patch import build_patch
from .webhook import WebhookServer, serve_webhook

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

