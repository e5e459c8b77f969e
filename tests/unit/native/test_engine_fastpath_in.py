"""The inbound fast path (native/src/fastpath_in.c): a served CONNECT matching an installed entry (its
connection, its raw :authority, the source its `forwarded` claims, the current generation, a credit left) is
accepted by the engine, connected to the entry's upstream, with a fast_accept event first; anything else is
a stream_request, as without the fast path. Real TLS HBONE on loopback; the upstream a real TCP echo."""

from __future__ import annotations

import contextlib
import socket
import threading
from collections.abc import Iterator
from pathlib import Path

import hpack
import pytest
from engine_testkit import Events, Pki, Tunnel, contexts, tcp_pair, tunnel
from test_engine_bad_peers import EMPTY_SETTINGS, PREFACE, frame_header, raw_client

from agent.proxy.forwarded import parse_forwarded
from native.engine import Engine, EngineError

FASTIN_TAG = 1 << 61  # AMBIT_FASTIN_TAG_BIT
CLAIM = "10.244.1.2"
AUTHORITY = "10.244.2.2:8080"


@pytest.fixture
def echo() -> Iterator[tuple[str, int]]:
    """A TCP echo server on loopback (the 'pod' the engine connects to)."""
    srv = socket.create_server(("127.0.0.1", 0))
    stop = threading.Event()

    def serve() -> None:
        while not stop.is_set():
            try:
                conn, _ = srv.accept()
            except OSError:
                return
            threading.Thread(target=_echo_one, args=(conn,), daemon=True).start()

    threading.Thread(target=serve, daemon=True).start()
    yield srv.getsockname()
    stop.set()
    srv.close()


def _echo_one(conn: socket.socket) -> None:
    with conn, contextlib.suppress(OSError):  # raw test clients never close their streams cleanly
        while data := conn.recv(65536):
            conn.sendall(data)


def _put(engine: Engine, conn: int, upstream: tuple[str, int], entry: int = 1, credits: int = 8,
         authority: str = AUTHORITY, claim: str = CLAIM) -> None:  # fmt: skip
    engine.fastin_put(entry, engine.fastin_generation(), conn, authority, claim, upstream, None, 0, credits)


def _open(t: Tunnel, authority: str = AUTHORITY, claim: str = CLAIM, port: int = 43210) -> socket.socket:
    app, local = socket.socketpair()
    t.engine.open_stream(t.client, authority, local.detach(), forwarded=claim, forwarded_port=port)
    return app


def _ready(engine: Engine, events: Events, pki: Pki) -> Tunnel:
    engine.fastin_set_capacity(16)
    t = tunnel(engine, events, pki)
    events.kind("handshake_done", conn_id=t.client)
    events.kind("peer_verified", conn_id=t.server)
    return t


def _counters(engine: Engine) -> dict[str, int]:
    return {k: v for k, v in engine.counters().items() if k.startswith("fastpath_in_")}


def test_installed_stream_is_accepted_without_python(
    engine: Engine, events: Events, pki: Pki, echo: tuple[str, int]
) -> None:
    t = _ready(engine, events, pki)
    _put(engine, t.server, echo)
    app = _open(t, port=40001)
    fast = events.kind("fast_accept", conn_id=t.server)
    # One event, once connected (it stands for stream_accepted): entry, claim port, the request's trace.
    assert (fast.bytes_in, fast.bytes_out, fast.status) == (1, 0, 40001) and fast.tag & FASTIN_TAG
    assert fast.traceparent == ""  # open_stream sent none: reported as received
    events.kind("stream_open", conn_id=t.client)
    app.sendall(b"through the engine")
    assert app.recv(64) == b"through the engine"
    app.close()
    assert events.kind("stream_closed", tag=fast.tag).bytes_in == len(b"through the engine")
    assert not [e for e in events.seen if e.kind in ("stream_request", "stream_accepted")]
    c = _counters(engine)
    assert (c["fastpath_in_hits"], c["fastpath_in_misses"], c["fastpath_in_entries"]) == (1, 0, 1)


@pytest.mark.parametrize(
    "authority,claim",
    [("10.244.2.2:8081", CLAIM), ("10.244.2.3:8080", CLAIM), (AUTHORITY, "10.244.1.3"), (AUTHORITY, "")],
    ids=["other-port", "other-address", "other-claim", "no-claim"],
)
def test_anything_but_the_key_goes_to_python(
    engine: Engine, events: Events, pki: Pki, echo: tuple[str, int], authority: str, claim: str
) -> None:
    t = _ready(engine, events, pki)
    _put(engine, t.server, echo)
    app = _open(t, authority, claim)
    req = events.kind("stream_request", conn_id=t.server)
    assert req.authority == authority
    assert _counters(engine)["fastpath_in_misses_no_entry"] == 1
    assert not [e for e in events.seen if e.kind == "fast_accept"]
    app.close()


def test_another_connection_of_the_same_peer_goes_to_python(
    engine: Engine, events: Events, pki: Pki, echo: tuple[str, int]
) -> None:
    t = _ready(engine, events, pki)
    other = _ready(engine, events, pki)
    _put(engine, t.server, echo)
    app = _open(other)
    assert events.kind("stream_request").conn_id == other.server
    app.close()


def test_stale_generation_and_spent_credits_go_to_python(
    engine: Engine, events: Events, pki: Pki, echo: tuple[str, int]
) -> None:
    t = _ready(engine, events, pki)
    _put(engine, t.server, echo, credits=1)
    first = _open(t)
    events.kind("fast_accept", conn_id=t.server)
    second = _open(t)
    events.kind("stream_request", conn_id=t.server)
    assert _counters(engine)["fastpath_in_misses_no_credit"] == 1
    assert engine.fastin_add_credits(1, 1)
    engine.fastin_invalidate()  # a new snapshot, policy or identity: the entry no longer matches
    third = _open(t)
    events.kind("stream_request", conn_id=t.server)
    assert _counters(engine)["fastpath_in_misses_stale"] == 1
    assert engine.fastin_remove(1) == 1  # the credit the stale entry never spent
    for app in (first, second, third):
        app.close()


def test_installing_is_bounded_and_refused_when_stale(engine: Engine, events: Events) -> None:
    engine.fastin_set_capacity(2)
    upstream = ("127.0.0.1", 9)
    gen = engine.fastin_generation()
    engine.fastin_put(1, gen, 7, AUTHORITY, CLAIM, upstream, None, 0, 1)
    with pytest.raises(EngineError, match="entry exists"):
        engine.fastin_put(2, gen, 7, AUTHORITY, CLAIM, upstream, None, 0, 1)
    engine.fastin_put(3, gen, 7, AUTHORITY, "", upstream, None, 0, 1)
    with pytest.raises(EngineError, match="table full"):
        engine.fastin_put(4, gen, 8, AUTHORITY, CLAIM, upstream, None, 0, 1)
    engine.fastin_invalidate()
    assert engine.fastin_remove(3) == 1
    with pytest.raises(EngineError, match="stale generation"):
        engine.fastin_put(5, gen, 8, AUTHORITY, CLAIM, upstream, None, 0, 1)
    for bad in (("fd00::2", "bad claimed source"), ("010.244.1.2", "bad claimed source")):
        with pytest.raises(EngineError, match=bad[1]):
            engine.fastin_put(6, engine.fastin_generation(), 8, AUTHORITY, bad[0], upstream, None, 0, 1)
    c = _counters(engine)
    assert (c["fastpath_in_entries"], c["fastpath_in_refused"]) == (1, 3)
    assert engine.fastin_remove(1) == 1 and engine.fastin_remove(1) == -1


# Claims the engine reads, and what Python reads them as: the engine must never be more lenient. (Values
# with surrounding whitespace never reach either: nghttp2 resets such a stream, RFC 9113 8.2.1.)
SAME_CLAIM = ["for=10.244.1.2", 'for="10.244.1.2"', 'for="10.244.1.2:1"', 'for="10.244.1.2:65535"']
NOT_READ = [
    "for=010.244.1.2", "FOR=10.244.1.2", "For=10.244.1.2", 'for="10.244.1.2:0"', 'for="10.244.1.2:080"',
    'for="10.244.1.2:65536"', "for=10.244.1.2:80", 'for="10.244.1.2";host=echo', 'for="[::ffff:10.244.1.2]"',
    'for="10.244.1.2"x', "for=10.244.1.2, for=10.244.1.3",
    "for=10.244.1.02", 'for="10.244.1.2:"', "for=", 'for=""', "for=10.244.1", "for=127.0.0.1",
    "for=0.0.0.0", "for=224.0.0.1", 'for="10.244.1.2:4321a"', "for=_hidden", "for=unknown",
]  # fmt: skip


def test_claims_are_read_strictly_and_as_python_reads_them(
    engine: Engine, events: Events, pki: Pki, echo: tuple[str, int], tmp_path: Path
) -> None:
    """Over one raw HTTP/2 connection: a claim the engine matches is one Python's parser gives the same
    address for; every other spelling (Python may or may not accept it) is Python's to decide."""
    engine.fastin_set_capacity(16)
    _, sctx = contexts(engine, pki)
    raw, ours = tcp_pair()
    conn = engine.serve_hbone(ours.detach(), sctx)
    encoder = hpack.Encoder()
    with raw_client(pki, tmp_path).wrap_socket(raw) as tls:
        tls.sendall(PREFACE + EMPTY_SETTINGS)
        events.kind("peer_verified", conn_id=conn)
        _put(engine, conn, echo, credits=100)
        for i, value in enumerate(SAME_CLAIM + NOT_READ):
            block = encoder.encode([(":method", "CONNECT"), (":authority", AUTHORITY), ("forwarded", value)])
            tls.sendall(frame_header(len(block), 1, 0x4, 2 * i + 1) + block)
            ev = events.wait(lambda e: e.kind in ("fast_accept", "stream_request") and e.conn_id == conn)
            if value in SAME_CLAIM:
                assert ev.kind == "fast_accept", value
                claim = parse_forwarded(value)
                assert claim is not None and claim.ip == CLAIM, value
            else:
                assert ev.kind == "stream_request" and ev.forwarded == value, value
    c = _counters(engine)
    assert (c["fastpath_in_hits"], c["fastpath_in_misses_claim"]) == (len(SAME_CLAIM), len(NOT_READ))


def test_a_hit_whose_upstream_fails_is_refused_503(engine: Engine, events: Events, pki: Pki) -> None:
    t = _ready(engine, events, pki)
    closed = socket.create_server(("127.0.0.1", 0))
    port = closed.getsockname()[1]
    closed.close()  # nothing listens there: the connect is refused
    _put(engine, t.server, ("127.0.0.1", port))
    app = _open(t)
    fast = events.kind("fast_accept", conn_id=t.server)
    assert fast.bytes_out == 1  # failed: upstream_failed follows
    assert events.kind("upstream_failed", tag=fast.tag).status > 0
    assert events.kind("stream_refused", conn_id=t.client).status == 503
    app.close()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@pytest.mark.parametrize("taken", [False, True], ids=["port-free", "port-taken"])
def test_the_pod_sees_the_client_port_when_it_is_free(
    engine: Engine, events: Events, pki: Pki, taken: bool
) -> None:
    """From the client's address, the engine connects from the port `forwarded` names (no port search
    through the TIME_WAIT of earlier connects); a port already held here falls back to one the kernel
    picks."""
    srv = socket.create_server(("127.0.0.1", 0))
    t = _ready(engine, events, pki)
    engine.fastin_put(
        1, engine.fastin_generation(), t.server, AUTHORITY, CLAIM, srv.getsockname(), "127.0.0.1", 0, 8
    )
    port = _free_port()
    holder = socket.socket()
    if taken:
        holder.bind(("127.0.0.1", port))
    app = _open(t, port=port)
    events.kind("fast_accept", conn_id=t.server)
    pod, peer = srv.accept()
    assert peer[0] == "127.0.0.1" and (peer[1] == port) is not taken
    app.sendall(b"x")
    assert pod.recv(1) == b"x"
    for s in (app, pod, holder, srv):
        s.close()
