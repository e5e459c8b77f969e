"""Node bootstrap (port 15013): a one-time join token buys a node certificate spiffe://<td>/node/<name>.

On Kubernetes the agent sends its pod's ServiceAccount token instead, checked by mgmt/kube_bootstrap.py
(TokenReview, then the pod: node, owner DaemonSet, ServiceAccount); a plane without that check refuses it.

The listener is TLS with server authentication only: the node has no certificate yet, it checks ours
against the trust bundle it was given out of band. The CSR is checked before the token is consumed so a
typo in the request does not burn the token.
"""

from __future__ import annotations

import datetime as dt
import logging
from concurrent import futures

import grpc

from api import ca_pb2, ca_pb2_grpc
from api.spiffe import SpiffeId, SpiffeIdError
from mgmt.ca import DEFAULT_LEAF_TTL, CertificateAuthority, certs_pem
from mgmt.identity_service import Audit, CsrError, Refusals, load_csr, plane_server_credentials
from mgmt.join_tokens import JoinTokens, TokenError, fingerprint
from mgmt.kube_bootstrap import KubeJoinError, KubeNodeVerifier

log = logging.getLogger(__name__)

BOOTSTRAP_PORT = 15013


class BootstrapService(ca_pb2_grpc.BootstrapServicer):
    def __init__(
        self,
        ca: CertificateAuthority,
        tokens: JoinTokens,
        audit: Audit | None,
        node_ttl: dt.timedelta,
        kube: KubeNodeVerifier | None = None,
    ) -> None:
        self._ca = ca
        self._tokens = tokens
        self._node_ttl = node_ttl
        self._kube = kube
        self.refusals = Refusals(audit, "join_refused")

    def _admit_join_token(
        self, request: ca_pb2.JoinRequest, context: grpc.ServicerContext, fields: dict[str, str]
    ) -> None:
        try:
            token_node = self._tokens.consume(request.token)
        except TokenError as e:
            self.refusals.refuse(context, grpc.StatusCode.UNAUTHENTICATED, str(e), kind=e.kind, **fields)
        if token_node != request.node:
            self.refusals.refuse(
                context,
                grpc.StatusCode.PERMISSION_DENIED,
                f"join token was issued for node {token_node}, not {request.node}",
                **fields,
            )

    def _admit_service_account(
        self, request: ca_pb2.JoinRequest, context: grpc.ServicerContext, fields: dict[str, str]
    ) -> None:
        if self._kube is None:
            self.refusals.refuse(
                context,
                grpc.StatusCode.UNAUTHENTICATED,
                "this plane does not take ServiceAccount tokens (it runs without --kube-bootstrap)",
                kind="kube_bootstrap_off",
                **fields,
            )
        try:
            pod = self._kube.verify(request.service_account_token, request.node)
        except KubeJoinError as e:
            code = grpc.StatusCode.UNAVAILABLE if e.retryable else grpc.StatusCode.PERMISSION_DENIED
            self.refusals.refuse(context, code, str(e), kind=e.kind, **fields)
        fields["pod"] = f"{pod.namespace}/{pod.name}"
        fields["pod_uid"] = pod.uid

    def Join(self, request: ca_pb2.JoinRequest, context: grpc.ServicerContext) -> ca_pb2.JoinResponse:  # noqa: N802
        kube = bool(request.service_account_token)
        secret = request.service_account_token if kube else request.token
        fields = {
            "node": request.node,
            "method": "service_account" if kube else "join_token",
            "token": fingerprint(secret),
            "peer": context.peer(),
        }
        try:
            node_id = SpiffeId.node(self._ca.trust_domain, request.node)
        except SpiffeIdError as e:
            self.refusals.refuse(context, grpc.StatusCode.INVALID_ARGUMENT, f"bad node name: {e}", **fields)
        try:
            key = load_csr(request.csr_pem, str(node_id))
        except CsrError as e:
            self.refusals.refuse(context, grpc.StatusCode.INVALID_ARGUMENT, str(e), **fields)
        if kube:
            self._admit_service_account(request, context, fields)
        else:
            self._admit_join_token(request, context, fields)
        chain = self._ca.issue(node_id, key, self._node_ttl)
        self.refusals.count("joined")
        self.refusals.audit("node_joined", **fields, serial=f"{chain[0].serial_number:x}")
        log.info("node %s joined (%s)", request.node, context.peer())
        return ca_pb2.JoinResponse(
            chain_pem=certs_pem(chain),
            trust_bundle_pem=self._ca.bundle_pem(),
            trust_domain=self._ca.trust_domain,
        )


class BootstrapServer:
    def __init__(
        self,
        ca: CertificateAuthority,
        tokens: JoinTokens,
        listen: str = f"0.0.0.0:{BOOTSTRAP_PORT}",
        audit: Audit | None = None,
        node_ttl: dt.timedelta = DEFAULT_LEAF_TTL,
        kube: KubeNodeVerifier | None = None,
    ) -> None:
        self.service = BootstrapService(ca, tokens, audit, node_ttl, kube)
        self._ca = ca
        self._listen = listen
        self._server: grpc.Server | None = None
        self.port = 0

    def counters(self) -> dict[str, int]:
        return dict(self.service.refusals.counts)

    def start(self) -> None:
        server = grpc.server(futures.ThreadPoolExecutor(max_workers=4, thread_name_prefix="bootstrap"))
        ca_pb2_grpc.add_BootstrapServicer_to_server(self.service, server)
        self.port = server.add_secure_port(
            self._listen, plane_server_credentials(self._ca, require_client_auth=False)
        )
        if not self.port:
            raise OSError(f"bootstrap: cannot listen on {self._listen}")
        server.start()
        self._server = server
        log.info("bootstrap listening on %s (port %d)", self._listen, self.port)

    def stop(self, grace: float = 1.0) -> None:
        if self._server is not None:
            self._server.stop(grace).wait()
            self._server = None
