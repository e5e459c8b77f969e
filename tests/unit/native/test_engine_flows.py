"""Live byte counts and state of open streams and splices (`Engine.flow_stats`), the admin view's source."""

from __future__ import annotations

import socket
import time
from collections.abc import Callable

import pytest
from engine_testkit import Events, Pki, tcp_pair, tunnel

from native.engine import Engine, EngineError, FlowStats


def _until(
    engine: Engine, flows: list[tuple[int, int]], done: Callable[[list[FlowStats]], bool]
) -> list[FlowStats]:
    """Polls until `done` holds (the loops move bytes on their own time), then returns that answer."""
    deadline = time.monotonic() + 10
    while True:
        got = engine.flow_stats(flows)
        if done(got) or time.monotonic() > deadline:
            return got
        time.sleep(0.02)


def _recv_exactly(sock: socket.socket, n: int) -> bytes:
    buf = b""
    while len(buf) < n:
        chunk = sock.recv(n - len(buf))
        assert chunk, f"EOF after {len(buf)} of {n} bytes"
        buf += chunk
    return buf


def test_stream_counts_grow_while_open_and_match_exactly(engine: Engine, events: Events, pki: Pki) -> None:
    t = tunnel(engine, events, pki)
    app, upstream, opened, req = t.open()
    client, server = (t.client, opened.stream_id), (t.server, req.stream_id)
    app.sendall(b"a" * 70_000)
    assert _recv_exactly(upstream, 70_000) == b"a" * 70_000
    upstream.sendall(b"b" * 1234)
    assert _recv_exactly(app, 1234) == b"b" * 1234
    first = _until(engine, [client, server], lambda s: s[1].bytes_out == 1234)
    # Client stream: sent to the peer / received from it; the served stream sees the same bytes mirrored.
    assert first == [FlowStats("open", 1234, 70_000), FlowStats("open", 70_000, 1234)]
    app.sendall(b"c" * 500_000)
    assert len(_recv_exactly(upstream, 500_000)) == 500_000
    second = engine.flow_stats([client, server])
    assert second == [FlowStats("open", 1234, 570_000), FlowStats("open", 570_000, 1234)]
    app.shutdown(socket.SHUT_WR)  # one direction ended: half-closed until the other ends too
    half = _until(engine, [client], lambda s: s[0].state != "open")
    assert half[0].state == "half_closed" and half[0].bytes_out == 570_000
    upstream.close()
    app.close()
    events.kind("stream_closed", conn_id=t.client)
    events.kind("stream_closed", conn_id=t.server)
    # Ended: the engine holds nothing more; unknown, not an error.
    assert engine.flow_stats([client, server]) == [FlowStats("unknown", 0, 0)] * 2


def test_splice_counts_while_open(engine: Engine, events: Events) -> None:
    a_app, a_eng = tcp_pair()
    b_eng, b_app = tcp_pair()
    sid = engine.splice(a_eng.detach(), b_eng.detach(), tag=5)
    a_app.sendall(b"x" * 300_000)
    assert len(_recv_exactly(b_app, 300_000)) == 300_000
    b_app.sendall(b"y" * 77)
    assert _recv_exactly(a_app, 77) == b"y" * 77
    got = _until(engine, [(sid, 0)], lambda s: s[0].bytes_out == 77)
    assert got == [FlowStats("open", 300_000, 77)]
    a_app.close()
    b_app.close()
    events.kind("splice_closed", conn_id=sid)
    assert engine.flow_stats([(sid, 0)]) == [FlowStats("unknown", 0, 0)]


def test_unknown_ids_and_wrong_kind_are_unknown(engine: Engine, events: Events, pki: Pki) -> None:
    t = tunnel(engine, events, pki)
    app, upstream, opened, _ = t.open()  # held open: a closed socket would make the stream half-closed
    flows = [
        (t.client, opened.stream_id + 10_000),  # no such stream
        (t.server, opened.stream_id),  # a stream of another connection
        (t.client, 0),  # an HBONE connection is no splice
        (2**63, 2**63),
        (t.client, opened.stream_id),
    ]
    got = engine.flow_stats(flows)
    assert [s.state for s in got] == ["unknown"] * 4 + ["open"]
    assert engine.flow_stats([]) == []
    app.close()
    upstream.close()


def test_batches_beyond_one_query_and_stopped_engine(pki: Pki) -> None:
    eng = Engine(threads=2)
    eng.start()
    try:
        a_app, a_eng = tcp_pair()
        b_eng, b_app = tcp_pair()
        sid = eng.splice(a_eng.detach(), b_eng.detach())
        a_app.sendall(b"z" * 10)
        assert _recv_exactly(b_app, 10) == b"z" * 10
        # 10,000 flows: three queries of at most 4,096; the real one is found wherever it sits.
        flows = [(sid + 1000 + i, 0) for i in range(10_000)]
        flows[7777] = (sid, 0)
        got = _until(eng, flows, lambda s: s[7777].bytes_in == 10)
        assert len(got) == 10_000 and got[7777] == FlowStats("open", 10, 0)
        assert sum(s.state != "unknown" for s in got) == 1
    finally:
        eng.stop()
    with pytest.raises(EngineError, match="engine stopped"):
        eng.flow_stats([(sid, 0)])
