"""RelayClient applies responses whole or not at all; MeshSnapshot lookups."""

from __future__ import annotations

import json

import grpc
import pytest

from agent.relay.client import LookupFailed, RelayClient
from agent.state import MeshSnapshot
from api import relay_pb2
from mgmt.store import canonical_json, content_hash
from tests.relay_fixtures import workload_doc


def _resource(doc: dict, key: str | None = None, hash_: str | None = None) -> relay_pb2.Resource:
    data = canonical_json(doc)
    ns = doc["metadata"].get("namespace")
    key = key or (
        f"{doc['kind']}/{ns}/{doc['metadata']['name']}" if ns else f"{doc['kind']}/{doc['metadata']['name']}"
    )
    return relay_pb2.Resource(type=doc["kind"], key=key, hash=hash_ or content_hash(data), document=data)


def _response(version: int, resources: list[relay_pb2.Resource], removed: tuple[str, ...] = ()):  # type: ignore[no-untyped-def]
    deltas = {}
    for r in resources:
        deltas.setdefault(r.type, relay_pb2.TypeDelta(type=r.type)).resources.append(r)
    for k in removed:
        deltas.setdefault(k.split("/")[0], relay_pb2.TypeDelta(type=k.split("/")[0])).removed.append(k)
    return relay_pb2.SubscribeResponse(
        version=version, nonce=f"n{version}", trust_domain="cluster.local", deltas=list(deltas.values())
    )


def _client(seen: list[MeshSnapshot]) -> RelayClient:
    return RelayClient("127.0.0.1:1", "node-1", grpc.local_channel_credentials(), on_snapshot=seen.append)


NODE = {
    "apiVersion": "ambit.io/v1",
    "kind": "Node",
    "metadata": {"name": "node-2"},
    "spec": {"addresses": ["172.30.0.2"]},
}


def test_update_applies_whole_and_acks() -> None:
    seen: list[MeshSnapshot] = []
    client = _client(seen)
    reply = client._on_response(
        _response(3, [_resource(workload_doc("web-1", 1, "10.244.1.2")), _resource(NODE)])
    )
    assert reply.WhichOneof("request") == "ack" and reply.ack.nonce == "n3"
    snap = client.snapshot
    assert snap.version == 3 and seen == [snap]
    assert snap.workload_by_ip("10.244.1.2").uid == "demo/web-1"  # type: ignore[union-attr]
    assert [w.uid for w in snap.local_workloads()] == ["demo/web-1"]
    assert snap.node_address("node-2") == "172.30.0.2" and snap.node_address("node-9") is None
    assert snap.namespace_of(snap.workloads["demo/web-1"]) is None
    reply = client._on_response(_response(4, [], removed=("Workload/demo/web-1",)))
    assert reply.WhichOneof("request") == "ack"
    assert client.snapshot.workloads == {} and "node-2" in client.snapshot.nodes


def test_one_bad_resource_nacks_the_whole_update() -> None:
    seen: list[MeshSnapshot] = []
    client = _client(seen)
    client._on_response(_response(1, [_resource(workload_doc("web-1", 1, "10.244.1.2"))]))
    good = client.snapshot
    bad_doc = workload_doc("web-2", 1, "10.244.1.3")
    bad_doc["spec"]["ips"] = ["not-an-ip"]
    for broken in (
        _resource(bad_doc),
        _resource(workload_doc("web-3", 1, "10.244.1.4"), hash_="0" * 64),
        _resource(workload_doc("web-4", 1, "10.244.1.5"), key="Workload/demo/somebody-else"),
    ):
        reply = client._on_response(_response(2, [_resource(workload_doc("web-5", 1, "10.244.1.6")), broken]))
        assert reply.WhichOneof("request") == "nack"
        assert reply.nack.error and reply.nack.version == 2
        assert client.snapshot is good and client.version == 1
    assert seen == [good]
    # The next subscription states only what was ACKed.
    sub = client._subscribe_message()
    assert sub.resume_version == 1
    assert dict(sub.initial_resource_versions["Workload"].versions) == {
        "Workload/demo/web-1": content_hash(canonical_json(workload_doc("web-1", 1, "10.244.1.2")))
    }


def test_validate_rejection_is_the_nack_detail() -> None:
    def validate(snapshot: MeshSnapshot) -> None:
        raise ValueError("policy demo/x: bad rule")

    client = RelayClient("127.0.0.1:1", "node-1", grpc.local_channel_credentials(), lambda s: None, validate)
    reply = client._on_response(_response(1, [_resource(NODE)]))
    assert reply.nack.error == "policy demo/x: bad rule"
    assert client.version == 0


def test_lookup_while_the_plane_is_away_fails_and_is_not_cached_as_absent() -> None:
    """A failed lookup is not "nobody there": the caller must be able to fail closed (docs/proxy.md)."""
    client = _client([])
    assert not client.connected
    assert client.snapshot.workload_by_ip("10.244.9.9") is None
    for _ in range(2):  # the failure is not remembered as a negative answer
        with pytest.raises(LookupFailed, match="10.244.9.9"):
            client.lookup("10.244.9.9", timeout=0.2)
    assert client.counters()["lookup_errors"] == 2


def test_empty_snapshot_and_service_endpoints() -> None:
    assert MeshSnapshot().version == 0 and MeshSnapshot().workload_by_ip("10.0.0.1") is None
    svc = {
        "apiVersion": "v1",
        "kind": "Service",
        "metadata": {"name": "web", "namespace": "demo"},
        "spec": {"addresses": ["10.96.0.10"], "ports": [{"port": 80}], "selector": {"app": "web"}},
    }
    client = _client([])
    client._on_response(_response(1, [_resource(svc), _resource(workload_doc("web-1", 2, "10.244.2.2"))]))
    snap = client.snapshot
    service = snap.service_by_ip("10.96.0.10")
    assert service is not None and [w.uid for w in snap.service_endpoints(service)] == ["demo/web-1"]
    assert snap.local_workloads() == []
    assert json.loads(canonical_json({"b": 1, "a": 2})) == {"a": 2, "b": 1}
