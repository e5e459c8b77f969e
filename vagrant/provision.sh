#!/usr/bin/env bash
# Starts the role of one Vagrant VM: the management plane on "mgmt", an agent on every other VM.
# The plane writes its public trust bundle and one join token per node into the synced state folder.
# Usage: provision.sh NAME MGMT_IP NODE...
set -euo pipefail
name=$1
mgmt_ip=$2
shift 2
nodes=("$@")
cd /opt/ambit
share=/opt/ambit/vagrant/.state
mkdir -p "$share"
chmod 700 "$share"
if [[ $name == mgmt ]]; then
    nohup .venv/bin/ambit mgmt --config-dir /opt/ambit/vagrant/config --state-dir "$share" \
        >/var/log/ambit-mgmt.log 2>&1 &
    for _ in $(seq 60); do [[ -f $share/ca-bundle.pem ]] && break; sleep 1; done
    for node in "${nodes[@]}"; do
        (umask 077 && .venv/bin/ambit mgmt token --state-dir "$share" --node "$node" --ttl 1h >"$share/$node.token")
    done
else
    for _ in $(seq 120); do [[ -f $share/$name.token ]] && break; sleep 1; done
    nohup .venv/bin/ambit agent --node "$name" --mgmt "$mgmt_ip:15012" --bootstrap "$mgmt_ip:15013" \
        --trust-bundle "$share/ca-bundle.pem" --join-token-file "$share/$name.token" \
        >/var/log/ambit-agent.log 2>&1 &
fi
