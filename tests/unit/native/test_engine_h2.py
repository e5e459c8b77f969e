"""HTTP/2 interop details (issue 13): ztunnel-like SETTINGS, 1 MiB frames, a peer's graceful GOAWAY,
extra request headers (baggage, traceparent) and how the server reports them (401: test_engine_hbone)."""

from __future__ import annotations

import socket

import h2.settings
import pytest
from engine_abuse import Listener, RawH2, tls_client
from engine_testkit import Events, Pki, contexts, tunnel

from native.engine import Engine, EngineError

BAGGAGE = "k8s.cluster.name=c1,k8s.namespace.name=demo,k8s.deployment.name=web,service.version=v1"
TRACEPARENT = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01"


def test_extra_headers_reach_the_server(engine: Engine, events: Events, pki: Pki) -> None:
    t = tunnel(engine, events, pki)
    app, local = socket.socketpair()
    engine.open_stream(t.client, "10.244.2.2:80", local.detach(),
                       headers=[("baggage", BAGGAGE), ("traceparent", TRACEPARENT)])  # fmt: skip
    req = events.kind("stream_request", conn_id=t.server)
    assert (req.baggage, req.traceparent) == (BAGGAGE, TRACEPARENT)


@pytest.mark.parametrize("name,value", [("Baggage", "x"), ("bad name", "x"), ("baggage", "a\r\nb")])
def test_bad_extra_header_is_refused_before_the_wire(engine: Engine, name: str, value: str) -> None:
    _, local = socket.socketpair()
    with pytest.raises(EngineError):
        engine.open_stream(1, "10.244.2.2:80", local.detach(), headers=[(name, value)])


def test_reserved_extra_header_refuses_the_stream(engine: Engine, events: Events, pki: Pki) -> None:
    t = tunnel(engine, events, pki)
    _, local = socket.socketpair()
    sid = engine.open_stream(
        t.client, "10.244.2.2:80", local.detach(), headers=[("forwarded", "for=1.2.3.4")]
    )
    assert events.kind("stream_refused", stream_id=sid).detail == "bad extra request header"


def test_oversized_baggage_is_dropped_not_truncated(engine: Engine, events: Events, pki: Pki) -> None:
    t = tunnel(engine, events, pki)
    _, local = socket.socketpair()
    engine.open_stream(t.client, "10.244.2.2:80", local.detach(), headers=[("baggage", "a=" + "b" * 600)])
    assert events.kind("stream_request", conn_id=t.server).baggage == ""


def test_settings_are_ztunnel_like_and_1mib_frames_accepted(engine: Engine, events: Events, pki: Pki) -> None:
    _, sctx = contexts(engine, pki)
    lst = Listener(engine, sctx)
    conn = RawH2(lst.connect(), tls_client(pki, pki.client))
    conn.h2.update_settings({h2.settings.SettingCodes.MAX_FRAME_SIZE: 1 << 20})
    conn.flush()
    while not conn.settings_seen:
        conn.pump(0.1)
    assert conn.max_streams() == 200
    assert conn.h2.remote_settings.max_frame_size == 1 << 20
    sid = conn.open("10.244.2.2:80")
    conn.flush()
    req = events.kind("stream_request")
    up, ours = socket.socketpair()
    engine.accept_stream(req.conn_id, req.stream_id, ours.detach())
    conn.h2.increment_flow_control_window(4 << 20)
    conn.h2.max_outbound_frame_size = 1 << 20
    conn.pump(0.2)
    conn.h2.send_data(sid, b"z" * (1 << 20))  # one 1 MiB DATA frame
    conn.flush()
    got = 0
    up.settimeout(10)
    while got < 1 << 20:
        got += len(up.recv(1 << 20))
    assert got == 1 << 20
    assert engine.counters()["errors_protocol"] == 0
    conn.close()
    lst.close()


def test_peer_graceful_goaway_stops_new_streams(engine: Engine, events: Events, pki: Pki) -> None:
    t = tunnel(engine, events, pki)
    app, up, _, req = t.open()
    # the server side drains gracefully: GOAWAY(NO_ERROR), the open stream keeps working
    engine.close(t.server)
    ev = events.kind("peer_goaway", conn_id=t.client)
    assert ev.peer_id == pki.server.spiffe_id
    app.sendall(b"still")
    assert up.recv(5) == b"still"
    _, local = socket.socketpair()
    sid = engine.open_stream(t.client, "10.244.2.2:81", local.detach())
    assert events.kind("stream_refused", stream_id=sid).detail == "connection closing"
