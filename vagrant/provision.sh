#!/usr/bin/env bash
# Starts the role of one Vagrant VM: the management plane on "mgmt", an agent on every other VM.
# The join token for each node is created on the mgmt VM and shared through the synced folder.
set -euo pipefail
name=$1
mgmt_ip=$2
cd /opt/ambit
share=/opt/ambit/vagrant/.state
mkdir -p "$share"
if [[ $name == mgmt ]]; then
    nohup .venv/bin/ambit mgmt --config-dir /opt/ambit/vagrant/config --state-dir "$share" \
        >/var/log/ambit-mgmt.log 2>&1 &
else
    for _ in $(seq 60); do [[ -f $share/ca-bundle.pem ]] && break; sleep 1; done
    nohup .venv/bin/ambit agent --node "$name" --mgmt "$mgmt_ip:15012" --bootstrap "$mgmt_ip:15013" \
        --trust-bundle "$share/ca-bundle.pem" --join-token-file "$share/$name.token" \
        >/var/log/ambit-agent.log 2>&1 &
fi
