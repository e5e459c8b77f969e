#!/usr/bin/env bash
# Provisions one Vagrant VM's role (idempotent: a second `vagrant provision` changes nothing that works).
#   provision.sh mgmt MGMT_IP NODE...   the plane as systemd unit ambit-mgmt; exports the trust bundle and
#                                       one join token per NODE into /var/lib/ambit/export
#   provision.sh NODE MGMT_IP INDEX     a pod namespace (10.244.INDEX.2) and the agent as unit ambit-agent
set -euo pipefail
name=$1
mgmt_ip=$2
shift 2
ambit=/opt/ambit/.venv/bin/ambit

unit() {  # unit NAME DESCRIPTION EXEC...
    local unit_name=$1 description=$2
    shift 2
    cat >"/etc/systemd/system/$unit_name.service" <<UNIT
[Unit]
Description=$description
After=network-online.target
Wants=network-online.target

[Service]
ExecStart=$*
Restart=on-failure
RestartSec=2
# The agent stops within 2 s of SIGTERM; the rest is margin.
TimeoutStopSec=10

[Install]
WantedBy=multi-user.target
UNIT
    systemctl daemon-reload
    systemctl enable "$unit_name"
    systemctl restart "$unit_name"
}

if [[ $name == mgmt ]]; then
    state=/var/lib/ambit/mgmt
    install -d -m 700 "$state" /var/lib/ambit/export
    unit ambit-mgmt "ambit management plane" "$ambit" mgmt --config-dir /opt/ambit/vagrant/config \
        --state-dir "$state" --metrics-listen "$mgmt_ip:15014" --audit-log /var/log/ambit-mgmt-audit.jsonl
    for _ in $(seq 60); do [[ -f $state/ca-bundle.pem ]] && break; sleep 1; done
    [[ -f $state/ca-bundle.pem ]] || { journalctl -u ambit-mgmt -n 30 --no-pager; exit 1; }
    install -m 644 "$state/ca-bundle.pem" /var/lib/ambit/export/ca-bundle.pem
    for node in "$@"; do
        (umask 077 && "$ambit" mgmt token --state-dir "$state" --node "$node" --ttl 24h \
            >"/var/lib/ambit/export/$node.token")
    done
    exit 0
fi

index=$1
state=/opt/ambit/vagrant/.state
if [[ ! -f $state/ca-bundle.pem || ! -f $state/$name.token ]]; then
    echo "provision: $state lacks the trust bundle or $name.token: bring up mgmt first (vagrant up mgmt)" >&2
    exit 1
fi
install -d -m 700 /etc/ambit
install -m 644 "$state/ca-bundle.pem" /etc/ambit/ca-bundle.pem
install -m 600 "$state/$name.token" /etc/ambit/join-token

# One pod: a namespace with a /32 address, a veth to the node and a link-local gateway, as in the netns
# lab; other nodes' pod ranges are routed through their node addresses.
pod_ip=10.244.$index.2
if ! ip netns list | grep -qw pod; then
    ip netns add pod
    ip link add veth-pod type veth peer name eth0 netns pod
    ip addr add 169.254.1.1/32 dev veth-pod
    ip link set veth-pod up
    ip route add "$pod_ip/32" dev veth-pod scope link
    ip -n pod link set lo up
    ip -n pod addr add "$pod_ip/32" dev eth0
    ip -n pod link set eth0 up
    ip -n pod route add 169.254.1.1/32 dev eth0 scope link
    ip -n pod route add default via 169.254.1.1 dev eth0
fi
sysctl -qw net.ipv4.ip_forward=1 net.ipv4.conf.all.rp_filter=0 net.ipv4.conf.default.rp_filter=0
for peer in 1 2; do
    [[ $peer == "$index" ]] && continue
    ip route replace "10.244.$peer.0/24" via "192.168.56.1$peer"
done
node_ip=192.168.56.1$index
unit ambit-agent "ambit node agent" "$ambit" agent --node "$name" --mgmt "$mgmt_ip:15012" \
    --bootstrap "$mgmt_ip:15013" --trust-bundle /etc/ambit/ca-bundle.pem \
    --join-token-file /etc/ambit/join-token --listen-ip "$node_ip" \
    --access-log /var/log/ambit-access.jsonl --audit-log /var/log/ambit-audit.jsonl
# A server in node2's pod for the example in the Vagrantfile.
if [[ $index == 2 ]]; then
    unit ambit-demo-http "HTTP server in the pod" /bin/ip netns exec pod /usr/bin/python3 -m http.server \
        8080 --bind "$pod_ip" --directory /opt/ambit/vagrant/www
fi
