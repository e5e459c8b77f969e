"""Relay security: mTLS only, node identity from the certificate, out-of-scope requests refused + audited."""

from __future__ import annotations

import logging

import grpc
import pytest

from api import relay_pb2, relay_pb2_grpc
from api.spiffe import SpiffeId
from mgmt.ca import CertificateAuthority
from mgmt.server import SERVER_NAME, issue_key_and_chain, node_channel_credentials
from tests.forge import forged_leaf
from tests.relay_fixtures import TD, Plane

OPTIONS = [("grpc.ssl_target_name_override", SERVER_NAME)]


def _stub(plane: Plane, creds: grpc.ChannelCredentials) -> tuple[grpc.Channel, relay_pb2_grpc.RelayStub]:
    channel = grpc.secure_channel(plane.target, creds, options=OPTIONS)
    return channel, relay_pb2_grpc.RelayStub(channel)


def _subscribe(stub: relay_pb2_grpc.RelayStub, node: str, types: list[str]) -> relay_pb2.SubscribeResponse:
    request = relay_pb2.SubscribeRequest(subscribe=relay_pb2.Subscribe(node=node, types=types))
    call = stub.Subscribe(iter([request]), timeout=10)
    return next(call)


def _audits(caplog: pytest.LogCaptureFixture) -> list[logging.LogRecord]:
    return [r for r in caplog.records if r.name == "ambit.audit"]


def test_subscribing_as_another_node_is_refused_and_audited(
    plane: Plane, ca: CertificateAuthority, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="ambit.audit")
    channel, stub = _stub(plane, node_channel_credentials(ca, "node-1"))
    with channel, pytest.raises(grpc.RpcError) as err:
        _subscribe(stub, "node-2", ["Workload"])
    assert err.value.code() == grpc.StatusCode.PERMISSION_DENIED
    assert "may not ask as node 'node-2'" in (err.value.details() or "")
    [record] = _audits(caplog)
    assert (record.node, record.requested_node, record.method) == ("node-1", "node-2", "Subscribe")  # type: ignore[attr-defined]
    assert plane.server.relay.counters()["refused"] == 1


def test_lookup_as_another_node_is_refused(
    plane: Plane, ca: CertificateAuthority, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="ambit.audit")
    channel, stub = _stub(plane, node_channel_credentials(ca, "node-1"))
    with channel, pytest.raises(grpc.RpcError) as err:
        stub.Lookup(relay_pb2.LookupRequest(node="node-2", address="10.244.2.2"), timeout=10)
    assert err.value.code() == grpc.StatusCode.PERMISSION_DENIED
    assert [r.method for r in _audits(caplog)] == ["Lookup"]  # type: ignore[attr-defined]


def test_workload_certificate_is_not_a_node(plane: Plane, ca: CertificateAuthority) -> None:
    key, chain = issue_key_and_chain(ca, SpiffeId.workload(TD, "demo", "web"))
    channel, stub = _stub(plane, grpc.ssl_channel_credentials(ca.bundle_pem(), key, chain))
    with channel, pytest.raises(grpc.RpcError) as err:
        _subscribe(stub, "node-1", ["Workload"])
    assert err.value.code() == grpc.StatusCode.PERMISSION_DENIED


def test_no_client_certificate_or_foreign_ca_never_gets_in(plane: Plane, ca: CertificateAuthority) -> None:
    foreign = CertificateAuthority.generate_root(TD)
    key, chain = issue_key_and_chain(foreign, SpiffeId.node(TD, "node-1"))
    for creds in (
        grpc.ssl_channel_credentials(ca.bundle_pem()),
        grpc.ssl_channel_credentials(ca.bundle_pem(), key, chain),
    ):
        channel, stub = _stub(plane, creds)
        with channel, pytest.raises(grpc.RpcError) as err:
            _subscribe(stub, "node-1", ["Workload"])
        assert err.value.code() == grpc.StatusCode.UNAVAILABLE
    assert plane.server.relay.counters()["streams"] == 0


def test_only_subscribed_types_are_pushed(plane: Plane, ca: CertificateAuthority) -> None:
    channel, stub = _stub(plane, node_channel_credentials(ca, "node-1"))
    with channel:
        response = _subscribe(stub, "node-1", ["Node"])
    assert [d.type for d in response.deltas] == ["Node"]
    assert sorted(r.key for r in response.deltas[0].resources) == ["Node/node-1", "Node/node-2"]
    assert response.version == plane.store.version and response.nonce


def test_a_node_absent_from_config_gets_nothing(
    plane: Plane, ca: CertificateAuthority, caplog: pytest.LogCaptureFixture
) -> None:
    """A valid node certificate of a node the config does not list (removed, or never added)."""
    caplog.set_level(logging.INFO, logger="ambit.audit")
    channel, stub = _stub(plane, node_channel_credentials(ca, "node-77"))
    with channel:
        with pytest.raises(grpc.RpcError) as err:
            _subscribe(stub, "node-77", ["Node", "Service"])
        assert err.value.code() == grpc.StatusCode.PERMISSION_DENIED
        assert "not in the config" in (err.value.details() or "")
        with pytest.raises(grpc.RpcError) as err:
            stub.Lookup(relay_pb2.LookupRequest(node="node-77", address="10.244.2.2"), timeout=10)
        assert err.value.code() == grpc.StatusCode.PERMISSION_DENIED
    audited = [(r.method, r.node) for r in _audits(caplog)]  # type: ignore[attr-defined]
    assert audited == [("Subscribe", "node-77"), ("Lookup", "node-77")]
    assert plane.server.relay.counters()["streams"] == 0


@pytest.mark.parametrize(
    ("uri", "is_ca", "why"),
    [
        (f"spiffe://{TD}/node/node-1", True, "no client certificate with an end-entity SPIFFE ID"),
        ("spiffe://evil.example/node/node-1", False, "is not a node identity of"),
    ],
    ids=["ca-true", "foreign-domain"],
)
def test_a_ca_certificate_or_another_domain_is_no_client_identity(
    plane: Plane, ca: CertificateAuthority, caplog: pytest.LogCaptureFixture, uri: str, is_ca: bool, why: str
) -> None:
    """Signed by our root: CA:true with a node's URI (gRPC's path validation takes it as a leaf; we do not),
    or a node name in another trust domain. Refused with a clear status, and audited."""
    caplog.set_level(logging.INFO, logger="ambit.audit")
    chain, key = forged_leaf(ca, uri, is_ca=is_ca)
    channel, stub = _stub(plane, grpc.ssl_channel_credentials(ca.bundle_pem(), key, chain))
    with channel, pytest.raises(grpc.RpcError) as err:
        _subscribe(stub, "node-1", ["Node"])
    assert err.value.code() == grpc.StatusCode.PERMISSION_DENIED
    assert why in (err.value.details() or "")
    assert [r.reason for r in _audits(caplog)] == [err.value.details()]  # type: ignore[attr-defined]
    assert plane.server.relay.counters()["streams"] == 0
