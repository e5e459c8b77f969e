from agent.proxy.sources import SourceIndex
from agent.state import MeshSnapshot
from api.resources import Meta
from api.resources.workload import Node, Workload
from api.spiffe import SpiffeId


def _w(name: str, sa: str, node: str, ip: str) -> Workload:
    return Workload(Meta(name=name, namespace="app"), sa, node, (ip,))


def _snap(*workloads: Workload) -> MeshSnapshot:
    nodes = {n: Node(Meta(name=n, namespace=""), (addr,)) for n, addr in [("node-1", "172.30.0.1")]}
    return MeshSnapshot(1, "td", "node-2", {w.uid: w for w in workloads}, {}, {}, nodes)


def test_unique_workload_of_identity_on_peer_node() -> None:
    index = SourceIndex()
    snap = _snap(_w("a", "web", "node-1", "10.244.1.2"), _w("b", "db", "node-1", "10.244.1.3"))
    found = index.lookup(snap, SpiffeId.workload("td", "app", "web"), "172.30.0.1")
    assert found is not None and found.ips == ("10.244.1.2",)
    assert index.lookup(snap, SpiffeId.workload("td", "app", "web"), "172.30.0.9") is None
    assert index.lookup(snap, SpiffeId.workload("other", "app", "web"), "172.30.0.1") is None
    assert index.lookup(snap, SpiffeId.node("td", "node-1"), "172.30.0.1") is None


def test_ambiguous_replicas_give_none_and_new_snapshot_rebuilds() -> None:
    index = SourceIndex()
    a, b = _w("a", "web", "node-1", "10.244.1.2"), _w("b", "web", "node-1", "10.244.1.3")
    web = SpiffeId.workload("td", "app", "web")
    assert index.lookup(_snap(a, b), web, "172.30.0.1") is None
    found = index.lookup(_snap(b), web, "172.30.0.1")
    assert found is not None and found.name == "b"
