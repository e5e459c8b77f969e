from dataclasses import dataclass

from agent.proxy.tls import NodeCredentials, TlsContexts
from api.spiffe import SpiffeId
from mgmt.ca import CertificateAuthority
from native.engine import Engine
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


def test_contexts_are_cached_and_rebuilt_on_rotation() -> None:
    ca = CertificateAuthority.generate_root(TRUST_DOMAIN)
    web = SpiffeId.workload(TRUST_DOMAIN, "app", "web")
    node = SpiffeId.node(TRUST_DOMAIN, "node-1")
    svids = Svids(ca)
    svids.rotate(web)
    svids.rotate(node)
    engine = Engine()
    contexts = TlsContexts(engine, NodeCredentials(svids, lambda: svids.current[str(node)]))
    try:
        first = contexts.client(web)
        assert contexts.client(web) == first
        svids.rotate(web)
        second = contexts.client(web)
        assert second[0] != first[0] and second[1] > first[1]
        server = contexts.server()
        assert contexts.server() == server
    finally:
        contexts.close()
        engine.stop()
