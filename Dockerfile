# syntax=docker/dockerfile:1
# podserve image: `docker build -t podserve:0.1.0 .` (BuildKit). Two stages:
#   build   - wheels for podserve and its dependencies, plus the demo model repository (needs the
#             `demo` extra: scikit-learn, skl2onnx, onnx; none of it reaches the runtime image)
#   runtime - slim Python, a venv with the podserve wheel WITHOUT extras, the models read-only,
#             a fixed non-root user; runs with a read-only root filesystem.

# Same base in both stages, so compiled wheels match the runtime ABI. Bump both together.
FROM python:3.11-slim-bookworm AS build
ENV PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PYTHONDONTWRITEBYTECODE=1
WORKDIR /src
COPY pyproject.toml README.md ./
COPY service ./service
# Every wheel the runtime and the demo build need: built once, installed offline below.
RUN pip wheel --no-cache-dir --wheel-dir /wheels ".[demo]"
# A throwaway venv with the demo extra, only to build the demo model repository.
RUN python -m venv /opt/build-venv \
    && /opt/build-venv/bin/pip install --no-cache-dir --no-index --find-links /wheels "podserve[demo]" \
    && /opt/build-venv/bin/podserve models build-demo /models

FROM python:3.11-slim-bookworm AS runtime
ARG VERSION=0.1.0
ARG REVISION=unknown
ARG CREATED=unknown
ARG UID=10001
ARG GID=10001
LABEL org.opencontainers.image.title="podserve" \
      org.opencontainers.image.description="Kubernetes-native ONNX model serving (FastAPI + Gunicorn)" \
      org.opencontainers.image.version="${VERSION}" \
      org.opencontainers.image.revision="${REVISION}" \
      org.opencontainers.image.created="${CREATED}" \
      org.opencontainers.image.licenses="Apache-2.0" \
      org.opencontainers.image.vendor="podserve" \
      org.opencontainers.image.base.name="docker.io/library/python:3.11-slim-bookworm"

# Fixed IDs: the Helm chart's securityContext (runAsUser/runAsGroup/fsGroup 10001) matches them.
RUN groupadd --system --gid "${GID}" podserve \
    && useradd --system --uid "${UID}" --gid podserve --no-create-home \
       --home-dir /nonexistent --shell /usr/sbin/nologin podserve

# Install from the build stage's wheels through a bind mount, so no wheel lands in a layer.
# No extras: runtime dependencies only. pip compiles bytecode now, as the root FS is read-only later.
RUN --mount=type=bind,from=build,source=/wheels,target=/wheels \
    python -m venv /opt/venv \
    && /opt/venv/bin/pip install --no-cache-dir --no-index --find-links /wheels podserve \
    && /opt/venv/bin/pip uninstall --yes pip

# Models owned by root and not writable by the server; mount a volume over this path (or point
# PODSERVE_MODEL_REPOSITORY elsewhere) to serve other models.
COPY --from=build --chown=root:root /models /models

# Writable paths, for `docker run` without mounts; in Kubernetes emptyDirs are mounted over them.
RUN install -d -o "${UID}" -g "${GID}" -m 0750 /var/spool/podserve /run/podserve/prometheus

ENV PATH=/opt/venv/bin:${PATH} \
    HOME=/tmp \
    PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PODSERVE_HOST=0.0.0.0 \
    PODSERVE_PORT=8000 \
    PODSERVE_MODEL_REPOSITORY=/models \
    PODSERVE_SPOOL_DIR=/var/spool/podserve \
    PODSERVE_PROMETHEUS_MULTIPROC_DIR=/run/podserve/prometheus \
    PROMETHEUS_MULTIPROC_DIR=/run/podserve/prometheus

USER ${UID}:${GID}
WORKDIR /tmp
EXPOSE 8000
HEALTHCHECK --interval=10s --timeout=3s --start-period=60s --retries=3 \
    CMD ["python", "-c", "import os, urllib.request as u; u.urlopen('http://127.0.0.1:%s/v2/health/live' % os.environ.get('PODSERVE_PORT', '8000'), timeout=2)"]
ENTRYPOINT ["podserve", "serve"]
