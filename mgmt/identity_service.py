"""The CSR service: node agents get SVIDs for the workloads scheduled on their own node, nothing else; an
edge gateway (the identity of a Gateway of the config, mgmt/gateway_scope.py) renews its own SVID only.

The caller is identified only by its mTLS client certificate (the gRPC server verified the chain against
the CA bundle); its URI SAN must be a node ID of our trust domain. Every refusal gets a precise gRPC status,
a log line, a counter and an audit record; nothing secret (keys, tokens) is ever logged.
"""

from __future__ import annotations

import datetime as dt
import logging
import threading
from collections import Counter
from collections.abc import Callable
from typing import Any, NoReturn, Protocol

import grpc
from cryptography import x509
from cryptography.hazmat.primitives.asymmetric import ec

from api import ca_pb2, ca_pb2_grpc
from api.spiffe import SpiffeId, SpiffeIdError, leaf_spiffe_id
from mgmt.ca import DEFAULT_LEAF_TTL, CertificateAuthority, certs_pem, serving_cert

log = logging.getLogger(__name__)

MAX_CSR_BYTES = 16 * 1024


class Audit(Protocol):
    def record(self, event: str, **fields: Any) -> None: ...


class Directory(Protocol):
    def identities_on_node(self, node: str) -> frozenset[str]: ...


# Whether a SPIFFE ID is the identity of a Gateway of the config in force (mgmt/gateway_scope.py).
GatewayIdentities = Callable[[SpiffeId], bool]


class CsrError(ValueError):
    pass


def load_csr(csr_pem: bytes, allowed_uri: str | None) -> ec.EllipticCurvePublicKey:
    """The public key of a well-formed, self-signed ECDSA P-256 CSR whose SANs are at most `allowed_uri`.

    `allowed_uri=None` means the CSR must carry no SAN at all (the plane decides the identity).
    """
    if not csr_pem or len(csr_pem) > MAX_CSR_BYTES:
        raise CsrError(f"CSR is empty or larger than {MAX_CSR_BYTES} bytes")
    try:
        csr = x509.load_pem_x509_csr(csr_pem)
        key = csr.public_key()
        valid = csr.is_signature_valid
    except (ValueError, TypeError) as e:
        raise CsrError(f"malformed CSR: {e}") from None
    if not valid:
        raise CsrError("CSR signature does not verify (proof of key possession failed)")
    if not isinstance(key, ec.EllipticCurvePublicKey) or not isinstance(key.curve, ec.SECP256R1):
        raise CsrError("CSR key must be ECDSA P-256")
    try:
        san = csr.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
        names = [f"{type(n).__name__}:{n.value}" for n in san]
        uris = san.get_values_for_type(x509.UniformResourceIdentifier)
    except x509.ExtensionNotFound:
        names, uris = [], []
    except ValueError as e:
        raise CsrError(f"malformed CSR extensions: {e}") from None
    if allowed_uri is None and names:
        raise CsrError(f"CSR must not carry SANs, has {names}")
    if allowed_uri is not None and names and (len(names) != 1 or uris != [allowed_uri]):
        raise CsrError(f"CSR SANs must be exactly the URI {allowed_uri}, has {names}")
    return key


class Refusals:
    """Refuse an RPC: log, count, audit, then abort with `code` (shared by the CSR and bootstrap services)."""

    def __init__(self, audit: Audit | None, event: str) -> None:
        self._audit = audit
        self._event = event
        self._lock = threading.Lock()
        self.counts: Counter[str] = Counter()

    def count(self, what: str) -> None:
        with self._lock:
            self.counts[what] += 1

    def audit(self, event: str, **fields: Any) -> None:
        if self._audit is not None:
            try:
                self._audit.record(event, **fields)
            except Exception:  # the audit sink must never take the CA down
                log.exception("audit record %s failed", event)

    def refuse(
        self, context: grpc.ServicerContext, code: grpc.StatusCode, reason: str, **fields: Any
    ) -> NoReturn:
        log.warning("%s: %s (%s) %s", self._event, code.name, reason, fields)
        self.count(f"refused_{code.name.lower()}")
        self.audit(self._event, code=code.name, reason=reason, **fields)
        context.abort(code, reason)
        raise AssertionError("unreachable: context.abort raises")


def peer_spiffe_id(context: grpc.ServicerContext) -> SpiffeId | None:
    """The SPIFFE ID in the verified client certificate of this call (None without one, or when that
    certificate is no end-entity SPIFFE identity, e.g. CA:true: `leaf_spiffe_id`)."""
    pem = (context.auth_context() or {}).get("x509_pem_cert")
    if not pem:
        return None
    try:
        return leaf_spiffe_id(x509.load_pem_x509_certificate(pem[0]))
    except ValueError as exc:
        log.warning("client certificate of %s refused: %s", context.peer(), exc)
        return None


class ServingTls:
    """The plane's TLS credentials, re-issued when the CA changes (root rotation) or at half life.

    gRPC's dynamic credentials call the fetcher on each new handshake, so new connections get the new
    serving certificate and client-root bundle while live ones are untouched.
    """

    def __init__(self, ca: CertificateAuthority, require_client_auth: bool) -> None:
        self._ca = ca
        self._require = require_client_auth
        self._lock = threading.Lock()
        self._generation = -1
        self._renew_at = dt.datetime.min.replace(tzinfo=dt.UTC)

    def _config(self) -> Any:
        chain, key = serving_cert(self._ca)
        leaf = x509.load_pem_x509_certificate(chain)
        self._renew_at = (
            leaf.not_valid_before_utc + (leaf.not_valid_after_utc - leaf.not_valid_before_utc) / 2
        )
        self._generation = self._ca.generation
        roots = self._ca.bundle_pem() if self._require else None
        return grpc.ssl_server_certificate_configuration([(key, chain)], root_certificates=roots)

    def _fetch(self) -> Any:
        with self._lock:
            if self._ca.generation == self._generation and dt.datetime.now(dt.UTC) < self._renew_at:
                return None
            return self._config()

    def credentials(self) -> grpc.ServerCredentials:
        with self._lock:
            initial = self._config()
        return grpc.dynamic_ssl_server_credentials(
            initial, self._fetch, require_client_authentication=self._require
        )


def plane_server_credentials(
    ca: CertificateAuthority, require_client_auth: bool = True
) -> grpc.ServerCredentials:
    """Server credentials for the plane's listeners (mTLS for 15012, server-auth only for bootstrap)."""
    return ServingTls(ca, require_client_auth).credentials()


class IdentityService(ca_pb2_grpc.IdentityServicer):
    def __init__(
        self,
        ca: CertificateAuthority,
        directory: Directory,
        audit: Audit | None = None,
        max_ttl: dt.timedelta = DEFAULT_LEAF_TTL,
        default_ttl: dt.timedelta | None = None,
        gateways: GatewayIdentities | None = None,
    ) -> None:
        self._ca = ca
        self._directory = directory
        self._gateways = gateways
        self._max_ttl = max_ttl
        self._default_ttl = default_ttl or max_ttl
        self._refusals = Refusals(audit, "csr_refused")

    def counters(self) -> dict[str, int]:
        return dict(self._refusals.counts)

    def _caller(self, context: grpc.ServicerContext) -> tuple[SpiffeId, str | None]:
        """(caller's identity, its node name), node name None for an edge gateway of the config."""
        peer = peer_spiffe_id(context)
        if peer is not None and peer.trust_domain == self._ca.trust_domain:
            if peer.node_name is not None:
                return peer, peer.node_name
            if self._gateways is not None and self._gateways(peer):
                return peer, None
        self._refusals.refuse(
            context,
            grpc.StatusCode.UNAUTHENTICATED,
            "caller is not a node or gateway of this trust domain",
            peer=str(peer) if peer else "",
        )

    def _ttl(self, seconds: int) -> dt.timedelta:
        if seconds <= 0:
            return self._default_ttl
        return min(dt.timedelta(seconds=seconds), self._max_ttl)

    def Sign(self, request: ca_pb2.SignRequest, context: grpc.ServicerContext) -> ca_pb2.SignResponse:  # noqa: N802
        peer, node = self._caller(context)
        fields = {"node": node or "", "spiffe_id": request.spiffe_id}
        if node is None:
            fields["gateway"] = str(peer)
        try:
            wanted = SpiffeId.parse(request.spiffe_id)
        except SpiffeIdError as e:
            self._refusals.refuse(context, grpc.StatusCode.INVALID_ARGUMENT, str(e), **fields)
        own_node = wanted == peer
        if wanted.trust_domain != self._ca.trust_domain:
            self._refusals.refuse(
                context, grpc.StatusCode.PERMISSION_DENIED, f"{wanted} is outside the trust domain", **fields
            )
        if not own_node and node is None:
            # A gateway renews its own SVID; it never speaks for anyone else.
            self._refusals.refuse(
                context, grpc.StatusCode.PERMISSION_DENIED, f"gateway {peer} may renew only itself", **fields
            )
        if not own_node and str(wanted) not in self._directory.identities_on_node(node or ""):
            self._refusals.refuse(
                context,
                grpc.StatusCode.PERMISSION_DENIED,
                f"node {node} runs no workload with identity {wanted}",
                **fields,
            )
        try:
            key = load_csr(request.csr_pem, str(wanted))
        except CsrError as e:
            self._refusals.refuse(context, grpc.StatusCode.INVALID_ARGUMENT, str(e), **fields)
        chain = self._ca.issue(wanted, key, self._ttl(request.ttl_seconds))
        leaf = chain[0]
        self._refusals.count("signed")
        self._refusals.audit(
            "csr_signed",
            **fields,
            serial=f"{leaf.serial_number:x}",
            not_after=leaf.not_valid_after_utc.isoformat(),
        )
        log.info("signed %s for %s (serial %x)", wanted, node or "itself", leaf.serial_number)
        return ca_pb2.SignResponse(chain_pem=certs_pem(chain), trust_bundle_pem=self._ca.bundle_pem())

    def TrustBundle(  # noqa: N802
        self, request: ca_pb2.TrustBundleRequest, context: grpc.ServicerContext
    ) -> ca_pb2.TrustBundleResponse:
        self._caller(context)
        return ca_pb2.TrustBundleResponse(trust_bundle_pem=self._ca.bundle_pem())


def add_identity_service(
    server: grpc.Server,
    ca: CertificateAuthority,
    directory: Directory,
    audit: Audit | None = None,
    max_ttl: dt.timedelta = DEFAULT_LEAF_TTL,
    gateways: GatewayIdentities | None = None,
) -> IdentityService:
    """Register the CSR service on the plane's mTLS gRPC server; returns it (for `counters()`)."""
    service = IdentityService(ca, directory, audit, max_ttl, gateways=gateways)
    ca_pb2_grpc.add_IdentityServicer_to_server(service, server)
    return service
