#!/usr/bin/env bash
# `make image`: build the ambit image (Dockerfile) with the first working builder: docker, podman, buildah.
# A builder counts only if it can build now (docker's client without a reachable daemon does not).
set -euo pipefail
cd "$(dirname "$0")/.."
IMAGE=${IMAGE:-ambit:dev}

if command -v docker >/dev/null && docker info >/dev/null 2>&1; then
    exec docker build -t "$IMAGE" .
elif command -v podman >/dev/null && podman info >/dev/null 2>&1; then
    exec podman build -t "$IMAGE" .
elif command -v buildah >/dev/null; then
    exec buildah bud -t "$IMAGE" .
fi
found=()
for b in docker podman buildah; do command -v "$b" >/dev/null && found+=("$b"); done
if ((${#found[@]})); then
    echo "make image: ${found[*]} found but not usable here (is the daemon running? \`docker info\` fails)" >&2
else
    echo "make image: no image builder on this machine: install docker, podman or buildah" >&2
fi
echo "make image: the image is the Dockerfile at the top of the repository (FROM debian:12, make setup)" >&2
exit 1
