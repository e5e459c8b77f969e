"""HBONE connection pool: mTLS connections from one source pod to one destination pod, as ztunnel pools.

A pool key is (source SPIFFE ID, source pod IP, destination SPIFFE ID, destination pod IP): the outer
connection goes from the source pod's address to `<destination pod ip>:15008`, the client certificate
carries the source identity and the server's the destination's, so none of the four may differ between
streams sharing a connection (the expected peer is in the key so a reused pod IP never inherits a
connection verified for its previous owner).
Each connection carries at most `max_streams` concurrent CONNECT streams; the pool opens another when all
are full. Busy keys are also spread: while every connection of a key carries a stream and the key has fewer
than `spread` connections, a new stream gets a new connection. One TLS connection is one engine loop thread
on each node, so several busy streams on one connection would share one core for their crypto; spread over
`spread` (2 x engine threads) connections they use every loop. New streams go to the least busy connection.
Connections that carried no stream for `idle_timeout` seconds are handed back for a graceful close, and a
connection is marked draining (no new streams) when its key's certificate rotates, or when the mesh view gives
its destination address another identity (it goes to who the pod was, not who holds the address now). A key
keeps at most `spread` idle connections warm: after a burst (5,000 streams open 50 connections) the surplus
closes at once instead of holding its TLS and HTTP/2 buffers for `idle_timeout`.
This module is pure bookkeeping: the caller opens and closes the engine connections.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field

PoolKey = tuple[str, str, str, str]  # (source SPIFFE ID, source IP, destination SPIFFE ID, destination IP)

DEFAULT_MAX_STREAMS = 100
DEFAULT_IDLE_TIMEOUT = 60.0
DEFAULT_SPREAD = 1


@dataclass
class PooledConnection:
    conn_id: int
    key: PoolKey
    peer: str  # "pod-ip:15008"
    generation: int  # credentials generation of the key when the connection was opened
    opened_at: float
    streams: int = 0
    streams_total: int = 0
    ready: bool = False  # TLS handshake and peer identity verified
    draining: bool = False
    closing: bool = False  # handed back for a graceful close; waiting for the engine's conn_closed
    idle_since: float = 0.0
    tls_version: str = ""
    tls_cipher: str = ""
    peer_cert_sha256: str = ""
    peer_id: str = ""  # the SPIFFE ID the engine required of the server (the destination workload's)


@dataclass
class Pool:
    max_streams: int = DEFAULT_MAX_STREAMS
    idle_timeout: float = DEFAULT_IDLE_TIMEOUT
    spread: int = DEFAULT_SPREAD  # connections per key that concurrent streams are spread over
    clock: Callable[[], float] = time.monotonic
    _by_id: dict[int, PooledConnection] = field(default_factory=dict)
    _by_key: dict[PoolKey, list[PooledConnection]] = field(default_factory=dict)
    drained_moved: int = 0  # connections drained because their destination's address or identity changed

    def acquire(
        self, key: PoolKey, generation: int, peer: str | None = None, peer_id: str | None = None
    ) -> PooledConnection | None:
        """Reserve a stream slot on the least busy live connection of `key` (handshaken first on a tie);
        None: open one (none has room, or all are busy and the key may spread over more). With `peer` /
        `peer_id` (where the destination is now, who it must be), connections made to anything else drain."""
        best: PooledConnection | None = None
        live = 0
        for conn in self._by_key.get(key, ()):
            if conn.draining or conn.closing:
                continue
            if conn.generation != generation:
                conn.draining = True  # opened with a rotated-out certificate: let it finish, reuse none
                continue
            if (peer is not None and conn.peer != peer) or (peer_id is not None and conn.peer_id != peer_id):
                self._drain_moved(conn)
                continue
            live += 1
            if conn.streams >= self.max_streams:
                continue
            if best is None or (conn.streams, not conn.ready) < (best.streams, not best.ready):
                best = conn
        if best is None or (best.streams and live < self.spread):
            return None
        self._reserve(best)
        return best

    def add(
        self, key: PoolKey, conn_id: int, peer: str, generation: int, peer_id: str = ""
    ) -> PooledConnection:
        """Register a connection the caller just opened, with a slot reserved for its first stream."""
        conn = PooledConnection(conn_id, key, peer, generation, opened_at=self.clock(), peer_id=peer_id)
        self._by_id[conn_id] = conn
        self._by_key.setdefault(key, []).append(conn)
        self._reserve(conn)
        return conn

    def reserve(self, conn_id: int) -> PooledConnection | None:
        """A stream the engine opened on this connection by itself (the fast path): count it."""
        conn = self._by_id.get(conn_id)
        if conn is not None:
            self._reserve(conn)
        return conn

    def connections_of(self, key: PoolKey) -> list[PooledConnection]:
        return list(self._by_key.get(key, ()))

    def _reserve(self, conn: PooledConnection) -> None:
        conn.streams += 1
        conn.streams_total += 1

    def release(self, conn_id: int) -> None:
        """A stream of this connection ended."""
        conn = self._by_id.get(conn_id)
        if conn is None or conn.streams == 0:
            return
        conn.streams -= 1
        if conn.streams == 0:
            conn.idle_since = self.clock()

    def handshake_done(self, conn_id: int, tls_version: str, tls_cipher: str, peer_cert_sha256: str) -> None:
        conn = self._by_id.get(conn_id)
        if conn is not None:
            conn.ready = True
            conn.tls_version, conn.tls_cipher = tls_version, tls_cipher
            conn.peer_cert_sha256 = peer_cert_sha256

    def get(self, conn_id: int) -> PooledConnection | None:
        return self._by_id.get(conn_id)

    def remove(self, conn_id: int) -> PooledConnection | None:
        """Forget a connection (it failed or closed); returns it when it was pooled."""
        conn = self._by_id.pop(conn_id, None)
        if conn is not None:
            siblings = self._by_key.get(conn.key, [])
            siblings[:] = [c for c in siblings if c.conn_id != conn_id]
            if not siblings:
                self._by_key.pop(conn.key, None)
        return conn

    def drain_moved(self, route: Callable[[PoolKey], tuple[str, str] | None]) -> int:
        """Drain every connection whose destination is no longer what it was opened to: `route(key)` is the
        destination's (peer address, identity) now, None when it is gone. Live streams finish; none is added,
        and `expired` closes each once idle. Returns how many were drained now."""
        moved = [
            c
            for c in self._by_id.values()
            if not (c.draining or c.closing) and route(c.key) != (c.peer, c.peer_id)
        ]
        for conn in moved:
            self._drain_moved(conn)
        return len(moved)

    def drain(self, conn_id: int) -> bool:
        """No new stream on this connection (the peer sent a graceful GOAWAY): its live streams finish and
        `expired` closes it once idle. Returns whether it was pooled and live."""
        conn = self._by_id.get(conn_id)
        if conn is None or conn.draining or conn.closing:
            return False
        conn.draining = True
        return True

    def _drain_moved(self, conn: PooledConnection) -> None:
        conn.draining = True
        self.drained_moved += 1

    def expired(self) -> list[int]:
        """Connections to close now: draining with no stream left, idle past the timeout, or idle beyond
        the `spread` a key keeps warm (the most recently used stay)."""
        now = self.clock()
        out = []
        for conns in self._by_key.values():
            warm = 0
            for conn in sorted(conns, key=lambda c: c.idle_since or c.opened_at, reverse=True):
                if conn.streams or conn.closing:
                    continue
                idle = now - (conn.idle_since or conn.opened_at)
                if conn.draining or idle >= self.idle_timeout or warm >= self.spread:
                    conn.draining = conn.closing = True
                    out.append(conn.conn_id)
                else:
                    warm += 1
        return out

    def connections(self) -> list[PooledConnection]:
        return list(self._by_id.values())

    def rows(self) -> list[dict[str, object]]:
        now = self.clock()
        return [
            {
                "conn_id": c.conn_id,
                "source": c.key[0],
                "source_ip": c.key[1],
                "destination": c.key[2],
                "peer": c.peer,
                "state": _state(c),
                "streams": c.streams,
                "streams_total": c.streams_total,
                "age_s": round(now - c.opened_at, 1),
                "tls": c.tls_version,
            }
            for c in self._by_id.values()
        ]


def _state(conn: PooledConnection) -> str:
    if conn.closing:
        return "closing"
    if conn.draining:
        return "draining"
    return "ready" if conn.ready else "handshaking"
