"""Recovering the source pod of an inbound HBONE stream from the mesh view.

The CONNECT request names only the destination. The source is the one workload with the peer's SPIFFE
identity scheduled on the node the connection came from; when there are several (replicas of one service
account on one node) the source pod cannot be told apart and the caller falls back to the node address.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Protocol

from api.resources.workload import Workload
from api.spiffe import SpiffeId


class WorkloadView(Protocol):
    @property
    def trust_domain(self) -> str: ...

    @property
    def workloads(self) -> Mapping[str, Workload]: ...

    def node_address(self, node_name: str) -> str | None: ...


class SourceIndex:
    """(namespace, service account, node address) -> workloads, rebuilt once per snapshot."""

    def __init__(self) -> None:
        self._snapshot: object = None
        self._index: dict[tuple[str, str, str], list[Workload]] = {}

    def lookup(self, snap: WorkloadView, principal: SpiffeId, node_ip: str) -> Workload | None:
        if snap is not self._snapshot:  # snapshots are immutable: a new one is a new object
            self._rebuild(snap)
        if principal.trust_domain != snap.trust_domain or principal.namespace is None:
            return None
        found = self._index.get((principal.namespace, principal.service_account or "", node_ip), [])
        return found[0] if len(found) == 1 else None

    def _rebuild(self, snap: WorkloadView) -> None:
        index: dict[tuple[str, str, str], list[Workload]] = {}
        for w in snap.workloads.values():
            addr = snap.node_address(w.node)
            if addr is not None:
                index.setdefault((w.namespace, w.service_account, addr), []).append(w)
        self._index, self._snapshot = index, snap
