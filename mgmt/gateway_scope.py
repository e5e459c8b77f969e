"""Edge gateways as clients of the plane: which identity serves which Gateway, and what a gateway may see.

Identity. A Gateway (gateway.networking.k8s.io/v1) is served by pods running as one ServiceAccount of the
Gateway's namespace: the annotation `ambit.io/service-account`, else `<gateway name>-<gatewayClassName>`
(the name Istio gives the Deployment and ServiceAccount it creates for a Gateway). Its SVID is
spiffe://<td>/ns/<namespace>/sa/<that account>. On Kubernetes the gateway pod must also be controlled
(through its ReplicaSet) by the Deployment `ambit.io/deployment`, by default the same name.

Scope (least privilege, the gateway's counterpart of mgmt/scope.py). A gateway identity subscribes for one
Gateway it serves and receives exactly:
- that Gateway;
- the HTTPRoutes attached to it (a parentRef naming it, from a namespace its listeners admit);
- the WafPolicies targeting the Gateway or one of those routes;
- the Services those routes' backendRefs name, the Workloads those Services select (the minimal form node
  agents get for peers) and the Namespaces of those Workloads (enrolment);
- the TLS Secrets its listeners reference;
- the ReferenceGrants that allow those of the references above that cross namespaces (the gateway's
  planner checks them again: gateway/config.py).
A reference to a Secret or Service of another namespace is followed only while a ReferenceGrant in that
namespace allows it (gateway.networking.k8s.io/v1beta1: from the Gateway's or HTTPRoute's kind and
namespace, to that kind and, if the grant names one, that name). Without one the object is not sent, and
the refusal is counted and audited by the relay; removing the grant revokes it at the next version.
Nothing else reaches a gateway; Secrets never reach node agents (mgmt/scope.py, NEVER_TO_NODES).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass

from api.resources import ResourceKey
from api.resources.gateway_api import GATEWAY_KINDS, Gateway, HTTPRoute, Reference, ReferenceGrant, granting
from api.resources.wafpolicy import WafPolicy
from api.resources.workload import Service
from api.spiffe import SpiffeId, SpiffeIdError
from mgmt.store import ConfigSnapshot, StoredResource

# What a gateway subscribes to (api/relay.proto Subscribe.types).
GATEWAY_TYPES = GATEWAY_KINDS
SERVICE_ACCOUNT_ANNOTATION = "ambit.io/service-account"
DEPLOYMENT_ANNOTATION = "ambit.io/deployment"
STREAM_PREFIX = "gateway:"
Minimal = Callable[
    [str], StoredResource | None
]  # how a gateway's stream is named in the relay's per-client rows


def service_account(gw: Gateway) -> str:
    return gw.meta.annotations.get(SERVICE_ACCOUNT_ANNOTATION) or f"{gw.meta.name}-{gw.gateway_class}"


def deployment(gw: Gateway) -> str:
    return gw.meta.annotations.get(DEPLOYMENT_ANNOTATION) or service_account(gw)


def gateway_spiffe_id(trust_domain: str, gw: Gateway) -> SpiffeId:
    return SpiffeId.workload(trust_domain, gw.meta.namespace, service_account(gw))


def stream_name(gateway: str) -> str:
    return f"{STREAM_PREFIX}{gateway}"


@dataclass(frozen=True)
class ReferenceRefusal:
    """A reference of the Gateway's config the gateway may not follow (not sent; audited by the relay)."""

    gateway: str
    kind: str
    target: str  # namespace/name
    reason: str


@dataclass(frozen=True)
class GatewayView:
    resources: dict[str, StoredResource]  # by str(ResourceKey)
    refusals: tuple[ReferenceRefusal, ...]


class GatewayIndex:
    """The Gateways of one config version, by name and by identity, and the view of each."""

    def __init__(self, snapshot: ConfigSnapshot, trust_domain: str) -> None:
        self.snapshot = snapshot
        self.trust_domain = trust_domain
        self._gateways: dict[str, Gateway] = {}
        for res in snapshot.of_kind("Gateway"):
            gw: Gateway = res.obj
            self._gateways[f"{gw.meta.namespace}/{gw.meta.name}"] = gw

    def gateway(self, name: str) -> Gateway | None:
        return self._gateways.get(name)

    def spiffe_id(self, name: str) -> SpiffeId | None:
        """The identity that serves Gateway `name` ("namespace/name"), None if there is no such Gateway (or
        its service account cannot form a SPIFFE ID)."""
        gw = self._gateways.get(name)
        if gw is None:
            return None
        try:
            return gateway_spiffe_id(self.trust_domain, gw)
        except SpiffeIdError:
            return None

    def served_by(self, sid: SpiffeId) -> list[str]:
        """The Gateways (namespace/name) identity `sid` serves."""
        return sorted(n for n in self._gateways if self.spiffe_id(n) == sid)

    def view(self, name: str, minimal: Minimal | None = None) -> GatewayView:
        """What the gateway serving `name` receives. `minimal`: the minimal form of a workload by key (the
        node scope's peer documents, ScopeIndex.peer_resource), sent instead of the full document."""
        gw = self._gateways.get(name)
        if gw is None:
            return GatewayView({}, ())
        res = self.snapshot.resources
        gw_key = str(ResourceKey("Gateway", gw.meta.namespace, gw.meta.name))
        out: dict[str, StoredResource] = {gw_key: res[gw_key]}
        refusals: list[ReferenceRefusal] = []
        grants: list[ReferenceGrant] = [g.obj for g in self.snapshot.of_kind("ReferenceGrant")]

        def follow(ref: Reference, where: str) -> StoredResource | None:
            """The target of `ref`, put in `out` (with its grant) if the gateway may follow it."""
            if ref.from_namespace != ref.to_namespace:
                grant = granting(grants, ref)
                if grant is None:
                    refusals.append(
                        ReferenceRefusal(
                            name,
                            ref.to_kind,
                            f"{ref.to_namespace}/{ref.to_name}",
                            f"{where}: no ReferenceGrant in namespace {ref.to_namespace} allows "
                            f"{ref.from_kind}s of namespace {ref.from_namespace} to refer to it",
                        )
                    )
                    return None
                _take(out, res, ResourceKey("ReferenceGrant", grant.meta.namespace, grant.meta.name))
            return _take(out, res, ResourceKey(ref.to_kind, ref.to_namespace, ref.to_name))

        for lst in gw.listeners:
            for ref in lst.certificate_refs:
                if ref.kind == "Secret":
                    cross = Reference("Gateway", gw.meta.namespace, "Secret", ref.namespace, ref.name)
                    follow(cross, f"listener {lst.name}")
        routes = [r for r in self.snapshot.of_kind("HTTPRoute") if _attached(gw, r.obj)]
        for r in routes:
            out[str(r.key)] = r
        route_keys = {(r.key.namespace, r.key.name) for r in routes}
        for p in self.snapshot.of_kind("WafPolicy"):
            pol: WafPolicy = p.obj
            if any(
                (t.kind == "Gateway" and (t.namespace, t.name) == (gw.meta.namespace, gw.meta.name))
                or (t.kind == "HTTPRoute" and (t.namespace, t.name) in route_keys)
                for t in pol.target_refs
            ):
                out[str(p.key)] = p
        services: list[Service] = []
        for r in routes:
            route: HTTPRoute = r.obj
            for rule in route.rules:
                for b in rule.backend_refs:
                    backend = Reference("HTTPRoute", route.meta.namespace, "Service", b.namespace, b.name)
                    svc = follow(backend, f"HTTPRoute {route.meta.namespace}/{route.meta.name}")
                    if svc is not None:
                        services.append(svc.obj)
        self._endpoints(out, services, minimal)
        return GatewayView(out, tuple(dict.fromkeys(refusals)))

    def _endpoints(
        self, out: dict[str, StoredResource], services: list[Service], minimal: Minimal | None
    ) -> None:
        res = self.snapshot.resources
        for w in self.snapshot.of_kind("Workload"):
            if not any(s.selects(w.obj) for s in services):
                continue
            key = str(w.key)
            out[key] = (minimal(key) if minimal is not None else None) or w
            _take(out, res, ResourceKey("Namespace", "", w.obj.namespace))


def _take(
    out: dict[str, StoredResource], resources: Mapping[str, StoredResource], key: ResourceKey
) -> StoredResource | None:
    found = resources.get(str(key))
    if found is not None:
        out[str(key)] = found
    return found


def _attached(gw: Gateway, route: HTTPRoute) -> bool:
    """A parentRef names the Gateway and one of its listeners admits the route's namespace."""
    if not any((p.namespace, p.name) == (gw.meta.namespace, gw.meta.name) for p in route.parent_refs):
        return False
    return any(lst.routes_from == "All" or route.meta.namespace == gw.meta.namespace for lst in gw.listeners)


class CurrentGateways:
    """The GatewayIndex of the config in force, rebuilt once per version (bootstrap and CSR service)."""

    def __init__(self, current: Callable[[], ConfigSnapshot], trust_domain: str) -> None:
        self._current = current
        self._trust_domain = trust_domain
        self._index: GatewayIndex | None = None

    def index(self) -> GatewayIndex:
        snapshot = self._current()
        index = self._index
        if index is None or index.snapshot is not snapshot:
            index = self._index = GatewayIndex(snapshot, self._trust_domain)
        return index

    def is_gateway(self, sid: SpiffeId) -> bool:
        return bool(self.index().served_by(sid))
