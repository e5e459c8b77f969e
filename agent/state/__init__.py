"""The node's view of the mesh: one immutable MeshSnapshot per accepted config version.

The relay client builds a new snapshot for every update and swaps it in whole, so readers (proxy, policy,
redirector) take `client.snapshot` once and work on a consistent picture; nobody mutates one in place.

A node holds peer workloads (other nodes' pods) only once it has asked for them (mgmt/scope.py): the proxy
asks through RelayClient.lookup, off its event loop. A snapshot never calls the plane itself: readers run on
threads (the proxy's loop, the relay's own thread) that must not block on the relay.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from functools import cached_property
from typing import Any

from api.resources.workload import Namespace, Node, Service, Workload

CORE_KINDS = frozenset({"Workload", "Namespace", "Service", "Node"})


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
    # On-demand lookup of an unknown address (the relay client's); not part of the snapshot's value.

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
            else:
                policies.append(obj)
        policies.sort(key=lambda p: (p.kind, p.meta.namespace, p.meta.name))
        return cls(version, trust_domain, node, workloads, namespaces, services, nodes, tuple(policies))

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
