"""Per-peer limits: how much of this node one source address or one peer identity may hold at once.

Nothing unauthenticated may cost more than a bounded share (pending TLS handshakes and connections per
source address), and one authenticated peer must not starve the others (connections and concurrent streams
per peer identity). A peer over a limit has only its NEW work refused (its live connections and streams go
on); every refusal is counted.

One owner per limit. The engine enforces what it sees first and cheapest (native/src/limits.c): the proxy
hands it `Limits.engine()` at start (`Engine.set_limits`), and its refusals are counted in the engine's
counters (`refused_handshakes`, `refused_conns_source`, `refused_streams_peer`, `refused_streams_conn`,
`reset_floods`). `Budgets` here keeps only what the engine cannot enforce: sockets the engine does not hold
yet (15008 connections waiting for a local workload's first SVID), decisions it does not make (a workload
identity's connections, refused at `peer_verified` and audited like an identity refusal; streams per source
address), and the plaintext listeners. The tables hold only keys with live work, so they are bounded by what
the budgets admit.
"""

from __future__ import annotations

import collections
import dataclasses
from dataclasses import dataclass, field

# Limits.field -> the engine's limit name (native.engine.LIMITS): the engine is their only owner.
ENGINE_LIMITS = {
    "hbone_pending_handshakes": "pending_handshakes",
    "hbone_handshakes_per_source": "pending_per_source",
    "hbone_connections_per_source": "conns_per_source",
    "hbone_streams_per_identity": "streams_per_peer",
    "hbone_max_concurrent_streams": "max_concurrent_streams",
    "hbone_resets_per_s": "resets_per_s",
    "hbone_stream_buffer": "stream_buffer",
    "hbone_connection_buffer": "conn_buffer",
}


@dataclass(frozen=True)
class Limits:
    """Every per-peer limit of the agent, each with one owner; 0 means unlimited."""

    # --- enforced by the engine (ENGINE_LIMITS), on 15008 ---
    # TLS handshakes in progress, all sources together, and per source address (a peer node's pods all
    # arrive from its pods' addresses; this node's own same-node HBONE is exempt: a socket pair).
    hbone_pending_handshakes: int = 4096
    hbone_handshakes_per_source: int = 256
    # 15008 connections of one source address, pending or established.
    hbone_connections_per_source: int = 4096
    # Concurrent inbound streams of one authenticated identity over all its connections (RST_STREAM
    # REFUSED_STREAM beyond), and per connection (SETTINGS_MAX_CONCURRENT_STREAMS, as ztunnel's 200).
    hbone_streams_per_identity: int = 4096
    hbone_max_concurrent_streams: int = 200
    # Stream resets one peer may cause per second; beyond, GOAWAY(ENHANCE_YOUR_CALM) (rapid reset).
    hbone_resets_per_s: int = 200
    # Bytes read from sockets awaiting the peer's window, per stream and per connection.
    hbone_stream_buffer: int = 128 << 10
    hbone_connection_buffer: int = 4 << 20
    # --- enforced by the proxy (Budgets) ---
    # 15008 connections of one source address accepted but not handed to the engine yet (waiting for the
    # local workload's first SVID): the engine's caps start once it holds the socket.
    hbone_waiting_per_source: int = 256
    # 15008 connections of one workload identity, any source (refused at peer_verified, audited).
    hbone_connections_per_identity: int = 512
    # Concurrent inbound streams from one address: a peer node's identities together (an fd each).
    hbone_streams_per_source: int = 8192
    # Captured plaintext: per client address, on 15006 (from outside the mesh) and 15001 (a local pod).
    plaintext_connections_per_source: int = 1024
    outbound_connections_per_source: int = 4096

    def __post_init__(self) -> None:
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 0:
                raise ValueError(f"limit {f.name} must be an integer >= 0 (0: unlimited), got {value!r}")
        # The engine's own bounds (native/src/loop.c ambit_engine_set_limit): checked here, at parse time.
        if not 16 << 10 <= self.hbone_stream_buffer <= 1 << 20:
            raise ValueError(f"hbone_stream_buffer must be 16384..1048576, got {self.hbone_stream_buffer}")
        if self.hbone_max_concurrent_streams < 1:
            raise ValueError("hbone_max_concurrent_streams must be >= 1")

    def engine(self) -> dict[str, int]:
        """The engine's share, by the engine's names (Engine.set_limits(**limits.engine()))."""
        return {engine_name: getattr(self, name) for name, engine_name in ENGINE_LIMITS.items()}

    @classmethod
    def names(cls) -> list[str]:
        return [f.name for f in dataclasses.fields(cls)]


@dataclass
class Budget:
    """Live units per key against one limit."""

    name: str
    limit: int
    _live: collections.Counter[str] = field(default_factory=collections.Counter)
    refused: int = 0

    def at_limit(self, key: str) -> bool:
        """Whether `key` is at its limit (0: unlimited), uncounted: a look before giving units back."""
        return bool(self.limit) and self._live.get(key, 0) >= self.limit

    def full(self, key: str) -> bool:
        """Whether `key` is at its limit (0: unlimited): its new work is refused (counted here)."""
        if not self.at_limit(key):
            return False
        self.refused += 1
        return True

    def take(self, key: str) -> bool:
        """One more unit for `key`, or False (counted) when `key` is at its limit."""
        if self.full(key):
            return False
        self._live[key] += 1
        return True

    def give_back(self, key: str) -> None:
        left = self._live[key] - 1
        if left > 0:
            self._live[key] = left
        else:
            del self._live[key]

    def held(self, key: str) -> int:
        return self._live.get(key, 0)

    def room(self, key: str, want: int) -> int:
        """Units a reservation for `key` may take (the fast paths' credits): at most `want` and at most half
        of what `key` has left, so work checked one by one keeps the other half (`want` when unlimited)."""
        return want if not self.limit else min(want, (self.limit - self.held(key)) // 2)

    def __len__(self) -> int:
        return len(self._live)


class Budgets:
    def __init__(self, limits: Limits) -> None:
        self.limits = limits
        self.hbone_waiting = Budget("hbone_waiting_per_source", limits.hbone_waiting_per_source)
        self.hbone_identities = Budget(
            "hbone_connections_per_identity", limits.hbone_connections_per_identity
        )
        self.hbone_source_streams = Budget("hbone_streams_per_source", limits.hbone_streams_per_source)
        self.plaintext_sources = Budget(
            "plaintext_connections_per_source", limits.plaintext_connections_per_source
        )
        self.outbound_sources = Budget(
            "outbound_connections_per_source", limits.outbound_connections_per_source
        )

    def all(self) -> list[Budget]:
        return [
            self.hbone_waiting,
            self.hbone_identities,
            self.hbone_source_streams,
            self.plaintext_sources,
            self.outbound_sources,
        ]

    def counters(self) -> dict[str, int]:
        """`limit_refused_<budget>` for every budget (0 included: a dashboard sees the series exist)."""
        return {f"limit_refused_{b.name}": b.refused for b in self.all()}
