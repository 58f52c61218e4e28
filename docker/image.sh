#!/usr/bin/env bash
# Build the serving image on a Debian bookworm base made with debootstrap from Debian's mirror.
#
#   docker/image.sh base                     the base image only (cached, see below)
#   docker/image.sh build [options]          the serving image (docker/serve.Dockerfile)
#     --variant cpu|cuda    cpu (default): torch's CPU wheel; cuda: PyPI's CUDA torch (GPU VM, GKE GPU pool)
#     --archive PATH        the .mar to pack (default model_store/emotion.mar)
#     --tag NAME            image name (default localhost/emotion-serve:<variant>)
#   docker/image.sh push IMAGE [--token-command "gcloud auth print-access-token"]
#
# Engine: `docker build` where a Docker engine answers, else `buildah bud --isolation chroot`
# (ENGINE=docker|buildah forces one). The debootstrap tarball is cached outside the repository in
# $EMOTION_CACHE_DIR (default /var/cache/emotion-classifier, or $XDG_CACHE_HOME/emotion-classifier
# when that is not writable); delete it, or run with REFRESH_BASE=1, to take Debian's latest
# point release. Layers are cached by the engine, so a rebuild after a code change is quick.
set -euo pipefail
cd "$(dirname "$0")/.."

BASE_IMAGE=localhost/emotion-base:bookworm
MIRROR=${DEBIAN_MIRROR:-http://deb.debian.org/debian}
STAGE=docker/stage
PYTHON=${PYTHON:-.venv/bin/python}

cache_dir() {
  local dir=${EMOTION_CACHE_DIR:-/var/cache/emotion-classifier}
  if ! mkdir -p "$dir" 2>/dev/null || [ ! -w "$dir" ]; then
    dir=${XDG_CACHE_HOME:-$HOME/.cache}/emotion-classifier
    mkdir -p "$dir"
  fi
  echo "$dir"
}

engine() {
  if [ -n "${ENGINE:-}" ]; then echo "$ENGINE"
  elif command -v docker >/dev/null && docker info >/dev/null 2>&1; then echo docker
  elif command -v buildah >/dev/null; then echo buildah
  else echo "no image engine: install Docker, or buildah (apt-get install buildah)" >&2; return 1
  fi
}

image_exists() {  # engine image
  if [ "$1" = docker ]; then docker image inspect "$2" >/dev/null 2>&1
  else buildah inspect --type image "$2" >/dev/null 2>&1
  fi
}

base_tarball() {  # the minbase root file system, made once per cache
  local tarball
  tarball="$(cache_dir)/debian-bookworm-minbase.tar"
  if [ ! -s "$tarball" ] || [ -n "${REFRESH_BASE:-}" ]; then
    command -v debootstrap >/dev/null || { echo "debootstrap is missing: apt-get install debootstrap" >&2; return 1; }
    local rootfs
    rootfs=$(mktemp -d)
    echo "debootstrap bookworm from $MIRROR into $rootfs" >&2
    debootstrap --variant=minbase bookworm "$rootfs" "$MIRROR" >&2
    # Package lists and caches are re-downloaded by the image's own apt-get layer.
    rm -rf "$rootfs"/var/lib/apt/lists/* "$rootfs"/var/cache/apt/*.bin "$rootfs"/var/cache/apt/archives/*.deb
    tar --numeric-owner -C "$rootfs" -cf "$tarball.tmp" .
    rm -rf "$rootfs"
    mv "$tarball.tmp" "$tarball"
  fi
  echo "$tarball"
}

build_base() {  # engine
  if image_exists "$1" "$BASE_IMAGE" && [ -z "${REFRESH_BASE:-}" ]; then return 0; fi
  local tarball
  tarball=$(base_tarball)
  if [ "$1" = docker ]; then
    docker import --change 'CMD ["bash"]' "$tarball" "$BASE_IMAGE" >/dev/null
  else
    local ctr mnt
    ctr=$(buildah from scratch)
    mnt=$(buildah mount "$ctr")
    tar --numeric-owner -C "$mnt" -xf "$tarball"
    buildah umount "$ctr" >/dev/null
    buildah config --cmd bash --env PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin "$ctr"
    buildah commit --quiet "$ctr" "$BASE_IMAGE" >/dev/null
    buildah rm "$ctr" >/dev/null
  fi
  echo "base image $BASE_IMAGE from $tarball" >&2
}

stage_torch_wheel() {  # Puts torch's CPU wheel in $STAGE/wheels when pip can find it locally; prints its index otherwise.
  local version
  version=$(sed -n 's/^torch==\([0-9.]*\).*/\1/p' requirements-serve.txt)
  mkdir -p "$STAGE/wheels"
  rm -f "$STAGE"/wheels/torch-*.whl
  # The host's pip configuration (find-links, local indexes) is what finds a local CPU build; PyPI
  # itself has none (its Linux torch wheel is the multi-GB CUDA build).
  if "$PYTHON" -m pip download --quiet --no-deps --only-binary=:all: --python-version 3.11 \
      --platform manylinux_2_28_x86_64 --dest "$STAGE/wheels" "torch==${version}+cpu" >/dev/null 2>&1; then
    echo ""
  else
    echo "https://download.pytorch.org/whl/cpu"
  fi
}

stage_ca_bundle() {  # A build host behind a TLS-inspecting proxy trusts its CA through pip's `cert` setting.
  local cert=${PIP_CERT:-}
  [ -n "$cert" ] || cert=$("$PYTHON" -m pip config get global.cert 2>/dev/null || true)
  rm -f "$STAGE/ca-bundle.crt"
  if [ -n "$cert" ] && [ -f "$cert" ]; then cp "$cert" "$STAGE/ca-bundle.crt"; fi
}

build() {
  local variant=cpu archive=model_store/emotion.mar tag=""
  while [ $# -gt 0 ]; do
    case "$1" in
      --variant) variant=$2; shift 2 ;;
      --archive) archive=$2; shift 2 ;;
      --tag) tag=$2; shift 2 ;;
      *) echo "unknown option $1" >&2; return 2 ;;
    esac
  done
  case "$variant" in cpu|cuda) ;; *) echo "--variant must be cpu or cuda, got $variant" >&2; return 2 ;; esac
  tag=${tag:-localhost/emotion-serve:$variant}
  [ -s "$archive" ] || { echo "$archive is missing: build it first (make archive)" >&2; return 1; }
  local eng torch_index=""
  eng=$(engine)
  build_base "$eng"
  mkdir -p "$STAGE/wheels"
  rm -f "$STAGE"/wheels/*.whl
  if [ "$variant" = cpu ]; then torch_index=$(stage_torch_wheel); fi
  stage_ca_bundle
  # The archive goes into the build context under a fixed name (hard link when possible).
  rm -f "$STAGE/emotion.mar"
  ln "$archive" "$STAGE/emotion.mar" 2>/dev/null || cp "$archive" "$STAGE/emotion.mar"
  local args=(--build-arg "BASE_IMAGE=$BASE_IMAGE" --build-arg "VARIANT=$variant"
              --build-arg "TORCH_INDEX=$torch_index" --build-arg "ARCHIVE=$STAGE/emotion.mar"
              -f docker/serve.Dockerfile -t "$tag")
  echo "building $tag with $eng (torch: ${torch_index:-local CPU wheel in $STAGE/wheels})" >&2
  if [ "$eng" = docker ]; then
    DOCKER_BUILDKIT=1 docker build "${args[@]}" .
  else
    # --format docker keeps HEALTHCHECK (the OCI image format has no field for it).
    buildah bud --isolation chroot --layers --force-rm --format docker "${args[@]}" .
  fi
  rm -f "$STAGE/emotion.mar" "$STAGE/ca-bundle.crt" "$STAGE"/wheels/*.whl
  echo "$tag"
}

push() {  # IMAGE [--token-command CMD]: log in to IMAGE's registry with an OAuth token, then push
  local image=$1 token_command=""
  [ "${2:-}" = --token-command ] && token_command=$3
  local eng
  eng=$(engine)
  if [ -n "$token_command" ]; then
    $token_command | "$eng" login --username oauth2accesstoken --password-stdin "${image%%/*}"
  fi
  "$eng" push "$image"
}

case "${1:-}" in
  push) shift; push "$@" ;;
  base) build_base "$(engine)" ;;
  build) shift; build "$@" ;;
  *) sed -n '2,15p' "$0" >&2; exit 2 ;;
esac
