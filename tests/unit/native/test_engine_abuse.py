"""Bounded under attack: aborted handshakes leave no memory, per-source handshake caps, one peer's streams
cannot starve another client, rapid reset has a budget. Real sockets, real TLS, a raw HTTP/2 client."""

from __future__ import annotations

import json
import os
import socket
import ssl
import subprocess
import sys
import time
from pathlib import Path

import h2.settings
from engine_abuse import Listener, RawH2, engine_with, tls_client, wait_counter
from engine_testkit import TD, Events, Pki, issue

from api.spiffe import SpiffeId
from native.engine import Event

MIB = 1024


def test_aborted_handshakes_leave_no_memory() -> None:
    """10,000 handshakes abandoned four ways; RSS once they are gone grows < 10 MB (it grew ~350 MB).

    Run in a fresh process: RSS is the whole process's, and in the suite's process other tests' threads,
    engines and caches move it by tens of MB."""
    here = Path(__file__).resolve().parent
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(here), str(here.parents[2])])}
    out = subprocess.run(
        [sys.executable, str(here / "engine_abuse.py"), "handshake-memory"],
        capture_output=True,
        text=True,
        timeout=240,
        env=env,
    )
    assert out.returncode == 0, out.stderr[-4000:]
    result = json.loads(out.stdout.strip().splitlines()[-1])
    assert result["conns_opened"] == 10_900 and result["conns_active"] == 0
    assert result["growth_kib"] < 10 * MIB, f"RSS grew {result['growth_kib'] / MIB:.1f} MiB"


def test_pending_handshakes_are_capped_per_source(pki: Pki) -> None:
    with engine_with(pki, pending_per_source=8) as (eng, events, cctx, sctx):
        eng.set_timeouts(handshake_s=30.0)
        lst = Listener(eng, sctx)
        held = [lst.connect("127.0.0.1") for _ in range(20)]
        wait_counter(eng, "refused_handshakes", 12)
        # another source still gets through while the first one holds its share
        other = socket.socket()
        other.bind(("127.0.0.2", 0))
        other.connect(lst.addr)
        s, _ = lst.sock.accept()
        sid = eng.serve_hbone(s.detach(), sctx)
        eng.connect_hbone(other.detach(), cctx, pki.server.spiffe_id)
        assert events.kind("peer_verified", conn_id=sid).peer_id == pki.client.spiffe_id
        for h in held:
            h.close()
        lst.close()


def test_one_peer_holding_streams_cannot_starve_another(pki: Pki) -> None:
    """A peer tries to hold 20,000 streams (100 connections x 200, our advertised maximum); its share is
    capped, the rest refused (REFUSED_STREAM, counted), and another client's new connection works."""
    with engine_with(pki, streams_per_peer=1000) as (eng, events, _, sctx):
        lst = Listener(eng, sctx)
        ctx = tls_client(pki, pki.client)
        peers = []
        for _ in range(100):
            conn = _raw_connected(lst, ctx)
            assert conn.max_streams() == 200
            for i in range(200):
                conn.open(f"10.244.2.2:{i + 1}")
            conn.flush()
            peers.append(conn)
        for conn in peers:
            conn.pump(0.05)
        wait_counter(eng, "refused_streams_peer", 19_000, timeout=60)
        requests = [e for e in _drain(events) if e.kind == "stream_request"]
        assert len(requests) <= 1000
        # another identity, new connection, new stream: served
        other = issue(pki.ca, SpiffeId.workload(TD, "default", "other"))
        octx = eng.tls_context(server=False, chain_pem=other.chain_pem, key_pem=other.key_pem,
                               bundle_pem=pki.bundle)  # fmt: skip
        a = socket.create_connection(lst.addr)
        b, _ = lst.sock.accept()
        server = eng.serve_hbone(b.detach(), sctx)
        client = eng.connect_hbone(a.detach(), octx, pki.server.spiffe_id)
        app, local = socket.socketpair()
        eng.open_stream(client, "10.244.2.2:80", local.detach())
        req = events.wait(lambda e: e.kind == "stream_request" and e.conn_id == server)
        assert req.peer_id == other.spiffe_id
        up, ours = socket.socketpair()
        eng.accept_stream(server, req.stream_id, ours.detach())
        app.sendall(b"ping")
        assert up.recv(4) == b"ping"
        for conn in peers:
            conn.close()
        lst.close()


def test_rapid_reset_has_a_budget(pki: Pki) -> None:
    """HEADERS + RST_STREAM x 1,000 on one connection: streams reset before they were announced cost no
    event; past the per-second budget the connection gets GOAWAY(ENHANCE_YOUR_CALM) and ends."""
    with engine_with(pki, resets_per_s=200) as (eng, events, _, sctx):
        lst = Listener(eng, sctx)
        conn = _raw_connected(lst, tls_client(pki, pki.client))
        for i in range(1000):
            sid = conn.open(f"10.244.2.2:{i + 1}")
            conn.reset(sid)
            if i % 50 == 49:
                conn.flush()
        conn.flush()
        wait_counter(eng, "reset_floods", 1)
        wait_counter(eng, "conns_active", 0)
        evs = _drain(events)
        assert len([e for e in evs if e.kind in ("stream_request", "stream_closed")]) < 50
        assert eng.counters()["streams_reset_early"] >= 150
        conn.close()
        lst.close()


def test_reset_budget_is_per_peer_identity(pki: Pki) -> None:
    """30 connections of one identity, 100 resets each (under any per-connection budget): the identity's
    budget (200/s over all its connections) ends them (per connection, none would be over 200)."""
    with engine_with(pki, resets_per_s=200) as (eng, events, _, sctx):
        lst = Listener(eng, sctx)
        ctx = tls_client(pki, pki.client)
        conns = [_raw_connected(lst, ctx) for _ in range(30)]
        for conn in conns:
            for i in range(100):
                conn.reset(conn.open(f"10.244.2.2:{i + 1}"))
            conn.flush()
        # the first 200 resets are within budget; past them every connection that resets again ends
        deadline = time.monotonic() + 30
        while eng.counters()["reset_floods"] < 10 and time.monotonic() < deadline:
            _drain(events)
            time.sleep(0.05)
        assert eng.counters()["reset_floods"] >= 10
        assert len([e for e in _drain(events) if e.kind == "stream_request"]) < 200
        for conn in conns:
            conn.close()
        lst.close()


def _raw_connected(lst: Listener, ctx: ssl.SSLContext) -> RawH2:
    """A RawH2 connection served by the engine, once our SETTINGS arrived."""
    conn = RawH2(lst.connect(), ctx)
    for _ in range(20):
        if conn.settings_seen:
            break
        conn.pump(0.05)
    return conn


def _drain(events: Events) -> list[Event]:
    events.drain()
    out, events.seen = events.seen, []
    return out


def _fill(socks: list[socket.socket], cap: int) -> int:
    """Write into every socket until none takes more (the engine stopped reading them), at most `cap` bytes
    each; returns the total taken."""
    chunk, taken, idle = b"\0" * 65536, {s: 0 for s in socks}, 0
    while idle < 5:
        moved = False
        for s in socks:
            while taken[s] < cap:
                try:
                    taken[s] += s.send(chunk[: cap - taken[s]])
                    moved = True
                except BlockingIOError:
                    break
        idle = 0 if moved else idle + 1
        time.sleep(0.05)  # let the engine read what it will
    return sum(taken.values())


def test_a_peer_granting_no_window_pins_bounded_memory(pki: Pki) -> None:
    """A peer that opens 64 streams and never grants window (SETTINGS_INITIAL_WINDOW_SIZE 0) while the pods
    behind them send: the engine buffers at most conn_buffer for the whole connection (each stream at most
    stream_buffer), then stops reading the pods' sockets; their senders block (instead of 64 x 128 KiB =
    8 MiB, or without per-stream bounds everything they send)."""
    conn_buffer, streams = 256 << 10, 64
    with engine_with(pki, conn_buffer=conn_buffer) as (eng, events, _, sctx):
        lst = Listener(eng, sctx)
        conn = _raw_connected(lst, tls_client(pki, pki.client))
        conn.h2.update_settings({h2.settings.SettingCodes.INITIAL_WINDOW_SIZE: 0})
        for i in range(streams):
            conn.open(f"10.244.2.2:{i + 1}")
        conn.flush()
        pods = []
        for _ in range(streams):
            req = events.wait(lambda e: e.kind == "stream_request")
            pod, ours = socket.socketpair()
            pod.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 4096)
            pod.setblocking(False)
            eng.accept_stream(req.conn_id, req.stream_id, ours.detach())
            pods.append(pod)
        conn.pump(0.1)  # our SETTINGS ack, the 200s
        held = _fill(pods, 1 << 20)
        slack = streams * 16 * 1024  # what the socket pairs themselves hold (measured: ~8 KiB each)
        assert held <= conn_buffer + slack, held
        assert eng.counters()["conns_active"] == 1  # held, not failed
        for pod in pods:
            pod.close()
        conn.close()
        lst.close()
