"""Workload, Namespace and Service: where pods run, who they are, and whether the mesh captures them.

Enrolment follows Istio ambient (its CNI's rule): `ambient` on the pod's Namespace or on the Workload itself
enrols it; `none` on the Workload opts it out, whatever its Namespace says. Istio's label
`istio.io/dataplane-mode` and ambit's `ambit.io/dataplane-mode` are read alike; when one object carries both
with different values, `none` wins (the owner asked not to be captured). Other values mean "not set".
"""

from __future__ import annotations

import ipaddress
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

from api.resources import Meta, ResourceError, register
from api.spiffe import SpiffeId, SpiffeIdError

API_VERSION = "ambit.io/v1"
DATAPLANE_LABEL = "ambit.io/dataplane-mode"
ISTIO_DATAPLANE_LABEL = "istio.io/dataplane-mode"
DATAPLANE_LABELS = (DATAPLANE_LABEL, ISTIO_DATAPLANE_LABEL)
AMBIENT = "ambient"
OPT_OUT = "none"


def dataplane_mode(labels: Mapping[str, str]) -> str | None:
    """AMBIENT, OPT_OUT or None (not set) from either dataplane-mode label; OPT_OUT wins a conflict."""
    values = {labels.get(name) for name in DATAPLANE_LABELS}
    if OPT_OUT in values:
        return OPT_OUT
    return AMBIENT if AMBIENT in values else None


def _check_fields(spec: Mapping[str, Any], allowed: set[str]) -> None:
    unknown = set(spec) - allowed
    if unknown:
        raise ResourceError(f"unknown spec field(s): {', '.join(sorted(unknown))}")


def _str(spec: Mapping[str, Any], name: str, required: bool = True, default: str = "") -> str:
    value = spec.get(name, None)
    if value is None:
        if required:
            raise ResourceError(f"spec.{name} is required")
        return default
    if not isinstance(value, str) or not value:
        raise ResourceError(f"spec.{name} must be a non-empty string")
    return value


def _ips(raw: Any, name: str) -> tuple[str, ...]:
    return _parsed_list(raw, name, ipaddress.ip_address, "an IP address", "IP addresses")


def _cidrs(raw: Any, name: str) -> tuple[str, ...]:
    # ip_network is strict: host bits set (10.244.1.1/24) is a typo, not a range.
    return _parsed_list(raw, name, ipaddress.ip_network, "a CIDR block", "CIDR blocks")


def _parsed_list(raw: Any, name: str, parse: Callable[[Any], object], one: str, many: str) -> tuple[str, ...]:
    """spec.<name>: a list of values `parse` accepts, normalized to their text (None: empty)."""
    if raw is None:
        return ()
    if not isinstance(raw, list):
        raise ResourceError(f"spec.{name} must be a list of {many}")
    out = []
    for item in raw:
        try:
            out.append(str(parse(item)))
        except (ValueError, TypeError):
            raise ResourceError(f"spec.{name}: {item!r} is not {one}") from None
    return tuple(out)


def _port(value: Any, where: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or not 1 <= value <= 65535:
        raise ResourceError(f"{where}: {value!r} is not a port number (1-65535)")
    return value


def _str_map(raw: Any, name: str) -> dict[str, str]:
    if raw is None:
        return {}
    if not isinstance(raw, dict) or not all(
        isinstance(k, str) and isinstance(v, str) for k, v in raw.items()
    ):
        raise ResourceError(f"spec.{name} must be a map of strings")
    return dict(raw)


@dataclass(frozen=True)
class Namespace:
    meta: Meta
    kind: str = "Namespace"

    @property
    def ambient(self) -> bool:
        return dataplane_mode(self.meta.labels) == AMBIENT


@register("Namespace", {API_VERSION, "v1"}, namespaced=False)
def _parse_namespace(meta: Meta, spec: Mapping[str, Any]) -> Namespace:
    _check_fields(spec, set())
    return Namespace(meta)


@dataclass(frozen=True)
class Workload:
    """One pod (or VM) the mesh knows: identity, placement and addresses."""

    meta: Meta
    service_account: str
    node: str
    ips: tuple[str, ...]
    ports: tuple[int, ...] = ()
    kind: str = "Workload"

    @property
    def uid(self) -> str:
        return f"{self.meta.namespace}/{self.meta.name}"

    @property
    def namespace(self) -> str:
        return self.meta.namespace

    @property
    def name(self) -> str:
        return self.meta.name

    @property
    def labels(self) -> Mapping[str, str]:
        return self.meta.labels

    def spiffe_id(self, trust_domain: str) -> SpiffeId:
        return SpiffeId.workload(trust_domain, self.meta.namespace, self.service_account)

    def enrolled(self, namespace: Namespace | None) -> bool:
        """Whether the mesh captures this workload's traffic, given its Namespace (None if not declared)."""
        own = dataplane_mode(self.meta.labels)
        if own is not None:
            return own == AMBIENT
        return namespace is not None and namespace.ambient


@register("Workload", {API_VERSION})
def _parse_workload(meta: Meta, spec: Mapping[str, Any]) -> Workload:
    _check_fields(spec, {"serviceAccount", "node", "ips", "ports"})
    sa = _str(spec, "serviceAccount", required=False, default="default")
    try:
        SpiffeId.workload("check.local", meta.namespace, sa)
    except SpiffeIdError:
        raise ResourceError(f"spec.serviceAccount {sa!r} cannot form a SPIFFE ID") from None
    ips = _ips(spec.get("ips"), "ips")
    if not ips:
        raise ResourceError("spec.ips must list at least one IP address")
    raw_ports = spec.get("ports") or []
    if not isinstance(raw_ports, list):
        raise ResourceError("spec.ports must be a list of port numbers")
    ports = tuple(_port(p, "spec.ports") for p in raw_ports)
    return Workload(meta, sa, _str(spec, "node"), ips, ports)


@dataclass(frozen=True)
class ServicePort:
    port: int
    target_port: int
    name: str = ""


@dataclass(frozen=True)
class Service:
    """A virtual address in front of the workloads whose labels match `selector`."""

    meta: Meta
    addresses: tuple[str, ...]
    ports: tuple[ServicePort, ...]
    selector: Mapping[str, str] = field(default_factory=dict)
    kind: str = "Service"

    @property
    def uid(self) -> str:
        return f"{self.meta.namespace}/{self.meta.name}"

    def selects(self, workload: Workload) -> bool:
        return (
            bool(self.selector)
            and workload.namespace == self.meta.namespace
            and all(workload.labels.get(k) == v for k, v in self.selector.items())
        )


def _service_ports(raw: Any) -> tuple[ServicePort, ...]:
    if not isinstance(raw, list) or not raw:
        raise ResourceError("spec.ports must be a non-empty list")
    out = []
    for i, item in enumerate(raw):
        if not isinstance(item, dict):
            raise ResourceError(f"spec.ports[{i}] must be a mapping")
        unknown = set(item) - {"port", "targetPort", "name"}
        if unknown:
            raise ResourceError(f"spec.ports[{i}]: unknown field(s): {', '.join(sorted(unknown))}")
        port = _port(item.get("port"), f"spec.ports[{i}].port")
        target = _port(item.get("targetPort", port), f"spec.ports[{i}].targetPort")
        name = item.get("name", "")
        if not isinstance(name, str):
            raise ResourceError(f"spec.ports[{i}].name must be a string")
        out.append(ServicePort(port, target, name))
    return tuple(out)


@register("Service", {API_VERSION, "v1"})
def _parse_service(meta: Meta, spec: Mapping[str, Any]) -> Service:
    _check_fields(spec, {"addresses", "ports", "selector"})
    addresses = _ips(spec.get("addresses"), "addresses")
    if not addresses:
        raise ResourceError("spec.addresses must list at least one IP address")
    return Service(
        meta, addresses, _service_ports(spec.get("ports")), _str_map(spec.get("selector"), "selector")
    )


@dataclass(frozen=True)
class Node:
    """A mesh node: where its agent accepts HBONE (port 15008 on the first address), and the pod ranges it
    hands out (Kubernetes `spec.podCIDRs`): an address in them is a mesh pod even when nobody knows it yet."""

    meta: Meta
    addresses: tuple[str, ...]
    pod_cidrs: tuple[str, ...] = ()
    kind: str = "Node"

    @property
    def name(self) -> str:
        return self.meta.name


@register("Node", {API_VERSION, "v1"}, namespaced=False)
def _parse_node(meta: Meta, spec: Mapping[str, Any]) -> Node:
    _check_fields(spec, {"addresses", "podCIDRs"})
    addresses = _ips(spec.get("addresses"), "addresses")
    if not addresses:
        raise ResourceError("spec.addresses must list at least one IP address")
    return Node(meta, addresses, _cidrs(spec.get("podCIDRs"), "podCIDRs"))


@dataclass(frozen=True)
class ServiceCIDR:
    """Ranges Service addresses are allocated from (Kubernetes `networking.k8s.io/v1` ServiceCIDR)."""

    meta: Meta
    cidrs: tuple[str, ...]
    kind: str = "ServiceCIDR"


@register("ServiceCIDR", {API_VERSION, "networking.k8s.io/v1"}, namespaced=False)
def _parse_service_cidr(meta: Meta, spec: Mapping[str, Any]) -> ServiceCIDR:
    _check_fields(spec, {"cidrs"})
    cidrs = _cidrs(spec.get("cidrs"), "cidrs")
    if not cidrs:
        raise ResourceError("spec.cidrs must list at least one CIDR block")
    return ServiceCIDR(meta, cidrs)
