"""Node bootstrap (port 15013): a one-time join token buys a node certificate spiffe://<td>/node/<name>.

An edge gateway joins the same way for the SVID of the Gateway it serves (`JoinRequest.gateway`): a token
minted for that Gateway (`ambit mgmt token --gateway ns/name`), or on Kubernetes its pod's ServiceAccount
token, which must be the Gateway's service account in the Gateway's namespace, in a pod of its Deployment
(mgmt/gateway_scope.py, mgmt/kube_bootstrap.py). The CSR carries no SAN: the plane decides the identity.

On Kubernetes the agent sends its pod's ServiceAccount token instead, checked by mgmt/kube_bootstrap.py
(TokenReview, then the pod: node, owner DaemonSet, ServiceAccount); a plane without that check refuses it.

The listener is TLS with server authentication only: the node has no certificate yet, it checks ours
against the trust bundle it was given out of band. The CSR is checked before the token is consumed so a
typo in the request does not burn the token.
"""

from __future__ import annotations

import datetime as dt
import logging
from collections.abc import Callable
from concurrent import futures

import grpc

from api import ca_pb2, ca_pb2_grpc
from api.resources.gateway_api import Gateway
from api.spiffe import SpiffeId, SpiffeIdError
from mgmt import gateway_scope
from mgmt.ca import DEFAULT_LEAF_TTL, CertificateAuthority, certs_pem
from mgmt.gateway_scope import GatewayIndex
from mgmt.identity_service import Audit, CsrError, Refusals, load_csr, plane_server_credentials
from mgmt.join_tokens import GATEWAY_SUBJECT, JoinTokens, TokenError, fingerprint, gateway_subject
from mgmt.kube_bootstrap import KubeJoinError, KubeNodeVerifier

log = logging.getLogger(__name__)

BOOTSTRAP_PORT = 15013


GatewayLookup = Callable[[], GatewayIndex]  # the Gateways of the config in force


class BootstrapService(ca_pb2_grpc.BootstrapServicer):
    def __init__(
        self,
        ca: CertificateAuthority,
        tokens: JoinTokens,
        audit: Audit | None,
        node_ttl: dt.timedelta,
        kube: KubeNodeVerifier | None = None,
        gateways: GatewayLookup | None = None,
    ) -> None:
        self._ca = ca
        self._tokens = tokens
        self._node_ttl = node_ttl
        self._kube = kube
        self._gateways = gateways
        self.refusals = Refusals(audit, "join_refused")

    def _admit_join_token(
        self, request: ca_pb2.JoinRequest, context: grpc.ServicerContext, fields: dict[str, str], subject: str
    ) -> None:
        try:
            token_subject = self._tokens.consume(request.token)
        except TokenError as e:
            self.refusals.refuse(context, grpc.StatusCode.UNAUTHENTICATED, str(e), kind=e.kind, **fields)
        if token_subject != subject:
            self.refusals.refuse(
                context,
                grpc.StatusCode.PERMISSION_DENIED,
                f"join token was issued for {_describe(token_subject)}, not {_describe(subject)}",
                kind="wrong_subject",
                **fields,
            )

    def _admit_service_account(
        self,
        request: ca_pb2.JoinRequest,
        context: grpc.ServicerContext,
        fields: dict[str, str],
        gateway: Gateway | None,
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
            if gateway is None:
                pod = self._kube.verify(request.service_account_token, request.node)
            else:
                pod = self._kube.verify_gateway(
                    request.service_account_token,
                    gateway.meta.namespace,
                    gateway_scope.service_account(gateway),
                    gateway_scope.deployment(gateway),
                )
        except KubeJoinError as e:
            code = grpc.StatusCode.UNAVAILABLE if e.retryable else grpc.StatusCode.PERMISSION_DENIED
            self.refusals.refuse(context, code, str(e), kind=e.kind, **fields)
        fields["pod"] = f"{pod.namespace}/{pod.name}"
        fields["pod_uid"] = pod.uid

    def _gateway(
        self, request: ca_pb2.JoinRequest, context: grpc.ServicerContext, fields: dict[str, str]
    ) -> tuple[SpiffeId, Gateway]:
        """The Gateway a gateway join names and the identity that serves it, or a refusal."""
        if request.node:
            self.refusals.refuse(
                context,
                grpc.StatusCode.INVALID_ARGUMENT,
                "a join names a node or a gateway, not both",
                **fields,
            )
        index = self._gateways() if self._gateways is not None else None
        gw = index.gateway(request.gateway) if index is not None else None
        sid = index.spiffe_id(request.gateway) if index is not None else None
        if gw is None or sid is None:
            self.refusals.refuse(
                context,
                grpc.StatusCode.PERMISSION_DENIED,
                f"Gateway {request.gateway!r} is not in the config",
                kind="unknown_gateway",
                **fields,
            )
        fields["spiffe_id"] = str(sid)
        return sid, gw

    def Join(self, request: ca_pb2.JoinRequest, context: grpc.ServicerContext) -> ca_pb2.JoinResponse:  # noqa: N802
        kube = bool(request.service_account_token)
        secret = request.service_account_token if kube else request.token
        fields = {
            "node": request.node,
            "method": "service_account" if kube else "join_token",
            "token": fingerprint(secret),
            "peer": context.peer(),
        }
        gateway: Gateway | None = None
        if request.gateway:
            fields["gateway"] = request.gateway
            sid, gateway = self._gateway(request, context, fields)
            subject = gateway_subject(request.gateway)
        else:
            try:
                sid = SpiffeId.node(self._ca.trust_domain, request.node)
            except SpiffeIdError as e:
                self.refusals.refuse(
                    context, grpc.StatusCode.INVALID_ARGUMENT, f"bad node name: {e}", **fields
                )
            subject = request.node
        try:
            key = load_csr(request.csr_pem, None if gateway is not None else str(sid))
        except CsrError as e:
            self.refusals.refuse(context, grpc.StatusCode.INVALID_ARGUMENT, str(e), **fields)
        if kube:
            self._admit_service_account(request, context, fields, gateway)
        else:
            self._admit_join_token(request, context, fields, subject)
        chain = self._ca.issue(sid, key, self._node_ttl)
        what = "gateway" if gateway is not None else "node"
        self.refusals.count("joined" if gateway is None else "gateways_joined")
        self.refusals.audit(f"{what}_joined", **fields, serial=f"{chain[0].serial_number:x}")
        log.info("%s %s joined as %s (%s)", what, request.gateway or request.node, sid, context.peer())
        return ca_pb2.JoinResponse(
            chain_pem=certs_pem(chain),
            trust_bundle_pem=self._ca.bundle_pem(),
            trust_domain=self._ca.trust_domain,
        )


def _describe(subject: str) -> str:
    if subject.startswith(GATEWAY_SUBJECT):
        return f"Gateway {subject[len(GATEWAY_SUBJECT) :]}"
    return f"node {subject}"


class BootstrapServer:
    def __init__(
        self,
        ca: CertificateAuthority,
        tokens: JoinTokens,
        listen: str = f"0.0.0.0:{BOOTSTRAP_PORT}",
        audit: Audit | None = None,
        node_ttl: dt.timedelta = DEFAULT_LEAF_TTL,
        kube: KubeNodeVerifier | None = None,
        gateways: GatewayLookup | None = None,
    ) -> None:
        self.service = BootstrapService(ca, tokens, audit, node_ttl, kube, gateways)
        self._ca = ca
        self._listen = listen
        self._server: grpc.Server | None = None
        self.port = 0

    def counters(self) -> dict[str, int]:
        return dict(self.service.refusals.counts)

    def start(self) -> None:
        server = grpc.server(futures.ThreadPoolExecutor(max_workers=4, thread_name_prefix="bootstrap"))
        ca_pb2_grpc.add_BootstrapServicer_to_server(self.service, server)
        try:  # grpcio reports a failed bind as RuntimeError (older releases: port 0)
            self.port = server.add_secure_port(
                self._listen, plane_server_credentials(self._ca, require_client_auth=False)
            )
        except RuntimeError:
            self.port = 0
        if not self.port:
            raise OSError(f"bootstrap: cannot listen on {self._listen} (address in use or not local)")
        server.start()
        self._server = server
        log.info("bootstrap listening on %s (port %d)", self._listen, self.port)

    def stop(self, grace: float = 1.0) -> None:
        if self._server is not None:
            self._server.stop(grace).wait()
            self._server = None
