"""HBONE through the engine: mTLS + HTTP/2 CONNECT between a client and a server connection over TCP."""

from __future__ import annotations

import hashlib
import os
import socket
import tempfile
import threading

import pytest
from engine_testkit import CLIENT_ID, Events, Pki, contexts, fd_count, issue, make_pki, tcp_pair, tunnel

from native.engine import Engine


def test_stream_both_ways_half_close_and_events(engine: Engine, events: Events, pki: Pki) -> None:
    t = tunnel(engine, events, pki)
    done = events.kind("handshake_done", conn_id=t.client)
    assert done.peer_id == pki.server.spiffe_id
    assert done.tls_version == "TLSv1.3" and done.tls_cipher and len(done.peer_cert_sha256) == 64
    assert events.kind("peer_verified", conn_id=t.server).peer_id == pki.client.spiffe_id
    app, upstream, opened, req = t.open("10.244.2.2:8080")
    assert (req.authority, req.peer_id, req.tag) == ("10.244.2.2:8080", pki.client.spiffe_id, 2)
    assert (opened.status, opened.tag, opened.stream_id) != (0, 0, 0)
    app.sendall(b"GET / HTTP/1.1\r\n\r\n")
    assert upstream.recv(100) == b"GET / HTTP/1.1\r\n\r\n"
    upstream.sendall(b"HTTP/1.1 200 OK\r\n\r\n")
    assert app.recv(100) == b"HTTP/1.1 200 OK\r\n\r\n"
    app.shutdown(socket.SHUT_WR)  # END_STREAM -> shutdown(SHUT_WR) on the upstream socket
    assert upstream.recv(100) == b""
    upstream.sendall(b"after half-close")
    assert app.recv(100) == b"after half-close"
    upstream.close()
    assert app.recv(100) == b""
    client_end = events.kind("stream_closed", conn_id=t.client)
    server_end = events.kind("stream_closed", conn_id=t.server)
    assert (client_end.bytes_out, client_end.bytes_in, client_end.detail) == (18, 35, "")
    assert (server_end.bytes_in, server_end.bytes_out, server_end.tag) == (18, 35, 22)
    engine.close(t.client)
    assert events.kind("conn_closed", conn_id=t.client).bytes_out > 0
    assert events.kind("conn_closed", conn_id=t.server).detail == ""
    assert not [e for e in events.seen if e.kind == "conn_error"]
    c = engine.counters()
    assert (c["conns_active"], c["streams_active"], c["streams_opened"]) == (0, 0, 2)


def test_large_transfer_both_directions(engine: Engine, events: Events, pki: Pki) -> None:
    t = tunnel(engine, events, pki)
    app, upstream, _, _ = t.open()
    up_payload = os.urandom(1 << 20) * 64  # 64 MiB towards the server
    down_payload = os.urandom(1 << 20) * 16

    def sender(sock: socket.socket, data: bytes) -> None:
        sock.sendall(data)
        sock.shutdown(socket.SHUT_WR)

    def receive(sock: socket.socket, out: list[tuple[int, str]]) -> None:
        h = hashlib.sha256()
        n = 0
        while chunk := sock.recv(1 << 20):
            h.update(chunk)
            n += len(chunk)
        out.append((n, h.hexdigest()))

    got_up: list[tuple[int, str]] = []
    got_down: list[tuple[int, str]] = []
    threads = [
        threading.Thread(target=sender, args=(app, up_payload)),
        threading.Thread(target=sender, args=(upstream, down_payload)),
        threading.Thread(target=receive, args=(upstream, got_up)),
        threading.Thread(target=receive, args=(app, got_down)),
    ]
    for th in threads:
        th.start()
    for th in threads:
        th.join(120)
    assert got_up == [(len(up_payload), hashlib.sha256(up_payload).hexdigest())]
    assert got_down == [(len(down_payload), hashlib.sha256(down_payload).hexdigest())]
    end = events.kind("stream_closed", conn_id=t.client)
    assert (end.bytes_out, end.bytes_in) == (len(up_payload), len(down_payload))


def test_many_concurrent_streams(engine: Engine, events: Events, pki: Pki) -> None:
    engine.set_limits(max_concurrent_streams=1000)
    t = tunnel(engine, events, pki)
    n = 250
    apps = []
    for i in range(n):
        app, local = socket.socketpair()
        engine.open_stream(t.client, f"10.244.2.2:{1000 + i}", local.detach(), tag=i)
        app.sendall(f"request {i}".encode())
        apps.append(app)
    upstreams = {}
    for _ in range(n):
        req = events.kind("stream_request", conn_id=t.server)
        ours, theirs = socket.socketpair()
        engine.accept_stream(t.server, req.stream_id, theirs.detach())
        upstreams[int(req.authority.rsplit(":", 1)[1]) - 1000] = ours
    for i in range(n):
        assert upstreams[i].recv(100) == f"request {i}".encode()
        upstreams[i].sendall(f"response {i}".encode())
    for i in range(n):
        assert apps[i].recv(100) == f"response {i}".encode()
    assert engine.counters()["streams_active"] == 2 * n
    for s in [*apps, *upstreams.values()]:
        s.close()
    for _ in range(2 * n):
        events.kind("stream_closed")
    assert engine.counters()["streams_active"] == 0


def test_peer_reset_maps_to_tcp_reset(engine: Engine, events: Events, pki: Pki) -> None:
    t = tunnel(engine, events, pki)
    app_tcp, local = tcp_pair()
    engine.open_stream(t.client, "10.244.2.2:80", local.detach())
    req = events.kind("stream_request", conn_id=t.server)
    upstream, ours = tcp_pair()
    engine.accept_stream(t.server, req.stream_id, ours.detach())
    events.kind("stream_open")
    app_tcp.sendall(b"x")
    assert upstream.recv(1) == b"x"
    app_tcp.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, b"\x01\x00\x00\x00\x00\x00\x00\x00")
    app_tcp.close()  # TCP RST -> RST_STREAM -> upstream socket reset
    assert events.kind("stream_closed", conn_id=t.server).detail == "reset by peer"
    try:
        upstream.recv(1)
        raise AssertionError("expected a reset")
    except ConnectionResetError:
        pass
    upstream.close()
    assert events.kind("stream_closed", conn_id=t.client).detail == "socket error"


def test_reset_stream_by_agent(engine: Engine, events: Events, pki: Pki) -> None:
    t = tunnel(engine, events, pki)
    app, upstream, opened, req = t.open()
    engine.reset_stream(t.server, req.stream_id)
    assert events.kind("stream_closed", conn_id=t.server).detail == "reset by agent"
    assert events.kind("stream_closed", conn_id=t.client).detail == "reset by peer"
    assert app.recv(10) == b"" and upstream.recv(10) == b""  # socketpairs see EOF on reset
    # the connection survives: a new stream works
    app2, up2, _, _ = t.open()
    app2.sendall(b"again")
    assert up2.recv(10) == b"again"


@pytest.mark.parametrize("status", [403, 401])  # ztunnel denies with 401: reported as received
def test_reject_stream_reports_status(engine: Engine, events: Events, pki: Pki, status: int) -> None:
    t = tunnel(engine, events, pki)
    app, local = socket.socketpair()
    sid = engine.open_stream(t.client, "10.244.2.2:22", local.detach())
    req = events.kind("stream_request", conn_id=t.server)
    engine.reject_stream(t.server, req.stream_id, status)
    refused = events.kind("stream_refused", conn_id=t.client, stream_id=sid)
    assert refused.status == status
    assert app.recv(10) == b""
    assert events.kind("stream_closed", conn_id=t.server).status == status
    assert engine.counters()["streams_refused"] == 1


def test_wrong_peer_identity_is_refused(engine: Engine, events: Events, pki: Pki) -> None:
    t = tunnel(engine, events, pki, expected_peer="spiffe://cluster.local/node/node-9")
    app, local = socket.socketpair()
    sid = engine.open_stream(t.client, "10.244.2.2:80", local.detach())  # queued before the handshake
    err = events.kind("conn_error", conn_id=t.client)
    assert "peer identity mismatch" in err.detail
    # refused whether the command ran before, while (the connection's error) or after the connection ended
    refused = events.kind("stream_refused", stream_id=sid).detail
    assert refused in ("connection closed", "no such connection", err.detail)
    events.kind("conn_closed", conn_id=t.client)
    events.kind("conn_closed", conn_id=t.server)
    assert app.recv(10) == b""
    assert engine.counters()["errors_peer_identity"] == 1
    assert not [e for e in events.seen if e.kind == "stream_request"]


def test_untrusted_client_fails_handshake(engine: Engine, events: Events, pki: Pki) -> None:
    other = make_pki()  # a different root: not in the server's bundle
    bad = issue(other.ca, CLIENT_ID)
    cctx = engine.tls_context(
        server=False, chain_pem=bad.chain_pem, key_pem=bad.key_pem, bundle_pem=pki.bundle
    )
    _, sctx = contexts(engine, pki)
    a, b = tcp_pair()
    cid = engine.connect_hbone(a.detach(), cctx, pki.server.spiffe_id)
    sid = engine.serve_hbone(b.detach(), sctx)
    assert "TLS handshake failed" in events.kind("conn_error", conn_id=sid).detail
    events.kind("conn_error", conn_id=cid)
    assert engine.counters()["errors_handshake"] >= 1


def test_open_stream_on_unknown_connection(engine: Engine, events: Events) -> None:
    app, local = socket.socketpair()
    sid = engine.open_stream(424242, "10.0.0.1:80", local.detach())
    assert events.kind("stream_refused", stream_id=sid).detail == "no such connection"
    assert app.recv(10) == b""


def test_session_resumption(engine: Engine, events: Events, pki: Pki) -> None:
    cctx, sctx = contexts(engine, pki)
    for _ in range(2):
        a, b = tcp_pair()
        cid = engine.connect_hbone(a.detach(), cctx, pki.server.spiffe_id)
        sid = engine.serve_hbone(b.detach(), sctx)
        app, local = socket.socketpair()
        engine.open_stream(cid, "10.0.0.1:80", local.detach())
        req = events.kind("stream_request", conn_id=sid)
        engine.reject_stream(sid, req.stream_id, 503)  # a round trip, so the ticket has arrived
        events.kind("stream_refused", conn_id=cid)
        engine.close(cid)
        events.kind("conn_closed", conn_id=cid)
        events.kind("conn_closed", conn_id=sid)
    assert engine.counters()["handshakes_resumed"] == 2  # client and server of the second connection


def test_stop_frees_everything(pki: Pki) -> None:
    before = fd_count()
    eng = Engine(threads=2)
    eng.start()
    evs = Events(eng)
    t = tunnel(eng, evs, pki)
    held = []
    for _ in range(10):
        app, upstream, _, _ = t.open()
        held += [app, upstream]
    c = eng.counters()
    assert (c["conns_active"], c["streams_active"]) == (2, 20)
    eng.stop()
    eng.stop()
    for s in held:
        s.close()
    assert fd_count() == before


def test_unpollable_stream_socket_is_refused_once(engine: Engine, events: Events, pki: Pki) -> None:
    """A local fd epoll refuses (here a regular file) refuses its stream ("epoll"), and nothing else: the
    stream was freed while nghttp2 still held it for the queued HEADERS (a use-after-free on the loop
    thread, "double free or corruption" without ASan), and the fd was closed twice (the second close hit
    whatever reused the number meanwhile: the thread below keeps taking the lowest free numbers)."""
    t = tunnel(engine, events, pki)
    events.kind("handshake_done", conn_id=t.client)
    with tempfile.TemporaryFile() as f:
        ino = os.fstat(f.fileno()).st_ino
        stop, lost = threading.Event(), []

        def take_numbers() -> None:
            while not stop.is_set():
                held = [os.dup(f.fileno()) for _ in range(32)]
                for fd in held:
                    try:
                        if os.fstat(fd).st_ino != ino:
                            lost.append(fd)
                        os.close(fd)
                    except OSError:
                        lost.append(fd)  # closed by someone else

        taker = threading.Thread(target=take_numbers)
        taker.start()
        try:
            for i in range(50):
                engine.open_stream(t.client, "10.244.2.2:80", os.dup(f.fileno()), tag=100 + i)
                assert events.kind("stream_refused", tag=100 + i).detail == "epoll"
        finally:
            stop.set()
            taker.join()
    assert lost == []
    app, upstream, _, _ = t.open()  # the connection still carries streams
    app.sendall(b"after")
    assert upstream.recv(16) == b"after"
    app.close()
    upstream.close()
