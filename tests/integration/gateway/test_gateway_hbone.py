"""Backends in the mesh over HBONE with the gateway's own SPIFFE identity: the mesh engine (native/) opens
CONNECT streams to an HBONE server (the engine in server role, as a destination node runs it), which sees
the gateway's SPIFFE id and the client in `forwarded`; streams are pooled like any upstream connection; an
attack never opens one; a wrong server identity is a 502."""

from __future__ import annotations

import select
import socket
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest

from api.spiffe import SpiffeId
from gateway.hbone import Identity
from gateway.server import ServerOptions
from native.engine import Engine
from tests.gateway_corpus import BACKEND_MARK, Backend, exchange, status_of
from tests.gateway_fixtures import (
    free_port,
    gateway_doc,
    policy_doc,
    route_doc,
    running_gateway,
    write_config,
)
from tests.unit.native.engine_testkit import TD, Pki, issue, make_pki

GATEWAY_ID = SpiffeId.workload(TD, "edge", "gateway")
GET = b"GET /%s HTTP/1.1\r\nHost: shop\r\nUser-Agent: t\r\nAccept: */*\r\n\r\n"


class HboneDestination:
    """Accepts HBONE connections and CONNECT streams to any authority on loopback, recording who asked."""

    def __init__(self, pki: Pki) -> None:
        self.engine = Engine(threads=1)
        self.engine.start()
        self.ctx = self.engine.tls_context(
            server=True, chain_pem=pki.server.chain_pem, key_pem=pki.server.key_pem, bundle_pem=pki.bundle
        )
        self.sock = socket.socket()
        self.sock.bind(("127.0.0.1", 0))
        self.sock.listen(16)
        self.port = self.sock.getsockname()[1]
        self.requests: list[tuple[str, str, str]] = []  # (peer id, authority, forwarded)
        self._stop = False
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop:
            ready, _, _ = select.select([self.sock, self.engine.eventfd], [], [], 0.2)
            if self.sock in ready:
                conn, _ = self.sock.accept()
                self.engine.serve_hbone(conn.detach(), self.ctx)
            for ev in self.engine.events():
                if ev.kind == "stream_request":
                    self.requests.append((ev.peer_id, ev.authority, ev.forwarded))
                    host, _, port = ev.authority.rpartition(":")
                    upstream = socket.create_connection((host, int(port)))
                    self.engine.accept_stream(ev.conn_id, ev.stream_id, upstream.detach())

    def close(self) -> None:
        self._stop = True
        self._thread.join(timeout=5)
        self.sock.close()
        self.engine.stop()


@pytest.fixture(scope="module")
def mesh() -> Iterator[tuple[Pki, HboneDestination, Backend]]:
    pki = make_pki()
    dest, backend = HboneDestination(pki), Backend()
    yield pki, dest, backend
    dest.close()
    backend.close()


def _service(dest_port: int, backend_port: int, peer: str) -> dict[str, object]:
    return {
        "apiVersion": "v1",
        "kind": "Service",
        "metadata": {
            "name": "shop",
            "namespace": "default",
            "annotations": {
                "ambit.io/gateway-upstream": "hbone",
                "ambit.io/hbone-peer": peer,
                "ambit.io/hbone-server": f"127.0.0.1:{dest_port}",
            },
        },
        "spec": {"addresses": ["127.0.0.1"], "ports": [{"port": 80, "targetPort": backend_port}]},
    }


def _gateway(
    tmp: Path, pki: Pki, dest: HboneDestination, backend: Backend, peer: str
) -> tuple[Path, ServerOptions, int]:
    port = free_port()
    docs = [
        gateway_doc([{"name": "http", "port": port, "protocol": "HTTP"}]),
        _service(dest.port, backend.port, peer),
        route_doc("shop", "shop"),
        policy_doc("crs", "Gateway", "edge"),
    ]
    svid = issue(pki.ca, GATEWAY_ID)
    identity = Identity(svid.spiffe_id, svid.chain_pem, svid.key_pem, pki.bundle)
    return write_config(tmp, docs), ServerOptions(identity=identity), port


def test_requests_enter_the_mesh_as_the_gateway(
    tmp_path: Path, mesh: tuple[Pki, HboneDestination, Backend]
) -> None:
    pki, dest, backend = mesh
    directory, options, port = _gateway(tmp_path, pki, dest, backend, pki.server.spiffe_id)
    with running_gateway(directory, options) as server:
        before = len(dest.requests)
        with socket.create_connection(("127.0.0.1", port), timeout=10) as client:
            for path in (b"one", b"two"):  # keep-alive: the second rides the pooled stream
                client.sendall(GET % path)
                head = client.recv(65536)
                assert status_of(head) == 200 and BACKEND_MARK in head
        assert len(dest.requests) == before + 1
        peer, authority, forwarded = dest.requests[-1]
        assert peer == str(GATEWAY_ID)
        assert authority == f"127.0.0.1:{backend.port}"
        assert forwarded == "for=127.0.0.1"
        assert backend.seen[-1].startswith(b"GET /two ")
        attack = exchange(port, GET % b"?q=1' OR 1=1--".replace(b" ", b"%20"))
        assert status_of(attack) == 403
        assert len(dest.requests) == before + 1
        assert server.upstreams is not None and server.upstreams.streams_opened == 1


def test_wrong_server_identity_is_a_502(tmp_path: Path, mesh: tuple[Pki, HboneDestination, Backend]) -> None:
    pki, dest, backend = mesh
    wrong = str(SpiffeId.workload(TD, "demo", "someone-else"))
    directory, options, port = _gateway(tmp_path, pki, dest, backend, wrong)
    with running_gateway(directory, options):
        resp = exchange(port, GET.replace(b"\r\n\r\n", b"\r\nConnection: close\r\n\r\n") % b"x")
        assert status_of(resp) == 502


def test_hbone_backend_without_identity_is_refused(
    tmp_path: Path, mesh: tuple[Pki, HboneDestination, Backend]
) -> None:
    from gateway.config import GatewayConfigError

    pki, dest, backend = mesh
    directory, _, _ = _gateway(tmp_path, pki, dest, backend, pki.server.spiffe_id)
    with pytest.raises(GatewayConfigError, match="identity"), running_gateway(directory):
        pass
