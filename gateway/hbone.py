"""Backends inside the mesh, reached over HBONE with the gateway's own SPIFFE identity (docs/engine.md).

The mesh engine (`native.engine`, the agent's C engine) carries the bytes: one mTLS connection per backend to
its HBONE server (the destination's node, port 15008, whose identity we require), an HTTP/2 CONNECT stream
per upstream connection the data plane asks for. The stream's local end is one side of a socketpair; the
other side is handed to the gateway's data plane as an ordinary connected socket, which it then pools
like any upstream connection, so a stream serves many requests.
"""

from __future__ import annotations

import contextlib
import logging
import socket
from dataclasses import dataclass, field

from gateway.config import HboneBackend, HboneEndpoint
from native.engine import Engine, EngineError, Event

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Identity:
    """The gateway's SVID (key in memory only) and the mesh trust bundle."""

    spiffe_id: str
    chain_pem: bytes
    key_pem: bytes = field(repr=False)
    bundle_pem: bytes = b""


ConnKey = tuple[tuple[str, int], str]  # (HBONE server, the identity it must present)


class HboneUpstreams:
    """Opens CONNECT streams for the data plane's external backends (provider id = index of the target).

    One mTLS connection per (HBONE server, expected identity), shared by every backend that goes there."""

    def __init__(self, identity: Identity, targets: list[HboneBackend]) -> None:
        self.engine = Engine(threads=1)
        self.engine.start()
        self._identity = identity
        self._ctx = self._context(identity)
        self.targets = targets
        self._conns: dict[ConnKey, int] = {}  # -> engine connection id
        self._tags: dict[int, ConnKey] = {}  # engine tag -> connection key
        self._next_tag = 0
        self._rr = 0
        self.streams_opened = 0
        self.errors = 0

    def _context(self, identity: Identity) -> int:
        return self.engine.tls_context(
            server=False,
            chain_pem=identity.chain_pem,
            key_pem=identity.key_pem,
            bundle_pem=identity.bundle_pem,
        )

    @property
    def eventfd(self) -> int:
        return self.engine.eventfd

    def open(self, provider: int, client_ip: str) -> int:
        """A connected fd whose bytes go to the target over HBONE; -1 when it cannot be opened."""
        if not 0 <= provider < len(self.targets):
            return -1
        endpoints = self.targets[provider].endpoints
        self._rr += 1
        endpoint = endpoints[self._rr % len(endpoints)]
        ours, theirs = socket.socketpair()
        try:
            conn = self._conn(endpoint)
            self.engine.open_stream(
                conn, endpoint.authority, theirs.detach(), tag=provider, forwarded=client_ip
            )
        except (EngineError, OSError) as exc:
            self.errors += 1
            log.warning("HBONE to %s (%s) failed: %s", endpoint.server, endpoint.peer, exc)
            ours.close()
            with contextlib.suppress(OSError):
                theirs.close()
            return -1
        self.streams_opened += 1
        return ours.detach()

    def _conn(self, endpoint: HboneEndpoint) -> int:
        key = (endpoint.server, endpoint.peer)
        if key in self._conns:
            return self._conns[key]
        sock = socket.socket(socket.AF_INET6 if ":" in endpoint.server[0] else socket.AF_INET)
        sock.setblocking(False)
        err = sock.connect_ex(endpoint.server)
        if err not in (0, 115):  # EINPROGRESS: the engine finishes the handshake
            sock.close()
            raise OSError(err, f"connect {endpoint.server}")
        self._next_tag += 1
        conn = self.engine.connect_hbone(sock.detach(), self._ctx, endpoint.peer, tag=self._next_tag)
        self._conns[key] = conn
        self._tags[self._next_tag] = key
        return conn

    def _close_all(self) -> None:
        """New streams get new connections; the old ones close once their streams end."""
        for conn in self._conns.values():
            with contextlib.suppress(EngineError):
                self.engine.close(conn)
        self._conns.clear()
        self._tags.clear()

    def retarget(self, targets: list[HboneBackend]) -> None:
        """A new config's HBONE backends."""
        self._close_all()
        self.targets = targets

    def set_identity(self, identity: Identity) -> None:
        """A renewed SVID or a new trust bundle: connections from now on present and trust the new ones."""
        if identity == self._identity:
            return
        old, self._ctx = self._ctx, self._context(identity)
        self._identity = identity
        self._close_all()
        self.engine.free_tls_context(old)  # live connections hold their own reference to it

    def drain(self) -> list[Event]:
        """Engine events: a failed or closed connection is forgotten (the next stream reconnects)."""
        events = self.engine.events()
        for ev in events:
            key = self._tags.get(ev.tag) if ev.kind in ("conn_error", "conn_closed") else None
            if key is not None and self._conns.get(key) == ev.conn_id:
                del self._conns[key], self._tags[ev.tag]
                if ev.kind == "conn_error":
                    self.errors += 1
                    log.warning("HBONE connection to %s (%s) failed: %s", key[0], key[1], ev.detail)
        return events

    def stop(self) -> None:
        self.engine.stop()
