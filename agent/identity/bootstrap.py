"""Node bootstrap: trade a one-time join token for the node certificate spiffe://<td>/node/<name>.

The bootstrap endpoint is TLS with server authentication only; we verify the plane's certificate (DNS SAN
`ambit-mgmt`) against the trust bundle given to us out of band, then send the token and a CSR for a key
that never leaves this process.
"""

from __future__ import annotations

import datetime as dt
import logging
import threading
import time
from dataclasses import dataclass, field

import grpc

from agent.identity.backoff import Backoff
from agent.identity.svid import Svid, key_and_csr
from api import ca_pb2, ca_pb2_grpc
from api.spiffe import SpiffeId
from native import pki

log = logging.getLogger(__name__)

MGMT_SERVER_NAME = "ambit-mgmt"  # DNS SAN of the plane's serving certificate (mgmt.ca.MGMT_SERVER_NAME)
RETRYABLE = (
    grpc.StatusCode.UNAVAILABLE,
    grpc.StatusCode.DEADLINE_EXCEEDED,
    grpc.StatusCode.RESOURCE_EXHAUSTED,
)


def channel_options(server_name: str = MGMT_SERVER_NAME) -> list[tuple[str, str]]:
    """The plane is reached by IP; its certificate is checked for this name instead."""
    return [("grpc.ssl_target_name_override", server_name)]


class JoinError(Exception):
    """The plane refused this node (bad, expired or used token; wrong node) or could not be reached."""

    def __init__(self, message: str, code: grpc.StatusCode | None = None) -> None:
        super().__init__(message)
        self.code = code


@dataclass
class NodeIdentity:
    """The node's own certificate and key (in memory). Renewed in place by the IdentityManager."""

    node: str
    trust_domain: str
    chain_pem: bytes
    key_pem: bytes = field(repr=False)
    trust_bundle_pem: bytes
    generation: int = 0  # bumped on every renewal so holders of channels know to reconnect
    # An edge gateway's identity (spiffe://td/ns/N/sa/S) held the same way; "" for a node.
    identity: str = ""
    _lock: threading.Lock = field(default_factory=threading.Lock, repr=False, compare=False)

    @property
    def spiffe_id(self) -> SpiffeId:
        return SpiffeId.parse(self.identity) if self.identity else SpiffeId.node(self.trust_domain, self.node)

    @property
    def leaf(self) -> pki.CertFacts:
        return pki.leaf_facts(self.chain_pem)

    @property
    def not_after(self) -> dt.datetime:
        return self.leaf.not_after

    def credentials(self, trust_bundle: bytes | None = None) -> grpc.ChannelCredentials:
        """mTLS channel credentials for the plane (relay and CSR service) with the current node cert."""
        with self._lock:
            chain, key = self.chain_pem, self.key_pem
            bundle = trust_bundle if trust_bundle is not None else self.trust_bundle_pem
        return grpc.ssl_channel_credentials(
            root_certificates=bundle, private_key=key, certificate_chain=chain
        )

    def svid(self) -> Svid:
        """Chain and key read together: a renewal in between cannot pair one's chain with the other's key."""
        with self._lock:
            return Svid.from_pem(str(self.spiffe_id), self.chain_pem, self.key_pem)

    def renew(self, chain_pem: bytes, key_pem_bytes: bytes, trust_bundle_pem: bytes | None = None) -> None:
        if str(SpiffeId.parse(pki.leaf_facts(chain_pem).spiffe_uri)) != str(self.spiffe_id):
            raise ValueError("renewed certificate is not this node's identity")
        with self._lock:
            self.chain_pem, self.key_pem = chain_pem, key_pem_bytes
            if trust_bundle_pem:
                self.trust_bundle_pem = trust_bundle_pem
            self.generation += 1


def _join_once(
    target: str, request: ca_pb2.JoinRequest, bundle: bytes, server_name: str
) -> ca_pb2.JoinResponse:
    creds = grpc.ssl_channel_credentials(root_certificates=bundle)
    with grpc.secure_channel(target, creds, options=channel_options(server_name)) as channel:
        response: ca_pb2.JoinResponse = ca_pb2_grpc.BootstrapStub(channel).Join(request, timeout=10)
        return response


def join(
    bootstrap_target: str,
    token: str,
    node: str,
    trust_bundle_pem: bytes,
    timeout: float = 30.0,
    server_name: str = MGMT_SERVER_NAME,
    service_account: bool = False,
    gateway: str = "",
) -> NodeIdentity:
    """Join the mesh; retries while the plane is unreachable (up to `timeout` s), fails at once if refused.

    `service_account`: `token` is this agent pod's projected ServiceAccount token (audience ambit), not a
    one-time join token; the plane checks it with the API server (mgmt/kube_bootstrap.py).
    `gateway` ("namespace/name", `node` then ""): join as the edge gateway serving that Gateway; the result
    holds the gateway's SVID, renewed like a node certificate by the IdentityManager."""
    # The trust domain is the plane's to say, so the CSR carries no SAN and the plane sets the identity.
    key, csr = key_and_csr(None)
    request = ca_pb2.JoinRequest(node=node, csr_pem=csr, gateway=gateway)
    if service_account:
        request.service_account_token = token
    else:
        request.token = token
    who = f"Gateway {gateway}" if gateway else node
    backoff = Backoff()
    deadline = time.monotonic() + timeout
    while True:
        try:
            response = _join_once(bootstrap_target, request, trust_bundle_pem, server_name)
            break
        except grpc.RpcError as e:
            code = e.code()
            if code not in RETRYABLE or time.monotonic() >= deadline:
                raise JoinError(
                    f"join as {who} via {bootstrap_target} failed: {code.name}: {e.details()}", code
                ) from None
            delay = min(backoff.next_delay(), max(0.0, deadline - time.monotonic()))
            log.warning(
                "bootstrap %s unavailable (%s); retrying in %.1fs", bootstrap_target, code.name, delay
            )
            time.sleep(delay)
    if not pki.has_key(response.chain_pem, key):
        raise JoinError("the plane returned a certificate for another key")
    try:
        sid = SpiffeId.parse(pki.leaf_facts(response.chain_pem).spiffe_uri)
    except ValueError as exc:
        raise JoinError(f"the plane returned a certificate with no single SPIFFE ID: {exc}") from None
    if gateway and (sid.trust_domain != response.trust_domain or sid.node_name or not sid.service_account):
        raise JoinError(f"the plane returned {sid} for Gateway {gateway}, not a workload identity")
    identity = NodeIdentity(
        node,
        response.trust_domain,
        response.chain_pem,
        key,
        response.trust_bundle_pem,
        identity=str(sid) if gateway else "",
    )
    log.info("joined as %s (serial %x)", identity.spiffe_id, identity.leaf.serial)
    return identity
