"""Kubernetes objects -> ambit documents: which pods are workloads, named ports, nodes, no server state."""

from __future__ import annotations

from typing import Any

from mgmt.kube import translate
from mgmt.kube.events import QUEUE_SIZE, EventRecorder
from mgmt.store import StoredResource, stored


def _pod(phase: str = "Running", ip: str | None = "10.1.0.5", **spec: Any) -> dict[str, Any]:
    status: dict[str, Any] = {"phase": phase}
    if ip:
        status["podIPs"] = [{"ip": ip}]
    return {
        "metadata": {"name": "web-0", "namespace": "demo", "labels": {"app": "web"}, "uid": "u1"},
        "spec": {"nodeName": "n1", "serviceAccountName": "web",
                 "containers": [{"name": "c", "ports": [{"containerPort": 8080}, {"containerPort": 53,
                                                                                   "protocol": "UDP"}]}],
                 **spec},
        "status": status,
    }  # fmt: skip


def test_only_running_pods_with_an_ip_on_a_node_are_workloads() -> None:
    assert translate.workload(_pod("Pending")) is None
    assert translate.workload(_pod(ip=None)) is None
    assert translate.workload(_pod(hostNetwork=True)) is None
    assert translate.workload(_pod(nodeName=None)) is None
    doc = translate.workload(_pod())
    assert doc is not None
    res = stored(doc, "Pod demo/web-0")
    assert isinstance(res, StoredResource)
    w = res.obj
    assert (w.uid, w.node, w.service_account, w.ips, w.ports) == (
        "demo/web-0",
        "n1",
        "web",
        ("10.1.0.5",),
        (8080,),
    )


def test_legacy_pod_ip_and_default_service_account() -> None:
    pod = _pod(ip=None, serviceAccountName=None)
    pod["status"]["podIP"] = "10.1.0.9"
    doc = translate.workload(pod)
    assert (
        doc is not None and doc["spec"]["ips"] == ["10.1.0.9"] and doc["spec"]["serviceAccount"] == "default"
    )


def _svc(**spec: Any) -> dict[str, Any]:
    base = {"clusterIP": "10.96.0.7", "clusterIPs": ["10.96.0.7"], "selector": {"app": "web"},
            "ports": [{"name": "http", "port": 80, "targetPort": "web"}, {"name": "m", "port": 9090},
                      {"name": "dns", "port": 53, "protocol": "UDP"}]}  # fmt: skip
    return {"metadata": {"name": "web", "namespace": "demo"}, "spec": {**base, **spec}}


def test_named_target_port_resolves_through_endpointslices_most_common_wins() -> None:
    assert translate.service(_svc())["spec"]["ports"] == [{"port": 9090, "targetPort": 9090, "name": "m"}]  # type: ignore[index]
    slices = [{"http": 8080}, {"http": 8080}, {"http": 8081}]
    doc = translate.service(_svc(), slices)
    assert doc is not None
    assert doc["spec"]["ports"][0] == {"port": 80, "targetPort": 8080, "name": "http"}
    assert isinstance(stored(doc, "Service demo/web"), StoredResource)


def test_headless_and_external_name_services_are_not_meshed() -> None:
    assert translate.service(_svc(clusterIP="None", clusterIPs=["None"])) is None
    assert translate.service(_svc(type="ExternalName", externalName="example.org")) is None


def test_slice_ports_keep_tcp_only() -> None:
    es = {"ports": [{"name": "http", "port": 8080}, {"name": "dns", "port": 53, "protocol": "UDP"}]}
    assert translate.slice_ports(es) == {"http": 8080}


def test_node_uses_internal_ips_and_pod_cidrs() -> None:
    node = {"metadata": {"name": "n1", "labels": {"kubernetes.io/os": "linux"}},
            "spec": {"podCIDRs": ["10.1.0.0/24"]},
            "status": {"addresses": [{"type": "Hostname", "address": "n1"},
                                     {"type": "InternalIP", "address": "172.30.0.1"}]}}  # fmt: skip
    doc = translate.node(node)
    assert doc is not None
    res = stored(doc, "Node n1")
    assert isinstance(res, StoredResource)
    assert (res.obj.addresses, res.obj.pod_cidrs) == (("172.30.0.1",), ("10.1.0.0/24",))
    assert translate.node({"metadata": {"name": "n2"}, "status": {"addresses": []}}) is None


def test_policy_drops_server_state() -> None:
    obj = {"apiVersion": "security.istio.io/v1", "kind": "AuthorizationPolicy",
           "metadata": {"name": "p", "namespace": "demo", "uid": "x", "resourceVersion": "7",
                        "managedFields": [{}], "generation": 2,
                        "annotations": {"kubectl.kubernetes.io/last-applied-configuration": "{}"}},
           "spec": {"action": "DENY", "rules": [{}]}, "status": {"conditions": []}}  # fmt: skip
    doc = translate.policy(obj)
    assert doc is not None and doc["metadata"] == {"name": "p", "namespace": "demo"}
    assert set(doc) == {"apiVersion", "kind", "metadata", "spec"}


def test_event_queue_is_bounded_and_drops_are_counted() -> None:
    recorder = EventRecorder(api_client=None)  # not started: nothing drains the queue
    obj = {"apiVersion": "v1", "kind": "Pod", "metadata": {"name": "p", "namespace": "demo"}}
    for _ in range(QUEUE_SIZE + 10):
        recorder.invalid(obj, "bad")
    assert recorder.counters["events_dropped"] == 10
