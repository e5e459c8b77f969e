#!/usr/bin/env bash
# System set-up for ambit on Debian 12: packages, and the kernel-header links bcc compiles against.
# Idempotent: installs only what is missing and links headers only when the links are absent.
set -euo pipefail

packages=(
    python3-bpfcc libbpfcc linux-headers-amd64 libssl-dev libnghttp2-dev python3-venv python3-dev
    iproute2 nftables tcpdump stunnel4 gcc make curl prometheus vagrant
    # gateway: libmodsecurity + OWASP CRS 3.3.4 for the WAF; llhttp's C sources (node-llhttp); nginx with
    # the ModSecurity connector as the bench's comparison
    libmodsecurity3 libmodsecurity-dev modsecurity-crs node-llhttp nginx libnginx-mod-http-modsecurity wrk
)

missing=()
for p in "${packages[@]}"; do
    dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done
if ((${#missing[@]})); then
    echo "setup: installing ${missing[*]}"
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -qq
    apt-get install -y -qq "${missing[@]}" >/dev/null
fi

# bcc compiles against /lib/modules/$(uname -r)/build. This kernel ships no headers of its own, so point
# the links at Debian's generic headers, but never replace links or trees that are already there.
kver=$(uname -r)
moddir=/lib/modules/$kver
hdr=$(ls -d /usr/src/linux-headers-*-amd64 2>/dev/null | sort -V | tail -n 1)
common=$(ls -d /usr/src/linux-headers-*-common 2>/dev/null | sort -V | tail -n 1)
if [[ -z "$hdr" || -z "$common" ]]; then
    echo "setup: no Debian kernel headers under /usr/src after installing linux-headers-amd64" >&2
    exit 1
fi
mkdir -p "$moddir"
if [[ ! -e "$moddir/build" ]]; then
    ln -sfn "$hdr" "$moddir/build"
    echo "setup: linked $moddir/build -> $hdr"
fi
if [[ ! -e "$moddir/source" ]]; then
    ln -sfn "$common" "$moddir/source"
    echo "setup: linked $moddir/source -> $common"
fi
