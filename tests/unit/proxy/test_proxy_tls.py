from dataclasses import dataclass

import pytest

from agent.proxy.tls import TlsContexts
from api.spiffe import SpiffeId
from mgmt.ca import CertificateAuthority
from native.engine import Engine, EngineError
from tests.integration.proxy.proxy_lab import TRUST_DOMAIN, issue


@dataclass
class Pem:
    chain_pem: bytes
    key_pem: bytes


class Svids:
    def __init__(self, ca: CertificateAuthority) -> None:
        self.ca = ca
        self.current: dict[str, Pem] = {}

    def rotate(self, spiffe_id: SpiffeId) -> None:
        chain, key = issue(self.ca, spiffe_id)
        self.current[str(spiffe_id)] = Pem(chain.encode(), key.encode())

    def svid_for(self, spiffe_id: SpiffeId) -> Pem:
        return self.current[str(spiffe_id)]

    def trust_bundle_pem(self) -> bytes:
        return self.ca.bundle_pem()


def test_contexts_are_cached_per_role_and_identity_and_rebuilt_on_rotation() -> None:
    ca = CertificateAuthority.generate_root(TRUST_DOMAIN)
    web = SpiffeId.workload(TRUST_DOMAIN, "app", "web")
    db = SpiffeId.workload(TRUST_DOMAIN, "app", "db")
    svids = Svids(ca)
    svids.rotate(web)
    svids.rotate(db)
    engine = Engine()
    contexts = TlsContexts(engine, svids)
    try:
        first = contexts.client(web)
        assert contexts.client(web) == first
        svids.rotate(web)
        second = contexts.client(web)
        assert second[0] != first[0] and second[1] > first[1]
        # the server side presents each local workload's own SVID: one context per identity
        assert not contexts.has_server(web)
        server_web, server_db = contexts.server(web), contexts.server(db)
        assert contexts.has_server(web) and server_web != server_db != second[0]
        assert contexts.server(web) == server_web
        svids.rotate(db)
        assert contexts.server(db) != server_db
        # a workload that left the node: its contexts are freed (both roles), the others kept
        contexts.forget({str(db)})
        assert not contexts.has_client(web) and not contexts.has_server(web) and contexts.has_server(db)
        for freed in (server_web, second[0]):  # the engine no longer holds them
            with pytest.raises(EngineError):
                engine.free_tls_context(freed)
    finally:
        contexts.close()
        engine.stop()
