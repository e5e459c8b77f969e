import ipaddress

import pytest

from agent.errors import UsageError
from agent.lab.plan import LabPlan, plan_lab


def test_default_lab_addresses_are_unique_and_inside_their_node_slice() -> None:
    plan = plan_lab(2, 2)
    pods = plan.pods()
    assert [p.name for p in pods] == ["pod-1-1", "pod-1-2", "pod-2-1", "pod-2-2"]
    assert len({p.ip for p in pods}) == 4
    for node in plan.nodes:
        for pod in node.pods:
            assert ipaddress.ip_address(pod.ip) in ipaddress.ip_network(node.pod_cidr)
    assert [n.ip for n in plan.nodes] == ["172.30.0.1", "172.30.0.2"]


def test_every_namespace_carries_the_prefix() -> None:
    plan = plan_lab(3, 4, prefix="zz-")
    assert all(n.startswith("zz-") for n in plan.netns_names())
    assert len(set(plan.netns_names())) == 1 + 3 + 12


def test_plan_round_trips_through_its_state_dict() -> None:
    plan = plan_lab(2, 3)
    assert LabPlan.from_dict(plan.to_dict()) == plan


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"nodes": 0, "pods_per_node": 2}, "nodes must be between"),
        ({"nodes": 2, "pods_per_node": -1}, "pods per node"),
        ({"nodes": 3, "pods_per_node": 1, "pod_cidr": "10.0.0.0/23"}, "overflows"),
        ({"nodes": 3, "pods_per_node": 1, "node_cidr": "172.30.0.0/30"}, "overflows"),
        ({"nodes": 1, "pods_per_node": 1, "pod_cidr": "10.0.0.0/25"}, "overflows"),
        ({"nodes": 1, "pods_per_node": 1, "pod_cidr": "not-a-cidr"}, "bad pod CIDR"),
        ({"nodes": 1, "pods_per_node": 1, "node_cidr": "10.244.0.0/24"}, "overlaps"),
        ({"nodes": 1, "pods_per_node": 1, "prefix": "bad prefix!"}, "bad prefix"),
    ],
)
def test_bad_arguments_are_usage_errors(kwargs: dict, message: str) -> None:
    with pytest.raises(UsageError, match=message):
        plan_lab(**kwargs)


def test_unknown_pod_names_the_known_ones() -> None:
    with pytest.raises(UsageError, match="pod-1-1"):
        plan_lab(1, 1).pod("pod-9-9")


def test_management_plane_address_is_on_the_node_network_and_free() -> None:
    plan = plan_lab(2, 1)
    assert plan.mgmt_ip == "172.30.0.254"
    assert plan.mgmt_ip not in {n.ip for n in plan.nodes}
    with pytest.raises(UsageError, match="management plane"):
        plan_lab(2, 1, node_cidr="172.30.0.0/30")
