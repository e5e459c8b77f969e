"""Hostile or broken HBONE clients (a raw TLS client from Python's ssl): the engine drops that one
connection with conn_error and keeps serving the others."""

from __future__ import annotations

import os
import ssl
import struct
from pathlib import Path

import pytest
from engine_testkit import Events, Pki, contexts, tcp_pair, tunnel

from native.engine import Engine

PREFACE = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n"
EMPTY_SETTINGS = b"\x00\x00\x00\x04\x00\x00\x00\x00\x00"


def frame_header(length: int, kind: int, flags: int, stream: int) -> bytes:
    return struct.pack(">I", length)[1:] + bytes([kind, flags]) + struct.pack(">I", stream)


def raw_client(pki: Pki, tmp: Path) -> ssl.SSLContext:
    (tmp / "chain.pem").write_bytes(pki.client.chain_pem)
    (tmp / "key.pem").write_bytes(pki.client.key_pem)
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.check_hostname = False
    ctx.load_verify_locations(cadata=pki.bundle.decode())
    ctx.load_cert_chain(tmp / "chain.pem", tmp / "key.pem")
    ctx.set_alpn_protocols(["h2"])
    return ctx


def read_until_closed(sock: ssl.SSLSocket) -> None:
    try:
        while sock.recv(65536):
            pass
    except (ssl.SSLError, OSError):
        pass


@pytest.mark.parametrize(
    "payload,expect",
    [
        (b"GET / HTTP/1.1\r\nHost: x\r\n\r\n" + os.urandom(4096), ("h2",)),
        (PREFACE + EMPTY_SETTINGS + os.urandom(64), ("protocol error",)),
        # a HEADERS frame with an undecodable HPACK block
        (PREFACE + EMPTY_SETTINGS + frame_header(4, 1, 0x4, 1) + b"\xff\xff\xff\xff", ("protocol error",)),
        # truncated: a frame announces 100 bytes, 10 arrive, then the client goes away (a FIN, or a RST
        # when the server's SETTINGS were still unread: seen by a read, or by the next send)
        (
            PREFACE + EMPTY_SETTINGS + frame_header(100, 1, 0x4, 1) + b"\x00" * 10,
            ("without GOAWAY", "reset by peer", "Broken pipe"),
        ),
    ],
    ids=["http1", "garbage-after-preface", "bad-hpack", "truncated-frame"],
)
def test_bad_client_is_dropped_others_unaffected(
    engine: Engine, events: Events, pki: Pki, tmp_path: Path, payload: bytes, expect: tuple[str, ...]
) -> None:
    good = tunnel(engine, events, pki)
    app, upstream, _, _ = good.open()
    _, sctx = contexts(engine, pki)
    raw, ours = tcp_pair()
    sid = engine.serve_hbone(ours.detach(), sctx)
    with raw_client(pki, tmp_path).wrap_socket(raw) as tls:
        tls.sendall(payload)
        if "without GOAWAY" in expect:
            tls.close()
        else:
            read_until_closed(tls)
    err = events.kind("conn_error", conn_id=sid)
    assert any(e in err.detail for e in expect), err.detail
    assert err.peer_id == pki.client.spiffe_id
    events.kind("conn_closed", conn_id=sid)
    assert not [e for e in events.seen if e.kind == "stream_request"]
    # the other connection and its stream carry on
    app.sendall(b"still here")
    assert upstream.recv(100) == b"still here"
    app2, upstream2, _, _ = good.open()
    upstream2.sendall(b"new stream")
    assert app2.recv(100) == b"new stream"
    assert engine.counters()["conns_active"] == 2


def test_client_without_certificate_is_refused(engine: Engine, events: Events, pki: Pki) -> None:
    _, sctx = contexts(engine, pki)
    raw, ours = tcp_pair()
    sid = engine.serve_hbone(ours.detach(), sctx)
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.check_hostname = False
    ctx.load_verify_locations(cadata=pki.bundle.decode())
    try:
        with ctx.wrap_socket(raw) as tls:
            read_until_closed(tls)  # TLS 1.3: the server's refusal arrives after the client's Finished
    except (ssl.SSLError, OSError):
        pass
    assert "TLS handshake failed" in events.kind("conn_error", conn_id=sid).detail


def test_plain_tcp_garbage_on_hbone_port(engine: Engine, events: Events, pki: Pki) -> None:
    _, sctx = contexts(engine, pki)
    raw, ours = tcp_pair()
    sid = engine.serve_hbone(ours.detach(), sctx)
    raw.sendall(os.urandom(2048))
    raw.close()
    assert "TLS handshake failed" in events.kind("conn_error", conn_id=sid).detail
    events.kind("conn_closed", conn_id=sid)


def test_socket_closed_mid_handshake(engine: Engine, events: Events, pki: Pki) -> None:
    _, sctx = contexts(engine, pki)
    raw, ours = tcp_pair()
    sid = engine.serve_hbone(ours.detach(), sctx)
    raw.close()
    assert events.kind("conn_error", conn_id=sid).detail
    # and a dead fd in general: connect to a socket whose peer is gone
    cctx, _ = contexts(engine, pki)
    a, b = tcp_pair()
    b.close()
    cid = engine.connect_hbone(a.detach(), cctx, pki.server.spiffe_id)
    assert events.kind("conn_error", conn_id=cid).detail


@pytest.mark.parametrize("tls12", [False, True])
def test_tls12_only_when_enabled(
    engine: Engine, events: Events, pki: Pki, tmp_path: Path, tls12: bool
) -> None:
    sctx = engine.tls_context(
        server=True,
        chain_pem=pki.server.chain_pem,
        key_pem=pki.server.key_pem,
        bundle_pem=pki.bundle,
        tls12=tls12,
    )
    raw, ours = tcp_pair()
    sid = engine.serve_hbone(ours.detach(), sctx)
    client = raw_client(pki, tmp_path)
    client.maximum_version = ssl.TLSVersion.TLSv1_2
    try:
        with client.wrap_socket(raw) as tls:
            tls.sendall(PREFACE + EMPTY_SETTINGS)
            version = tls.version()
            tls.recv(100)  # the server's SETTINGS
    except (ssl.SSLError, OSError):
        version = None
    if tls12:
        assert version == "TLSv1.2"
        assert events.kind("peer_verified", conn_id=sid).tls_version == "TLSv1.2"
    else:
        assert version is None
        assert "TLS handshake failed" in events.kind("conn_error", conn_id=sid).detail
