# syntax=docker/dockerfile:1
# One image for `bridge serve`, `bridge worker` and `bridge run`.

FROM python:3.11-slim AS build
ENV PIP_DISABLE_PIP_VERSION_CHECK=1 PIP_NO_CACHE_DIR=1
WORKDIR /src
# Compilers for any dependency without a wheel; this stage is thrown away. Versions are
# not pinned: they follow the base image's Debian release.
# hadolint ignore=DL3008
RUN apt-get update \
 && apt-get install -y --no-install-recommends build-essential \
 && rm -rf /var/lib/apt/lists/*
COPY pyproject.toml README.md ./
COPY bridge ./bridge
COPY workers ./workers
COPY config ./config
RUN python -m venv /opt/bridge \
 && /opt/bridge/bin/pip install --upgrade pip \
 && /opt/bridge/bin/pip install .

FROM python:3.11-slim AS runtime
LABEL org.opencontainers.image.title="itsm-alert-bridge" \
      org.opencontainers.image.description="Monitoring alerts in, exactly one ITSM incident per problem out"
ENV PATH=/opt/bridge/bin:$PATH \
    PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    BRIDGE_CONFIG=/etc/bridge/bridge.toml \
    BRIDGE_HTTP_HOST=0.0.0.0 \
    BRIDGE_LOG_FORMAT=json
# PROMETHEUS_MULTIPROC_DIR is left unset: `bridge worker` makes a fresh directory for its
# pool's samples; set image-wide it would point `bridge serve` at a directory nobody made.
# A numeric user, so that runAsNonRoot-style checks can verify it without /etc/passwd.
RUN groupadd --system --gid 10001 bridge \
 && useradd --system --uid 10001 --gid bridge --home-dir /nonexistent --shell /usr/sbin/nologin bridge
COPY --from=build /opt/bridge /opt/bridge
COPY config/bridge.toml /etc/bridge/bridge.toml
USER 10001:10001
EXPOSE 8080 9808
HEALTHCHECK --interval=30s --timeout=3s --start-period=20s --retries=3 \
  CMD ["python", "-c", "import os,urllib.request,sys; sys.exit(0 if urllib.request.urlopen('http://127.0.0.1:%s/healthz' % os.environ.get('BRIDGE_HTTP_PORT','8080'), timeout=2).status == 200 else 1)"]
ENTRYPOINT ["bridge"]
CMD ["serve"]
