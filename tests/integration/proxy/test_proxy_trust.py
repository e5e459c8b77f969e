"""The engine refuses, in the TLS handshake, clients that are no workload of the mesh's trust domains; the
proxy keeps that list current: the first connection after a config arrives is judged by that config."""

from __future__ import annotations

import pytest

from agent.proxy.proxy import Ports, Proxy
from agent.state import MeshSnapshot
from api.resources import Meta
from api.resources.workload import Namespace, Node, Workload
from api.spiffe import SpiffeId
from mgmt.ca import CertificateAuthority
from tests.forge import forged_leaf
from tests.integration.proxy.test_proxy_limits import (
    NODE,
    Agent,
    Client,
    _AllowAll,
    _Creds,
    _echo_server,
    _Observer,
)
from tests.relay_fixtures import wait_until
from tests.unit.native.engine_testkit import TD, Svid

pytestmark = pytest.mark.root


def test_first_connection_after_the_first_config_is_served() -> None:
    """The agent starts before its config (no trust domain yet: the engine accepts nobody); the config
    arrives and a client connects at once, before any periodic tick: served (was: refused in the
    handshake until the next tick)."""
    ca = CertificateAuthority.generate_root(TD)
    srv, port = _echo_server()
    server = Workload(Meta(name="server", namespace="app"), "server", NODE, ("127.0.0.1",))
    config = MeshSnapshot.from_objects(
        1, TD, NODE, [Namespace(Meta(name="app")), server, Node(Meta(name=NODE), ("127.0.0.1",))]
    )
    current = [MeshSnapshot(node=NODE)]
    observer, creds = _Observer(), _Creds(ca)
    proxy = Proxy(NODE, lambda: current[0], creds, _AllowAll(), observer, "127.0.0.1", capture_ip="127.0.0.1",
                  ports=Ports(0, 0, 0), engine_threads=1, preserve_source_ip=False)  # fmt: skip
    proxy.start()
    try:
        agent = Agent(proxy, ca, port, observer, creds)
        current[0] = config
        client = Client(agent, SpiffeId.workload(TD, "app", "a"))
        try:
            assert client.stream(client.connect()) == "200"
        finally:
            client.close()
        uri = "spiffe://evil.example/ns/app/sa/a"  # signed by the mesh's root, another trust domain
        foreign = Client(agent, SpiffeId.parse(uri), svid=Svid(uri, *forged_leaf(ca, uri)))
        try:
            assert foreign.stream(foreign.connect()).startswith("failed")  # refused in the handshake
            assert wait_until(lambda: proxy.counters().get("hbone_bad_certificate", 0) == 1, 5)
        finally:
            foreign.close()
    finally:
        proxy.stop()
        srv.close()
