#!/usr/bin/env bash
# Builds the HeteroScale image from the Dockerfile with buildah, podman or docker.
#
#   scripts/build-image.sh                      # ghcr.io/heteroscale/heteroscale:<version>
#   IMAGE=registry.example.com/heteroscale:dev scripts/build-image.sh
#   BASE_IMAGE=localhost/heteroscale-base:bookworm scripts/build-image.sh
#   scripts/build-image.sh --debian-base [TAG]  # make a Debian base image with python3 from
#                                               # Debian packages (mmdebstrap): no registry needed
#   scripts/build-image.sh --print-image        # print the tag a build would make, and exit
#
# Environment (all optional):
#   BASE_IMAGE  base of both Dockerfile stages (default docker.io/library/python:3.12-slim);
#               any glibc image with python3 >= 3.11 and /bin/sh
#   IMAGE       tag of the result (default ghcr.io/heteroscale/heteroscale:VERSION, VERSION
#               from pyproject.toml: the name and tag manifests/ deploy)
#   BUILDER     buildah | podman | docker (default: the first of them installed)
#   PYTHON      a python3 with pip that makes the wheelhouse (default python3). It uses this
#               machine's pip configuration (index, mirrors, certificates).
#   DEBIAN_SUITE  suite of --debian-base (default bookworm)
#   BUILDAH_ISOLATION (default chroot), BUILDAH_LAYERS (default true): read by buildah/podman
#
# How: (1) ask the base image for its Python version, C library and architecture; (2) make
# build/image/wheelhouse outside the build sandbox: the project's wheel, pip's wheel and every
# dependency as a binary wheel for exactly that Python and platform; (3) build. The build
# installs from the wheelhouse only (pip --no-index) and reaches no package index.
set -euo pipefail
cd "$(dirname "$0")/.."

die() { echo "build-image: $*" >&2; exit 1; }
# Usage problems: one line each, all of them, exit 2.
problems=()
mode=build
case "${1:-}" in
  "") ;;
  --debian-base) mode=debian-base; [ $# -le 2 ] || problems+=("--debian-base takes at most one TAG") ;;
  --print-image) mode=print-image; [ $# -eq 1 ] || problems+=("--print-image takes no argument") ;;
  *) problems+=("unknown argument '$1' (usage: scripts/build-image.sh [--debian-base [TAG] | --print-image])") ;;
esac
case "${BUILDER:-}" in buildah|podman|docker|"") ;; *) problems+=("BUILDER must be buildah, podman or docker, got '$BUILDER'") ;; esac
if [ ${#problems[@]} -gt 0 ]; then
  printf 'build-image: %s\n' "${problems[@]}" >&2
  exit 2
fi
if [ -z "${BUILDER:-}" ]; then
  for b in buildah podman docker; do
    if command -v "$b" >/dev/null 2>&1; then BUILDER=$b; break; fi
  done
fi
PYTHON=${PYTHON:-python3}
BASE_IMAGE=${BASE_IMAGE:-docker.io/library/python:3.12-slim}
export BUILDAH_ISOLATION=${BUILDAH_ISOLATION:-chroot}   # no OCI runtime or cgroups needed
export BUILDAH_LAYERS=${BUILDAH_LAYERS:-true}            # keep the layer cache between builds

version=$("$PYTHON" -c 'import tomllib; print(tomllib.load(open("pyproject.toml", "rb"))["project"]["version"])') \
  || die "cannot read the version from pyproject.toml with $PYTHON (needs Python >= 3.11)"
IMAGE=${IMAGE:-ghcr.io/heteroscale/heteroscale:$version}
if [ "$mode" = print-image ]; then echo "$IMAGE"; exit 0; fi

[ -n "${BUILDER:-}" ] || die "none of buildah, podman, docker is installed (Debian: apt-get install buildah)"
command -v "$BUILDER" >/dev/null 2>&1 || die "BUILDER=$BUILDER is not installed"

# A Debian base image with python3, from Debian packages: the stand-in for the official
# Python image where no registry is reachable. Same trimming as Debian's slim images.
if [ "$mode" = debian-base ]; then
  suite=${DEBIAN_SUITE:-bookworm}
  tag=${2:-localhost/heteroscale-base:$suite}
  command -v mmdebstrap >/dev/null 2>&1 || die "mmdebstrap is not installed (Debian: apt-get install mmdebstrap)"
  tmp=$(mktemp -d)
  trap 'rm -rf "$tmp"' EXIT
  mmdebstrap --quiet --variant=minbase --include=python3 \
    --hook-dir=/usr/share/mmdebstrap/hooks/merged-usr \
    --dpkgopt='path-exclude=/usr/share/man/*' --dpkgopt='path-exclude=/usr/share/info/*' \
    --dpkgopt='path-exclude=/usr/share/locale/*' --dpkgopt='path-exclude=/usr/share/doc/*' \
    --dpkgopt='path-include=/usr/share/doc/*/copyright' \
    "$suite" "$tmp/rootfs.tar" || die "mmdebstrap $suite failed"
  case "$BUILDER" in
    buildah)
      ctr=$(buildah from scratch)
      buildah add --quiet "$ctr" "$tmp/rootfs.tar" / >/dev/null
      buildah config --cmd /bin/bash "$ctr"
      buildah commit --quiet --rm "$ctr" "$tag" >/dev/null ;;
    *) "$BUILDER" import --change 'CMD ["/bin/bash"]' "$tmp/rootfs.tar" "$tag" >/dev/null ;;
  esac
  echo "build-image: made $tag ($suite, python3) with mmdebstrap" >&2
  exit 0
fi

"$PYTHON" -m pip --version >/dev/null 2>&1 || die "$PYTHON has no pip: set PYTHON to one that has (e.g. PYTHON=.venv/bin/python)"

# (1) What the wheels must fit: Python X.Y, glibc 2.N, machine.
probe='import os, platform, sys
try:
    libc = os.confstr("CS_GNU_LIBC_VERSION") or "none"
except (ValueError, OSError):  # not glibc (musl)
    libc = "none"
print("%d.%d" % sys.version_info[:2], platform.machine(), libc)'
case "$BUILDER" in
  buildah)
    ctr=$(buildah from --quiet "$BASE_IMAGE") || die "cannot get BASE_IMAGE $BASE_IMAGE"
    facts=$(buildah run "$ctr" -- python3 -c "$probe") || { buildah rm "$ctr" >/dev/null; die "cannot run python3 in $BASE_IMAGE"; }
    buildah rm "$ctr" >/dev/null ;;
  *)
    facts=$("$BUILDER" run --rm --network none --entrypoint python3 "$BASE_IMAGE" -c "$probe") \
      || die "cannot run python3 in $BASE_IMAGE" ;;
esac
read -r pyver arch _ <<<"$facts"
[[ "$facts" =~ glibc\ 2\.([0-9]+) ]] || die "$BASE_IMAGE does not use glibc ($facts): the wheelhouse holds manylinux wheels"
glibc_minor=${BASH_REMATCH[1]}
"$PYTHON" -c "import sys; sys.exit(tuple(map(int, '$pyver'.split('.'))) < (3, 11))" \
  || die "$BASE_IMAGE has Python $pyver; HeteroScale needs >= 3.11"
platforms=(--platform "manylinux2014_$arch")              # pip adds manylinux2010 and manylinux1
for ((m = glibc_minor; m >= 17; m--)); do platforms+=(--platform "manylinux_2_${m}_$arch"); done

# (2) The wheelhouse. The project's wheel is built from a clean build directory (setuptools
# would otherwise reuse build/lib, where a deleted module can linger), with the last commit's
# time as every file's time, so the same sources give the same wheel and the build's layer
# cache holds.
if [ -z "${SOURCE_DATE_EPOCH:-}" ] && git rev-parse --git-dir >/dev/null 2>&1; then
  SOURCE_DATE_EPOCH=$(git log -1 --format=%ct) && export SOURCE_DATE_EPOCH
fi
wheelhouse=build/image/wheelhouse
rm -rf "$wheelhouse" build/lib build/bdist.*
mkdir -p "$wheelhouse"
echo "build-image: wheelhouse for Python $pyver, glibc 2.$glibc_minor, $arch ($BASE_IMAGE)" >&2
"$PYTHON" -m pip wheel --quiet --no-deps --wheel-dir "$wheelhouse" . || die "pip wheel of the project failed"
project_wheel=("$wheelhouse"/heteroscale-*.whl)
"$PYTHON" -m pip download --quiet --only-binary=:all: --dest "$wheelhouse" \
  --python-version "$pyver" --implementation cp "${platforms[@]}" \
  "${project_wheel[0]}" pip \
  || die "pip download of the dependencies for Python $pyver/$arch failed (see above)"

# (3) The build.
start=$(date +%s)
# --force-rm: intermediate containers go even when a step fails (buildah and podman accept
# it only beside an explicit --layers).
build_args=(--force-rm --build-arg "BASE_IMAGE=$BASE_IMAGE" --label "org.opencontainers.image.version=$version"
            -f Dockerfile -t "$IMAGE")
case "$BUILDER" in
  buildah) buildah bud --layers="$BUILDAH_LAYERS" "${build_args[@]}" . ;;
  podman)  podman build --layers="$BUILDAH_LAYERS" "${build_args[@]}" . ;;
  docker)  docker build "${build_args[@]}" . ;;
esac
echo "build-image: built $IMAGE from $BASE_IMAGE with $BUILDER in $(( $(date +%s) - start )) s" >&2
