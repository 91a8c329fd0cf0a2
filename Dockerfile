# syntax=docker/dockerfile:1
# flux-agent: the sidecar image (also runs the injection webhook: `flux-agent inject-webhook`).
#
#   docker build -t flux-agent:0.1.0 --build-arg VERSION=0.1.0 \
#     --build-arg REVISION="$(git rev-parse HEAD)" .
#
# Stage 1 builds wheels for the package and its dependencies at the versions pinned in
# constraints.txt (refresh: .ci/constraints.py); stage 2 installs only those wheels (no
# compiler, no build tools, no pip cache). The `embedded` extra (a bundled PostgreSQL) is
# deliberately not installed: in Kubernetes the agent writes to a real database named by
# FLUX_AGENT_DATABASE_URL. A pip configuration for the build (a mirror, an index, a CA) can be
# passed as a secret, never baked into a layer: `--secret id=pip.conf,src=PATH`.
#
# At run time the image needs no shell (exec-form ENTRYPOINT/CMD/HEALTHCHECK), runs as the
# numeric non-root uid 10001, and works with a read-only root filesystem: everything it
# writes goes to the state directory (/var/lib/flux-agent, a volume) and the socket directory
# (/var/run/flux-agent, a volume in the injected pod).

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

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    FLUX_AGENT_STATE_DIR=/var/lib/flux-agent \
    FLUX_AGENT_ADMIN_LISTEN=0.0.0.0:9464

# Install the wheels (dependencies included, no index), precompile the bytecode now because
# the root filesystem is read-only later, and create the unprivileged user and its dirs.
RUN --mount=type=bind,from=build,source=/wheels,target=/wheels \
    pip install --no-cache-dir --no-index --find-links=/wheels /wheels/flux_agent-*.whl \
    && python -m compileall -q "$(python -c 'import sysconfig; print(sysconfig.get_path("purelib"))')" \
    && groupadd --system --gid 10001 flux \
    && useradd --system --uid 10001 --gid 10001 --no-create-home \
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
