# Vigil's image for the scaled runtime roles: `vigil gateway`, `vigil worker`, `vigil api` (and every other
# `vigil` command: `docker compose run --rm vigil-api devices add ...`). See docs/DEPLOY.md.
#
# Stage 1 builds everything into a virtual environment: DTLSSocket (the simulator's CoAPS client) builds
# tinydtls from source, which needs autotools and a C compiler. Stage 2 copies only that environment, so the
# running image has no compiler and downloads nothing at runtime.

ARG PYTHON_IMAGE=python:3.11-slim-bookworm

FROM ${PYTHON_IMAGE} AS build
RUN apt-get update \
 && apt-get install -y --no-install-recommends autoconf automake libtool gcc libc6-dev make \
 && rm -rf /var/lib/apt/lists/*
ENV PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1
RUN python -m venv /opt/vigil && /opt/vigil/bin/pip install -U pip
WORKDIR /src
# Only what `pip install .` packages (pyproject.toml [tool.setuptools.packages.find]); .dockerignore keeps
# caches, virtual environments and data out of the context.
COPY pyproject.toml ./
COPY vigil ./vigil
COPY api ./api
COPY records ./records
COPY gateway ./gateway
COPY streams ./streams
COPY devices ./devices
COPY alerting ./alerting
COPY telemed ./telemed
COPY dashboards ./dashboards
RUN /opt/vigil/bin/pip install ".[scaled]" \
 && /opt/vigil/bin/vigil --help >/dev/null

FROM ${PYTHON_IMAGE} AS runtime
LABEL org.opencontainers.image.title="vigil" \
      org.opencontainers.image.description="Vigil, a real-time clinical event hub: gateway, worker and api roles"
RUN groupadd --system --gid 10001 vigil \
 && useradd --system --uid 10001 --gid vigil --home-dir /var/lib/vigil --shell /usr/sbin/nologin vigil \
 && install -d -o vigil -g vigil -m 0750 /var/lib/vigil
COPY --from=build /opt/vigil /opt/vigil
ENV PATH=/opt/vigil/bin:$PATH \
    PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    VIGIL_HOST=0.0.0.0 \
    VIGIL_HTTP_PORT=8080 \
    VIGIL_DATA_DIR=/var/lib/vigil
USER vigil:vigil
WORKDIR /var/lib/vigil
# HTTP API / health / metrics; CoAP and CoAPS (gateway); HL7 v2 MLLP (gateway, reserved).
EXPOSE 8080/tcp 5683/udp 5684/udp 2575/tcp
# The api role's liveness (contract: GET /healthz answers 200 while the process lives). Standard library
# only: the slim image has no curl. docker-compose.yml gives every role the same check.
HEALTHCHECK --interval=15s --timeout=5s --start-period=30s --retries=3 \
  CMD ["python", "-c", "import os, urllib.request; urllib.request.urlopen('http://127.0.0.1:%s/healthz' % os.environ.get('VIGIL_HTTP_PORT', '8080'), timeout=4)"]
ENTRYPOINT ["vigil"]
CMD ["api"]
