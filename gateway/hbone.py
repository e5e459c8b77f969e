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

from gateway.config import HboneBackend
from native.engine import Engine, EngineError, Event

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Identity:
    """The gateway's SVID (key in memory only) and the mesh trust bundle."""

    spiffe_id: str
    chain_pem: bytes
    key_pem: bytes = field(repr=False)
    bundle_pem: bytes = b""


class HboneUpstreams:
    """Opens CONNECT streams for the data plane's external backends (provider id = index of the target)."""

    def __init__(self, identity: Identity, targets: list[HboneBackend]) -> None:
        self.engine = Engine(threads=1)
        self.engine.start()
        self._ctx = self.engine.tls_context(
            server=False,
            chain_pem=identity.chain_pem,
            key_pem=identity.key_pem,
            bundle_pem=identity.bundle_pem,
        )
        self.targets = targets
        self._conns: dict[int, int] = {}  # provider -> engine connection id
        self._rr = 0
        self.streams_opened = 0
        self.errors = 0

    @property
    def eventfd(self) -> int:
        return self.engine.eventfd

    def open(self, provider: int, client_ip: str) -> int:
        """A connected fd whose bytes go to the target over HBONE; -1 when it cannot be opened."""
        if not 0 <= provider < len(self.targets):
            return -1
        target = self.targets[provider]
        ours, theirs = socket.socketpair()
        try:
            conn = self._conn(provider, target)
            self._rr += 1
            authority = target.authorities[self._rr % len(target.authorities)]
            self.engine.open_stream(conn, authority, theirs.detach(), tag=provider, forwarded=client_ip)
        except (EngineError, OSError) as exc:
            self.errors += 1
            log.warning("HBONE to %s (%s) failed: %s", target.server, target.peer, exc)
            ours.close()
            with contextlib.suppress(OSError):
                theirs.close()
            return -1
        self.streams_opened += 1
        return ours.detach()

    def _conn(self, provider: int, target: HboneBackend) -> int:
        if provider in self._conns:
            return self._conns[provider]
        sock = socket.socket(socket.AF_INET6 if ":" in target.server[0] else socket.AF_INET)
        sock.setblocking(False)
        err = sock.connect_ex(target.server)
        if err not in (0, 115):  # EINPROGRESS: the engine finishes the handshake
            sock.close()
            raise OSError(err, f"connect {target.server}")
        conn = self.engine.connect_hbone(sock.detach(), self._ctx, target.peer, tag=provider)
        self._conns[provider] = conn
        return conn

    def retarget(self, targets: list[HboneBackend]) -> None:
        """A new config's HBONE backends: connections for the old ones close once their streams end."""
        for conn in self._conns.values():
            with contextlib.suppress(EngineError):
                self.engine.close(conn)
        self._conns.clear()
        self.targets = targets

    def drain(self) -> list[Event]:
        """Engine events: a failed or closed connection is forgotten (the next stream reconnects)."""
        events = self.engine.events()
        for ev in events:
            if ev.kind in ("conn_error", "conn_closed") and self._conns.get(ev.tag) == ev.conn_id:
                del self._conns[ev.tag]
                if ev.kind == "conn_error":
                    self.errors += 1
                    log.warning("HBONE connection to %s failed: %s", self.targets[ev.tag].server, ev.detail)
        return events

    def stop(self) -> None:
        self.engine.stop()
