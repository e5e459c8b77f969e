#!/usr/bin/env bash
# Host side of the Vagrant lab: copy the plane's export (public trust bundle, one join token per node)
# from the mgmt VM into vagrant/.state/, which the node VMs' rsync then carries to them.
# Usage (run by the Vagrantfile's trigger, from the vagrant/ directory): fetch-state.sh MGMT_VM
set -euo pipefail
cd "$(dirname "$0")"
vm=$1
state=.state
mkdir -p "$state"
chmod 700 "$state"
cfg=$(mktemp)
trap 'rm -f "$cfg"' EXIT
# ssh-config only reads the machine's state, so it is safe while vagrant still holds the VM's action lock.
vagrant ssh-config "$vm" >"$cfg"
ssh -F "$cfg" "$vm" 'sudo tar -C /var/lib/ambit/export -cf - .' | (umask 077 && tar -C "$state" -xf -)
echo "fetch-state: $(ls "$state" | tr '\n' ' ')into vagrant/$state"
