"""Per-peer limits on 15008 (agent/proxy/limits.py), against a real Proxy on loopback, configured as the agent
is (`--limit NAME=N`, parse_limits): one identity over its stream or connection limit, or one address over
its handshake or connection limit, has only its NEW work refused while other peers keep being served; the
engine's limits are refused and counted by the engine, the proxy's by its budgets. Tiny limits, same code
paths as the defaults."""

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
from agent.settings import parse_limits
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
        self.delay = threading.Event()  # cleared: SVID fetches wait (as for a slow plane)
        self.delay.set()

    def svid_for(self, spiffe_id: SpiffeId) -> Svid:
        self.delay.wait(10)
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
    creds: _Creds

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
    observer, creds = _Observer(), _Creds(ca)
    proxy = Proxy(NODE, lambda: snap, creds, _AllowAll(), observer, "127.0.0.1",
                  capture_ip="127.0.0.1", ports=Ports(0, 0, 0), engine_threads=1, preserve_source_ip=False,
                  limits=limits)  # fmt: skip
    proxy.start()
    try:
        yield Agent(proxy, ca, port, observer, creds)
    finally:
        proxy.stop()
        srv.close()


class Client:
    """HBONE connections of one identity through the real engine; streams are held until closed."""

    def __init__(
        self, node: Agent, identity: SpiffeId, source_ip: str = "127.0.0.1", svid: Svid | None = None
    ) -> None:
        """`svid`: a certificate the mesh CA would not issue (tests.forge), instead of one for `identity`."""
        self.node, self.source_ip = node, source_ip
        self.engine = Engine(threads=1)
        self.engine.start()
        self.events = Events(self.engine)
        svid = svid or issue(node.ca, identity)
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


@pytest.mark.parametrize("node", [parse_limits(["hbone_streams_per_identity=3"])], indirect=True)
def test_streams_per_identity(node: Agent) -> None:
    """The agent's setting reaches the engine, which alone enforces it: A's fourth concurrent stream (over
    any of its connections) is refused with REFUSED_STREAM before the proxy sees it (no 503, no record
    each), counted by the engine; B is served; once one of A's streams ends, A gets a new one."""
    a, b = Client(node, A), Client(node, B)
    try:
        conns = [a.connect(), a.connect()]  # the limit spans the identity's connections
        assert [a.stream(conns[i % 2]) for i in range(3)] == ["200"] * 3
        assert a.stream(conns[0]) == "refused 0"  # RST_STREAM(REFUSED_STREAM): no HTTP status
        assert b.stream(b.connect()) == "200"  # another identity is not starved
        assert node.proxy.engine_counters()["refused_streams_peer"] == 1
        assert "limit_refused_hbone_streams_per_identity" not in node.proxy.counters()  # one owner
        a.apps.pop().close()  # one of A's streams ends: its share is back
        assert wait_until(lambda: a.stream(conns[1]) == "200", 5)
    finally:
        a.close()
        b.close()


@pytest.mark.parametrize("node", [parse_limits(["hbone_connections_per_source=2"])], indirect=True)
def test_connections_per_source_address(node: Agent) -> None:
    """The engine resets a source's third connection before any TLS state; its two live ones and another
    address go on."""
    a, elsewhere = Client(node, A), Client(node, A, source_ip="127.0.0.2")
    try:
        first, second = a.connect(), a.connect()
        assert [a.stream(first), a.stream(second)] == ["200", "200"]
        assert a.stream(a.connect()).startswith("failed")  # refused at the engine's accept
        assert a.stream(first) == "200"
        assert elsewhere.stream(elsewhere.connect()) == "200"
        assert node.proxy.engine_counters()["refused_conns_source"] == 1
    finally:
        a.close()
        elsewhere.close()


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


@pytest.mark.parametrize("node", [parse_limits(["hbone_handshakes_per_source=2"])], indirect=True)
def test_pending_handshakes_per_source(node: Agent) -> None:
    """Two half-open handshakes (TCP up, no ClientHello) from one address: the engine resets its third
    connection before any TLS state; another address completes its handshake and is served."""
    stalled = [socket.create_connection(node.hbone) for _ in range(2)]
    try:
        assert wait_until(lambda: node.proxy.engine_counters().get("conns_active", 0) >= 2, 5)
        third = socket.create_connection(node.hbone, timeout=5)
        with contextlib.suppress(ConnectionResetError):  # reset before any TLS
            assert third.recv(1) == b""
        third.close()
        assert wait_until(lambda: node.proxy.engine_counters()["refused_handshakes"] >= 1, 5)
        other = Client(node, B, source_ip="127.0.0.2")
        try:
            assert other.stream(other.connect()) == "200"
        finally:
            other.close()
    finally:
        for s in stalled:
            s.close()


@pytest.mark.parametrize("node", [Limits(hbone_waiting_per_source=2)], indirect=True)
def test_connections_waiting_for_a_first_svid_are_bounded(node: Agent) -> None:
    """Before the engine holds a socket (the local workload's first SVID is being fetched) the proxy's own
    budget bounds one address; that budget is given back once the engine takes the socket."""
    node.creds.delay.clear()  # the next SVID fetch waits until released
    waiting = [socket.create_connection(node.hbone) for _ in range(2)]
    try:
        assert wait_until(lambda: node.proxy.counters().get("hbone_waited_for_svid", 0) >= 2, 5)
        third = socket.create_connection(node.hbone, timeout=5)
        assert third.recv(1) == b""  # closed at accept
        third.close()
        assert node.proxy.counters()["limit_refused_hbone_waiting_per_source"] == 1
    finally:
        node.creds.delay.set()
        for s in waiting:
            s.close()
    assert wait_until(lambda: node.proxy.engine_counters()["conns_opened"] >= 2, 5)  # handed over
    a = Client(node, A)
    try:  # held by the engine now: the budget is back, many connections of one address are fine
        assert [a.stream(a.connect()) for _ in range(4)] == ["200"] * 4
    finally:
        a.close()
