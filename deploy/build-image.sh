#!/usr/bin/env bash
# Build the specforge image, with or without an image registry.
#
#   deploy/build-image.sh [TAG]          (default tag: specforge:dev)
#
# Base image: $SPECFORGE_BASE_IMAGE when set; else python:3.11-slim when it is present or can be
# pulled; else a Debian bookworm base imported from debootstrap (specforge-base:bookworm, built
# once, ~2 minutes; needs root and debootstrap). The build host's CPU torch wheel and CA bundle
# are staged in deploy/local/ so the build downloads no CUDA torch and trusts the same proxy.
set -euo pipefail
cd "$(dirname "$0")/.."
TAG="${1:-specforge:dev}"
LOCAL_BASE="specforge-base:bookworm"
PY="${PYTHON:-.venv/bin/python}"
[ -x "$PY" ] || PY=python3

log() { echo "build-image: $*" >&2; }

base="${SPECFORGE_BASE_IMAGE:-}"
if [ -z "$base" ]; then
  if docker image inspect python:3.11-slim >/dev/null 2>&1 || docker pull -q python:3.11-slim >/dev/null 2>&1; then
    base=python:3.11-slim
  else
    base="$LOCAL_BASE"
    if ! docker image inspect "$base" >/dev/null 2>&1; then
      command -v debootstrap >/dev/null || { log "no registry and no debootstrap: apt-get install -y debootstrap"; exit 1; }
      mirror="${DEBIAN_MIRROR:-http://deb.debian.org/debian}"
      root="$(mktemp -d)"
      trap 'rm -rf "$root"' EXIT
      log "no registry reachable: building $base with debootstrap from $mirror (~2 min)"
      debootstrap --variant=minbase --include=python3,python3-venv,ca-certificates,libibverbs1,libcurl4,libnuma1,tini \
        bookworm "$root" "$mirror" >/dev/null
      tar -C "$root" -c . | docker import - "$base" >/dev/null
    fi
  fi
fi
log "base image: $base"

rm -rf deploy/local/wheels deploy/local/ca-certificates.crt
mkdir -p deploy/local/wheels
# The CPU torch wheel: first one the host already has (its pip find-links), then the CPU index.
# Never the default index: its torch is the multi-GB CUDA build.
for source in "--no-index" "--index-url https://download.pytorch.org/whl/cpu"; do
  # shellcheck disable=SC2086
  "$PY" -m pip download --quiet --no-deps --only-binary=:all: -d deploy/local/wheels $source \
    "torch==2.13.0" >/dev/null 2>&1 && break
done
compgen -G "deploy/local/wheels/torch-*.whl" >/dev/null \
  || log "no CPU torch wheel staged; the build will use TORCH_INDEX_URL"
cert="${PIP_CERT:-$("$PY" -m pip config get global.cert 2>/dev/null || true)}"
[ -n "$cert" ] && [ -f "$cert" ] && cp "$cert" deploy/local/ca-certificates.crt

# A staged wheel makes the CPU index unnecessary (and it may be unreachable from the build).
index_args=()
if [ -n "${SPECFORGE_TORCH_INDEX_URL+set}" ]; then
  index_args=(--build-arg "TORCH_INDEX_URL=$SPECFORGE_TORCH_INDEX_URL")
elif compgen -G "deploy/local/wheels/torch-*.whl" >/dev/null; then
  index_args=(--build-arg "TORCH_INDEX_URL=")
fi

started=$(date +%s)
docker build -f deploy/Dockerfile --build-arg BASE_IMAGE="$base" "${index_args[@]}" -t "$TAG" .
log "built $TAG in $(( $(date +%s) - started )) s"
