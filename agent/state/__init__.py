"""The node's view of the mesh: one immutable MeshSnapshot per accepted config version.

The relay client builds a new snapshot for every update and swaps it in whole, so readers (proxy, policy,
redirector) take `client.snapshot` once and work on a consistent picture; nobody mutates one in place.

A node holds peer workloads (other nodes' pods) only once it has asked for them (mgmt/scope.py): the proxy
asks through RelayClient.lookup, off its event loop. A snapshot never calls the plane itself: readers run on
threads (the proxy's loop, the relay's own thread) that must not block on the relay.
"""

from __future__ import annotations

import dataclasses
import ipaddress
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from functools import cached_property
from typing import Any

from api.resources.workload import Namespace, Node, Service, ServiceCIDR, Workload
from api.spiffe import TrustDomains

CORE_KINDS = frozenset({"Workload", "Namespace", "Service", "Node", "ServiceCIDR"})


@dataclass(frozen=True)
class MeshSnapshot:
    version: int = 0
    trust_domain: str = ""
    node: str = ""
    workloads: Mapping[str, Workload] = field(default_factory=dict)  # by uid "ns/name"
    namespaces: Mapping[str, Namespace] = field(default_factory=dict)  # by name
    services: Mapping[str, Service] = field(default_factory=dict)  # by uid "ns/name"
    nodes: Mapping[str, Node] = field(default_factory=dict)  # by name
    policies: tuple[Any, ...] = ()  # every other registered kind (AuthorizationPolicy, MeshConfig, ...)
    service_cidrs: Mapping[str, ServiceCIDR] = field(default_factory=dict)  # by name

    @classmethod
    def from_objects(
        cls,
        version: int,
        trust_domain: str,
        node: str,
        objects: Iterable[Any],
    ) -> MeshSnapshot:
        """Sort parsed resources into a snapshot; policies keep a stable order (kind, namespace, name)."""
        workloads: dict[str, Workload] = {}
        namespaces: dict[str, Namespace] = {}
        services: dict[str, Service] = {}
        nodes: dict[str, Node] = {}
        service_cidrs: dict[str, ServiceCIDR] = {}
        policies: list[Any] = []
        for obj in objects:
            if isinstance(obj, Workload):
                workloads[obj.uid] = obj
            elif isinstance(obj, Namespace):
                namespaces[obj.meta.name] = obj
            elif isinstance(obj, Service):
                services[obj.uid] = obj
            elif isinstance(obj, Node):
                nodes[obj.name] = obj
            elif isinstance(obj, ServiceCIDR):
                service_cidrs[obj.meta.name] = obj
            else:
                policies.append(obj)
        policies.sort(key=lambda p: (p.kind, p.meta.namespace, p.meta.name))
        return cls(
            version,
            trust_domain,
            node,
            workloads,
            namespaces,
            services,
            nodes,
            tuple(policies),
            service_cidrs,
        )

    @cached_property
    def _by_ip(self) -> dict[str, Workload]:
        out: dict[str, Workload] = {}
        for uid in sorted(self.workloads):  # deterministic if two workloads claim one IP
            w = self.workloads[uid]
            for ip in w.ips:
                out.setdefault(ip, w)
        return out

    @cached_property
    def _service_by_ip(self) -> dict[str, Service]:
        return {ip: s for _, s in sorted(self.services.items()) for ip in s.addresses}

    @cached_property
    def trust(self) -> TrustDomains:
        """This mesh's trust domain and the aliases MeshConfig names: the only identities believed."""
        configs = [p for p in self.policies if p.kind == "MeshConfig"]
        aliases = {a for p in configs for a in getattr(p, "trust_domain_aliases", ())}
        return TrustDomains(self.trust_domain, frozenset(aliases - {self.trust_domain}))

    @cached_property
    def _mesh_ranges(self) -> tuple[ipaddress.IPv4Network | ipaddress.IPv6Network, ...]:
        cidrs = [c for n in self.nodes.values() for c in n.pod_cidrs]
        cidrs += [c for s in self.service_cidrs.values() for c in s.cidrs]
        return tuple(ipaddress.ip_network(c) for c in cidrs)

    def in_mesh_range(self, ip: str) -> bool:
        """Whether `ip` lies in a Node's pod CIDRs or a ServiceCIDR: a mesh address even when unknown here."""
        try:
            addr = ipaddress.ip_address(ip)
        except ValueError:
            return False
        return any(addr in net for net in self._mesh_ranges)

    @cached_property
    def _node_addresses(self) -> frozenset[str]:
        return frozenset(a for n in self.nodes.values() for a in n.addresses)

    def is_node_address(self, ip: str) -> bool:
        return ip in self._node_addresses

    def workload_by_ip(self, ip: str) -> Workload | None:
        """The workload holding `ip`, if this node holds it (never asks the plane)."""
        return self._by_ip.get(ip)

    def service_by_ip(self, ip: str) -> Service | None:
        return self._service_by_ip.get(ip)

    def service_endpoints(self, service: Service) -> list[Workload]:
        return [w for _, w in sorted(self.workloads.items()) if service.selects(w)]

    def local_workloads(self) -> list[Workload]:
        return [w for _, w in sorted(self.workloads.items()) if w.node == self.node]

    def node_address(self, node_name: str) -> str | None:
        n = self.nodes.get(node_name)
        return n.addresses[0] if n is not None and n.addresses else None

    def namespace_of(self, w: Workload) -> Namespace | None:
        return self.namespaces.get(w.namespace)

    def with_workloads(self, extra: Iterable[Workload]) -> MeshSnapshot:
        """The same version plus workloads learnt by on-demand lookup."""
        workloads = dict(self.workloads)
        workloads.update((w.uid, w) for w in extra)
        return dataclasses.replace(self, workloads=workloads)


EMPTY = MeshSnapshot()
