"""Kubernetes objects -> the ambit documents the file source reads (same kinds, same parser, same hashes).

A Pod becomes a `Workload` only while it runs with an IP on a node: `status.phase: Running`, `status.podIPs`
(or `status.podIP`), `spec.nodeName`, not `hostNetwork` (a host-network pod has the node's address, not an
identity of its own, as in Istio ambient). A Service becomes a `Service` when it has a cluster IP: its TCP
ports, and each named `targetPort` resolved through the Service's EndpointSlices (the EndpointSlice
controller's resolution against the pods' container ports; with several numbers for one name, the most
common wins). Nodes give their InternalIP addresses and podCIDRs; Namespaces their labels. Policy kinds
(Istio's AuthorizationPolicy and PeerAuthentication, ambit's RegoPolicy and MeshConfig) and the Gateway API
kinds (Gateway, HTTPRoute, ambit's WafPolicy) are the object itself, minus server state (mgmt/documents).
A kubernetes.io/tls Secret keeps its certificate and key only; a ServiceCIDR its ranges.

`None` means "not (yet) part of the mesh" (a pending pod, a headless Service), which is not an error.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterable, Mapping
from typing import Any

from mgmt.documents import normalized

AMBIT_API = "ambit.io/v1"
SERVICE_NAME_LABEL = "kubernetes.io/service-name"  # set on every EndpointSlice of a Service


def _meta(obj: Mapping[str, Any], namespaced: bool = True) -> dict[str, Any]:
    md = obj.get("metadata") or {}
    out: dict[str, Any] = {"name": md.get("name")}
    if namespaced:
        out["namespace"] = md.get("namespace")
    labels = md.get("labels")
    if labels:
        out["labels"] = dict(labels)
    return out


def pod_ips(pod: Mapping[str, Any]) -> list[str]:
    status = pod.get("status") or {}
    ips = [str(p["ip"]) for p in status.get("podIPs") or () if isinstance(p, Mapping) and p.get("ip")]
    if not ips and status.get("podIP"):
        ips = [str(status["podIP"])]
    return ips


def workload(pod: Mapping[str, Any]) -> dict[str, Any] | None:
    spec, status = pod.get("spec") or {}, pod.get("status") or {}
    ips = pod_ips(pod)
    if status.get("phase") != "Running" or not ips or not spec.get("nodeName") or spec.get("hostNetwork"):
        return None
    ports = sorted(
        {
            p["containerPort"]
            for c in spec.get("containers") or ()
            for p in c.get("ports") or ()
            if p.get("protocol", "TCP") == "TCP" and isinstance(p.get("containerPort"), int)
        }
    )
    doc_spec: dict[str, Any] = {
        "serviceAccount": spec.get("serviceAccountName") or "default",
        "node": spec["nodeName"],
        "ips": ips,
    }
    if ports:
        doc_spec["ports"] = ports
    return {"apiVersion": AMBIT_API, "kind": "Workload", "metadata": _meta(pod), "spec": doc_spec}


def namespace(ns: Mapping[str, Any]) -> dict[str, Any]:
    return {"apiVersion": "v1", "kind": "Namespace", "metadata": _meta(ns, namespaced=False)}


def node(n: Mapping[str, Any]) -> dict[str, Any] | None:
    status, spec = n.get("status") or {}, n.get("spec") or {}
    addresses = [a.get("address") for a in status.get("addresses") or () if a.get("type") == "InternalIP"]
    if not addresses:
        return None
    md = _meta(n, namespaced=False)
    md.pop("labels", None)  # dozens of node labels, none of which the mesh reads
    doc_spec: dict[str, Any] = {"addresses": addresses}
    cidrs = spec.get("podCIDRs") or ([spec["podCIDR"]] if spec.get("podCIDR") else [])
    if cidrs:
        doc_spec["podCIDRs"] = list(cidrs)
    return {"apiVersion": "v1", "kind": "Node", "metadata": md, "spec": doc_spec}


def slice_ports(endpoint_slice: Mapping[str, Any]) -> dict[str, int]:
    """The EndpointSlice's resolved port numbers by Service port name (TCP only)."""
    return {
        str(p.get("name") or ""): p["port"]
        for p in endpoint_slice.get("ports") or ()
        if p.get("protocol", "TCP") == "TCP" and isinstance(p.get("port"), int)
    }


def service(svc: Mapping[str, Any], slices: Iterable[Mapping[str, int]] = ()) -> dict[str, Any] | None:
    """`slices`: slice_ports() of each EndpointSlice of this Service."""
    spec = svc.get("spec") or {}
    if spec.get("type") == "ExternalName":
        return None
    addresses = [ip for ip in spec.get("clusterIPs") or [spec.get("clusterIP")] if ip and ip != "None"]
    if not addresses:
        return None
    slices = list(slices)
    ports = []
    for p in spec.get("ports") or ():
        if p.get("protocol", "TCP") != "TCP":
            continue
        target = p.get("targetPort", p.get("port"))
        if isinstance(target, str) and not target.isdigit():
            target = _resolve(str(p.get("name") or ""), slices)
            if target is None:
                continue  # no endpoint resolved the name yet: the port is not reachable through the VIP
        entry: dict[str, Any] = {"port": p.get("port"), "targetPort": int(target)}
        if p.get("name"):
            entry["name"] = p["name"]
        ports.append(entry)
    if not ports:
        return None
    doc_spec: dict[str, Any] = {"addresses": addresses, "ports": ports}
    if spec.get("selector"):
        doc_spec["selector"] = dict(spec["selector"])
    return {"apiVersion": "v1", "kind": "Service", "metadata": _meta(svc), "spec": doc_spec}


def _resolve(port_name: str, slices: list[Mapping[str, int]]) -> int | None:
    numbers = Counter(s[port_name] for s in slices if port_name in s)
    return min(numbers, key=lambda n: (-numbers[n], n)) if numbers else None


def policy(obj: Mapping[str, Any]) -> dict[str, Any]:
    """A policy CRD object as its document (the Istio YAML a user applied, minus server state)."""
    doc: dict[str, Any] = normalized(dict(obj))
    return doc


def service_cidr(obj: Mapping[str, Any]) -> dict[str, Any]:
    """A ServiceCIDR (networking.k8s.io/v1, cluster-scoped): its ranges. One being deleted stays until it
    is gone: its addresses may still be allocated, and a range too many only refuses more (fail closed)."""
    spec = obj.get("spec") or {}
    return {
        "apiVersion": "networking.k8s.io/v1",
        "kind": "ServiceCIDR",
        "metadata": {"name": (obj.get("metadata") or {}).get("name")},
        "spec": {"cidrs": list(spec.get("cidrs") or ())},
    }


TLS_SECRET_TYPE = "kubernetes.io/tls"
TLS_KEYS = ("tls.crt", "tls.key")


def tls_secret(obj: Mapping[str, Any]) -> dict[str, Any] | None:
    """A kubernetes.io/tls Secret as the store holds it (api/resources/gateway_api: core v1 shape, `type`
    and `data` beside metadata): the certificate chain and key only, base64 as the API serves them; other
    keys (ca.crt, ...) are not kept. None for any other type: the gateway holds certificates, nothing else."""
    if obj.get("type") != TLS_SECRET_TYPE:
        return None
    data = obj.get("data") or {}
    kept = {k: data[k] for k in TLS_KEYS if isinstance(data, Mapping) and k in data}
    return {
        "apiVersion": "v1",
        "kind": "Secret",
        "metadata": _meta(obj),
        "type": TLS_SECRET_TYPE,
        "data": kept,
    }


def from_kubernetes(raw: Any) -> tuple[bool, dict[str, Any] | None]:
    """For the file source: (True, document or None) when `raw` is a core Kubernetes object in its own
    shape (`kubectl get pods,services,nodes -o yaml`), translated as the Kubernetes source would;
    (False, None) for anything else (ambit's own forms, which parse as they are). Named targetPorts need
    EndpointSlices, which a file does not carry: those ports are left out."""
    if not isinstance(raw, Mapping) or raw.get("apiVersion") != "v1":
        return False, None
    kind, spec = raw.get("kind"), raw.get("spec") or {}
    if kind == "Pod":
        return True, workload(raw)
    if kind == "Service" and isinstance(spec, Mapping) and "addresses" not in spec:
        return True, service(raw)
    if kind == "Node" and isinstance(spec, Mapping) and "addresses" not in spec:
        return True, node(raw)
    return False, None
