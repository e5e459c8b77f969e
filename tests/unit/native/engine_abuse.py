"""Abusive clients for the engine's bounds (tests and the abuse bench): aborted TLS handshakes, a raw
HTTP/2 client that holds or resets streams, process RSS."""

from __future__ import annotations

import contextlib
import os
import socket
import ssl
import time
from collections.abc import Iterator
from contextlib import contextmanager

import h2.config
import h2.connection
import h2.events
import h2.exceptions
from engine_testkit import Events, Pki, Svid

from native.engine import Engine


def rss_kib() -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    raise RuntimeError("no VmRSS")


def client_hello() -> bytes:
    """The first flight of a real TLS 1.3 client (no certificate needed to produce it)."""
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.check_hostname = False
    ctx.verify_mode = ssl.CERT_NONE
    incoming, outgoing = ssl.MemoryBIO(), ssl.MemoryBIO()
    obj = ctx.wrap_bio(incoming, outgoing)
    with contextlib.suppress(ssl.SSLWantReadError):
        obj.do_handshake()
    return outgoing.read()


def tls_client(pki: Pki, svid: Svid) -> ssl.SSLContext:
    """Python's TLS client presenting `svid`; the key goes through a memfd, never to disk."""
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.check_hostname = False
    ctx.load_verify_locations(cadata=pki.bundle.decode())
    fds = []
    for name, data in (("chain", svid.chain_pem), ("key", svid.key_pem)):
        fd = os.memfd_create(name, os.MFD_CLOEXEC)
        os.write(fd, data)
        fds.append(fd)
    try:
        ctx.load_cert_chain(f"/proc/self/fd/{fds[0]}", f"/proc/self/fd/{fds[1]}")
    finally:
        for fd in fds:
            os.close(fd)
    ctx.set_alpn_protocols(["h2"])
    return ctx


class Listener:
    """A loopback listener whose accepted sockets go to `engine.serve_hbone`."""

    def __init__(self, engine: Engine, ctx: int, ip: str = "127.0.0.1") -> None:
        self.engine, self.ctx = engine, ctx
        self.sock = socket.socket()
        self.sock.bind((ip, 0))
        self.sock.listen(4096)
        self.addr = self.sock.getsockname()

    def connect(self, source_ip: str = "127.0.0.1") -> socket.socket:
        c = socket.socket()
        c.bind((source_ip, 0))
        c.connect(self.addr)
        s, _ = self.sock.accept()
        self.engine.serve_hbone(s.detach(), self.ctx)
        return c

    def close(self) -> None:
        self.sock.close()


def abort_handshakes(listener: Listener, mode: str, count: int, batch: int = 500) -> None:
    """`count` handshakes abandoned: `close` at once, `partial` ClientHello then close, `full` ClientHello
    then close, `hold` (nothing sent; the caller waits for the handshake deadline)."""
    hello = client_hello()
    held: list[socket.socket] = []
    for _ in range(count):
        c = listener.connect()
        try:
            if mode == "partial":
                c.sendall(hello[: len(hello) // 2])
            elif mode == "full":
                c.sendall(hello)
        except OSError:  # refused by a cap: reset
            pass
        if mode == "close":
            c.close()
        else:
            held.append(c)
        if mode != "hold" and len(held) >= batch:
            for h in held:
                h.close()
            held.clear()
    if mode == "hold":
        wait_counter(listener.engine, "conns_active", 0, timeout=60)
    for h in held:
        h.close()


def wait_counter(engine: Engine, name: str, value: int, timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while engine.counters()[name] != value:
        if time.monotonic() > deadline:
            raise AssertionError(f"{name} stayed {engine.counters()[name]}, want {value}")
        for _ in engine.events(4096):
            pass
        time.sleep(0.02)


def settle(engine: Engine) -> int:
    """RSS (KiB) once every connection is gone and the engine had its chance to return freed memory."""
    wait_counter(engine, "conns_active", 0)
    trims = engine.counters()["malloc_trims"]
    deadline = time.monotonic() + 3.0
    while engine.counters()["malloc_trims"] == trims and time.monotonic() < deadline:
        engine.events(4096)
        time.sleep(0.05)
    engine.events(4096)
    return rss_kib()


class RawH2:
    """A raw HTTP/2 client over mTLS (python-h2): opens CONNECT streams and holds or resets them, the way
    an abusive (but authenticated) peer would."""

    def __init__(self, raw: socket.socket, ctx: ssl.SSLContext) -> None:
        """`raw`: a connected TCP socket the engine already serves."""
        self.sock = ctx.wrap_socket(raw)
        self.goaway = False
        self.h2 = h2.connection.H2Connection(
            h2.config.H2Configuration(client_side=True, header_encoding="utf-8")
        )
        self.h2.initiate_connection()
        self.flush()
        self.refused = 0
        self.opened: list[int] = []
        self.goaway = False
        self.settings_seen = False

    def flush(self) -> None:
        data = self.h2.data_to_send()
        if data and not self.goaway:
            try:
                self.sock.sendall(data)
            except OSError:  # the engine ended the connection (e.g. a reset flood)
                self.goaway = True

    def pump(self, timeout: float = 0.2) -> None:
        self.sock.settimeout(timeout)
        try:
            data = self.sock.recv(1 << 16)
        except (TimeoutError, ssl.SSLWantReadError):
            return
        except OSError:
            self.goaway = True
            return
        if not data:
            self.goaway = True
            return
        try:
            evs = self.h2.receive_data(data)
        except h2.exceptions.ProtocolError:
            self.goaway = True
            return
        for ev in evs:
            if isinstance(ev, h2.events.RemoteSettingsChanged):
                self.settings_seen = True
            elif isinstance(ev, h2.events.StreamReset):
                self.refused += 1
            elif isinstance(ev, h2.events.ConnectionTerminated):
                self.goaway = True
        self.flush()

    def max_streams(self) -> int:
        return int(self.h2.remote_settings.max_concurrent_streams)

    def open(self, authority: str, end: bool = False) -> int:
        sid = self.h2.get_next_available_stream_id()
        self.h2.send_headers(sid, [(":method", "CONNECT"), (":authority", authority)], end_stream=end)
        self.opened.append(sid)
        return sid

    def reset(self, sid: int) -> None:
        self.h2.reset_stream(sid)

    def close(self) -> None:
        self.sock.close()


@contextmanager
def engine_with(pki: Pki, threads: int = 1, **limits: int) -> Iterator[tuple[Engine, Events, int, int]]:
    from engine_testkit import contexts

    eng = Engine(threads=threads)
    eng.start()
    if limits:
        eng.set_limits(**limits)
    cctx, sctx = contexts(eng, pki)
    try:
        yield eng, Events(eng), cctx, sctx
    finally:
        eng.stop()


def handshake_memory_growth(pki: Pki) -> dict[str, int]:
    """RSS growth (KiB) over 10,000 handshakes abandoned four ways, after a warm-up of 900."""
    with engine_with(pki, threads=2, pending_handshakes=0, pending_per_source=0) as (eng, _, _, sctx):
        eng.set_timeouts(handshake_s=1.0)
        lst = Listener(eng, sctx)
        for mode in ("close", "partial", "full"):
            abort_handshakes(lst, mode, 300)
        before = settle(eng)
        for mode, count in (("close", 3000), ("partial", 3000), ("full", 2000), ("hold", 2000)):
            abort_handshakes(lst, mode, count)
        after = settle(eng)
        lst.close()
        c = eng.counters()
        return {
            "growth_kib": after - before,
            "conns_opened": c["conns_opened"],
            "conns_active": c["conns_active"],
        }


if __name__ == "__main__":
    import json
    import sys

    from engine_testkit import make_pki

    if sys.argv[1:] != ["handshake-memory"]:
        raise SystemExit("usage: engine_abuse.py handshake-memory")
    print(json.dumps(handshake_memory_growth(make_pki())))
