"""The Kubernetes source against a real API server: what a node's relay subscription sees as objects change.

Each test keeps to its own namespace and node names; the plane (conftest) watches the whole API server.
"""

from __future__ import annotations

from agent.lab import kube
from agent.state import MeshSnapshot
from api.resources.workload import AMBIENT, DATAPLANE_LABEL
from mgmt.kube.reflector import Reflector, ResourceType
from tests.kube_fixtures import SYNC_TIMEOUT, KubePlane, unique
from tests.relay_fixtures import relay_client, wait_until

AMBIENT_LABELS = {DATAPLANE_LABEL: AMBIENT}


def _node(plane: KubePlane, ip: str) -> str:
    name = unique("node")
    kube.ensure_node(plane.api.client(), name, ip, "10.250.0.0/24")
    return name


def _pod(plane: KubePlane, ns: str, name: str, node: str, ip: str, **labels: str) -> None:
    api = plane.api.client()
    kube.ensure_service_account(api, ns, "web")
    kube.run_pod(api, kube.pod_body(ns, name, node, "web", {"app": "web", **labels}, [8080]), ip)


def _has_workload(uid: str, ip: str = "") -> object:
    return lambda s: uid in s.workloads and (not ip or s.workloads[uid].ips == (ip,))


def test_running_pod_with_ip_is_a_workload_of_its_node_until_deleted(kube_plane: KubePlane) -> None:
    api = kube_plane.api.client()
    ns = unique("ns")
    kube.ensure_namespace(api, ns, AMBIENT_LABELS)
    node = _node(kube_plane, "172.31.0.1")
    kube.ensure_service_account(api, ns, "web")
    body = kube.pod_body(ns, "web-0", node, "web", {"app": "web"}, [8080])
    from kubernetes import client

    client.CoreV1Api(api).create_namespaced_pod(ns, body)
    with relay_client(kube_plane.target, kube_plane.ca, node) as (_, rec):
        first = rec.wait_for(lambda s: node in s.nodes, SYNC_TIMEOUT)
        assert first is not None
        assert f"{ns}/web-0" not in first.workloads  # Pending, no IP: not a workload yet
        assert first.nodes[node].addresses == ("172.31.0.1",)
        assert first.nodes[node].pod_cidrs == ("10.250.0.0/24",)
        client.CoreV1Api(api).patch_namespaced_pod_status("web-0", ns, kube.running_status("10.250.0.5"))
        snap = rec.wait_for(_has_workload(f"{ns}/web-0", "10.250.0.5"), SYNC_TIMEOUT)
        assert snap is not None
        w = snap.workloads[f"{ns}/web-0"]
        assert (w.node, w.service_account, w.ports) == (node, "web", (8080,))
        assert str(w.spiffe_id("cluster.local")) == f"spiffe://cluster.local/ns/{ns}/sa/web"
        assert w.enrolled(snap.namespace_of(w))
        kube.delete_pod(api, ns, "web-0")
        assert rec.wait_for(lambda s: f"{ns}/web-0" not in s.workloads, SYNC_TIMEOUT) is not None


def test_namespace_label_change_enrols_and_unenrols(kube_plane: KubePlane) -> None:
    api = kube_plane.api.client()
    ns = unique("ns")
    kube.ensure_namespace(api, ns)
    node = _node(kube_plane, "172.31.0.2")
    _pod(kube_plane, ns, "web-0", node, "10.250.1.5")
    uid = f"{ns}/web-0"

    def enrolled(want: bool) -> object:
        def pred(s: MeshSnapshot) -> bool:
            w = s.workloads.get(uid)
            return w is not None and w.enrolled(s.namespace_of(w)) is want

        return pred

    with relay_client(kube_plane.target, kube_plane.ca, node) as (_, rec):
        assert rec.wait_for(enrolled(False), SYNC_TIMEOUT) is not None
        kube.label_namespace(api, ns, AMBIENT_LABELS)
        assert rec.wait_for(enrolled(True), SYNC_TIMEOUT) is not None
        kube.label_namespace(api, ns, {DATAPLANE_LABEL: None})
        assert rec.wait_for(enrolled(False), SYNC_TIMEOUT) is not None


def test_service_named_target_port_is_resolved_through_its_endpointslice(kube_plane: KubePlane) -> None:
    api = kube_plane.api.client()
    ns = unique("ns")
    kube.ensure_namespace(api, ns, AMBIENT_LABELS)
    node = _node(kube_plane, "172.31.0.3")
    _pod(kube_plane, ns, "web-0", node, "10.250.2.5")
    kube.create(api, kube.service_body(ns, "web", "10.96.7.7", [(80, "p8080"), (81, 9000)], {"app": "web"}))
    uid = f"{ns}/web"
    with relay_client(kube_plane.target, kube_plane.ca, node) as (_, rec):
        snap = rec.wait_for(lambda s: uid in s.services, SYNC_TIMEOUT)
        assert snap is not None
        # Until an EndpointSlice resolves the name, only the numeric targetPort is reachable.
        assert [(p.port, p.target_port) for p in snap.services[uid].ports] == [(81, 9000)]
        kube.create(api, kube.endpoint_slice_body(ns, "web", {80: 8080, 81: 9000}, ["10.250.2.5"]))
        snap = rec.wait_for(lambda s: uid in s.services and len(s.services[uid].ports) == 2, SYNC_TIMEOUT)
        assert snap is not None
        svc = snap.services[uid]
        assert svc.addresses == ("10.96.7.7",)
        assert [(p.port, p.target_port) for p in svc.ports] == [(80, 8080), (81, 9000)]
        assert [w.uid for w in snap.service_endpoints(svc)] == [f"{ns}/web-0"]


def _policy(ns: str, name: str, action: str, port: int = 8080, principal: str = "") -> str:
    """Istio YAML as users apply it (v1beta1, ports as strings); a `principal` pattern is the source."""
    source = f"principals: ['{principal}']" if principal else f"namespaces: [{ns}]"
    return f"""apiVersion: security.istio.io/v1beta1
kind: AuthorizationPolicy
metadata: {{name: {name}, namespace: {ns}}}
spec:
  action: {action}
  rules:
  - from: [{{source: {{{source}}}}}]
    to: [{{operation: {{ports: ["{port}"]}}}}]
"""


# The CRD's schema takes any string as a principal; Istio (and ambit) allow '*' only at either end.
BAD_PRINCIPAL = "cluster.local/*/sa/*"


def test_invalid_policy_is_reported_and_skipped_while_others_apply(kube_plane: KubePlane) -> None:
    """What the CRD schema cannot check (a principal pattern) is refused by the plane, per object."""
    api = kube_plane.api
    ns = unique("ns")
    kube.ensure_namespace(api.client(), ns, AMBIENT_LABELS)
    api.kubectl_run("apply", "-f", "-", stdin=_policy(ns, "bad-pattern", "ALLOW", principal=BAD_PRINCIPAL))
    api.kubectl_run("apply", "-f", "-", stdin=_policy(ns, "deny-peers", "DENY"))
    store = kube_plane.store
    assert wait_until(lambda: f"AuthorizationPolicy/{ns}/deny-peers" in store.current.resources, SYNC_TIMEOUT)
    assert f"AuthorizationPolicy/{ns}/bad-pattern" not in store.current.resources
    assert wait_until(
        lambda: any(e.key == f"AuthorizationPolicy/{ns}/bad-pattern" for e in store.errors), SYNC_TIMEOUT
    )
    error = next(e for e in store.errors if e.key == f"AuthorizationPolicy/{ns}/bad-pattern")
    assert (
        "only allowed as a whole value" in error.reason
        and error.where == f"AuthorizationPolicy {ns}/bad-pattern"
    )
    assert kube_plane.source.counters()["rejected_objects"] >= 1

    def event_reasons() -> list[str]:
        selector = "involvedObject.name=bad-pattern"
        out = api.kubectl_run(
            "get", "events", "-n", ns, f"--field-selector={selector}", "-o=jsonpath={.items[*].reason}"
        )
        return out.stdout.split()

    assert wait_until(lambda: "InvalidConfig" in event_reasons(), SYNC_TIMEOUT)


def test_broken_edit_keeps_the_last_valid_policy(kube_plane: KubePlane) -> None:
    api = kube_plane.api
    ns = unique("ns")
    kube.ensure_namespace(api.client(), ns, AMBIENT_LABELS)
    key = f"AuthorizationPolicy/{ns}/deny"
    api.kubectl_run("apply", "-f", "-", stdin=_policy(ns, "deny", "DENY"))
    store = kube_plane.store
    assert wait_until(lambda: key in store.current.resources, SYNC_TIMEOUT)
    good = store.current.resources[key]
    api.kubectl_run("apply", "-f", "-", stdin=_policy(ns, "deny", "DENY", principal=BAD_PRINCIPAL))
    assert wait_until(lambda: any(e.key == key for e in store.errors), SYNC_TIMEOUT)
    assert store.current.resources[key].hash == good.hash
    api.kubectl_run("delete", "authorizationpolicy", "-n", ns, "deny")
    assert wait_until(lambda: key not in store.current.resources, SYNC_TIMEOUT)
    assert not any(e.key == key for e in store.errors)


def test_watches_resume_after_an_apiserver_restart(kube_plane: KubePlane) -> None:
    """Changes made right after the restart, while the informers are still reconnecting, all arrive."""
    api = kube_plane.api
    ns = unique("ns")
    kube.ensure_namespace(api.client(), ns, AMBIENT_LABELS)
    node = _node(kube_plane, "172.31.0.4")
    _pod(kube_plane, ns, "old-0", node, "10.250.3.5")
    store = kube_plane.store
    assert wait_until(lambda: f"Workload/{ns}/old-0" in store.current.resources, SYNC_TIMEOUT)
    watches = kube_plane.source.counters()["pods_watches"]
    api.restart_apiserver()
    kube.delete_pod(api.client(), ns, "old-0")
    _pod(kube_plane, ns, "new-0", node, "10.250.3.6")
    api.kubectl_run("apply", "-f", "-", stdin=_policy(ns, "after-restart", "DENY"))
    with relay_client(kube_plane.target, kube_plane.ca, node) as (_, rec):
        snap = rec.wait_for(
            lambda s: (
                f"{ns}/new-0" in s.workloads
                and f"{ns}/old-0" not in s.workloads
                and any(p.meta.name == "after-restart" for p in s.policies)
            ),
            SYNC_TIMEOUT,
        )
        assert snap is not None
    assert kube_plane.source.counters()["pods_watches"] > watches


def test_a_pod_appearing_at_an_address_a_node_missed_is_pushed_to_it(kube_plane: KubePlane) -> None:
    """A node that looked up an IP before its pod ran holds the miss in a 5 s negative cache; the plane
    remembers the miss and pushes the workload when it appears, so the first connection speaks HBONE."""
    api = kube_plane.api.client()
    ns = unique("ns")
    kube.ensure_namespace(api, ns, AMBIENT_LABELS)
    client_node, server_node = _node(kube_plane, "172.31.0.5"), _node(kube_plane, "172.31.0.6")
    with relay_client(kube_plane.target, kube_plane.ca, client_node) as (client, rec):
        assert rec.wait_for(lambda s: server_node in s.nodes, SYNC_TIMEOUT) is not None
        assert client.lookup("10.250.4.5") is None
        _pod(kube_plane, ns, "late-0", server_node, "10.250.4.5")
        snap = rec.wait_for(_has_workload(f"{ns}/late-0", "10.250.4.5"), SYNC_TIMEOUT)
        assert snap is not None and snap.workloads[f"{ns}/late-0"].node == server_node


class _Seen:
    def __init__(self) -> None:
        self.retained: list[set[str]] = []
        self.applied: list[str] = []

    def retain(self, rtype: ResourceType, names: set[str]) -> None:
        self.retained.append(names)

    def apply(self, rtype: ResourceType, event: str, obj: dict[str, object]) -> None:
        self.applied.append(event)


def test_a_type_whose_crd_is_not_installed_counts_as_listed_and_empty(kube_plane: KubePlane) -> None:
    """A cluster without (say) ambit's CRDs still gets a plane: the absent type is empty, not a hang."""
    seen = _Seen()
    reflector = Reflector(
        kube_plane.api.client(), ResourceType("Gadget", "gadgets.example.org/v1", "gadgets"), seen
    )
    reflector.start()
    try:
        assert reflector.synced.wait(SYNC_TIMEOUT)
        assert seen.retained == [set()] and seen.applied == []
    finally:
        reflector.stop()
