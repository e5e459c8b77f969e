"""Seeded mutations of real requests (HTTP/1.1 and HTTP/2 frames) never crash the gateway or leave
connections behind: every mutated request gets an answer or a close, and clean requests keep working."""

from __future__ import annotations

import random
import socket
import time
from collections.abc import Iterator

import pytest

from gateway.server import GatewayServer
from tests.gateway_corpus import SAMPLE, Backend, exchange, load_rows, raw_request, status_of
from tests.gateway_fixtures import (
    free_port,
    gateway_doc,
    policy_doc,
    route_doc,
    running_gateway,
    service_doc,
    write_config,
)

CLEAN = b"GET /ok HTTP/1.1\r\nHost: a\r\nUser-Agent: t\r\nAccept: */*\r\nConnection: close\r\n\r\n"
PREFACE = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n"


@pytest.fixture(scope="module")
def edge(tmp_path_factory: pytest.TempPathFactory) -> Iterator[GatewayServer]:
    backend = Backend()
    docs = [
        gateway_doc([{"name": "http", "port": free_port(), "protocol": "HTTP"}]),
        service_doc("app", backend.port),
        route_doc("app", "app"),
        policy_doc("crs", "Gateway", "edge"),
    ]
    with running_gateway(write_config(tmp_path_factory.mktemp("mut"), docs)) as server:
        yield server
    backend.close()


def _mutate(rng: random.Random, data: bytes) -> bytes:
    b = bytearray(data)
    for _ in range(rng.randint(1, 6)):
        op = rng.randrange(4)
        pos = rng.randrange(len(b)) if b else 0
        if op == 0 and b:
            b[pos] = rng.randrange(256)
        elif op == 1:
            b[pos:pos] = rng.choice([b"\r\n", b"\n", b"\0", b":", b" ", b"\r\n\r\n", b"\xff" * 8])
        elif op == 2 and b:
            del b[pos : pos + rng.randint(1, 8)]
        else:
            b = b[: max(1, pos)]
    return bytes(b)


def _send(port: int, data: bytes) -> bytes:
    try:
        return exchange(port, data, timeout=15)
    except OSError:  # a reset is an answer too
        return b""


def test_mutated_http1_requests(edge: GatewayServer) -> None:
    rng = random.Random(1717)
    port = edge.ports["http"]
    rows = load_rows(SAMPLE)
    for _ in range(150):
        response = _send(port, _mutate(rng, raw_request(rng.choice(rows))))
        assert response == b"" or response.startswith(b"HTTP/1.1 ")
    assert status_of(exchange(port, CLEAN)) == 200


def test_mutated_http2_frames(edge: GatewayServer) -> None:
    import h2.connection

    rng = random.Random(2929)
    port = edge.ports["http"]
    for _ in range(60):
        conn = h2.connection.H2Connection()
        conn.initiate_connection()
        conn.send_headers(
            1,
            [
                (":method", "POST"),
                (":path", "/x"),
                (":scheme", "http"),
                (":authority", "a"),
                ("content-type", "application/x-www-form-urlencoded"),
            ],
        )
        conn.send_data(1, b"a=1&b=2", end_stream=True)
        frames = conn.data_to_send()[len(PREFACE) :]
        _send(port, PREFACE + _mutate(rng, frames))
    assert status_of(exchange(port, CLEAN)) == 200
    deadline = time.monotonic() + 5
    while edge.gateway.counters()["conns_active"] and time.monotonic() < deadline:
        time.sleep(0.05)
    assert edge.gateway.counters()["conns_active"] == 0


def test_slow_partial_requests_are_cut_by_the_deadline_not_by_others(edge: GatewayServer) -> None:
    port = edge.ports["http"]
    held = []
    for i in range(20):
        s = socket.create_connection(("127.0.0.1", port))
        s.sendall(b"POST / HTTP/1.1\r\nHost: a\r\nContent-Length: 100\r\n\r\n" + b"x" * i)
        held.append(s)
    assert status_of(exchange(port, CLEAN)) == 200
    for s in held:
        s.close()
