"""The outbound fast path (native/src/fastpath.c): the engine accepts on a listener and opens the CONNECT
stream for (source, destination) entries; everything else reaches Python with its fd. Real sockets and TLS:
the listener is plain loopback, so the "original destination" is the listener's own address."""

from __future__ import annotations

import os
import re
import socket
import time
from collections.abc import Iterator

import pytest
from engine_testkit import Events, Pki, Tunnel, fd_count, tunnel

from native.engine import Engine, EngineError, Event

BAGGAGE = "k8s.cluster.name=Kubernetes,k8s.namespace.name=app,k8s.pod.name=a"
TRACEPARENT = re.compile(r"00-[0-9a-f]{32}-[0-9a-f]{16}-00")


@pytest.fixture
def listener(engine: Engine) -> Iterator[tuple[str, int]]:
    """A listening socket handed to the engine; yields its address."""
    lst = socket.socket()
    lst.bind(("127.0.0.1", 0))
    lst.listen(64)
    addr = lst.getsockname()
    engine.fastpath_listen(lst.detach())
    yield addr


def _put(engine: Engine, t: Tunnel, addr: tuple[str, int], entry: int = 1, credits: int = 8) -> None:
    engine.fastpath_put(
        entry, engine.fastpath_generation(), "127.0.0.1", addr[0], addr[1], [t.client], spread=1,
        credits=credits, authority=f"10.244.2.2:{addr[1]}", forwarded="10.244.1.2",
        headers=[("baggage", BAGGAGE)],
    )  # fmt: skip


def _connect(addr: tuple[str, int], source: str = "127.0.0.1") -> socket.socket:
    sock = socket.socket()
    sock.bind((source, 0))
    sock.connect(addr)
    return sock


def _miss(events: Events) -> Event:
    ev = events.kind("fast_miss")
    os.close(ev.status)  # the fd is the caller's now
    return ev


def _ready(engine: Engine, events: Events, pki: Pki) -> Tunnel:
    t = tunnel(engine, events, pki)
    events.kind("handshake_done", conn_id=t.client)
    return t


def test_installed_destination_opens_without_python(
    engine: Engine, events: Events, pki: Pki, listener: tuple[str, int]
) -> None:
    t = _ready(engine, events, pki)
    _put(engine, t, listener)
    client = _connect(listener)
    opened = events.kind("fast_open")
    assert (opened.conn_id, opened.bytes_in, opened.status) == (t.client, 1, client.getsockname()[1])
    assert TRACEPARENT.fullmatch(opened.traceparent) and opened.tag >= 1 << 62
    req = events.kind("stream_request", conn_id=t.server)
    assert req.authority == f"10.244.2.2:{listener[1]}"
    port = client.getsockname()[1]
    assert (req.forwarded, req.baggage) == (f'for="10.244.1.2:{port}"', BAGGAGE)
    assert req.traceparent == opened.traceparent  # the one the record names is the one sent
    up, ours = socket.socketpair()
    engine.accept_stream(t.server, req.stream_id, ours.detach(), tag=5)
    client.sendall(b"ping")
    assert up.recv(4) == b"ping"
    client.close()
    up.close()
    closed = events.kind("stream_closed", tag=opened.tag)
    assert closed.bytes_out == 4
    # fast_open reported the stream: its 200 adds no stream_open (one event less per fast connection)
    assert not [ev for ev in events.seen if ev.kind == "stream_open" and ev.tag == opened.tag]
    counters = engine.counters()
    assert (counters["fastpath_hits"], counters["fastpath_misses"], counters["fastpath_entries"]) == (1, 0, 1)


def test_misses_hand_the_socket_to_python(
    engine: Engine, events: Events, pki: Pki, listener: tuple[str, int]
) -> None:
    """No entry (another source), spent credits, and a stale generation each arrive as fast_miss with a
    working fd: never passed through, never dropped."""
    t = _ready(engine, events, pki)
    _put(engine, t, listener, credits=1)
    other = _connect(listener, "127.0.0.2")
    ev = events.kind("fast_miss")
    theirs = socket.socket(fileno=ev.status)
    theirs.sendall(b"to python")
    assert other.recv(9) == b"to python"
    theirs.close()
    first = _connect(listener)
    events.kind("fast_open")
    spent = _connect(listener)
    _miss(events)
    assert engine.fastpath_add_credits(1, 2)
    engine.fastpath_invalidate()
    stale = _connect(listener)
    _miss(events)
    counters = engine.counters()
    assert counters["fastpath_misses_no_entry"] == counters["fastpath_misses_no_credit"] == 1
    assert counters["fastpath_misses_stale"] == 1 and counters["fastpath_hits"] == 1
    assert engine.fastpath_remove(1) == 2  # the two credits added back, none used after invalidation
    assert engine.fastpath_remove(1) == -1
    assert not engine.fastpath_add_credits(1, 1)
    for sock in (first, spent, stale, other):
        sock.close()


def test_table_is_bounded_and_generation_checked(engine: Engine, events: Events, pki: Pki) -> None:
    t = _ready(engine, events, pki)
    engine.fastpath_set_capacity(2)
    _put(engine, t, ("127.0.0.1", 81), entry=1)
    _put(engine, t, ("127.0.0.1", 82), entry=2)
    with pytest.raises(EngineError, match="table full"):
        _put(engine, t, ("127.0.0.1", 83), entry=3)
    assert engine.fastpath_remove(2) == 8
    with pytest.raises(EngineError, match="entry exists"):  # one entry per (source, destination)
        _put(engine, t, ("127.0.0.1", 81), entry=4)
    stale = engine.fastpath_generation()
    engine.fastpath_invalidate()
    with pytest.raises(EngineError, match="stale generation"):
        engine.fastpath_put(5, stale, "127.0.0.1", "127.0.0.1", 84, [t.client], spread=1, credits=1,
                            authority="10.244.2.2:84")  # fmt: skip
    with pytest.raises(EngineError):
        engine.fastpath_put(6, engine.fastpath_generation(), "not-an-ip", "127.0.0.1", 85, [t.client],
                            spread=1, credits=1, authority="10.244.2.2:85")  # fmt: skip
    assert engine.counters()["fastpath_entries"] == 1


def test_connection_gone_between_lookup_and_open_goes_to_python(
    engine: Engine, events: Events, pki: Pki, listener: tuple[str, int]
) -> None:
    """The pooled connection stopped taking streams (closing): the client reaches Python, not a refusal."""
    t = _ready(engine, events, pki)
    _put(engine, t, listener)
    engine.close(t.client)
    client = _connect(listener)
    _miss(events)
    assert engine.counters()["fastpath_misses_conn_gone"] == 1
    assert engine.fastpath_remove(1) == 8  # the credit came back with the miss
    client.close()


def test_hand_offs_never_drained_are_closed_with_the_engine() -> None:
    """An accepted socket queued for Python (fast_miss) when the engine stops is closed, not leaked."""
    before = fd_count()
    eng = Engine(threads=1)
    eng.start()
    lst = socket.socket()
    lst.bind(("127.0.0.1", 0))
    lst.listen(8)
    addr = lst.getsockname()
    eng.fastpath_listen(lst.detach())
    client = socket.create_connection(addr)
    deadline = time.monotonic() + 10
    while eng.counters()["fastpath_misses"] < 1 and time.monotonic() < deadline:
        time.sleep(0.01)
    eng.stop()
    client.close()
    assert fd_count() == before
