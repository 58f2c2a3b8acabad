#!/usr/bin/env bash
# Prepares the real servers the integration tiers use, where this machine allows:
#  - a Kubernetes control plane (../shared/tools/k8s-envtest install: ~6 min once, then cached)
#  - Debian packages: iproute2 (network namespaces), prometheus, chromium (status page checks),
#    buildah, mmdebstrap, podman, runc (the image tier: tests/test_image.py)
# Each step is best effort: a tier whose prerequisite is missing skips its tests.
set -uo pipefail
cd "$(dirname "$0")/.."
status=0
envtest=../shared/tools/k8s-envtest
if [ -x "$envtest" ]; then
  if ! "$envtest" install --check >/dev/null 2>&1; then
    echo "test-deps: building the k8s-envtest control plane (once per machine, several minutes)" >&2
    "$envtest" install >/tmp/heteroscale-k8s-envtest-install.log 2>&1 || { echo "test-deps: k8s-envtest install failed (see /tmp/heteroscale-k8s-envtest-install.log)" >&2; status=1; }
  fi
fi
need=()
command -v ip >/dev/null 2>&1 || need+=(iproute2)
command -v prometheus >/dev/null 2>&1 || need+=(prometheus)
command -v chromium >/dev/null 2>&1 || need+=(chromium)
# Image tier: buildah builds (no daemon), mmdebstrap makes the Debian base image (no registry),
# podman runs read-only containers; runc for hosts where podman's default crun cannot start one.
for pkg in buildah mmdebstrap podman runc; do
  command -v "$pkg" >/dev/null 2>&1 || need+=("$pkg")
done
if [ ${#need[@]} -gt 0 ]; then
  if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then
    echo "test-deps: installing ${need[*]}" >&2
    { apt-get update -q && DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends "${need[@]}"; } \
      >/tmp/heteroscale-apt.log 2>&1 || { echo "test-deps: apt-get install ${need[*]} failed (see /tmp/heteroscale-apt.log)" >&2; status=1; }
  else
    echo "test-deps: missing ${need[*]} and not root: those tiers will skip" >&2
  fi
fi
exit $status
