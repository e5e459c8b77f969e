"""Many concurrent HBONE streams through real engines, every byte checked (SHA-256) both ways.

One selector thread drives both ends of every stream: the app side (the socket handed to open_stream's
peer) and the upstream side (the socket accept_stream's peer holds). Each stream gets its own random
sizes and one of several orderings that stress the hand-off windows between open_stream, the socket
registration, the first read and half-close:

- `eager`: the app writes before the stream is even opened (bytes wait in the socket before the engine
  registers it), both sides send at once;
- `banner`: the upstream writes a banner before accept_stream registers its socket; the app reads it,
  then uploads (the shape of a server-speaks-first protocol: SMTP, SSH, MySQL);
- `late`: the app uploads only after the whole download arrived (a request after a long greeting);
- `client_abort` / `server_abort`: one side sends everything, then resets its socket (TCP RST) as soon as
  its peer acknowledged the bytes (not merely sent: a lost segment's retransmission dies with the RST):
  the other side must still get every byte, as over plain TCP (only the aborting side's data is checked).

Used by the stress test (tests/unit/native/test_engine_stress.py) and the soak bench (tests/bench).
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import random
import selectors
import socket
import struct
import termios
import time
from collections.abc import Callable
from dataclasses import dataclass, field

from engine_testkit import Events, Pki, contexts, tcp_pair

from native.engine import Engine

MAX_SIZE = 1 << 20
ORDERS = ("eager", "banner", "late", "client_abort", "server_abort")
SIOCOUTQ = termios.TIOCOUTQ  # bytes the peer has not acknowledged yet (sent or not)
BANNER = b"220 banner\r\n"
_BLOCK = hashlib.shake_256(b"ambit-stress").digest(2 * MAX_SIZE)


def random_size(rng: random.Random, top: int = MAX_SIZE) -> int:
    """0 B .. top (1 MiB), log-uniform (many small streams, some large), with exact 0 and top present."""
    r = rng.random()
    if r < 0.03:
        return 0
    if r < 0.05:
        return top
    return min(top, int(2 ** rng.uniform(0, top.bit_length() - 1)))


@dataclass
class End:
    """One socket of a stream: what it must send, what it got."""

    sock: socket.socket
    payload: memoryview
    sent: int = 0
    shut: bool = False
    got: int = 0
    digest: hashlib._Hash = field(default_factory=hashlib.sha256)
    eof: bool = False
    may_send: bool = True
    abort: bool = False  # reset the socket once everything is sent and acknowledged
    closed: bool = False


@dataclass
class Stream:
    index: int
    order: str
    up: bytes  # app -> upstream
    down: bytes  # upstream -> app
    app: End
    upstream: End | None = None


@dataclass
class Result:
    streams: int
    mismatches: list[str]
    seconds: float
    bytes_total: int


def _payload(rng: random.Random, size: int) -> bytes:
    off = rng.randrange(0, MAX_SIZE)
    return _BLOCK[off : off + size]


class Driver:
    """Drives `count` streams over `conns` client connections of `client` to `server` (may be one engine)."""

    def __init__(
        self, client: Engine, server: Engine, pki: Pki, count: int, conns: int, seed: int,
        top: int = MAX_SIZE, orders: tuple[str, ...] = ORDERS,
    ) -> None:  # fmt: skip
        self.client, self.server = client, server
        self.orders = orders
        self.cev = Events(client)
        self.sev = self.cev if server is client else Events(server)
        self.rng = random.Random(seed)
        self.top = top
        self.count = count
        self.sel = selectors.DefaultSelector()
        cctx, _ = contexts(client, pki)
        _, sctx = contexts(server, pki)
        self.pairs: list[tuple[int, int]] = []
        for _ in range(conns):
            a, b = tcp_pair()
            cid = client.connect_hbone(a.detach(), cctx, pki.server.spiffe_id, tag=1)
            sid = server.serve_hbone(b.detach(), sctx, tag=2)
            self.pairs.append((cid, sid))
        self.streams: dict[int, Stream] = {}
        self.open_ends = 0
        self.aborting: list[End] = []

    def _register(self, end: End, stream: Stream) -> None:
        end.sock.setblocking(False)
        write = selectors.EVENT_WRITE if end.may_send and not end.shut else 0
        self.sel.register(end.sock, selectors.EVENT_READ | write, (stream, end))
        self.open_ends += 1

    def _open_all(self) -> None:
        for i in range(self.count):
            order = self.orders[i % len(self.orders)]
            # An abort without a byte may legitimately never reach the server (counted as an early reset).
            up = _payload(self.rng, max(order == "client_abort", random_size(self.rng, self.top)))
            down = _payload(self.rng, random_size(self.rng, self.top))
            if order == "banner":
                down = BANNER + down
            app_sock, local = tcp_pair()
            app = End(app_sock, memoryview(up), may_send=order in ("eager", "client_abort"))
            app.abort = order == "client_abort"
            st = Stream(i, order, up, down, app)
            self.streams[i] = st
            if order == "eager" and up:
                # Bytes (and maybe FIN) wait in the socket before the engine ever registers it.
                n = app_sock.send(up[:65536])
                app.sent = n
                if n == len(up):
                    app_sock.shutdown(socket.SHUT_WR)
                    app.shut = True
            cid = self.pairs[i % len(self.pairs)][0]
            self.client.open_stream(cid, f"10.244.2.2:{10000 + i}", local.detach(), tag=i)
            self._register(app, st)

    def _accept_pending(self) -> None:
        self.sev.drain()
        keep = []
        for ev in self.sev.seen:
            if ev.kind != "stream_request":
                keep.append(ev)
                continue
            st = self.streams[int(ev.authority.rsplit(":", 1)[1]) - 10000]
            ours, theirs = tcp_pair()
            end = End(ours, memoryview(st.down), abort=st.order == "server_abort")
            st.upstream = end
            if st.order == "banner":
                ours.sendall(BANNER)  # readable before accept_stream registers the engine's socket
                end.sent = len(BANNER)
            self.server.accept_stream(ev.conn_id, ev.stream_id, theirs.detach(), tag=st.index)
            self._register(end, st)
        self.sev.seen = keep

    def _pump(self, stream: Stream, end: End, mask: int) -> None:
        if mask & selectors.EVENT_READ and not end.eof:
            try:
                data = end.sock.recv(1 << 18)
            except (BlockingIOError, InterruptedError):
                data = None
            except OSError:
                data = b""
            if data is not None:
                if data:
                    end.digest.update(data)
                    end.got += len(data)
                else:
                    end.eof = True
        if end is stream.app and not end.may_send:
            want = len(BANNER) if stream.order == "banner" else len(stream.down)
            end.may_send = end.got >= want or end.eof
        if end.may_send and not end.shut:
            while end.sent < len(end.payload):
                try:
                    n = end.sock.send(end.payload[end.sent : end.sent + (1 << 18)])
                except (BlockingIOError, InterruptedError):
                    break
                except OSError:
                    end.sent = len(end.payload)
                    break
                end.sent += n
            if end.sent >= len(end.payload):
                if end.abort:
                    self.aborting.append(end)
                    self.sel.unregister(end.sock)
                    self.open_ends -= 1
                    end.shut = end.eof = True
                    return
                with contextlib.suppress(OSError):
                    end.sock.shutdown(socket.SHUT_WR)
                end.shut = True
        events = (0 if end.eof else selectors.EVENT_READ) | (
            0 if end.shut or not end.may_send else selectors.EVENT_WRITE
        )
        if not events:
            self.sel.unregister(end.sock)
            self.open_ends -= 1
        elif events != self.sel.get_key(end.sock).events:
            self.sel.modify(end.sock, events, (stream, end))

    def _abort_transmitted(self) -> None:
        """Resets (SO_LINGER 0) the aborting sockets whose bytes all left their kernel."""
        keep = []
        for end in self.aborting:
            if struct.unpack("i", fcntl.ioctl(end.sock, SIOCOUTQ, b"\0" * 4))[0]:
                keep.append(end)
                continue
            end.sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
            end.sock.close()
            end.closed = True
        self.aborting = keep

    def run(self, timeout: float = 120.0) -> Result:
        start = time.monotonic()
        self._open_all()
        deadline = start + timeout
        accepted = lambda: sum(1 for s in self.streams.values() if s.upstream is not None)  # noqa: E731
        while (self.open_ends or self.aborting or accepted() < self.count) and time.monotonic() < deadline:
            self._accept_pending()
            self._abort_transmitted()
            for key, mask in self.sel.select(0.05):
                stream, end = key.data
                self._pump(stream, end, mask)
        seconds = time.monotonic() - start
        mismatches = []
        for st in self.streams.values():
            if st.upstream is None:
                mismatches.append(f"stream {st.index} ({st.order}): never reached the server")
                continue
            checks = [("up", st.up, st.upstream), ("down", st.down, st.app)]
            if st.order == "client_abort":
                checks = checks[:1]
            elif st.order == "server_abort":
                checks = checks[1:]
            for what, data, end in checks:
                if (end.got, end.digest.hexdigest()) != (len(data), hashlib.sha256(data).hexdigest()):
                    mismatches.append(
                        f"stream {st.index} ({st.order}) {what}: {end.got} of {len(data)} bytes"
                    )
        for st in self.streams.values():
            st.app.sock.close()
            if st.upstream is not None:
                st.upstream.sock.close()
        self.sel.close()
        total = sum(len(s.up) + len(s.down) for s in self.streams.values())
        return Result(self.count, mismatches, seconds, total)

    def close(self) -> None:
        for cid, _ in self.pairs:
            self.client.close(cid)


def run_stress(
    pki: Pki, count: int, threads: int, cross_node: bool, conns: int = 4, seed: int = 1,
    on_engines: Callable[[Engine, Engine], None] | None = None, orders: tuple[str, ...] = ORDERS,
) -> Result:  # fmt: skip
    """`count` streams over `conns` connections; cross_node: client and server in two engines (two nodes)."""
    client = Engine(threads=threads)
    client.start()
    server = client
    if cross_node:
        server = Engine(threads=threads)
        server.start()
    try:
        driver = Driver(client, server, pki, count, conns, seed, orders=orders)
        result = driver.run()
        if on_engines is not None:
            on_engines(client, server)
        return result
    finally:
        client.stop()
        if server is not client:
            server.stop()
