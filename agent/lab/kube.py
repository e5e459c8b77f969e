"""What a kubelet and the controllers would write, done by hand on an API server that has neither.

The lab (`ambit lab up --kube`), the tests and the bench create Nodes, Namespaces, ServiceAccounts and Pods
bound to a node (`spec.nodeName`, so no scheduler is needed), then patch the Pod's status to what the
kubelet reports once the sandbox runs: `phase: Running`, `podIP(s)` (the lab pod's address), Ready. They
write a Service's EndpointSlice as the EndpointSlice controller would. Deletes use grace 0: no kubelet
will ever confirm a graceful termination.
"""

from __future__ import annotations

import datetime as dt
from collections.abc import Mapping, Sequence
from typing import Any

from kubernetes import client
from kubernetes.client.exceptions import ApiException

LAB_IMAGE = "ambit.invalid/lab-pod:none"  # never pulled: there is no kubelet
SERVICE_NAME_LABEL = "kubernetes.io/service-name"
MANAGED_BY_LABEL = "endpointslice.kubernetes.io/managed-by"


def _ignore_exists(call: Any, *args: Any, **kwargs: Any) -> None:
    try:
        call(*args, **kwargs)
    except ApiException as exc:
        if exc.status != 409:
            raise


def ensure_namespace(api: Any, name: str, labels: Mapping[str, str] | None = None) -> None:
    body = {"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": name, "labels": dict(labels or {})}}
    _ignore_exists(client.CoreV1Api(api).create_namespace, body)


def label_namespace(api: Any, name: str, labels: Mapping[str, str | None]) -> None:
    """Set (or with None remove) labels on a Namespace."""
    client.CoreV1Api(api).patch_namespace(name, {"metadata": {"labels": dict(labels)}})


def ensure_service_account(api: Any, namespace: str, name: str) -> None:
    body = {"apiVersion": "v1", "kind": "ServiceAccount", "metadata": {"name": name, "namespace": namespace}}
    _ignore_exists(client.CoreV1Api(api).create_namespaced_service_account, namespace, body)


def ensure_node(api: Any, name: str, address: str, pod_cidr: str = "") -> None:
    """A Node object as a kubelet registers it: InternalIP, and the podCIDR the node IPAM gave it."""
    core = client.CoreV1Api(api)
    spec: dict[str, Any] = {"podCIDR": pod_cidr, "podCIDRs": [pod_cidr]} if pod_cidr else {}
    body = {"apiVersion": "v1", "kind": "Node", "metadata": {"name": name}, "spec": spec}
    _ignore_exists(core.create_node, body)
    status = {
        "status": {
            "addresses": [{"type": "InternalIP", "address": address}, {"type": "Hostname", "address": name}]
        }
    }
    core.patch_node_status(name, status)


def pod_body(
    namespace: str,
    name: str,
    node: str,
    service_account: str = "default",
    labels: Mapping[str, str] | None = None,
    ports: Sequence[int] = (),
) -> dict[str, Any]:
    container: dict[str, Any] = {"name": "app", "image": LAB_IMAGE}
    if ports:
        container["ports"] = [{"name": f"p{p}", "containerPort": p, "protocol": "TCP"} for p in ports]
    return {
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {"name": name, "namespace": namespace, "labels": dict(labels or {})},
        "spec": {
            "nodeName": node,
            "serviceAccountName": service_account,
            "automountServiceAccountToken": False,
            "containers": [container],
        },
    }


def running_status(ip: str, host_ip: str = "") -> dict[str, Any]:
    now = dt.datetime.now(dt.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")
    status: dict[str, Any] = {
        "phase": "Running",
        "podIP": ip,
        "podIPs": [{"ip": ip}],
        "startTime": now,
        "conditions": [{"type": "Ready", "status": "True", "lastTransitionTime": now}],
        "containerStatuses": [
            {
                "name": "app",
                "ready": True,
                "started": True,
                "restartCount": 0,
                "image": LAB_IMAGE,
                "imageID": "",
                "state": {"running": {"startedAt": now}},
            }
        ],
    }
    if host_ip:
        status["hostIP"] = host_ip
        status["hostIPs"] = [{"ip": host_ip}]
    return {"status": status}


def run_pod(api: Any, body: Mapping[str, Any], ip: str, host_ip: str = "") -> None:
    """Create the Pod (bound to its node) and report it running at `ip`, as its kubelet would."""
    core = client.CoreV1Api(api)
    md = body["metadata"]
    _ignore_exists(core.create_namespaced_pod, md["namespace"], dict(body))
    core.patch_namespaced_pod_status(md["name"], md["namespace"], running_status(ip, host_ip))


def delete_pod(api: Any, namespace: str, name: str) -> None:
    try:
        client.CoreV1Api(api).delete_namespaced_pod(name, namespace, grace_period_seconds=0)
    except ApiException as exc:
        if exc.status != 404:
            raise


def service_body(
    namespace: str,
    name: str,
    cluster_ip: str,
    ports: Sequence[tuple[int, int | str]],
    selector: Mapping[str, str],
) -> dict[str, Any]:
    """`ports`: (port, targetPort); a str targetPort names a container port."""
    return {
        "apiVersion": "v1",
        "kind": "Service",
        "metadata": {"name": name, "namespace": namespace},
        "spec": {
            "clusterIP": cluster_ip,
            "selector": dict(selector),
            "ports": [{"name": f"port-{p}", "port": p, "targetPort": t, "protocol": "TCP"} for p, t in ports],
        },
    }


def endpoint_slice_body(
    namespace: str, service: str, ports: Mapping[int, int], addresses: Sequence[str], suffix: str = "1"
) -> dict[str, Any]:
    """The EndpointSlice the controller would write: `ports` maps each Service port to its resolved number."""
    return {
        "apiVersion": "discovery.k8s.io/v1",
        "kind": "EndpointSlice",
        "metadata": {
            "name": f"{service}-{suffix}",
            "namespace": namespace,
            "labels": {SERVICE_NAME_LABEL: service, MANAGED_BY_LABEL: "ambit-lab"},
        },
        "addressType": "IPv4",
        "ports": [{"name": f"port-{p}", "port": t, "protocol": "TCP"} for p, t in ports.items()],
        "endpoints": [{"addresses": [a], "conditions": {"ready": True}} for a in addresses],
    }


def create(api: Any, body: Mapping[str, Any]) -> None:
    """Create a Service or EndpointSlice (409 if it exists is fine: callers make unique names)."""
    ns = body["metadata"]["namespace"]
    if body["kind"] == "Service":
        _ignore_exists(client.CoreV1Api(api).create_namespaced_service, ns, dict(body))
    else:
        _ignore_exists(client.DiscoveryV1Api(api).create_namespaced_endpoint_slice, ns, dict(body))
