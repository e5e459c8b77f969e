"""Deadlines: a silent client on the HBONE port, keepalive PINGs on idle connections, a frozen peer."""

from __future__ import annotations

import contextlib
import ssl
from pathlib import Path

from engine_testkit import Events, Pki, contexts, tcp_pair, tunnel

from native.engine import Engine


def test_silent_client_hits_handshake_deadline(engine: Engine, events: Events, pki: Pki) -> None:
    engine.set_timeouts(handshake_s=0.3)
    _, sctx = contexts(engine, pki)
    raw, ours = tcp_pair()
    sid = engine.serve_hbone(ours.detach(), sctx)
    assert "timed out" in events.kind("conn_error", conn_id=sid).detail
    with contextlib.suppress(ConnectionResetError):
        assert raw.recv(10) == b""
    raw.close()


def test_idle_connection_kept_alive_by_ping(engine: Engine, events: Events, pki: Pki) -> None:
    engine.set_timeouts(keepalive_idle_s=0.2, keepalive_timeout_s=5)
    t = tunnel(engine, events, pki)
    events.kind("handshake_done", conn_id=t.client)
    events.kind("peer_verified", conn_id=t.server)
    before = engine.counters()["tls_bytes_in"]
    failed = None
    with contextlib.suppress(AssertionError):  # several keepalive rounds pass without a failure
        failed = events.wait(lambda e: e.kind in ("conn_error", "conn_closed"), timeout=1.5)
    assert failed is None
    assert engine.counters()["tls_bytes_in"] > before  # PING and PING ACK frames flowed
    app, upstream, _, _ = t.open()
    app.sendall(b"alive")
    assert upstream.recv(10) == b"alive"


def test_frozen_peer_detected_by_keepalive(engine: Engine, events: Events, pki: Pki, tmp_path: Path) -> None:
    """A server that completes TLS and then never answers: the client's PING goes unanswered."""
    engine.set_timeouts(keepalive_idle_s=0.2, keepalive_timeout_s=0.3)
    (tmp_path / "chain.pem").write_bytes(pki.server.chain_pem)
    (tmp_path / "key.pem").write_bytes(pki.server.key_pem)
    frozen = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    frozen.load_cert_chain(tmp_path / "chain.pem", tmp_path / "key.pem")
    frozen.load_verify_locations(cadata=pki.bundle.decode())
    frozen.verify_mode = ssl.CERT_REQUIRED
    cctx, _ = contexts(engine, pki)
    a, b = tcp_pair()
    cid = engine.connect_hbone(a.detach(), cctx, pki.server.spiffe_id)
    with frozen.wrap_socket(b, server_side=True):  # handshake completes here, then silence
        events.kind("handshake_done", conn_id=cid)
        assert "keepalive" in events.kind("conn_error", conn_id=cid).detail
        events.kind("conn_closed", conn_id=cid)
    assert engine.counters()["conns_active"] == 0
