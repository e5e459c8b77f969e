"""Abuse: what the engine (its loop threads: the agent's data path) spends on hostile work, per 1,000
aborted TLS handshakes, per 1,000 reset streams (rapid reset over 30 connections) and per 1,000 held
streams: loop-thread CPU (ms) and process RSS growth (KiB, after the work is gone for the first two, while
held for the last). Python clients run in this process but outside the loop threads, so CPU is the engine's
own; RSS includes them (small: sockets only)."""

from __future__ import annotations

import os
import socket
import sys
import threading
import time
from typing import Any

from native.engine import Engine

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "unit", "native"))
from engine_abuse import Listener, RawH2, abort_handshakes, rss_kib, settle, tls_client, wait_counter  # noqa: E402
from engine_testkit import Pki, contexts, make_pki  # noqa: E402

HANDSHAKES = 6000
RESET_CONNS, RESETS_PER_CONN = 30, 1000
HELD = 2000
TICK = os.sysconf("SC_CLK_TCK")


def _tids() -> set[int]:
    return {int(t) for t in os.listdir("/proc/self/task")}


def _cpu_ms(tids: set[int]) -> float:
    total = 0
    for tid in tids:
        try:
            with open(f"/proc/self/task/{tid}/stat") as f:
                fields = f.read().rsplit(")", 1)[1].split()
        except FileNotFoundError:
            continue
        total += int(fields[11]) + int(fields[12])  # utime + stime
    return total * 1000 / TICK


class Measured:
    """An engine whose loop threads' CPU we can read."""

    def __init__(self, pki: Pki, **limits: int) -> None:
        before = _tids()
        self.engine = Engine(threads=2)
        self.engine.start()
        self.loops = _tids() - before - {threading.get_native_id()}
        if limits:
            self.engine.set_limits(**limits)
        self.cctx, self.sctx = contexts(self.engine, pki)

    def cpu(self) -> float:
        return _cpu_ms(self.loops)

    def stop(self) -> None:
        self.engine.stop()


def _handshakes(pki: Pki) -> tuple[float, float]:
    m = Measured(pki, pending_handshakes=0, pending_per_source=0)
    m.engine.set_timeouts(handshake_s=1.0)
    lst = Listener(m.engine, m.sctx)
    abort_handshakes(lst, "full", 300)
    rss0, cpu0 = settle(m.engine), m.cpu()
    per = HANDSHAKES // 3
    for mode in ("close", "partial", "full"):
        abort_handshakes(lst, mode, per)
    cpu = m.cpu() - cpu0
    rss = settle(m.engine) - rss0
    lst.close()
    m.stop()
    return cpu * 1000 / HANDSHAKES, rss * 1000 / HANDSHAKES


def _resets(pki: Pki) -> tuple[float, float, int]:
    m = Measured(pki)
    lst = Listener(m.engine, m.sctx)
    ctx = tls_client(pki, pki.client)
    conns = [RawH2(lst.connect(), ctx) for _ in range(RESET_CONNS)]
    for c in conns:
        while not c.settings_seen and not c.goaway:
            c.pump(0.05)
    rss0, cpu0 = rss_kib(), m.cpu()
    events = 0
    for c in conns:
        for i in range(RESETS_PER_CONN):
            sid = c.open(f"10.244.2.2:{i + 1}")
            c.reset(sid)
            if i % 100 == 99:
                c.flush()
                events += len(m.engine.events(4096))
        c.flush()
    deadline = time.monotonic() + 20
    while m.engine.counters()["conns_active"] and time.monotonic() < deadline:
        for c in conns:
            c.pump(0.01)
        events += len(m.engine.events(4096))
    cpu = m.cpu() - cpu0
    events += len(m.engine.events(4096))
    total = RESET_CONNS * RESETS_PER_CONN
    rss = settle(m.engine) - rss0
    for c in conns:
        c.close()
    lst.close()
    m.stop()
    return cpu * 1000 / total, rss * 1000 / total, events


def _held(pki: Pki) -> tuple[float, float]:
    m = Measured(pki, max_concurrent_streams=HELD)
    lst = Listener(m.engine, m.sctx)
    conn = RawH2(lst.connect(), tls_client(pki, pki.client))
    while not conn.settings_seen:
        conn.pump(0.05)
    rss0, cpu0 = rss_kib(), m.cpu()
    ups = []
    for i in range(HELD):
        conn.open(f"10.244.2.2:{i + 1}")
    conn.flush()
    accepted = 0
    deadline = time.monotonic() + 30
    while accepted < HELD and time.monotonic() < deadline:
        conn.pump(0.01)
        for ev in m.engine.events(4096):
            if ev.kind == "stream_request":
                ours, theirs = socket.socketpair()
                ours.sendall(b"x" * 4096)  # the peer never grants window beyond its initial one
                m.engine.accept_stream(ev.conn_id, ev.stream_id, theirs.detach())
                ups.append(ours)
                accepted += 1
    wait_counter(m.engine, "streams_active", HELD)
    time.sleep(0.5)
    cpu, rss = m.cpu() - cpu0, rss_kib() - rss0
    conn.close()
    for u in ups:
        u.close()
    lst.close()
    m.stop()
    return cpu * 1000 / HELD, rss * 1000 / HELD


def run() -> list[dict[str, Any]]:
    pki = make_pki()
    hs_cpu, hs_rss = _handshakes(pki)
    rs_cpu, rs_rss, rs_events = _resets(pki)
    held_cpu, held_rss = _held(pki)
    unit_cpu, unit_rss = "ms engine CPU", "KiB RSS"
    return [
        {"name": "per 1,000 aborted handshakes: CPU", "value": hs_cpu, "unit": unit_cpu, "baseline": ""},
        {"name": "per 1,000 aborted handshakes: RSS left", "value": hs_rss, "unit": unit_rss, "baseline": ""},
        {"name": "per 1,000 reset streams: CPU", "value": rs_cpu, "unit": unit_cpu, "baseline": ""},
        {"name": "per 1,000 reset streams: RSS left", "value": rs_rss, "unit": unit_rss, "baseline": ""},
        {"name": f"{RESET_CONNS} x {RESETS_PER_CONN} reset streams: engine events", "value": rs_events,
         "unit": "events", "baseline": ""},
        {"name": "per 1,000 held streams: CPU", "value": held_cpu, "unit": unit_cpu, "baseline": ""},
        {"name": "per 1,000 held streams: RSS held", "value": held_rss, "unit": unit_rss, "baseline": ""},
    ]  # fmt: skip


if __name__ == "__main__":
    for row in run():
        print(row)
