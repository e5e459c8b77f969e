"""TLS contexts the proxy hands to the engine, rebuilt whenever the certificates behind them rotate.

HBONE identities (see docs/proxy.md), as Istio ambient (ztunnel) has them: the client presents the SOURCE
workload's SVID and requires the DESTINATION workload's; the server on `<pod ip>:15008` presents the SVID of
the local workload that owns the address the connection was accepted on (chosen before the handshake: no
SNI is sent). So there is one context per (role, local workload identity). A context is replaced (and the
old one freed: live connections keep their own reference inside the engine) when the certificate chain or
the trust bundle changes; the generation number lets the pool stop reusing connections made with the old
certificate.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

from api.spiffe import SpiffeId


class Pem(Protocol):
    @property
    def chain_pem(self) -> bytes: ...  # leaf first

    @property
    def key_pem(self) -> bytes: ...


class ProxyCredentials(Protocol):
    """What the proxy needs from identity (the IdentityManager): local workloads' SVIDs and the bundle."""

    def svid_for(self, spiffe_id: SpiffeId) -> Pem: ...

    def trust_bundle_pem(self) -> bytes: ...


class ContextFactory(Protocol):
    def tls_context(
        self, *, server: bool, chain_pem: bytes, key_pem: bytes, bundle_pem: bytes, tls12: bool = False
    ) -> int: ...

    def free_tls_context(self, ctx: int) -> None: ...


@dataclass
class _Cached:
    chain_pem: bytes
    bundle_pem: bytes
    ctx: int
    generation: int


class TlsContexts:
    def __init__(self, engine: ContextFactory, credentials: ProxyCredentials, tls12: bool = False) -> None:
        self._engine = engine
        self._credentials = credentials
        self._tls12 = tls12
        self._cached: dict[tuple[bool, str], _Cached] = {}  # by (server role, SPIFFE ID)
        self._generations = 0

    def has_client(self, source: SpiffeId) -> bool:
        """Whether a context for `source` exists, i.e. client() will not wait for a first SVID fetch."""
        return (False, str(source)) in self._cached

    def has_server(self, local: SpiffeId) -> bool:
        """Whether a server context for `local` exists, i.e. server() will not wait for a first fetch."""
        return (True, str(local)) in self._cached

    def server_generation(self, local: SpiffeId) -> int:
        """The generation of `local`'s server context, -1 when there is none (never fetched, forgotten):
        a new number once its certificate or the bundle rotated. Never fetches."""
        cached = self._cached.get((True, str(local)))
        return cached.generation if cached is not None else -1

    def fetch(self, identity: SpiffeId) -> None:
        """Fetch `identity`'s SVID into the identity cache (blocking: call it off the control loop)."""
        self._credentials.svid_for(identity)

    def client(self, source: SpiffeId) -> tuple[int, int]:
        """(context, generation) presenting `source`'s SVID; may block on the first SVID fetch."""
        cached = self._context(source, server=False)
        return cached.ctx, cached.generation

    def server(self, local: SpiffeId) -> int:
        """The context presenting the SVID of `local`, the workload whose address a peer dialled."""
        return self._context(local, server=True).ctx

    def _context(self, identity: SpiffeId, server: bool) -> _Cached:
        key = (server, str(identity))
        pem = self._credentials.svid_for(identity)
        bundle = self._credentials.trust_bundle_pem()
        cached = self._cached.get(key)
        if cached is not None and cached.chain_pem == pem.chain_pem and cached.bundle_pem == bundle:
            return cached
        ctx = self._engine.tls_context(
            server=server, chain_pem=pem.chain_pem, key_pem=pem.key_pem, bundle_pem=bundle, tls12=self._tls12
        )
        if cached is not None:
            self._engine.free_tls_context(cached.ctx)
        self._generations += 1
        self._cached[key] = _Cached(pem.chain_pem, bundle, ctx, self._generations)
        return self._cached[key]

    def forget(self, keep: set[str]) -> None:
        """Free the contexts of identities no longer in `keep` (workloads that left this node)."""
        for key in [k for k in self._cached if k[1] not in keep]:
            self._engine.free_tls_context(self._cached.pop(key).ctx)

    def close(self) -> None:
        for cached in self._cached.values():
            self._engine.free_tls_context(cached.ctx)
        self._cached.clear()
