# flux-agent: the sidecar image (also runs the injection webhook: `flux-agent inject-webhook`).
#
#   docker build -t flux-agent:0.1.0 --build-arg VERSION=0.1.0 \
#     --build-arg REVISION="$(git rev-parse HEAD)" .
#   podman build --format docker -t flux-agent:0.1.0 .    # (buildah bud: the same flags)
#
# `--format docker` keeps the HEALTHCHECK: the OCI image format (podman's and buildah's
# default) has no field for it. Kubernetes ignores HEALTHCHECK either way (the chart sets the
# probes). Needs BuildKit (Docker 23 and later by default) or buildah, for RUN --mount; no
# `# syntax=` line, so no frontend image is fetched and air-gapped builds work.
#
# Stage 1 builds wheels for the package (the distribution flux-etl-agent: on the public index
# the name flux-agent is an unrelated project's) and its dependencies at the versions pinned in
# constraints.txt (refresh: .ci/constraints.py); stage 2 installs only those wheels (no
# compiler, no build tools, no pip cache). The `embedded` extra (a bundled PostgreSQL) is
# deliberately not installed: in Kubernetes the agent writes to a real database named by
# FLUX_AGENT_DATABASE_URL. A pip configuration for the build (a mirror, an index, a CA) can be
# passed as a secret, never baked into a layer: `--secret id=pip.conf,src=PATH`.
#
# At run time the image needs no shell (exec-form ENTRYPOINT/CMD/HEALTHCHECK), runs as the
# numeric non-root uid 10001, and works with a read-only root filesystem: everything it
# writes goes to the state directory (/var/lib/flux-agent, a volume) and the socket directory
# (/var/run/flux-agent, a volume in the injected pod), and all bytecode, the standard
# library's included, is compiled at build time.
#
# Stopping: `docker stop` / `podman stop` send SIGTERM and wait 10 s before SIGKILL. The image
# drains for at most 8 s (FLUX_AGENT_DRAIN_TIMEOUT) so it exits 0 within that; when you raise
# the drain timeout, raise the stop timeout with it (`docker run --stop-timeout`, `docker stop
# -t`). In Kubernetes the chart's ConfigMap sets the drain timeout below the pod's
# terminationGracePeriodSeconds.

ARG PYTHON_IMAGE=python:3.11-slim-bookworm

FROM ${PYTHON_IMAGE} AS build
ENV PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PYTHONDONTWRITEBYTECODE=1
WORKDIR /src
# Only what the wheel is built from (see .dockerignore): no tests, no bench, no caches.
COPY pyproject.toml README.md constraints.txt ./
COPY flux_agent ./flux_agent
COPY schemas ./schemas
COPY sql ./sql
# PIP_CONSTRAINT (not -c) so the pins also hold in the isolated build of the wheel (hatchling).
RUN --mount=type=secret,id=pip.conf,target=/etc/pip.conf \
    PIP_CONSTRAINT=/src/constraints.txt pip wheel --no-cache-dir --wheel-dir /wheels .

FROM ${PYTHON_IMAGE}
ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    FLUX_AGENT_STATE_DIR=/var/lib/flux-agent \
    FLUX_AGENT_ADMIN_LISTEN=0.0.0.0:9464 \
    FLUX_AGENT_DRAIN_TIMEOUT=8s

# Install the wheels (dependencies included, no index), precompile the bytecode of everything
# on sys.path, the standard library included, now because the root filesystem is read-only
# later (the official python images ship the standard library without .pyc files: every
# start and every HEALTHCHECK would compile it again, in memory; the packaging tools, never
# imported at run time, are left out), and create the unprivileged user and its dirs (a
# regular uid: 10001 is above SYS_UID_MAX, so not --system).
RUN --mount=type=bind,from=build,source=/wheels,target=/wheels \
    pip install --no-cache-dir --no-index --find-links=/wheels /wheels/flux_etl_agent-*.whl \
    && python -c 'import compileall, os, re, sys; skip = re.compile("/(pip|setuptools|pkg_resources|wheel)/"); sys.exit(not all([compileall.compile_dir(p, quiet=1, workers=0, rx=skip) for p in sys.path if os.path.isdir(p)]))' \
    && groupadd --gid 10001 flux \
    && useradd --uid 10001 --gid 10001 --no-create-home --no-log-init \
       --home-dir /nonexistent --shell /usr/sbin/nologin flux \
    && mkdir -p /var/lib/flux-agent /var/run/flux-agent \
    && chown 10001:10001 /var/lib/flux-agent /var/run/flux-agent \
    && chmod 0750 /var/lib/flux-agent \
    && chmod 0770 /var/run/flux-agent

VOLUME ["/var/lib/flux-agent"]
# Admin listener (/health/*, /metrics). The event API stays on 127.0.0.1:8787 and the socket.
EXPOSE 9464
USER 10001:10001
WORKDIR /var/lib/flux-agent
STOPSIGNAL SIGTERM
HEALTHCHECK --interval=10s --timeout=3s --start-period=20s --retries=3 \
    CMD ["python", "-c", "import sys,urllib.request; sys.exit(0 if urllib.request.urlopen('http://127.0.0.1:9464/health/live', timeout=2).status == 200 else 1)"]
ENTRYPOINT ["flux-agent"]
CMD ["run"]
# Last, so that a new revision or date re-runs no build step.
ARG VERSION=0.1.0
ARG REVISION=unknown
ARG CREATED=unknown
LABEL org.opencontainers.image.title="flux-agent" \
      org.opencontainers.image.description="Embeddable asyncio sidecar: durable, validated, exactly-once step events from ETL pods to PostgreSQL" \
      org.opencontainers.image.version="${VERSION}" \
      org.opencontainers.image.revision="${REVISION}" \
      org.opencontainers.image.created="${CREATED}" \
      org.opencontainers.image.licenses="Apache-2.0" \
      org.opencontainers.image.source="https://github.com/flux-agent/flux-agent" \
      org.opencontainers.image.documentation="https://github.com/flux-agent/flux-agent#readme" \
      org.opencontainers.image.vendor="flux-agent"
