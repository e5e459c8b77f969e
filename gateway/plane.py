"""The gateway as a client of the management plane, like every other part of ambit: identity and config are
pulled over mTLS gRPC, versioned, ACKed or NACKed.

Identity: the gateway joins (agent/identity/bootstrap.join with `gateway=`) with a join token minted for its
Gateway or its pod's ServiceAccount token and gets spiffe://<td>/ns/<ns>/sa/<sa>; the key is generated here
and stays in memory. The agent's IdentityManager then renews that certificate at half life and follows the
trust bundle (root rotation) exactly as it does a node certificate; each change is handed to the running
server (new HBONE connections present the new certificate and trust the new bundle).

Config: the agent's RelayClient subscribes for the Gateway (`Subscribe.gateway`), so the plane sends only what
that Gateway references (mgmt/gateway_scope.py). Every version is turned into a GatewayPlan and compiled
(WafPolicies included) before it is ACKed: a refusal (gateway/config.py, gateway/waf.py) NACKs with its reason
and the running config keeps serving. The first accepted version starts the listeners; later ones go through
the server's reload path (listener ports need a restart, as with files).
"""

from __future__ import annotations

import dataclasses
import logging
import threading
from dataclasses import dataclass
from typing import Any

from agent.identity.bootstrap import MGMT_SERVER_NAME, join
from agent.identity.manager import DEFAULT_BUNDLE_REFRESH_S, IdentityChange, IdentityManager
from agent.relay.client import RelayClient
from agent.state import MeshSnapshot
from api.resources.gateway_api import GATEWAY_KINDS, Gateway, HTTPRoute, ReferenceGrant, TlsSecret
from api.resources.wafpolicy import WafPolicy
from gateway import config as gwconfig
from gateway.hbone import Identity
from gateway.server import GatewayServer, ServerOptions

log = logging.getLogger(__name__)

# What a gateway subscribes to; the plane sends each only as far as the Gateway references it.
GATEWAY_TYPES = GATEWAY_KINDS


@dataclass(frozen=True)
class PlaneOptions:
    relay: str  # host:port of the plane's mTLS listener (relay + CSR service)
    bootstrap: str  # host:port of its bootstrap listener
    trust_bundle_pem: bytes  # to verify the plane before we have a certificate
    gateway: str  # namespace/name of the Gateway this process serves
    token: str = dataclasses.field(repr=False, default="")
    service_account: bool = False  # token is the pod's projected ServiceAccount token
    bundle_refresh_s: float = DEFAULT_BUNDLE_REFRESH_S
    join_timeout_s: float = 30.0


def objects_of(snapshot: MeshSnapshot) -> gwconfig.Objects:
    """The gateway's objects of one relay version, with each selecting Service's endpoints: its workloads,
    in the mesh (HBONE with the workload's SPIFFE id) or not (plain TCP)."""
    objs = gwconfig.Objects()
    for obj in snapshot.policies:
        if isinstance(obj, (Gateway, HTTPRoute, WafPolicy, TlsSecret, ReferenceGrant)):
            gwconfig.add(objs, obj)
    for svc in snapshot.services.values():
        objs.services.append(svc)
        if not svc.selector:
            continue
        objs.endpoints[svc.uid] = tuple(
            gwconfig.Endpoint(
                w.ips[0],
                str(w.spiffe_id(snapshot.trust_domain))
                if w.enrolled(snapshot.namespaces.get(w.namespace))
                else "",
            )
            for w in sorted(snapshot.workloads.values(), key=lambda w: w.uid)
            if svc.selects(w)
        )
    return objs


class PlaneGateway:
    """Join, then serve whatever the plane sends for the Gateway; `stop()` undoes it all."""

    def __init__(self, plane: PlaneOptions, options: ServerOptions) -> None:
        self.plane = plane
        self.options = options
        self.server: GatewayServer | None = None
        self.identity: IdentityManager | None = None
        self.relay: RelayClient | None = None
        self.version = 0  # the config version serving now (ACKed)
        self.serving = threading.Event()
        self._lock = threading.Lock()

    def start(self) -> None:
        p = self.plane
        node = join(
            p.bootstrap,
            p.token,
            "",
            p.trust_bundle_pem,
            timeout=p.join_timeout_s,
            service_account=p.service_account,
            gateway=p.gateway,
        )
        log.info("Gateway %s: identity %s from the plane", p.gateway, node.spiffe_id)
        self.identity = IdentityManager(p.relay, node, node.trust_domain, bundle_refresh_s=p.bundle_refresh_s)
        self.identity.add_listener(self._on_identity)
        self.identity.start()
        identity = self.identity
        self.relay = RelayClient(
            p.relay,
            f"gateway:{p.gateway}",
            # Asked on every reconnect: follows the renewed certificate and the trust bundle.
            lambda: identity.node.credentials(identity.trust_bundle_pem()),
            on_snapshot=lambda _: None,
            validate=self._apply,
            server_name=MGMT_SERVER_NAME,
            types=GATEWAY_TYPES,
            gateway=p.gateway,
        )
        self.relay.start()

    def _svid(self) -> Identity:
        assert self.identity is not None
        svid = self.identity.node_identity()
        return Identity(svid.spiffe_id, svid.chain_pem, svid.key_pem, self.identity.trust_bundle_pem())

    def _apply(self, snapshot: MeshSnapshot) -> None:
        """Plan, compile and apply one version; any refusal raises (the relay client NACKs with it)."""
        plan = gwconfig.plan(objects_of(snapshot), self.plane.gateway)
        with self._lock:
            if self.server is None:
                server = GatewayServer(plan, dataclasses.replace(self.options, identity=self._svid()))
                try:
                    server.start()
                except Exception:
                    server.stop()  # listeners already bound must not outlive the refused version
                    raise
                self.server = server
            else:
                self.server.reload(plan)
            self.version = snapshot.version
        log.info("Gateway %s: config version %d applied", self.plane.gateway, snapshot.version)
        self.serving.set()

    def _on_identity(self, change: IdentityChange) -> None:
        if change.kind in ("node", "bundle"):  # our SVID (held as the "node" identity) or the bundle
            with self._lock:
                if self.server is not None:
                    self.server.set_identity(self._svid())

    def status(self) -> dict[str, Any]:
        return {
            "gateway": self.plane.gateway,
            "version": self.version,
            "relay": self.relay.status() if self.relay else {},
            "certs": self.identity.rows() if self.identity else [],
        }

    def stop(self) -> None:
        if self.relay is not None:
            self.relay.stop()
        if self.identity is not None:
            self.identity.stop()
        with self._lock:
            if self.server is not None:
                self.server.stop()
                self.server = None
