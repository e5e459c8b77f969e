"""The plaintext pump: bytes both ways, half-close, reset, and the engine owning the fds."""

from __future__ import annotations

import hashlib
import os
import select
import socket
import threading

import pytest
from engine_testkit import Events, fd_count, tcp_pair

from native.engine import Ending, Engine, ending


def test_bytes_flow_both_ways_and_half_close(engine: Engine, events: Events) -> None:
    client, a = socket.socketpair()
    b, server = socket.socketpair()
    sid = engine.splice(a.detach(), b.detach(), tag=7)
    client.sendall(b"ping")
    assert server.recv(16) == b"ping"
    server.sendall(b"pong!")
    assert client.recv(16) == b"pong!"
    client.shutdown(socket.SHUT_WR)
    assert server.recv(16) == b""  # FIN forwarded
    server.sendall(b"late")  # the other direction stays open
    assert client.recv(16) == b"late"
    server.close()
    assert client.recv(16) == b""
    ev = events.kind("splice_closed", conn_id=sid)
    assert (ev.tag, ev.bytes_in, ev.bytes_out, ev.detail) == (7, 4, 9, "")
    client.close()


def test_large_transfer_checksum(engine: Engine, events: Events) -> None:
    client, a = tcp_pair()
    b, server = tcp_pair()
    engine.splice(a.detach(), b.detach())
    payload = os.urandom(1 << 20) * 32
    sent = hashlib.sha256(payload).hexdigest()

    def send() -> None:
        client.sendall(payload)
        client.shutdown(socket.SHUT_WR)

    t = threading.Thread(target=send)
    t.start()
    digest = hashlib.sha256()
    total = 0
    while chunk := server.recv(1 << 20):
        digest.update(chunk)
        total += len(chunk)
    t.join()
    assert (total, digest.hexdigest()) == (len(payload), sent)
    server.close()
    client.close()
    assert events.kind("splice_closed").bytes_in == len(payload)


@pytest.mark.parametrize("side", ["a", "b"])
def test_reset_propagates(engine: Engine, events: Events, side: str) -> None:
    client, a = tcp_pair()
    b, server = tcp_pair()
    engine.splice(a.detach(), b.detach())
    client.sendall(b"x")
    assert server.recv(1) == b"x"
    resetting, other = (client, server) if side == "a" else (server, client)
    resetting.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, b"\x01\x00\x00\x00\x00\x00\x00\x00")
    resetting.close()  # RST
    ev = events.kind("splice_closed")
    assert ev.detail.startswith(f"{side}: ")  # the error names the socket that failed
    assert ending(ev) is (Ending.SPLICE_A_FAILED if side == "a" else Ending.SPLICE_B_FAILED)
    server = other
    try:
        data = server.recv(1)
    except ConnectionResetError:
        data = b"reset"
    assert data in (b"", b"reset")
    server.close()


def test_close_by_agent_and_stop_frees_fds() -> None:
    before = fd_count()
    eng = Engine()
    eng.start()
    evs = Events(eng)
    keep = []
    for _ in range(20):
        c, a = socket.socketpair()
        b, s = socket.socketpair()
        sid = eng.splice(a.detach(), b.detach())
        keep += [c, s]
    eng.close(sid)
    assert evs.kind("splice_closed", conn_id=sid).detail == "closed by agent"
    eng.stop()
    for s in keep:
        s.close()
    assert fd_count() == before


def test_informational_events_wake_python_without_a_decision_event(engine: Engine) -> None:
    """splice_closed is informational: the engine defers its wake-up (at most a few ms, docs/engine.md
    "Events"), but never loses it: the eventfd turns readable with nothing else happening, and a burst of
    closes arrives complete, each exactly once."""
    ids = []
    ends = []
    for tag in range(40):
        client, a = socket.socketpair()
        b, server = socket.socketpair()
        ids.append(engine.splice(a.detach(), b.detach(), tag=tag))
        ends += [client, server]
    for sock in ends:
        sock.close()
    got: list[int] = []
    while len(got) < len(ids):
        readable, _, _ = select.select([engine.eventfd], [], [], 20)
        assert readable, f"the engine never woke Python (got {len(got)} of {len(ids)} splice_closed)"
        got += [ev.conn_id for ev in engine.events() if ev.kind == "splice_closed"]
    assert sorted(got) == sorted(ids)
    assert engine.events() == []
