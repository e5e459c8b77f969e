"""Istio's TCP labels from a connection record and the node's snapshot: canonical names, services."""

from __future__ import annotations

from agent.connections import ConnectionRecord, Direction
from agent.observe.metrics import ISTIO_LABELS, istio_labels
from agent.state import MeshSnapshot
from api.resources import Meta
from api.resources.workload import Service, ServicePort, Workload


def _workload(name: str, ip: str, **labels: str) -> Workload:
    return Workload(Meta(name, "shop", labels), name, "node-1", (ip,))


SNAPSHOT = MeshSnapshot.from_objects(
    3,
    "cluster.local",
    "node-1",
    [
        _workload("web-7f9", "10.0.0.1", app="web", version="v2"),
        _workload(
            "db-0",
            "10.0.0.2",
            **{
                "app": "ignored",
                "app.kubernetes.io/name": "postgres",
                "service.istio.io/canonical-revision": "16",
            },
        ),
        _workload("bare", "10.0.0.3"),
        Service(
            Meta("db", "shop"),
            ("10.96.0.5",),
            (ServicePort(5432, 5432),),
            {"app.kubernetes.io/name": "postgres"},
        ),
        Service(Meta("db-vip", "shop"), ("10.96.0.6",), (ServicePort(5432, 5432),), {}),
    ],
)


def _record(dst_ip: str, dst_uid: str = "", direction: Direction = Direction.OUTBOUND) -> ConnectionRecord:
    return ConnectionRecord(
        1,
        direction,
        "10.0.0.1",
        40000,
        dst_ip,
        5432,
        source_workload="shop/web-7f9",
        destination_workload=dst_uid,
    )


def test_canonical_names_follow_istios_label_precedence() -> None:
    labels = istio_labels(_record("10.0.0.2", "shop/db-0"), snapshot=SNAPSHOT)
    assert list(labels) == list(ISTIO_LABELS)
    assert (labels["source_canonical_service"], labels["source_canonical_revision"]) == ("web", "v2")
    assert (labels["source_app"], labels["source_version"], labels["source_cluster"]) == (
        "web",
        "v2",
        "Kubernetes",
    )
    # app.kubernetes.io/name outranks app; the Istio revision label outranks the rest.
    assert (labels["destination_canonical_service"], labels["destination_canonical_revision"]) == (
        "postgres",
        "16",
    )
    assert labels["reporter"] == "source" and labels["request_protocol"] == "tcp"


def test_unlabelled_workload_is_its_own_name_at_latest() -> None:
    labels = istio_labels(_record("10.0.0.3", "shop/bare"), snapshot=SNAPSHOT)
    assert (labels["destination_canonical_service"], labels["destination_canonical_revision"]) == (
        "bare",
        "latest",
    )
    assert labels["destination_service"] == "unknown"


def test_destination_service_dialled_vip_first_then_selector() -> None:
    by_vip = istio_labels(_record("10.96.0.6", "shop/db-0"), snapshot=SNAPSHOT)
    assert by_vip["destination_service"] == "db-vip.shop.svc.cluster.local"
    by_selector = istio_labels(_record("10.0.0.2", "shop/db-0"), snapshot=SNAPSHOT)
    assert (by_selector["destination_service_name"], by_selector["destination_service_namespace"]) == (
        "db",
        "shop",
    )


def test_unknown_peer_is_named_by_its_verified_identity() -> None:
    record = ConnectionRecord(
        2,
        Direction.INBOUND,
        "10.9.9.9",
        0,
        "10.0.0.2",
        5432,
        source_principal="spiffe://cluster.local/ns/billing/sa/worker",
        destination_workload="shop/db-0",
    )
    labels = istio_labels(record, snapshot=SNAPSHOT)
    assert labels["reporter"] == "destination"
    assert (labels["source_workload"], labels["source_workload_namespace"]) == ("unknown", "billing")
    assert labels["source_canonical_service"] == "unknown" and labels["source_cluster"] == "unknown"
