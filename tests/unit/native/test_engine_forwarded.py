"""The `forwarded` request header: sent by open_stream, reported raw (bounded) on stream_request."""

from __future__ import annotations

import socket
from pathlib import Path

import hpack
import pytest
from engine_testkit import Events, Pki, contexts, tcp_pair, tunnel
from test_engine_bad_peers import EMPTY_SETTINGS, PREFACE, frame_header, raw_client

from native.engine import Engine, EngineError

INVALID = " invalid (repeated or too long)"


@pytest.mark.parametrize(
    "ip,port,header",
    [
        ("10.244.1.2", 0, "for=10.244.1.2"),
        ("fd00::2", 0, 'for="[fd00::2]"'),
        ("10.244.1.2", 40123, 'for="10.244.1.2:40123"'),  # with the client's port, as ztunnel sends it
        ("fd00::2", 65535, 'for="[fd00::2]:65535"'),
        ("", 0, ""),
    ],
)
def test_open_stream_sends_forwarded(
    engine: Engine, events: Events, pki: Pki, ip: str, port: int, header: str
) -> None:
    t = tunnel(engine, events, pki)
    app, local = socket.socketpair()
    engine.open_stream(t.client, "10.244.2.2:80", local.detach(), forwarded=ip, forwarded_port=port)
    req = events.kind("stream_request", conn_id=t.server)
    assert req.forwarded == header
    assert req.authority == "10.244.2.2:80"
    app.close()


def test_bad_forwarded_address_is_refused_and_fd_closed(engine: Engine, events: Events, pki: Pki) -> None:
    t = tunnel(engine, events, pki)
    app, local = socket.socketpair()
    with pytest.raises(EngineError):
        engine.open_stream(t.client, "10.244.2.2:80", local.detach(), forwarded="10.0.0.1\r\nx: y")
    assert app.recv(10) == b""  # the engine owned (and closed) the fd
    app, local = socket.socketpair()
    with pytest.raises(EngineError, match="port 65536"):
        engine.open_stream(
            t.client, "10.244.2.2:80", local.detach(), forwarded="10.0.0.1", forwarded_port=65536
        )
    assert app.recv(10) == b""


def _raw_request(headers: list[tuple[str, str]]) -> bytes:
    block = hpack.Encoder().encode(headers)
    return PREFACE + EMPTY_SETTINGS + frame_header(len(block), 1, 0x4, 1) + block


@pytest.mark.parametrize(
    "extra,expect",
    [
        (
            [("forwarded", "for=10.0.0.1;by=x, for=1.2.3.4")],
            "for=10.0.0.1;by=x, for=1.2.3.4",
        ),  # raw: Python judges
        ([("forwarded", "for=10.0.0.1"), ("forwarded", "for=10.0.0.2")], INVALID),  # never combined
        ([("forwarded", "for=10.0.0.1;x=" + "y" * 300)], INVALID),  # never truncated
        ([], ""),
    ],
    ids=["raw", "repeated", "too-long", "absent"],
)
def test_hostile_forwarded_headers(
    engine: Engine, events: Events, pki: Pki, tmp_path: Path, extra: list[tuple[str, str]], expect: str
) -> None:
    _, sctx = contexts(engine, pki)
    raw, ours = tcp_pair()
    sid = engine.serve_hbone(ours.detach(), sctx)
    with raw_client(pki, tmp_path).wrap_socket(raw) as tls:
        tls.sendall(_raw_request([(":method", "CONNECT"), (":authority", "10.244.2.2:80"), *extra]))
        req = events.kind("stream_request", conn_id=sid)
        assert req.forwarded == expect
        engine.reject_stream(sid, req.stream_id, 403)
        events.kind("stream_closed", conn_id=sid)
