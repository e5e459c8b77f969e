#!/usr/bin/env bash
# The Gateway API CRDs (GatewayClass, Gateway, HTTPRoute, ReferenceGrant; standard channel) for the test
# bed's API server, from the sigs.k8s.io/gateway-api Go module (config/crd/standard), cached outside the
# clone, keyed by version. The chart does not ship them: Gateway API CRDs are cluster-wide and shared by
# every implementation in a cluster, so the cluster admin installs one release (docs/deploy.md).
#
#   scripts/gateway-api-crds.sh          fetch them when missing, print the directory
#   scripts/gateway-api-crds.sh --path   print the directory only (exit 1 when not fetched)
set -euo pipefail

VERSION=${AMBIT_GATEWAY_API_VERSION:-1.6.3}
DEST=${AMBIT_CACHE:-/var/cache/ambit}/gateway-api-$VERSION
KINDS=(gatewayclasses gateways httproutes referencegrants)

fetched() {
    local k
    for k in "${KINDS[@]}"; do [[ -s $DEST/gateway.networking.k8s.io_$k.yaml ]] || return 1; done
}

if fetched; then
    echo "$DEST"
    exit 0
fi
[[ ${1:-} == --path ]] && exit 1
[[ -x /usr/local/go/bin/go ]] && PATH="$PATH:/usr/local/go/bin"
command -v go >/dev/null || { echo "gateway-api-crds: go is required" >&2; exit 1; }
mkdir -p "$DEST"
exec 9>"$DEST/.lock"
flock 9
if ! fetched; then
    work=$(mktemp -d)
    trap 'rm -rf "$work"' EXIT
    dir=$(cd "$work" && GOTOOLCHAIN=local GOFLAGS=-mod=mod go mod download -json "sigs.k8s.io/gateway-api@v$VERSION" \
        | sed -n 's/.*"Dir": "\(.*\)".*/\1/p')
    [[ -d $dir/config/crd/standard ]] || { echo "gateway-api-crds: no CRDs in $dir" >&2; exit 1; }
    for k in "${KINDS[@]}"; do
        cp "$dir/config/crd/standard/gateway.networking.k8s.io_$k.yaml" "$DEST/"
    done
    cp "$dir/LICENSE" "$DEST/LICENSE"  # Apache-2.0, the Kubernetes Authors
    chmod 644 "$DEST"/*.yaml "$DEST/LICENSE"
fi
echo "$DEST"
