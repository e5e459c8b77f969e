#!/usr/bin/env bash
# Builds the real Kubernetes API server test bed (kube-apiserver, kubectl, etcd) from the Go module proxy
# and caches the binaries outside the clone, keyed by version, so a warm run is one `test -x` per binary.
# A cold build takes 6-13 minutes on 2 cores (84 MiB of modules, ~2.8 GiB of Go build cache).
#
#   scripts/build-kube.sh          build what is missing, print the bin directory
#   scripts/build-kube.sh --path   print the bin directory only (exit 1 when not built)
set -euo pipefail

K8S_VERSION=${AMBIT_K8S_VERSION:-1.37.2}
ETCD_VERSION=${AMBIT_ETCD_VERSION:-3.7.0}
CACHE_ROOT=${AMBIT_CACHE:-/var/cache/ambit}
DEST=$CACHE_ROOT/kube-$K8S_VERSION-etcd-$ETCD_VERSION
BINS=(kube-apiserver kubectl etcd)

built() {
    local b
    for b in "${BINS[@]}"; do [[ -x $DEST/bin/$b ]] || return 1; done
}

if [[ ${1:-} == --path ]]; then
    built && echo "$DEST/bin" && exit 0
    exit 1
fi
if built; then
    echo "$DEST/bin"
    exit 0
fi
# The machine image installs Go under /usr/local/go; a non-login shell (CI) may not have it on PATH.
[[ -x /usr/local/go/bin/go ]] && PATH="$PATH:/usr/local/go/bin"
command -v go >/dev/null || { echo "build-kube: go is required (Debian 12: golang from backports or go.dev)" >&2; exit 1; }

mkdir -p "$DEST"
# Two worktrees running `make setup` at once would both spend ten minutes: the second waits, then finds
# the binaries.
exec 9>"$DEST/.lock"
flock 9
if built; then
    echo "$DEST/bin"
    exit 0
fi

src=$DEST/src
mkdir -p "$src/kube" "$src/etcd" "$DEST/bin"
export CGO_ENABLED=0 GOFLAGS=-mod=mod GOTOOLCHAIN=local
started=$SECONDS
log() { echo "build-kube: [$((SECONDS - started))s] $*" >&2; }

# k8s.io/kubernetes requires its staging modules at v0.0.0 and replaces them with ./staging paths, which a
# dependent module does not inherit: every staging module is replaced here by its published v0.<minor>
# tag. The list is read from the release's own go.mod so a version bump needs no edit here.
log "kubernetes v$K8S_VERSION: reading its go.mod"
kgomod=$(cd "$src/kube" && go mod download -json "k8s.io/kubernetes@v$K8S_VERSION" | sed -n 's/.*"GoMod": "\(.*\)".*/\1/p')
staging=$(sed -n 's#^[[:space:]]*\(k8s.io/[a-z0-9-]*\) => ./staging/src/.*#\1#p' "$kgomod" | sort -u)
staging_version=0.${K8S_VERSION#1.}
{
    echo "module ambit.local/kubetestbed"
    echo
    echo "go 1.25"
    echo
    echo "require k8s.io/kubernetes v$K8S_VERSION"
    echo
    for m in $staging; do echo "replace $m => $m v$staging_version"; done
} >"$src/kube/go.mod"
cat >"$src/kube/tools.go" <<'GO'
//go:build tools

package tools

import (
	_ "k8s.io/kubernetes/cmd/kube-apiserver"
	_ "k8s.io/kubernetes/cmd/kubectl"
)
GO
log "$(echo "$staging" | wc -w) staging modules replaced by v$staging_version"

mkdir -p "$src/etcd/cmd/etcd"
cat >"$src/etcd/go.mod" <<GOMOD
module ambit.local/etcdtestbed

go 1.25

require go.etcd.io/etcd/server/v3 v$ETCD_VERSION
GOMOD
cat >"$src/etcd/cmd/etcd/main.go" <<'GO'
package main

import (
	"os"

	"go.etcd.io/etcd/server/v3/etcdmain"
)

func main() { etcdmain.Main(os.Args) }
GO

log "etcd v$ETCD_VERSION: resolving modules"
(cd "$src/etcd" && go mod tidy >/dev/null 2>&1 || go mod download)
log "etcd: building"
(cd "$src/etcd" && go build -trimpath -ldflags=-s -o "$DEST/bin/etcd.tmp" ./cmd/etcd)
mv "$DEST/bin/etcd.tmp" "$DEST/bin/etcd"
log "etcd: done ($(du -m "$DEST/bin/etcd" | cut -f1) MB)"

log "kubernetes: resolving modules (84 MiB on a cold cache)"
(cd "$src/kube" && go mod tidy -e >/dev/null 2>&1 || true)
# What kube's own build stamps (hack/lib/version.sh): without it the server says v0.0.0-master, which
# charts' kubeVersion constraints and kubectl's skew check refuse.
ldflags="-s"
for pkg in k8s.io/component-base/version k8s.io/client-go/pkg/version; do
    ldflags+=" -X $pkg.gitVersion=v$K8S_VERSION -X $pkg.gitMajor=${K8S_VERSION%%.*}"
    ldflags+=" -X $pkg.gitMinor=$(cut -d. -f2 <<<"$K8S_VERSION") -X $pkg.gitTreeState=clean"
done
for b in kube-apiserver kubectl; do
    log "$b: building (the long part: several minutes on 2 cores)"
    (cd "$src/kube" && go build -trimpath -ldflags="$ldflags" -o "$DEST/bin/$b.tmp" "k8s.io/kubernetes/cmd/$b")
    mv "$DEST/bin/$b.tmp" "$DEST/bin/$b"
    log "$b: done ($(du -m "$DEST/bin/$b" | cut -f1) MB)"
done
"$DEST/bin/kube-apiserver" --version >&2
echo "$DEST/bin"
