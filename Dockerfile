# HeteroScale image: one image for the sidecar and the coordinator
# (`heteroscale sidecar ...`, `heteroscale coordinator ...`).
# Build: docker build -t heteroscale:0.1.0 .
# The install steps below are the ones CI runs in a clean virtual environment
# (tests/test_image.py), since no Docker engine runs on the CI machines.

FROM python:3.12-slim AS build
ENV PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1
WORKDIR /src
COPY pyproject.toml README.md ./
COPY heteroscale ./heteroscale
COPY sidecar ./sidecar
COPY engine_adapters ./engine_adapters
COPY kv_transfer ./kv_transfer
COPY coordinator ./coordinator
COPY simulator ./simulator
COPY demo ./demo
RUN python -m venv /opt/heteroscale \
 && /opt/heteroscale/bin/pip install --no-compile . \
 && /opt/heteroscale/bin/heteroscale --version

FROM python:3.12-slim
LABEL org.opencontainers.image.title="heteroscale" \
      org.opencontainers.image.description="Coordinated P/D autoscaler for LLM serving" \
      org.opencontainers.image.licenses="Apache-2.0"
COPY --from=build /opt/heteroscale /opt/heteroscale
ENV PATH=/opt/heteroscale/bin:$PATH \
    PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    MPLCONFIGDIR=/tmp/matplotlib
# Numeric UID/GID so Kubernetes runAsNonRoot can verify it without /etc/passwd.
USER 10001:10001
EXPOSE 9400 9500
ENTRYPOINT ["heteroscale"]
CMD ["--help"]
