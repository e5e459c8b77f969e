"""TLS contexts the proxy hands to the engine, rebuilt whenever the certificates behind them rotate.

HBONE identities (see docs/proxy.md): the client presents the SOURCE workload's SVID, so the destination
authorizes the true source principal; the server on 15008 presents its NODE identity, and the client
checks that it is the node the destination workload is scheduled on. One client context per source
identity; one server context. A context is replaced (and the old one freed: live connections keep their
own reference inside the engine) when the certificate chain or the trust bundle changes; the generation
number lets the pool stop reusing connections made with the old certificate.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Protocol

from api.spiffe import SpiffeId


class Pem(Protocol):
    @property
    def chain_pem(self) -> bytes: ...  # leaf first

    @property
    def key_pem(self) -> bytes: ...


class ProxyCredentials(Protocol):
    """What the proxy needs from identity: the IdentityManager plus the node identity."""

    def svid_for(self, spiffe_id: SpiffeId) -> Pem: ...

    def trust_bundle_pem(self) -> bytes: ...

    def node_identity(self) -> Pem: ...


class SvidSource(Protocol):
    def svid_for(self, spiffe_id: SpiffeId) -> Pem: ...

    def trust_bundle_pem(self) -> bytes: ...


class NodeCredentials:
    """ProxyCredentials from the IdentityManager (workload SVIDs, bundle) and the node's own identity."""

    def __init__(self, svids: SvidSource, node_identity: Callable[[], Pem]) -> None:
        self._svids = svids
        self._node_identity = node_identity

    def svid_for(self, spiffe_id: SpiffeId) -> Pem:
        return self._svids.svid_for(spiffe_id)

    def trust_bundle_pem(self) -> bytes:
        return self._svids.trust_bundle_pem()

    def node_identity(self) -> Pem:
        return self._node_identity()


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
        self._clients: dict[str, _Cached] = {}
        self._server: _Cached | None = None
        self._generations = 0

    def has_client(self, source: SpiffeId) -> bool:
        """Whether a context for `source` exists, i.e. client() will not wait for a first SVID fetch."""
        return str(source) in self._clients

    def fetch(self, source: SpiffeId) -> None:
        """Fetch `source`'s SVID into the identity cache (blocking: call it off the control loop)."""
        self._credentials.svid_for(source)

    def client(self, source: SpiffeId) -> tuple[int, int]:
        """(context, generation) presenting `source`'s SVID; may block on the first SVID fetch."""
        svid = self._credentials.svid_for(source)
        cached = self._refresh(self._clients.get(str(source)), svid, server=False)
        self._clients[str(source)] = cached
        return cached.ctx, cached.generation

    def server(self) -> int:
        self._server = self._refresh(self._server, self._credentials.node_identity(), server=True)
        return self._server.ctx

    def _refresh(self, cached: _Cached | None, pem: Pem, server: bool) -> _Cached:
        bundle = self._credentials.trust_bundle_pem()
        if cached is not None and cached.chain_pem == pem.chain_pem and cached.bundle_pem == bundle:
            return cached
        ctx = self._engine.tls_context(
            server=server, chain_pem=pem.chain_pem, key_pem=pem.key_pem, bundle_pem=bundle, tls12=self._tls12
        )
        if cached is not None:
            self._engine.free_tls_context(cached.ctx)
        self._generations += 1
        return _Cached(pem.chain_pem, bundle, ctx, self._generations)

    def close(self) -> None:
        for cached in [*self._clients.values(), *([self._server] if self._server else [])]:
            self._engine.free_tls_context(cached.ctx)
        self._clients.clear()
        self._server = None
