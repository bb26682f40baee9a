# syntax=docker/dockerfile:1
#
# One image for every kumex-l3 service. Pick the service with the command:
#
#   docker run --rm -e REDIS_URL=redis://redis:6379/0 kumex-l3 python -m services.feed
#
# (default: the book service). docker-compose.yml builds it once and runs each
# service with its own `command:` and `environment:`.
#
# Stage 1 (builder) has the build tools and installs the project into a venv,
# from pyproject.toml, with the runtime extras (those `make venv` installs,
# minus test and bench: tests/unit/test_compose.py keeps the two in step).
# Stage 2 is python:3.11-slim with only that venv and the source: no compiler,
# no pip cache, a non-root user.

ARG PYTHON_IMAGE=python:3.11-slim

# ---------------------------------------------------------------------------- builder
FROM ${PYTHON_IMAGE} AS builder

RUN apt-get update \
    && apt-get install -y --no-install-recommends build-essential \
    && rm -rf /var/lib/apt/lists/*

ENV PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PIP_NO_CACHE_DIR=1 \
    PYTHONDONTWRITEBYTECODE=1
RUN python -m venv /opt/venv
ENV PATH=/opt/venv/bin:$PATH

WORKDIR /src
COPY pyproject.toml README.md ./
COPY kumex_l3 ./kumex_l3
COPY services ./services

# The install step: the same pyproject, the runtime extras (none today).
RUN python -m pip install '.'

# ---------------------------------------------------------------------------- runtime
FROM ${PYTHON_IMAGE} AS runtime

LABEL org.opencontainers.image.title="kumex-l3" \
      org.opencontainers.image.description="KuMEX Level 3 feed, book, order monitor, grid strategy and sandbox exchange" \
      org.opencontainers.image.licenses="MIT"

RUN groupadd --system --gid 10001 kumex \
    && useradd --system --uid 10001 --gid kumex --no-create-home \
               --home-dir /app --shell /usr/sbin/nologin kumex

COPY --from=builder /opt/venv /opt/venv

WORKDIR /app
# Source owned by root, readable by all: the service user cannot rewrite its code.
COPY pyproject.toml README.md ./
COPY kumex_l3 ./kumex_l3
COPY services ./services

ENV PATH=/opt/venv/bin:$PATH \
    PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    HEALTH_PORT=8080

USER kumex

# book 8080, feed 8081, order_monitor 8082, strategy 8083, sandbox 8090
EXPOSE 8080 8081 8082 8083 8090

# Works for any service: set HEALTH_PORT to the port of its /healthz (compose
# also gives each service its own healthcheck). Non-2xx or no answer: unhealthy.
HEALTHCHECK --interval=10s --timeout=3s --start-period=30s --retries=3 \
    CMD ["python", "-c", "import os, urllib.request; urllib.request.urlopen('http://127.0.0.1:%s/healthz' % os.environ.get('HEALTH_PORT', '8080'), timeout=2)"]

CMD ["python", "-m", "services.book"]
