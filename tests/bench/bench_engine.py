"""Loopback throughput through the native engine: HBONE (mTLS + HTTP/2 CONNECT) vs the engine's own
plaintext splice, with 1 and 4 concurrent streams, and the request/response round trip (p50) with the number
of engine events (Python wake-ups) it costs once the stream is up (expected 0).

Path: Python source -> TCP -> client engine stream -> TLS over TCP -> server engine -> TCP -> Python sink.
Baseline: the same sockets joined by `Engine.splice` (kernel splice, no TLS, no framing), so the ratio is
the cost of the tunnel itself. Two engines (one loop thread each) stand for the two nodes' agents. Sources
send from a preallocated buffer and sinks use recv_into, so Python adds little per byte. ~3 s per case.
"""

from __future__ import annotations

import select
import socket
import threading
import time
from collections.abc import Callable
from typing import Any

from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec

from api.spiffe import SpiffeId
from mgmt.ca import CertificateAuthority
from native.engine import Engine, Event
from tests.unit.native.engine_testkit import tcp_pair

CASE_S = 3.0
WARMUP_S = 0.5
CHUNK = 1 << 20
RR_ROUNDS = 3000
TD = "cluster.local"


def _svid(ca: CertificateAuthority, sid: SpiffeId) -> tuple[bytes, bytes]:
    key = ec.generate_private_key(ec.SECP256R1())
    chain = b"".join(c.public_bytes(serialization.Encoding.PEM) for c in ca.issue(sid, key.public_key()))
    pem = key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )
    return chain, pem


def _wait(engine: Engine, pred: Callable[[Event], bool], pending: list[Event]) -> Event:
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        pending.extend(engine.events())
        for ev in pending:
            if pred(ev):
                pending.remove(ev)
                return ev
        select.select([engine.eventfd], [], [], 0.5)
    raise RuntimeError("engine event did not arrive")


def _measure(pairs: list[tuple[socket.socket, socket.socket]]) -> float:
    """Gbit/s from all sources to all sinks over CASE_S, after a warm-up."""
    stop = threading.Event()
    counts = [0] * len(pairs)
    marks: dict[str, tuple[float, int]] = {}
    data = memoryview(bytearray(CHUNK))

    def source(sock: socket.socket) -> None:
        try:
            while not stop.is_set():
                sock.sendall(data)
        except OSError:
            pass

    def sink(i: int, sock: socket.socket) -> None:
        buf = bytearray(CHUNK)
        try:
            while n := sock.recv_into(buf):
                counts[i] += n
        except OSError:
            pass

    threads = [threading.Thread(target=source, args=(src,), daemon=True) for src, _ in pairs]
    threads += [threading.Thread(target=sink, args=(i, dst), daemon=True) for i, (_, dst) in enumerate(pairs)]
    for t in threads:
        t.start()
    time.sleep(WARMUP_S)
    marks["start"] = (time.monotonic(), sum(counts))
    time.sleep(CASE_S)
    marks["end"] = (time.monotonic(), sum(counts))
    stop.set()
    for src, dst in pairs:
        src.close()
        dst.close()
    for t in threads:
        t.join(5)
    (t0, b0), (t1, b1) = marks["start"], marks["end"]
    return (b1 - b0) * 8 / (t1 - t0) / 1e9


def _rr_p50_us(pair: tuple[socket.socket, socket.socket], done: Callable[[], None] | None = None) -> float:
    """Median round trip of a 64-byte request answered by a 64-byte response, in microseconds; `done` runs
    after the last round trip, before the sockets close."""
    client, server = pair
    for s in pair:
        s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    msg = b"x" * 64

    def echo() -> None:
        try:
            while data := server.recv(64):
                server.sendall(data)
        except OSError:
            pass

    t = threading.Thread(target=echo, daemon=True)
    t.start()
    samples = []
    for _ in range(RR_ROUNDS):
        t0 = time.perf_counter()
        client.sendall(msg)
        got = 0
        while got < len(msg):
            got += len(client.recv(64))
        samples.append(time.perf_counter() - t0)
    if done is not None:
        done()
    client.close()
    t.join(5)
    server.close()
    samples.sort()
    return samples[len(samples) // 2] * 1e6


def _splice_pairs(engine: Engine, streams: int) -> list[tuple[socket.socket, socket.socket]]:
    pairs = []
    for _ in range(streams):
        src, a = tcp_pair()
        b, dst = tcp_pair()
        engine.splice(a.detach(), b.detach())
        pairs.append((src, dst))
    return pairs


def _splice_case(streams: int, rr: bool = False) -> float:
    engine = Engine()
    engine.start()
    try:
        pairs = _splice_pairs(engine, streams)
        return _rr_p50_us(pairs[0]) if rr else _measure(pairs)
    finally:
        engine.stop()


def _hbone_case(streams: int, rr: bool = False, events_per_rr: list[float] | None = None) -> float:
    ca = CertificateAuthority.generate_root(TD)
    client_chain, client_key = _svid(ca, SpiffeId.workload(TD, "default", "bench"))
    server_chain, server_key = _svid(ca, SpiffeId.node(TD, "node-2"))
    client, server = Engine(), Engine()
    client.start()
    server.start()
    try:
        cctx = client.tls_context(
            server=False, chain_pem=client_chain, key_pem=client_key, bundle_pem=ca.bundle_pem()
        )
        sctx = server.tls_context(
            server=True, chain_pem=server_chain, key_pem=server_key, bundle_pem=ca.bundle_pem()
        )
        a, b = tcp_pair()
        cid = client.connect_hbone(a.detach(), cctx, str(SpiffeId.node(TD, "node-2")))
        sid = server.serve_hbone(b.detach(), sctx)
        pending: list[Event] = []
        pairs = []
        for i in range(streams):
            src, local = tcp_pair()
            client.open_stream(cid, f"10.244.2.2:{8000 + i}", local.detach())
            req = _wait(server, lambda e: e.kind == "stream_request", pending)
            up, dst = tcp_pair()
            server.accept_stream(sid, req.stream_id, up.detach())
            pairs.append((src, dst))
        if not rr:
            return _measure(pairs)
        time.sleep(0.1)
        client.events(), server.events()  # setup events; from here on a round trip should raise none

        def count_events() -> None:
            if events_per_rr is not None:
                events_per_rr.append((len(client.events()) + len(server.events())) / RR_ROUNDS)

        return _rr_p50_us(pairs[0], count_events)
    finally:
        client.stop()
        server.stop()


def run() -> list[dict[str, Any]]:
    rows: list[dict[str, Any]] = []
    for streams in (1, 4):
        base_name = f"splice loopback, {streams} stream(s)"
        base = _splice_case(streams)
        tunnel = _hbone_case(streams)
        rows.append({"name": base_name, "value": base, "unit": "Gbit/s", "baseline": ""})
        rows.append(
            {
                "name": f"HBONE mTLS+h2 loopback, {streams} stream(s)",
                "value": tunnel,
                "unit": "Gbit/s",
                "baseline": base_name,
            }
        )
    base_rr = _splice_case(1, rr=True)
    per_rr: list[float] = []
    tunnel_rr = _hbone_case(1, rr=True, events_per_rr=per_rr)
    rows.append({"name": "splice RR p50", "value": base_rr, "unit": "us", "baseline": ""})
    rows.append(
        {
            "name": "HBONE RR p50",
            "value": tunnel_rr,
            "unit": "us",
            "baseline": "splice RR p50",
        }
    )
    # Python wake-ups per request/response once the stream is up: the engine moves the bytes alone.
    rows.append(
        {
            "name": "HBONE RR engine events per round trip",
            "value": per_rr[0],
            "unit": "events",
            "baseline": "",
        }
    )
    return rows


if __name__ == "__main__":
    for row in run():
        print(row)
