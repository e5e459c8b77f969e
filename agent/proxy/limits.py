"""Per-peer budgets: how much of this node one source address or one peer identity may hold at once.

Nothing unauthenticated may cost more than a bounded share (pending TLS handshakes and connections per
source address), and one authenticated peer must not starve the others (connections and concurrent streams
per peer identity). A peer over its budget has only its NEW work refused (its live connections and streams
go on); every refusal is counted by budget. The tables hold only keys with live work, so they are bounded
by what the budgets admit.

The engine bounds streams per connection (SETTINGS_MAX_CONCURRENT_STREAMS); these budgets are the
cross-connection view the proxy has, where the decision about a peer is made.
"""

from __future__ import annotations

import collections
from dataclasses import dataclass, field


@dataclass(frozen=True)
class Limits:
    # 15008, before authentication: per source address (a peer node's pods all arrive from its address).
    hbone_handshakes_per_source: int = 256
    hbone_connections_per_source: int = 4096
    # 15008, per authenticated workload identity (across all its connections and source nodes).
    hbone_connections_per_identity: int = 512
    hbone_streams_per_identity: int = 4096
    # ... and per source address: a peer node's identities together (each inbound stream holds an fd).
    hbone_streams_per_source: int = 8192
    # Captured plaintext: per client address, on 15006 (from outside the mesh) and 15001 (a local pod).
    plaintext_connections_per_source: int = 1024
    outbound_connections_per_source: int = 4096


@dataclass
class Budget:
    """Live units per key against one limit."""

    name: str
    limit: int
    _live: collections.Counter[str] = field(default_factory=collections.Counter)
    refused: int = 0

    def full(self, key: str) -> bool:
        """Whether `key` is at its limit: its new work is refused (counted here)."""
        if self._live.get(key, 0) < self.limit:
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

    def __len__(self) -> int:
        return len(self._live)


class Budgets:
    def __init__(self, limits: Limits) -> None:
        self.limits = limits
        self.hbone_handshakes = Budget("hbone_handshakes_per_source", limits.hbone_handshakes_per_source)
        self.hbone_sources = Budget("hbone_connections_per_source", limits.hbone_connections_per_source)
        self.hbone_identities = Budget(
            "hbone_connections_per_identity", limits.hbone_connections_per_identity
        )
        self.hbone_streams = Budget("hbone_streams_per_identity", limits.hbone_streams_per_identity)
        self.hbone_source_streams = Budget("hbone_streams_per_source", limits.hbone_streams_per_source)
        self.plaintext_sources = Budget(
            "plaintext_connections_per_source", limits.plaintext_connections_per_source
        )
        self.outbound_sources = Budget(
            "outbound_connections_per_source", limits.outbound_connections_per_source
        )

    def all(self) -> list[Budget]:
        return [
            self.hbone_handshakes,
            self.hbone_sources,
            self.hbone_identities,
            self.hbone_streams,
            self.hbone_source_streams,
            self.plaintext_sources,
            self.outbound_sources,
        ]

    def counters(self) -> dict[str, int]:
        """`limit_refused_<budget>` for every budget (0 included: a dashboard sees the series exist)."""
        return {f"limit_refused_{b.name}": b.refused for b in self.all()}
