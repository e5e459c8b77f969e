"""What each node may see: the per-node view of one config version (the relay serves nothing else).

Scope decision (least privilege that still lets a node route and authorize):
- its own Workloads, in full (labels included: policies select on them);
- the Namespaces of its own workloads, of the peers it holds and the root namespace (enrolment labels);
- every Node (the HBONE address of any peer's node is needed to route to it);
- every Service (addresses, ports, selector: a client may dial any service VIP);
- policy objects (every kind registered besides Workload/Namespace/Service/Node) in the namespaces of its
  own workloads, in the root namespace (MeshConfig's `root_namespace`, default "istio-system") and every
  cluster-scoped one;
- never a Secret (NEVER_TO_NODES: the gateway's listener keys), whatever kinds the node subscribes to;
- PEER workloads only on demand: a lookup by IP (a workload IP, or a service VIP which yields its
  endpoints) returns them in minimal form (uid, service account, node, ips, ports) and from then on they stay
  in that node's subscription. Minimal form keeps exactly two kinds of label: the enrolment labels (the node
  must know whether to speak HBONE to the peer) and the keys some Service of the peer's namespace selects on
  (so `Service.selects` picks endpoints on the node), plus the labels Istio's telemetry names a workload
  by (TELEMETRY_LABELS: canonical service and revision, app, version: the node's metrics label both ends of
  a connection with them, as ztunnel does); every other label stays on the plane.
- a listing (Lookup of address "*", for `ambit debug reachable`): every workload in that same minimal form
  (at most MAX_LISTED), which adds nothing to the node's subscription.
Asking as another node than the certificate's is refused by the relay (PERMISSION_DENIED) and audited.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Iterable, Mapping
from typing import Any

from api.resources.policy import DEFAULT_ROOT_NAMESPACE
from api.resources.workload import DATAPLANE_LABELS, Service, Workload
from mgmt.store import ConfigSnapshot, StoredResource, canonical_json, content_hash

CORE_KINDS = frozenset({"Workload", "Namespace", "Service", "Node"})
# Listener certificates' private keys: for the gateway only, never in a node's view, whatever it subscribes.
NEVER_TO_NODES = frozenset({"Secret"})
LIST_ALL = "*"  # LookupRequest.address that lists every workload (api/relay.proto)
MAX_LISTED = 10_000
# Where Istio reads a workload's canonical service and revision (metrics' *_canonical_*, *_app, *_version).
TELEMETRY_LABELS = frozenset(
    {
        "service.istio.io/canonical-name",
        "service.istio.io/canonical-revision",
        "app.kubernetes.io/name",
        "app.kubernetes.io/version",
        "app",
        "version",
    }
)

View = dict[str, StoredResource]  # by str(ResourceKey)


def root_namespace(snapshot: ConfigSnapshot) -> str:
    for res in snapshot.resources.values():
        if res.kind == "MeshConfig":
            value = getattr(res.obj, "root_namespace", None)
            if isinstance(value, str) and value:
                return value
    return DEFAULT_ROOT_NAMESPACE


class ScopeIndex:
    """Indices of one ConfigSnapshot, built once per version, from which every node's view is cut."""

    def __init__(self, snapshot: ConfigSnapshot) -> None:
        self.snapshot = snapshot
        self.root_namespace = root_namespace(snapshot)
        self._by_node: dict[str, list[StoredResource]] = {}
        self._workloads: dict[str, StoredResource] = {}
        self._by_ip: dict[str, list[str]] = {}
        self._service_by_ip: dict[str, list[Service]] = {}
        self._namespaces: dict[str, StoredResource] = {}
        self._global: list[StoredResource] = []  # Nodes, Services, cluster-scoped policy kinds
        self._policies_by_ns: dict[str, list[StoredResource]] = {}
        self._selector_keys: dict[str, set[str]] = {}
        self._peer_docs: dict[str, StoredResource] = {}
        for key, res in snapshot.resources.items():
            self._index(key, res)

    def _index(self, key: str, res: StoredResource) -> None:
        obj = res.obj
        if res.kind in NEVER_TO_NODES:
            return
        if res.kind == "Workload":
            self._workloads[key] = res
            self._by_node.setdefault(obj.node, []).append(res)
            for ip in obj.ips:
                self._by_ip.setdefault(ip, []).append(key)
        elif res.kind == "Namespace":
            self._namespaces[obj.meta.name] = res
        elif res.kind == "Service":
            self._global.append(res)
            self._selector_keys.setdefault(obj.meta.namespace, set()).update(obj.selector)
            for ip in obj.addresses:
                self._service_by_ip.setdefault(ip, []).append(obj)
        elif res.kind == "Node" or not res.key.namespace:
            self._global.append(res)
        else:
            self._policies_by_ns.setdefault(res.key.namespace, []).append(res)

    # -- views -----------------------------------------------------------------------------------------
    def view(self, node: str, peers: Iterable[str] = ()) -> View:
        """The node's whole view: own workloads, peers it looked up (minimal), and what they depend on."""
        out: View = {}
        namespaces = {self.root_namespace}
        for res in self._by_node.get(node, ()):
            out[str(res.key)] = res
            namespaces.add(res.key.namespace)
        policy_namespaces = set(namespaces)
        for key in peers:
            if key in out:
                continue
            peer = self.peer_resource(key)
            if peer is not None:
                out[key] = peer
                namespaces.add(peer.key.namespace)
        for ns in namespaces:
            ns_res = self._namespaces.get(ns)
            if ns_res is not None:
                out[str(ns_res.key)] = ns_res
            for res in self._policies_by_ns.get(ns, ()) if ns in policy_namespaces else ():
                out[str(res.key)] = res
        for res in self._global:
            out[str(res.key)] = res
        return out

    def full_view(self) -> View:
        """Everything, unscoped: what a plane without node scoping would send (the bench's baseline)."""
        return dict(self.snapshot.resources)

    def peer_resource(self, key: str) -> StoredResource | None:
        """A workload in minimal form (cached per version)."""
        cached = self._peer_docs.get(key)
        if cached is not None:
            return cached
        res = self._workloads.get(key)
        if res is None:
            return None
        doc = self._minimal_document(res.obj)
        data = canonical_json(doc)
        peer = StoredResource(res.key, res.obj, data, content_hash(data), res.where)
        self._peer_docs[key] = peer
        return peer

    def _minimal_document(self, w: Workload) -> dict[str, Any]:
        keep = self._selector_keys.get(w.namespace, set()) | set(DATAPLANE_LABELS) | TELEMETRY_LABELS
        labels = {k: v for k, v in w.labels.items() if k in keep}
        metadata: dict[str, Any] = {"name": w.name, "namespace": w.namespace}
        if labels:
            metadata["labels"] = labels
        spec: dict[str, Any] = {"serviceAccount": w.service_account, "node": w.node, "ips": list(w.ips)}
        if w.ports:
            spec["ports"] = list(w.ports)
        return {"apiVersion": "ambit.io/v1", "kind": "Workload", "metadata": metadata, "spec": spec}

    # -- on-demand lookup ------------------------------------------------------------------------------
    def lookup(self, address: str) -> list[str]:
        """Keys of the workloads behind one IP: the workload(s) holding it, or a service VIP's endpoints."""
        try:
            ip = str(ipaddress.ip_address(address))
        except ValueError:
            return []
        keys = list(self._by_ip.get(ip, ()))
        for svc in self._service_by_ip.get(ip, ()):
            keys.extend(k for k, res in self._workloads.items() if svc.selects(res.obj))
        return sorted(set(keys))

    def all_workload_keys(self) -> list[str]:
        """Every workload (at most MAX_LISTED), for a node's `ambit debug reachable`: the minimal form a
        lookup by IP would give anyway, listed without adding anything to the node's subscription."""
        return sorted(self._workloads)[:MAX_LISTED]

    def is_workload(self, key: str) -> bool:
        return key in self._workloads

    def local_keys(self, node: str) -> set[str]:
        return {str(r.key) for r in self._by_node.get(node, ())}


def filter_types(view: Mapping[str, StoredResource], types: Iterable[str]) -> View:
    """Only the kinds the node subscribed to: nothing is pushed that it did not ask for."""
    wanted = set(types)
    return {k: r for k, r in view.items() if r.kind in wanted}


def key_type(key: str) -> str:
    return key.split("/", 1)[0]
