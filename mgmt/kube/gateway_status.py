"""Gateway API status, as a Gateway API user reads it: `kubectl get gateway` / `get httproute -o yaml`.

The verdicts are the gateway's own: the plan it would build from what the store holds (gateway/config.py:
`plan`, listener certificates, route attachment, backend resolution), computed here from the same parsed
objects, so status never says Programmed for a config the gateway would refuse.

- GatewayClass whose `controllerName` is ours (CONTROLLER_NAME): `Accepted`. Gateways of other classes are
  not ours: the plane neither holds them nor writes their status.
- Gateway: `Accepted` (it parses) and `Programmed` (the gateway's plan builds); per listener `Accepted`
  (PortUnavailable when another listener has its port), `ResolvedRefs` (InvalidCertificateRef: Secret
  missing or not a certificate; RefNotPermitted: a Secret in another namespace that no ReferenceGrant
  there allows; InvalidRouteKinds), `Programmed`, `attachedRoutes`.
- HTTPRoute: one `status.parents` entry per parentRef to one of our Gateways (entries of other
  controllers are kept), with `Accepted` (NotAllowedByListeners, NoMatchingParent,
  NoMatchingListenerHostname, UnsupportedValue for a route the parser refuses) and `ResolvedRefs`
  (RefNotPermitted for a backend in another namespace no ReferenceGrant allows, InvalidKind for a
  backend that is not a core Service, BackendNotFound for a Service or port that does not exist).
- WafPolicy: `Accepted`, or False with the refusal: the parser's, the gateway's config-time check
  (mgmt/waf_check), or two policies on one target.

Every condition carries `observedGeneration`; `lastTransitionTime` moves only when the status flips. A patch
is queued only when the object does not already carry exactly these conditions, so our own writes (which
come back as MODIFIED events) cost nothing.
"""

from __future__ import annotations

import datetime as dt
import logging
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field, replace
from typing import Any

from api.resources.gateway_api import GROUP, Gateway, HTTPRoute, Reference
from gateway import config as gwconfig
from mgmt import gateway_scope, waf_check
from mgmt.store import StoredResource

log = logging.getLogger("ambit.mgmt.kube")

CONTROLLER_NAME = "ambit.io/gateway-controller"
VERSION = "v1"
ROUTE_KIND = {"group": GROUP, "kind": "HTTPRoute"}
MAX_MESSAGE = 1024  # the CRDs' limit on a condition message is 32 KiB; a reason needs far less

Write = tuple[str, str, str, str, str, dict[str, Any]]  # group, version, plural, namespace, name, body


@dataclass
class GatewayApiObjects:
    """The raw Kubernetes objects (spec, generation, status) status is computed for, by object name."""

    classes: dict[str, Mapping[str, Any]] = field(default_factory=dict)
    gateways: dict[str, Mapping[str, Any]] = field(default_factory=dict)
    routes: dict[str, Mapping[str, Any]] = field(default_factory=dict)
    waf_policies: dict[str, Mapping[str, Any]] = field(default_factory=dict)
    # Every Service's addresses ("ns/name" -> status.addresses entries): a Gateway's are its gateway's
    # Service's (service_addresses).
    services: dict[str, list[dict[str, str]]] = field(default_factory=dict)

    def copy(self) -> GatewayApiObjects:
        return GatewayApiObjects(
            dict(self.classes),
            dict(self.gateways),
            dict(self.routes),
            dict(self.waf_policies),
            dict(self.services),
        )

    def ours(self, gateway: Mapping[str, Any]) -> bool:
        """Whether `gateway`'s class is one whose controller is this plane."""
        cls = self.classes.get(str((gateway.get("spec") or {}).get("gatewayClassName")))
        return cls is not None and (cls.get("spec") or {}).get("controllerName") == CONTROLLER_NAME


def kept(obj: Mapping[str, Any]) -> dict[str, Any]:
    """What is kept of a Gateway API object between events: spec, identity, generation and status."""
    md = obj.get("metadata") or {}
    keep = ("name", "namespace", "generation", "resourceVersion")
    return {
        "apiVersion": obj.get("apiVersion"),
        "kind": obj.get("kind"),
        "metadata": {k: md[k] for k in keep if k in md},
        "spec": obj.get("spec") or {},
        "status": obj.get("status") or {},
    }


def service_addresses(svc: Mapping[str, Any]) -> list[dict[str, str]]:
    """Where clients reach a Service: its load balancer's ingress (set by the cloud's controller), else its
    cluster IPs."""
    ingress = ((svc.get("status") or {}).get("loadBalancer") or {}).get("ingress") or ()
    out = [
        {"type": "IPAddress", "value": str(i["ip"])}
        if i.get("ip")
        else {"type": "Hostname", "value": str(i["hostname"])}
        for i in ingress
        if isinstance(i, Mapping) and (i.get("ip") or i.get("hostname"))
    ]
    if not out:
        spec = svc.get("spec") or {}
        ips = spec.get("clusterIPs") or [spec.get("clusterIP")]
        out = [{"type": "IPAddress", "value": str(ip)} for ip in ips if ip and ip != "None"]
    return out[:16]  # the CRD's bound


def gateway_service(gw: Gateway) -> str:
    """`ns/name` of the Service in front of the gateway serving `gw`: the chart names it as the Deployment
    the plane admits gateway pods from (`gateway_scope.deployment`)."""
    return f"{gw.meta.namespace}/{gateway_scope.deployment(gw)}"


# ---- conditions ----


def _now() -> str:
    return dt.datetime.now(dt.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def _condition(
    ctype: str, ok: bool, reason: str, message: str, generation: int, previous: Iterable[Any]
) -> dict[str, Any]:
    status = "True" if ok else "False"
    before = next((c for c in previous if isinstance(c, Mapping) and c.get("type") == ctype), None)
    since = before.get("lastTransitionTime") if before and before.get("status") == status else None
    return {
        "type": ctype,
        "status": status,
        "reason": reason,
        "message": message[:MAX_MESSAGE],
        "observedGeneration": generation,
        "lastTransitionTime": since or _now(),
    }


def _same(current: Any, desired: Any) -> bool:
    """Equal but for lastTransitionTime (which _condition keeps when nothing flipped)."""
    if isinstance(current, Mapping) and isinstance(desired, Mapping):
        keys = (set(current) | set(desired)) - {"lastTransitionTime"}
        return all(_same(current.get(k), desired.get(k)) for k in keys)
    if isinstance(current, list) and isinstance(desired, list):
        return len(current) == len(desired) and all(
            _same(a, b) for a, b in zip(current, desired, strict=True)
        )
    return bool(current == desired)


def _generation(obj: Mapping[str, Any]) -> int:
    return int((obj.get("metadata") or {}).get("generation") or 0)


def _ident(obj: Mapping[str, Any]) -> tuple[str, str]:
    md = obj.get("metadata") or {}
    return str(md.get("namespace") or ""), str(md.get("name") or "")


# ---- the computation ----


class GatewayStatus:
    """Computes the status patches of every Gateway API object the plane owns (`writes`)."""

    def writes(
        self,
        raw: GatewayApiObjects,
        resources: Mapping[str, StoredResource],
        invalid: Mapping[str, str],
    ) -> list[Write]:
        """`resources`: what the store holds (by str(ResourceKey)); `invalid`: why each skipped object
        ("Kind ns/name") was refused."""
        objs = gwconfig.Objects()
        for res in resources.values():
            if res.kind in ("Gateway", "HTTPRoute", "WafPolicy", "Service", "Secret", "ReferenceGrant"):
                gwconfig.add(objs, res.obj)
        out: list[Write] = []
        for name, cls in raw.classes.items():
            out.extend(self._gateway_class(name, cls))
        ours: dict[tuple[str, str], Gateway] = {}
        for name, gw_raw in raw.gateways.items():
            if not raw.ours(gw_raw):
                continue
            parsed = resources.get(f"Gateway/{name}")
            gw = parsed.obj if parsed is not None else None
            if gw is not None:
                ours[(gw.meta.namespace, gw.meta.name)] = gw
            addresses = raw.services.get(gateway_service(gw), []) if gw is not None else []
            out.extend(self._gateway(gw_raw, gw, objs, invalid.get(f"Gateway {name}"), addresses))
        for name, route_raw in raw.routes.items():
            parsed = resources.get(f"HTTPRoute/{name}")
            route = parsed.obj if parsed is not None else None
            out.extend(self._route(route_raw, route, ours, raw, objs, invalid.get(f"HTTPRoute {name}")))
        return out

    # -- GatewayClass --------------------------------------------------------------------------------
    @staticmethod
    def _gateway_class(name: str, cls: Mapping[str, Any]) -> list[Write]:
        if (cls.get("spec") or {}).get("controllerName") != CONTROLLER_NAME:
            return []
        current = (cls.get("status") or {}).get("conditions") or []
        cond = _condition("Accepted", True, "Accepted", "handled by ambit", _generation(cls), current)
        others = [c for c in current if isinstance(c, Mapping) and c.get("type") != "Accepted"]
        desired = [*others, cond]
        if _same(current, desired):
            return []
        return [(GROUP, VERSION, "gatewayclasses", "", name, {"status": {"conditions": desired}})]

    # -- Gateway -------------------------------------------------------------------------------------
    def _gateway(
        self,
        raw: Mapping[str, Any],
        gw: Gateway | None,
        objs: gwconfig.Objects,
        problem: str | None,
        addresses: list[dict[str, str]],
    ) -> list[Write]:
        ns, name = _ident(raw)
        gen = _generation(raw)
        status = raw.get("status") or {}
        current = status.get("conditions") or []
        listeners: list[dict[str, Any]] = []
        if gw is None:  # refused by the parser, and no earlier version in force
            reason = problem or "not valid"
            conditions = [
                _condition("Accepted", False, "Invalid", reason, gen, current),
                _condition("Programmed", False, "Invalid", reason, gen, current),
            ]
        else:
            single = replace(objs, gateways=[gw])
            try:
                gwconfig.plan(single, f"{ns}/{name}")
                programmed = (True, "Programmed", "the gateway's tables build from this configuration")
            except gwconfig.GatewayConfigError as exc:
                programmed = (False, "Invalid", str(exc))
            if problem:
                accepted = (False, "Invalid", f"{problem} (its last valid version stays in force)")
            else:
                accepted = (True, "Accepted", "handled by ambit")
            conditions = [
                _condition("Accepted", *accepted, gen, current),
                _condition("Programmed", *programmed, gen, current),
            ]
            listeners = self._listeners(raw, gw, objs, programmed[0])
        desired = {"conditions": conditions, "listeners": listeners, "addresses": addresses}
        carried = {k: status.get(k) or [] for k in ("listeners", "addresses")}
        if _same({"conditions": current, **carried}, desired):
            return []
        return [(GROUP, VERSION, "gateways", ns, name, {"status": desired})]

    @staticmethod
    def _listeners(
        raw: Mapping[str, Any], gw: Gateway, objs: gwconfig.Objects, gateway_ok: bool
    ) -> list[dict[str, Any]]:
        gen = _generation(raw)
        previous = {
            lst.get("name"): lst.get("conditions") or []
            for lst in (raw.get("status") or {}).get("listeners") or ()
            if isinstance(lst, Mapping)
        }
        raw_listeners = {
            lst.get("name"): lst
            for lst in (raw.get("spec") or {}).get("listeners") or ()
            if isinstance(lst, Mapping)
        }
        attached = [0] * len(gw.listeners)
        for route in objs.routes:
            for lid, _ in gwconfig.attached_listeners(gw, route):
                attached[lid - 1] += 1
        ports = [lst.port for lst in gw.listeners]
        out = []
        for i, lst in enumerate(gw.listeners):
            before = previous.get(lst.name, [])
            accepted = (True, "Accepted", "")
            if ports.count(lst.port) > 1:
                accepted = (
                    False,
                    "PortUnavailable",
                    f"another listener has port {lst.port}: one listener per port",
                )
            resolved = (True, "ResolvedRefs", "")
            kinds = ((raw_listeners.get(lst.name) or {}).get("allowedRoutes") or {}).get("kinds")
            supported = [ROUTE_KIND]
            if kinds:
                wanted = [k for k in kinds if isinstance(k, Mapping)]
                supported = [ROUTE_KIND] if any(_is_route_kind(k) for k in wanted) else []
                if not all(_is_route_kind(k) for k in wanted):
                    resolved = (False, "InvalidRouteKinds", "only HTTPRoute attaches to an ambit gateway")
            if resolved[0]:
                try:
                    gwconfig.certificates(gw, lst, objs, None)
                except gwconfig.RefNotPermitted as exc:
                    resolved = (False, "RefNotPermitted", str(exc))
                except gwconfig.GatewayConfigError as exc:
                    resolved = (False, "InvalidCertificateRef", str(exc))
            ok = accepted[0] and resolved[0] and gateway_ok
            programmed = (
                (True, "Programmed", "")
                if ok
                else (False, "Invalid", "see Accepted, ResolvedRefs and the Gateway's Programmed")
            )
            out.append(
                {
                    "name": lst.name,
                    "supportedKinds": supported,
                    "attachedRoutes": attached[i],
                    "conditions": [
                        _condition("Accepted", *accepted, gen, before),
                        _condition("ResolvedRefs", *resolved, gen, before),
                        _condition("Programmed", *programmed, gen, before),
                    ],
                }
            )
        return out

    # -- HTTPRoute -----------------------------------------------------------------------------------
    def _route(
        self,
        raw: Mapping[str, Any],
        route: HTTPRoute | None,
        ours: Mapping[tuple[str, str], Gateway],
        raw_objs: GatewayApiObjects,
        objs: gwconfig.Objects,
        problem: str | None,
    ) -> list[Write]:
        ns, name = _ident(raw)
        gen = _generation(raw)
        status = raw.get("status") or {}
        current = [p for p in status.get("parents") or () if isinstance(p, Mapping)]
        mine: list[dict[str, Any]] = []
        for i, ref in enumerate((raw.get("spec") or {}).get("parentRefs") or ()):
            if (
                not isinstance(ref, Mapping)
                or ref.get("group", GROUP) != GROUP
                or ref.get("kind", "Gateway") != "Gateway"
            ):
                continue
            target = (str(ref.get("namespace") or ns), str(ref.get("name")))
            gw_raw = raw_objs.gateways.get(f"{target[0]}/{target[1]}")
            if gw_raw is None or not raw_objs.ours(gw_raw):
                continue  # another controller's parent, or no Gateway: not ours to speak for
            before = next((p.get("conditions") or [] for p in current if _same(p.get("parentRef"), ref)), [])
            accepted, resolved = self._parent_verdict(raw, route, i, ours.get(target), objs, problem)
            mine.append(
                {
                    "parentRef": dict(ref),
                    "controllerName": CONTROLLER_NAME,
                    "conditions": [
                        _condition("Accepted", *accepted, gen, before),
                        _condition("ResolvedRefs", *resolved, gen, before),
                    ],
                }
            )
        others = [p for p in current if p.get("controllerName") != CONTROLLER_NAME]
        desired = [*others, *mine]
        if _same(current, desired):
            return []
        return [(GROUP, VERSION, "httproutes", ns, name, {"status": {"parents": desired}})]

    @staticmethod
    def _parent_verdict(
        raw: Mapping[str, Any],
        route: HTTPRoute | None,
        index: int,
        gw: Gateway | None,
        objs: gwconfig.Objects,
        problem: str | None,
    ) -> tuple[tuple[bool, str, str], tuple[bool, str, str]]:
        resolved = _resolved_refs(raw, route, objs)
        if route is None:
            return (False, "UnsupportedValue", problem or "not valid"), resolved
        if gw is None:
            return (False, "NoMatchingParent", "the parent Gateway is not valid"), resolved
        one = replace(route, parent_refs=(route.parent_refs[index],))
        targets = gwconfig.attached_listeners(gw, one)
        ref = route.parent_refs[index]
        if not targets:
            named = [
                lst
                for lst in gw.listeners
                if (not ref.section_name or lst.name == ref.section_name)
                and (not ref.port or lst.port == ref.port)
            ]
            if not named:
                return (False, "NoMatchingParent", "no listener has that sectionName/port"), resolved
            return (
                False,
                "NotAllowedByListeners",
                f"the listeners admit routes of namespace {gw.meta.namespace} only (allowedRoutes)",
            ), resolved
        hosts = route.hostnames or ("",)
        if not any(
            gwconfig.host_intersection(lst.hostname, h) is not None for _, lst in targets for h in hosts
        ):
            return (
                False,
                "NoMatchingListenerHostname",
                "no hostname of the route matches a listener's",
            ), resolved
        return (True, "Accepted", "attached"), resolved

    # -- WafPolicy -----------------------------------------------------------------------------------
    def waf_verdicts(
        self, raw: GatewayApiObjects, resources: Mapping[str, StoredResource], invalid: Mapping[str, str]
    ) -> list[tuple[Mapping[str, Any], str | None]]:
        """(object, refusal or None) for every WafPolicy: what mgmt/policy_status writes as Accepted."""
        parsed = {
            f"{r.obj.meta.namespace}/{r.obj.meta.name}": r.obj
            for r in resources.values()
            if r.kind == "WafPolicy"
        }
        claimed: dict[tuple[str, str, str], str] = {}
        out: list[tuple[Mapping[str, Any], str | None]] = []
        for name in sorted(raw.waf_policies):  # as gateway/config.py orders them: the first keeps a target
            obj = raw.waf_policies[name]
            problem = invalid.get(f"WafPolicy {name}")
            pol = parsed.get(name)
            if problem is None and pol is not None:
                problem = waf_check.refusal(pol)
                for ref in pol.target_refs:
                    key = (ref.kind, ref.namespace, ref.name)
                    if problem is None and key in claimed:
                        problem = (
                            f"WafPolicy {claimed[key]} already targets {ref.kind} {ref.namespace}/{ref.name}"
                        )
                    claimed.setdefault(key, name)
            out.append((obj, problem))
        return out


def _is_route_kind(kind: Mapping[str, Any]) -> bool:
    return kind.get("group", GROUP) == GROUP and kind.get("kind") == "HTTPRoute"


def _resolved_refs(
    raw: Mapping[str, Any], route: HTTPRoute | None, objs: gwconfig.Objects
) -> tuple[bool, str, str]:
    """ResolvedRefs of a route: every backendRef a Service that exists, of the route's namespace or of one
    whose ReferenceGrant allows it."""
    ns, _ = _ident(raw)
    for i, rule in enumerate((raw.get("spec") or {}).get("rules") or ()):
        for ref in (rule or {}).get("backendRefs") or () if isinstance(rule, Mapping) else ():
            if not isinstance(ref, Mapping):
                continue
            if ref.get("group", "") != "" or ref.get("kind", "Service") != "Service":
                return (
                    False,
                    "InvalidKind",
                    f"rule {i}: backend {ref.get('kind')} {ref.get('name')}: only core Services",
                )
            cross = Reference("HTTPRoute", ns, "Service", str(ref.get("namespace", ns)), str(ref.get("name")))
            try:
                gwconfig.ref_not_permitted(objs, cross, f"rule {i}")
            except gwconfig.RefNotPermitted as exc:
                return False, "RefNotPermitted", str(exc)
    if route is not None:
        for i in range(len(route.rules)):
            found = gwconfig.backend_addresses(objs, route, i)
            if isinstance(found, str):
                missing = found.endswith("not found") or " has no port " in found
                return False, "BackendNotFound" if missing else "UnsupportedProtocol", f"rule {i}: {found}"
    return True, "ResolvedRefs", "every backend resolved"
