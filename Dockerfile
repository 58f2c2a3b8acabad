# HeteroScale image: one image for the sidecar and the coordinator
# (`heteroscale sidecar ...`, `heteroscale coordinator ...`).
#
# Build it with scripts/build-image.sh (buildah, podman or docker; docs/deploy.md). The
# script first makes build/image/wheelhouse outside the build sandbox: the project's wheel,
# every dependency as a binary wheel for the base image's Python, and pip's own wheel. The
# build installs from that directory only (--no-index): it reaches no package index, needs
# no certificates, and the same wheelhouse gives the same packages.
#
# BASE_IMAGE is the base of both stages: the official Python slim image by default, or any
# glibc image with python3 >= 3.11 and /bin/sh, e.g. plain Debian with python3 installed
# (`scripts/build-image.sh --debian-base` makes one from Debian packages).
ARG BASE_IMAGE=docker.io/library/python:3.12-slim

FROM ${BASE_IMAGE} AS build
ENV PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PYTHONDONTWRITEBYTECODE=1
COPY build/image/wheelhouse/ /wheelhouse/
# pip runs from its wheel (Debian's python3 has no pip and no ensurepip), so the venv never
# gets a pip of its own. Not needed at run time, and removed: the dependencies' test suites
# and bytecode caches, and kubernetes/aio (42 MB: an asyncio twin of the client; HeteroScale
# uses the synchronous one). Every module of the sidecar and the coordinator, and each
# dependency they import lazily, is imported once afterwards to prove nothing they need went.
# The simulator and the demo (the [sim] extra: numpy, matplotlib) are not in the image.
RUN set -- /wheelhouse/pip-*.whl \
 && python3 -m venv --without-pip /opt/heteroscale \
 && /opt/heteroscale/bin/python "$1/pip" install --no-index --find-links /wheelhouse \
      --no-compile --no-warn-script-location heteroscale \
 && find /opt/heteroscale -depth -type d \( -name tests -o -name test -o -name __pycache__ \) -exec rm -rf {} + \
 && rm -rf /opt/heteroscale/lib/python3*/site-packages/kubernetes/aio \
 && /opt/heteroscale/bin/python -c "import importlib, pkgutil, heteroscale as h; \
[importlib.import_module(m.name) for m in pkgutil.walk_packages(h.__path__, 'heteroscale.') \
 if not m.name.endswith('__main__') and not m.name.startswith(('heteroscale.simulator', 'heteroscale.demo'))]; \
import grpc, kubernetes.client, kubernetes.config, kubernetes.client.exceptions" \
 && /opt/heteroscale/bin/heteroscale --version

FROM ${BASE_IMAGE}
LABEL org.opencontainers.image.title="heteroscale" \
      org.opencontainers.image.description="Coordinated P/D autoscaler for LLM serving" \
      org.opencontainers.image.licenses="Apache-2.0"
# Nothing is installed at run time: the base image's own pip and ensurepip wheels go too.
RUN rm -rf /usr/local/bin/pip* /usr/local/lib/python3*/site-packages/pip \
           /usr/local/lib/python3*/site-packages/pip-*.dist-info \
           /usr/local/lib/python3*/ensurepip /usr/lib/python3*/ensurepip
COPY --from=build /opt/heteroscale /opt/heteroscale
# Writable paths at run time: /tmp only (the coordinator's local lease file).
ENV PATH=/opt/heteroscale/bin:$PATH \
    PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1
# Numeric UID/GID so Kubernetes runAsNonRoot can verify it without /etc/passwd.
USER 10001:10001
# 9400: sidecar /metrics, /v1/report, /healthz, /readyz; 9500: coordinator status page and API.
EXPOSE 9400 9500
ENTRYPOINT ["heteroscale"]
CMD ["--help"]
