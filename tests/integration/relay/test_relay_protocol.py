"""Relay protocol edges with a raw stub: ordering, stale ACKs, changing subscriptions, bad first request."""

from __future__ import annotations

import queue
from collections.abc import Iterator

import grpc
import pytest

from api import relay_pb2, relay_pb2_grpc
from mgmt.ca import CertificateAuthority
from mgmt.server import SERVER_NAME, node_channel_credentials
from tests.relay_fixtures import Plane, wait_until

TIMEOUT = 15.0


class RawStream:
    """A Subscribe stream driven by hand: send requests, read responses one at a time."""

    def __init__(self, plane: Plane, ca: CertificateAuthority, node: str) -> None:
        self.channel = grpc.secure_channel(
            plane.target,
            node_channel_credentials(ca, node),
            options=[("grpc.ssl_target_name_override", SERVER_NAME)],
        )
        self.outbox: queue.Queue[relay_pb2.SubscribeRequest | None] = queue.Queue()
        self.call = relay_pb2_grpc.RelayStub(self.channel).Subscribe(self._requests(), timeout=TIMEOUT)

    def _requests(self) -> Iterator[relay_pb2.SubscribeRequest]:
        while (item := self.outbox.get()) is not None:
            yield item

    def send(self, **kwargs: object) -> None:
        self.outbox.put(relay_pb2.SubscribeRequest(**kwargs))  # type: ignore[arg-type]

    def recv(self) -> relay_pb2.SubscribeResponse:
        return next(self.call)

    def close(self) -> None:
        self.outbox.put(None)
        self.call.cancel()
        self.channel.close()


@pytest.fixture
def raw(plane: Plane, ca: CertificateAuthority) -> Iterator[RawStream]:
    stream = RawStream(plane, ca, "node-1")
    yield stream
    stream.close()


def _keys(resp: relay_pb2.SubscribeResponse) -> set[str]:
    return {r.key for d in resp.deltas for r in d.resources}


def test_first_request_must_be_subscribe(raw: RawStream) -> None:
    raw.send(ack=relay_pb2.Ack(nonce="x", version=1))
    with pytest.raises(grpc.RpcError) as err:
        raw.recv()
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT


def test_stale_ack_is_ignored_and_a_wider_subscription_adds_types(raw: RawStream, plane: Plane) -> None:
    raw.send(subscribe=relay_pb2.Subscribe(node="node-1", types=["Node"]))
    first = raw.recv()
    assert _keys(first) == {"Node/node-1", "Node/node-2"}
    raw.send(ack=relay_pb2.Ack(nonce="not-the-nonce", version=first.version))
    assert wait_until(lambda: plane.server.relay.counters()["stale_acks"] == 1, TIMEOUT)
    raw.send(ack=relay_pb2.Ack(nonce=first.nonce, version=first.version))
    raw.send(subscribe=relay_pb2.Subscribe(node="node-1", types=["Node", "Service"]))
    second = raw.recv()
    assert _keys(second) == {"Service/demo/web"}  # only what is new to the node
    assert second.nonce != first.nonce


def test_unacked_response_blocks_the_next_until_answered(raw: RawStream, plane: Plane) -> None:
    raw.send(subscribe=relay_pb2.Subscribe(node="node-1", types=["Node"]))
    first = raw.recv()
    raw.send(subscribe=relay_pb2.Subscribe(node="node-1", types=["Node", "Namespace"]))
    assert wait_until(lambda: plane.server.relay.counters()["responses"] == 1, TIMEOUT)
    raw.send(nack=relay_pb2.Nack(nonce=first.nonce, version=first.version, error="cannot use it"))
    # Same store version after a NACK: nothing is resent until the config changes.
    assert wait_until(lambda: plane.server.relay.last_nack("node-1") is not None, TIMEOUT)
    assert plane.server.relay.last_nack("node-1").error == "cannot use it"  # type: ignore[union-attr]
    assert plane.server.relay.counters()["responses"] == 1
    # Asking again is answered (from the ACKed state: nothing, so everything subscribed).
    raw.send(subscribe=relay_pb2.Subscribe(node="node-1", types=["Node", "Namespace"]))
    again = raw.recv()
    assert {"Node/node-1", "Namespace/demo", "Namespace/istio-system"} <= _keys(again)
    assert "Namespace/other" not in _keys(again)


def test_switching_node_mid_stream_is_refused(raw: RawStream, plane: Plane) -> None:
    raw.send(subscribe=relay_pb2.Subscribe(node="node-1", types=["Node"]))
    first = raw.recv()
    raw.send(ack=relay_pb2.Ack(nonce=first.nonce, version=first.version))
    raw.send(subscribe=relay_pb2.Subscribe(node="node-2", types=["Workload"]))
    with pytest.raises(grpc.RpcError) as err:
        raw.recv()
    assert err.value.code() == grpc.StatusCode.PERMISSION_DENIED
    assert plane.server.relay.counters()["refused"] == 1
