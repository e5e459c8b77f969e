"""HTTP/2 from clients (h2 prior knowledge on a plain listener, ALPN h2 over TLS): several streams on one
connection, each routed and inspected by the WAF like HTTP/1.1, bodies both with and without
content-length, an attack in a body blocked, and the backend reached over HTTP/1.1."""

from __future__ import annotations

import socket
import ssl
from collections.abc import Iterator
from pathlib import Path

import h2.config
import h2.connection
import h2.events
import pytest

from gateway.server import GatewayServer
from tests.gateway_corpus import Backend
from tests.gateway_fixtures import (
    free_port,
    gateway_doc,
    policy_doc,
    route_doc,
    running_gateway,
    service_doc,
    tls_material,
    write_config,
)

Headers = list[tuple[str, str]]


@pytest.fixture(scope="module")
def backend() -> Iterator[Backend]:
    b = Backend()
    yield b
    b.close()


@pytest.fixture(scope="module")
def edge(tmp_path_factory: pytest.TempPathFactory, backend: Backend) -> Iterator[tuple[GatewayServer, bytes]]:
    directory = tmp_path_factory.mktemp("h2")
    ca_pem, certs = tls_material(["shop.example"])
    (directory / "shop.crt").write_bytes(certs["shop.example"][0])
    (directory / "shop.key").write_bytes(certs["shop.example"][1])
    https = {
        "name": "https",
        "port": free_port(),
        "protocol": "HTTPS",
        "tls": {"certificateRefs": [{"group": "ambit.io", "kind": "File", "name": "shop"}]},
    }
    docs = [
        gateway_doc([{"name": "http", "port": free_port(), "protocol": "HTTP"}, https]),
        service_doc("shop", backend.port),
        route_doc("shop", "shop"),
        policy_doc("crs", "Gateway", "edge"),
    ]
    with running_gateway(write_config(directory, docs)) as server:
        yield server, ca_pem


def _exchange(sock: socket.socket, requests: list[tuple[Headers, bytes]]) -> dict[int, tuple[int, bytes]]:
    conn = h2.connection.H2Connection(h2.config.H2Configuration(client_side=True))
    conn.initiate_connection()
    ids = []
    for headers, body in requests:
        sid = conn.get_next_available_stream_id()
        ids.append(sid)
        conn.send_headers(sid, headers, end_stream=not body)
        if body:
            conn.send_data(sid, body, end_stream=True)
    sock.sendall(conn.data_to_send())
    status: dict[int, int] = {}
    bodies: dict[int, bytes] = {sid: b"" for sid in ids}
    done: set[int] = set()
    while len(done) < len(ids):
        data = sock.recv(65536)
        assert data, f"connection closed with streams {set(ids) - done} open"
        for ev in conn.receive_data(data):
            if isinstance(ev, h2.events.ResponseReceived):
                status[ev.stream_id] = int(dict(ev.headers)[b":status"])
            elif isinstance(ev, h2.events.DataReceived):
                bodies[ev.stream_id] += ev.data
                conn.acknowledge_received_data(ev.flow_controlled_length, ev.stream_id)
            elif isinstance(ev, h2.events.StreamEnded | h2.events.StreamReset):
                done.add(ev.stream_id)
        sock.sendall(conn.data_to_send())
    return {sid: (status.get(sid, 0), bodies[sid]) for sid in ids}


def _get(path: str, host: str = "shop.example") -> Headers:
    return [
        (":method", "GET"),
        (":path", path),
        (":scheme", "http"),
        (":authority", host),
        ("user-agent", "h2-test"),
        ("accept", "*/*"),
    ]


def _post(path: str, length: bool) -> Headers:
    h = [
        (":method", "POST"),
        (":path", path),
        (":scheme", "http"),
        (":authority", "shop.example"),
        ("user-agent", "h2-test"),
        ("accept", "*/*"),
        ("content-type", "application/x-www-form-urlencoded"),
    ]
    return h + ([("content-length", "14")] if length else [])


def _cases() -> list[tuple[Headers, bytes]]:
    return [
        (_get("/a?x=1"), b""),
        (_get("/?q=1%27%20OR%201=1--"), b""),
        (_post("/form", True), b"name=some+text"),
        (_post("/form", False), b"q=1' OR 1=1--"),
        (_get("/a", "other.example"), b""),
    ]


def _check(results: dict[int, tuple[int, bytes]]) -> None:
    statuses = [s for s, _ in results.values()]
    assert statuses == [200, 403, 200, 403, 200], results  # the catch-all route takes other.example
    assert list(results.values())[0][1] == b"ok\n"


def test_h2_prior_knowledge(edge: tuple[GatewayServer, bytes], backend: Backend) -> None:
    with socket.create_connection(("127.0.0.1", edge[0].ports["http"]), timeout=10) as sock:
        _check(_exchange(sock, _cases()))
    heads = [h.lower() for h in backend.seen[-3:]]
    assert any(h.startswith(b"post /form http/1.1") and b"content-length: 14" in h for h in heads)


def test_h2_over_tls_alpn(edge: tuple[GatewayServer, bytes]) -> None:
    server, ca_pem = edge
    blocked = server.gateway.counters()["waf_blocked"]
    ctx = ssl.create_default_context(cadata=ca_pem.decode())
    ctx.set_alpn_protocols(["h2", "http/1.1"])
    with (
        socket.create_connection(("127.0.0.1", server.ports["https"]), timeout=10) as raw,
        ctx.wrap_socket(raw, server_hostname="shop.example") as tls,
    ):
        assert tls.selected_alpn_protocol() == "h2"
        _check(_exchange(tls, _cases()))
    assert server.gateway.counters()["waf_blocked"] == blocked + 2


def test_h2_large_responses_on_concurrent_streams(tmp_path: Path) -> None:
    """Bodies far over the per-stream buffer (1 MiB) and the initial window: flow control and the
    pause/resume of the backend read, on three streams at once; every byte arrives, in order."""
    body = bytes(range(256)) * 8192  # 2 MiB
    big = Backend(body=body)
    try:
        port = free_port()
        docs = [
            gateway_doc([{"name": "http", "port": port, "protocol": "HTTP"}]),
            service_doc("big", big.port),
            route_doc("big", "big"),
        ]
        with (
            running_gateway(write_config(tmp_path, docs)),
            socket.create_connection(("127.0.0.1", port), timeout=20) as sock,
        ):
            results = _exchange(sock, [(_get(f"/{i}"), b"") for i in range(3)])
        assert [(s, b == body) for s, b in results.values()] == [(200, True)] * 3
    finally:
        big.close()
