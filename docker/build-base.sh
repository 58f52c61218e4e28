#!/usr/bin/env bash
# Build a Debian bookworm base image with Python 3.11 from Debian's mirror (no Docker Hub needed),
# then the serving image, with buildah. Usage: docker/build-base.sh [serve|train]
set -euo pipefail
cd "$(dirname "$0")/.."
target=${1:-serve}
rootfs=$(mktemp -d)
trap 'rm -rf "$rootfs"' EXIT
debootstrap --variant=minbase --include=python3,python3-pip,python3-venv,ca-certificates bookworm "$rootfs"
# Debian marks its Python externally managed; the image is single-purpose, so pip may install.
rm -f "$rootfs"/usr/lib/python3.11/EXTERNALLY-MANAGED
ln -sf python3 "$rootfs/usr/bin/python"
tar -C "$rootfs" -c . | buildah import - localhost/debian-python
buildah bud --isolation chroot --build-arg BASE_IMAGE=localhost/debian-python \
  -f "docker/${target}.Dockerfile" -t "localhost/emotion-${target}" .
