"""The management plane's gRPC server: mTLS only, client certificates required and chained to the mesh CA.

Serving credentials come from mgmt/identity_service.py (one owner of the plane's serving certificate: DNS
SAN "ambit-mgmt", which node clients check with grpc.ssl_target_name_override whatever address they dial;
re-issued on CA rotation). Services other than the relay (the CSR service, ...) attach through
`extra_services` and read the caller's identity from the same verified peer certificate.
"""

from __future__ import annotations

import datetime as dt
import logging
from collections.abc import Callable, Sequence
from concurrent import futures

import grpc
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec

from api import relay_pb2_grpc
from api.keepalive import RELAY_KEEPALIVE, Keepalive
from api.spiffe import SpiffeId
from mgmt.ca import MGMT_SERVER_NAME, CertificateAuthority
from mgmt.identity_service import Audit, plane_server_credentials
from mgmt.relay_service import RelayService
from mgmt.store import ConfigStore

log = logging.getLogger("ambit.mgmt.server")

SERVER_NAME = MGMT_SERVER_NAME  # DNS SAN of the plane's serving certificate; clients verify this name
NODE_TTL = dt.timedelta(hours=24)
MAX_WORKERS = 256  # every node's subscription stream holds one worker thread (sync gRPC)
MAX_MESSAGE_BYTES = 64 * 1024 * 1024


def issue_key_and_chain(
    ca: CertificateAuthority,
    spiffe_id: SpiffeId,
    ttl: dt.timedelta = NODE_TTL,
    dns_names: tuple[str, ...] = (),
) -> tuple[bytes, bytes]:
    """A fresh P-256 key and its certificate chain from `ca`, both PEM (the key stays in memory)."""
    key = ec.generate_private_key(ec.SECP256R1())
    chain = ca.issue(spiffe_id, key.public_key(), ttl, dns_names)
    key_pem = key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )
    return key_pem, b"".join(c.public_bytes(serialization.Encoding.PEM) for c in chain)


def node_channel_credentials(ca: CertificateAuthority, node: str) -> grpc.ChannelCredentials:
    """Client credentials for a node, issued directly by `ca` (tests, benchmarks, local tooling)."""
    key_pem, chain_pem = issue_key_and_chain(ca, SpiffeId.node(ca.trust_domain, node))
    return grpc.ssl_channel_credentials(ca.bundle_pem(), key_pem, chain_pem)


class MgmtServer:
    def __init__(
        self,
        store: ConfigStore,
        ca: CertificateAuthority,
        listen: str,
        trust_domain: str,
        extra_services: Sequence[Callable[[grpc.Server], None]] = (),
        max_workers: int = MAX_WORKERS,
        audit: Audit | None = None,
        keepalive: Keepalive = RELAY_KEEPALIVE,
    ) -> None:
        self.store = store
        self.ca = ca
        self.listen = listen
        self.trust_domain = trust_domain
        self.relay = RelayService(store, trust_domain, audit)
        self._server = grpc.server(
            futures.ThreadPoolExecutor(max_workers=max_workers, thread_name_prefix="mgmt-grpc"),
            options=[
                ("grpc.so_reuseport", 0),  # a second plane on the same port must fail, not share it
                ("grpc.max_send_message_length", MAX_MESSAGE_BYTES),
                # Nodes ping their idle streams; the ping policy must allow exactly that (api/keepalive.py).
                *keepalive.server_options(),
            ],
        )
        relay_pb2_grpc.add_RelayServicer_to_server(self.relay, self._server)
        for add in extra_services:
            add(self._server)
        credentials = plane_server_credentials(ca, require_client_auth=True)
        try:  # grpcio reports a failed bind as RuntimeError (older releases: port 0)
            self.port = self._server.add_secure_port(listen, credentials)
        except RuntimeError:
            self.port = 0
        if self.port == 0:
            raise OSError(f"cannot listen on {listen} (address in use or not local)")

    def start(self) -> None:
        self._server.start()
        log.info("management plane relay listening on %s (port %d, mTLS)", self.listen, self.port)

    def stop(self, grace: float | None = 0.5) -> None:
        self.relay.close()
        self._server.stop(grace).wait()
