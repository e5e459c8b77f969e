"""Per-peer budgets on 15008 (agent/proxy/limits.py), against a real Proxy on loopback: one identity over its
stream or connection budget, or one address over its handshake budget, has only its NEW work refused while
other peers keep being served. Tiny limits, same code paths as the defaults."""

from __future__ import annotations

import contextlib
import socket
import threading
from collections.abc import Iterator
from dataclasses import dataclass

import pytest

from agent.connections import ConnectionClose, ConnectionRecord
from agent.policy.decision import ConnectionAttrs, Decision
from agent.proxy.limits import Limits
from agent.proxy.proxy import Ports, Proxy
from agent.state import MeshSnapshot
from api.resources import Meta
from api.resources.workload import Namespace, Node, Workload
from api.spiffe import SpiffeId
from mgmt.ca import CertificateAuthority
from native.engine import Engine
from tests.relay_fixtures import wait_until
from tests.unit.native.engine_testkit import TD, Events, Svid, issue

pytestmark = pytest.mark.root

NODE = "node-1"
A, B = SpiffeId.workload(TD, "app", "a"), SpiffeId.workload(TD, "app", "b")


class _Creds:
    def __init__(self, ca: CertificateAuthority) -> None:
        self._ca, self._node = ca, issue(ca, SpiffeId.node(TD, NODE))

    def svid_for(self, spiffe_id: SpiffeId) -> Svid:
        return issue(self._ca, spiffe_id)

    def trust_bundle_pem(self) -> bytes:
        return self._ca.bundle_pem()

    def node_identity(self) -> Svid:
        return self._node


class _AllowAll:
    def authorize(self, attrs: ConnectionAttrs) -> Decision:
        return Decision(True, "", "allow all")

    def mtls_mode(self, workload: Workload, port: int) -> str:
        return "PERMISSIVE"


class _Observer:
    def __init__(self) -> None:
        self.flags: list[str] = []

    def opened(self, record: ConnectionRecord) -> None:
        pass

    def closed(self, close: ConnectionClose) -> None:
        self.flags.append(close.response_flags)


def _echo_server() -> tuple[socket.socket, int]:
    srv = socket.create_server(("127.0.0.1", 0))

    def serve() -> None:
        while True:
            try:
                conn, _ = srv.accept()
            except OSError:
                return
            threading.Thread(target=lambda c=conn: _echo(c), daemon=True).start()

    threading.Thread(target=serve, daemon=True).start()
    return srv, srv.getsockname()[1]


def _echo(conn: socket.socket) -> None:
    with conn, contextlib.suppress(OSError):  # a client reset ends it like a close
        while data := conn.recv(65536):
            conn.sendall(data)


@dataclass
class Agent:
    proxy: Proxy
    ca: CertificateAuthority
    echo_port: int
    observer: _Observer

    @property
    def hbone(self) -> tuple[str, int]:
        return "127.0.0.1", self.proxy.ports.hbone


@pytest.fixture
def node(request: pytest.FixtureRequest) -> Iterator[Agent]:
    limits: Limits = request.param
    ca = CertificateAuthority.generate_root(TD)
    srv, port = _echo_server()
    server = Workload(Meta(name="server", namespace="app"), "server", NODE, ("127.0.0.1",))
    snap = MeshSnapshot.from_objects(
        1, TD, NODE, [Namespace(Meta(name="app")), server, Node(Meta(name=NODE), ("127.0.0.1",))]
    )
    observer = _Observer()
    proxy = Proxy(NODE, lambda: snap, _Creds(ca), _AllowAll(), observer, "127.0.0.1",
                  capture_ip="127.0.0.1", ports=Ports(0, 0, 0), engine_threads=1, preserve_source_ip=False,
                  limits=limits)  # fmt: skip
    proxy.start()
    try:
        yield Agent(proxy, ca, port, observer)
    finally:
        proxy.stop()
        srv.close()


class Client:
    """HBONE connections of one identity through the real engine; streams are held until closed."""

    def __init__(self, node: Agent, identity: SpiffeId, source_ip: str = "127.0.0.1") -> None:
        self.node, self.source_ip = node, source_ip
        self.engine = Engine(threads=1)
        self.engine.start()
        self.events = Events(self.engine)
        svid = issue(node.ca, identity)
        self.ctx = self.engine.tls_context(
            server=False, chain_pem=svid.chain_pem, key_pem=svid.key_pem, bundle_pem=node.ca.bundle_pem()
        )
        self._tags = iter(range(1, 1 << 30))
        self.apps: list[socket.socket] = []

    def connect(self) -> int:
        sock = socket.socket()
        sock.bind((self.source_ip, 0))
        sock.connect(self.node.hbone)
        # The agent presents the SVID of the workload that owns the dialled address (as ztunnel).
        return self.engine.connect_hbone(sock.detach(), self.ctx, str(SpiffeId.workload(TD, "app", "server")))

    def stream(self, conn: int) -> str:
        """'200' (the stream is held open) or 'refused <status>' / 'failed <kind>'."""
        tag = next(self._tags)
        app, local = socket.socketpair()
        self.engine.open_stream(conn, f"127.0.0.1:{self.node.echo_port}", local.detach(), tag=tag)
        ev = self.events.wait(
            lambda e: e.tag == tag or (e.conn_id == conn and e.kind in ("conn_error", "conn_closed"))
        )
        if ev.kind == "stream_open":
            self.apps.append(app)
            return "200"
        app.close()
        return f"refused {ev.status}" if ev.kind == "stream_refused" else f"failed {ev.kind}"

    def close(self) -> None:
        for app in self.apps:
            app.close()
        self.engine.stop()


@pytest.mark.parametrize("node", [Limits(hbone_streams_per_identity=3)], indirect=True)
def test_streams_per_identity(node: Agent) -> None:
    a, b = Client(node, A), Client(node, B)
    try:
        conns = [a.connect(), a.connect()]  # the budget spans the identity's connections
        assert [a.stream(conns[i % 2]) for i in range(3)] == ["200"] * 3
        assert a.stream(conns[0]) == "refused 503"
        assert b.stream(b.connect()) == "200"  # another identity is not starved
        assert node.proxy.counters()["limit_refused_hbone_streams_per_identity"] == 1
        assert "UO" in node.observer.flags
        a.apps.pop().close()  # one of A's streams ends: its budget is back
        assert wait_until(lambda: a.stream(conns[1]) == "200", 5)
    finally:
        a.close()
        b.close()


@pytest.mark.parametrize("node", [Limits(hbone_streams_per_source=3)], indirect=True)
def test_streams_per_source_address(node: Agent) -> None:
    """One peer node's identities together (one address) are bounded; another address is served."""
    a, b, elsewhere = Client(node, A), Client(node, B), Client(node, A, source_ip="127.0.0.2")
    try:
        assert [a.stream(a.connect()), b.stream(b.connect()), a.stream(a.connect())] == ["200"] * 3
        assert b.stream(b.connect()) == "refused 503"
        assert elsewhere.stream(elsewhere.connect()) == "200"
        assert node.proxy.counters()["limit_refused_hbone_streams_per_source"] == 1
    finally:
        for c in (a, b, elsewhere):
            c.close()


@pytest.mark.parametrize("node", [Limits(hbone_connections_per_identity=2)], indirect=True)
def test_connections_per_identity(node: Agent) -> None:
    a, b = Client(node, A), Client(node, B)
    try:
        first, second = a.connect(), a.connect()
        assert [a.stream(first), a.stream(second)] == ["200", "200"]
        assert a.stream(a.connect()).startswith(("refused", "failed"))  # a third connection of A
        assert a.stream(first) == "200"  # its live connections go on
        assert b.stream(b.connect()) == "200"
        assert node.proxy.counters()["hbone_peer_refused"] == 1
    finally:
        a.close()
        b.close()


@pytest.mark.parametrize("node", [Limits(hbone_handshakes_per_source=2)], indirect=True)
def test_pending_handshakes_per_source(node: Agent) -> None:
    """Two half-open handshakes (TCP up, no ClientHello) from one address: its third connection is closed
    at accept; another address completes its handshake and is served."""
    stalled = [socket.create_connection(node.hbone) for _ in range(2)]
    try:
        assert wait_until(lambda: node.proxy.counters().get("hbone_accepted", 0) >= 2, 5)
        third = socket.create_connection(node.hbone, timeout=5)
        assert third.recv(1) == b""  # closed by the agent before any TLS
        third.close()
        assert node.proxy.counters()["limit_refused_hbone_handshakes_per_source"] >= 1
        other = Client(node, B, source_ip="127.0.0.2")
        try:
            assert other.stream(other.connect()) == "200"
        finally:
            other.close()
    finally:
        for s in stalled:
            s.close()
