#!/usr/bin/env bash
# Builds helm from the Go module proxy (`go install`) and caches it outside the clone, keyed by version, so
# a warm run is one `test -x`. A cold build takes ~3 minutes on 2 cores.
#
#   scripts/install-helm.sh          build it when missing, print the binary's path
#   scripts/install-helm.sh --path   print the path only (exit 1 when not built)
set -euo pipefail

HELM_VERSION=${AMBIT_HELM_VERSION:-3.22.0}
DEST=${AMBIT_CACHE:-/var/cache/ambit}/helm-v$HELM_VERSION
HELM=$DEST/helm

if [[ -x $HELM ]]; then
    echo "$HELM"
    exit 0
fi
[[ ${1:-} == --path ]] && exit 1
# The machine image installs Go under /usr/local/go; a non-login shell (CI) may not have it on PATH.
[[ -x /usr/local/go/bin/go ]] && PATH="$PATH:/usr/local/go/bin"
command -v go >/dev/null || { echo "install-helm: go is required" >&2; exit 1; }
mkdir -p "$DEST"
exec 9>"$DEST/.lock"
flock 9  # two worktrees running `make setup` at once build it once
if [[ ! -x $HELM ]]; then
    echo "install-helm: building helm v$HELM_VERSION (go install, a few minutes on a cold cache)" >&2
    CGO_ENABLED=0 GOTOOLCHAIN=local GOBIN=$DEST/.tmp go install -trimpath -ldflags=-s \
        "helm.sh/helm/v3/cmd/helm@v$HELM_VERSION"
    mv "$DEST/.tmp/helm" "$HELM"
    rmdir "$DEST/.tmp"
fi
echo "$HELM"
