# The relay image: one image for the ingress, the worker and the admin console (the compose files
# pick the command).
FROM python:3.11-slim

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    RELAY_CONFIG=/app/config/relay.yaml

WORKDIR /app

# Install the project (pyproject.toml names README.md as its readme, so it is copied too),
# with OpenTelemetry (the tracing extra: off unless OTEL_EXPORTER_OTLP_ENDPOINT is set).
COPY pyproject.toml README.md ./
COPY relay ./relay
COPY workers ./workers
RUN pip install ".[tracing]" \
    && useradd --system --uid 10001 --home-dir /app relay

# The config is not baked in: the compose files mount it read-only on /app/config,
# and secrets come from the environment (.env), never from the image.
USER relay
# 8080: relay ingress; 8081: relay admin.
EXPOSE 8080 8081
CMD ["relay", "--help"]
