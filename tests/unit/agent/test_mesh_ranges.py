"""Mesh address ranges: Nodes' pod CIDRs and ServiceCIDRs, what the proxy uses to fail closed."""

from __future__ import annotations

import pytest

from agent.state import MeshSnapshot
from api.resources import ResourceError, load_kinds, parse

load_kinds()


def _node(name: str, spec: dict[str, object]) -> object:
    return parse({"apiVersion": "v1", "kind": "Node", "metadata": {"name": name}, "spec": spec})


def test_pod_and_service_cidrs_make_the_mesh_ranges() -> None:
    node = _node("node-1", {"addresses": ["172.30.0.1"], "podCIDRs": ["10.244.1.0/24", "fd00:1::/64"]})
    services = parse(
        {"apiVersion": "networking.k8s.io/v1", "kind": "ServiceCIDR", "metadata": {"name": "kubernetes"},
         "spec": {"cidrs": ["10.96.0.0/16"]}}
    )  # fmt: skip
    snap = MeshSnapshot.from_objects(1, "td", "node-1", [node, services])
    assert not snap.policies  # ServiceCIDR is mesh structure, not a policy
    assert snap.in_mesh_range("10.244.1.77") and snap.in_mesh_range("10.96.3.4")
    assert snap.in_mesh_range("fd00:1::9")
    assert not snap.in_mesh_range("10.244.2.1") and not snap.in_mesh_range("192.0.2.1")
    assert not snap.in_mesh_range("not-an-ip")
    assert not MeshSnapshot().in_mesh_range("10.244.1.77")


@pytest.mark.parametrize(
    ("spec", "error"),
    [
        ({"addresses": ["172.30.0.1"], "podCIDRs": ["10.244.1.1/24"]}, "is not a CIDR block"),
        ({"addresses": ["172.30.0.1"], "podCIDRs": "10.244.1.0/24"}, "must be a list"),
    ],
)
def test_bad_pod_cidrs_are_errors(spec: dict[str, object], error: str) -> None:
    with pytest.raises(ResourceError, match=error):
        _node("node-1", spec)


def test_service_cidr_needs_cidrs() -> None:
    with pytest.raises(ResourceError, match="at least one"):
        parse({"apiVersion": "ambit.io/v1", "kind": "ServiceCIDR", "metadata": {"name": "s"}, "spec": {}})
