"""The lab's layout, computed without touching the kernel: names, addresses, routes.

Nodes share one L2 segment (a bridge in a fabric netns, so the host's namespace is never touched); each
node owns a slice of the pod CIDR and routes the other nodes' slices via their node IPs. Pods get /32
addresses and a default route via a link-local gateway that lives on the node side of their veth.
"""

from __future__ import annotations

import ipaddress
from dataclasses import asdict, dataclass, field
from typing import Any

from agent.errors import UsageError

DEFAULT_PREFIX = "amb-"
DEFAULT_NODE_CIDR = "172.30.0.0/24"
DEFAULT_POD_CIDR = "10.244.0.0/16"
NODE_POD_PREFIXLEN = 24
# Every pod's gateway, as in Calico: an address the node side of each pod veth answers ARP for.
POD_GATEWAY = "169.254.1.1"
MAX_NODES = 64
# Node-side veth names are "vp<index>"; Linux caps interface names at 15 characters.
MAX_PODS_PER_NODE = 250


@dataclass(frozen=True)
class PodPlan:
    name: str
    node: str
    netns: str
    ip: str
    host_ifname: str  # node-side end of the pod's veth, inside the node netns


@dataclass(frozen=True)
class NodePlan:
    name: str
    netns: str
    ip: str
    pod_cidr: str
    fabric_ifname: str  # the node's port on the fabric bridge, inside the fabric netns
    pods: tuple[PodPlan, ...] = field(default_factory=tuple)


@dataclass(frozen=True)
class LabPlan:
    prefix: str
    fabric_netns: str
    node_cidr: str
    pod_cidr: str
    nodes: tuple[NodePlan, ...]
    # The management plane's address: on the fabric bridge itself, the last host of the node CIDR.
    mgmt_ip: str = ""

    @property
    def node_prefixlen(self) -> int:
        return ipaddress.ip_network(self.node_cidr).prefixlen

    def pods(self) -> list[PodPlan]:
        return [p for n in self.nodes for p in n.pods]

    def pod(self, name: str) -> PodPlan:
        for p in self.pods():
            if p.name == name:
                return p
        known = ", ".join(p.name for p in self.pods())
        raise UsageError(f"unknown pod {name!r} (lab pods: {known})")

    def node(self, name: str) -> NodePlan:
        for n in self.nodes:
            if n.name == name:
                return n
        known = ", ".join(n.name for n in self.nodes)
        raise UsageError(f"unknown node {name!r} (lab nodes: {known})")

    def netns_names(self) -> list[str]:
        return [self.fabric_netns] + [n.netns for n in self.nodes] + [p.netns for p in self.pods()]

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> LabPlan:
        nodes = tuple(NodePlan(**{**n, "pods": tuple(PodPlan(**p) for p in n["pods"])}) for n in d["nodes"])
        return cls(**{**d, "nodes": nodes})


def _network(text: str, what: str) -> ipaddress.IPv4Network:
    try:
        net = ipaddress.ip_network(text, strict=True)
    except ValueError as exc:
        raise UsageError(f"bad {what} {text!r}: {exc}") from None
    if not isinstance(net, ipaddress.IPv4Network):
        raise UsageError(f"bad {what} {text!r}: the lab is IPv4 only")
    return net


def plan_lab(
    nodes: int,
    pods_per_node: int,
    prefix: str = DEFAULT_PREFIX,
    node_cidr: str = DEFAULT_NODE_CIDR,
    pod_cidr: str = DEFAULT_POD_CIDR,
) -> LabPlan:
    if not 1 <= nodes <= MAX_NODES:
        raise UsageError(f"nodes must be between 1 and {MAX_NODES}, got {nodes}")
    if not 0 <= pods_per_node <= MAX_PODS_PER_NODE:
        raise UsageError(f"pods per node must be between 0 and {MAX_PODS_PER_NODE}, got {pods_per_node}")
    if not prefix or len(prefix) > 8 or not all(c.isalnum() or c == "-" for c in prefix):
        raise UsageError(f"bad prefix {prefix!r}: 1-8 characters of letters, digits and '-'")
    node_net = _network(node_cidr, "node CIDR")
    pod_net = _network(pod_cidr, "pod CIDR")
    if node_net.overlaps(pod_net):
        raise UsageError(f"node CIDR {node_cidr} overlaps pod CIDR {pod_cidr}")
    node_hosts = node_net.num_addresses - 2
    if nodes + 1 > node_hosts:
        raise UsageError(
            f"node CIDR {node_cidr} overflows: {nodes} nodes and the management plane need "
            f"{nodes + 1} addresses, it has {node_hosts}"
        )
    if pod_net.prefixlen > NODE_POD_PREFIXLEN:
        raise UsageError(f"pod CIDR {pod_cidr} overflows: it must hold /{NODE_POD_PREFIXLEN} node slices")
    slices = list(pod_net.subnets(new_prefix=NODE_POD_PREFIXLEN))
    # Slice 0 is left unused so node N owns x.y.N.0/24, which keeps addresses readable.
    if nodes > len(slices) - 1:
        raise UsageError(
            f"pod CIDR {pod_cidr} overflows: {nodes} nodes need {nodes + 1} /{NODE_POD_PREFIXLEN} slices, "
            f"it has {len(slices)}"
        )
    node_plans = []
    for i in range(1, nodes + 1):
        node_name = f"node-{i}"
        node_netns = f"{prefix}{node_name}"
        slice_net = slices[i]
        pod_plans = tuple(
            PodPlan(
                name=f"pod-{i}-{j}",
                node=node_name,
                netns=f"{prefix}pod-{i}-{j}",
                ip=str(slice_net.network_address + 1 + j),
                host_ifname=f"vp{j}",
            )
            for j in range(1, pods_per_node + 1)
        )
        node_plans.append(
            NodePlan(
                name=node_name,
                netns=node_netns,
                ip=str(node_net.network_address + i),
                pod_cidr=str(slice_net),
                fabric_ifname=f"n{i}",
                pods=pod_plans,
            )
        )
    return LabPlan(
        prefix=prefix,
        fabric_netns=f"{prefix}fabric",
        node_cidr=str(node_net),
        pod_cidr=str(pod_net),
        nodes=tuple(node_plans),
        mgmt_ip=str(node_net.broadcast_address - 1),
    )
