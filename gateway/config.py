"""From Gateway API objects to the data plane's tables: which listeners to open, which backends exist, and
every (listener, hostname, match) of every attached HTTPRoute rule in Gateway API precedence order, with the
WafPolicy that applies to it. Pure: reading files is `load_dir`'s job, compiling rules the server's.

Precedence (HTTPRoute spec, v1): the longest non-wildcard hostname, then the longest wildcard hostname, then
an Exact path before a PathPrefix, the longest path, a method match, the most header matches; remaining
ties go to the route first by namespace/name (the file source has no creation timestamps), then rule and
match order.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from api.resources import ResourceError, load_kinds, parse
from api.resources.gateway_api import (
    Gateway,
    HTTPRoute,
    Listener,
    Reference,
    ReferenceGrant,
    RouteMatch,
    TlsSecret,
    permitted,
)
from api.resources.wafpolicy import WafPolicy
from api.resources.workload import Service


class GatewayConfigError(ValueError):
    """The config cannot be served as given; the message names the object and the reason."""


@dataclass(frozen=True)
class Certificate:
    names: tuple[str, ...]  # its DNS SANs: the SNI names it answers
    chain_pem: bytes
    key_pem: bytes = field(repr=False)


def _dns_names(chain_pem: bytes, where: str) -> tuple[str, ...]:
    from cryptography import x509

    try:
        leaf = x509.load_pem_x509_certificate(chain_pem)
    except ValueError as exc:
        raise GatewayConfigError(f"{where}: not a PEM certificate: {exc}") from None
    try:
        san = leaf.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    except x509.ExtensionNotFound:
        return ()
    return tuple(n.lower() for n in san.get_values_for_type(x509.DNSName))


# A Service whose backends are inside the mesh: reached over HBONE with the gateway's own identity.
UPSTREAM_ANNOTATION = "ambit.io/gateway-upstream"  # "hbone" (default: plain TCP to the addresses)
PEER_ANNOTATION = "ambit.io/hbone-peer"  # SPIFFE id the HBONE server must present
SERVER_ANNOTATION = "ambit.io/hbone-server"  # ip:port of the HBONE server (default <address>:15008)
HBONE_PORT = 15008


@dataclass(frozen=True)
class HboneEndpoint:
    server: tuple[str, int]  # the HBONE server: the destination pod's <ip>:15008, or the annotation's
    peer: str  # SPIFFE id it must present
    authority: str  # CONNECT target, "ip:port"


@dataclass(frozen=True)
class HboneBackend:
    endpoints: tuple[HboneEndpoint, ...]  # requests go round robin over them (weights repeat entries)


@dataclass(frozen=True)
class Endpoint:
    """A workload behind a Service, as the plane names it: `peer` is its SPIFFE id when it is in the mesh
    (reached over HBONE at <ip>:15008), "" when it is not (plain TCP)."""

    ip: str
    peer: str = ""


@dataclass(frozen=True)
class ListenerPlan:
    listener_id: int
    name: str
    bind: str
    port: int
    certificates: tuple[Certificate, ...]  # empty: plain HTTP, unless refused
    # Why the listener does not serve (a certificate it may not use): its port stays open but the engine
    # has no config for it, so every connection is refused (counted) rather than served without TLS.
    refused: str = ""

    @property
    def tls(self) -> bool:
        return bool(self.certificates or self.refused)


@dataclass(frozen=True)
class EntryPlan:
    listener_id: int
    hostname: str
    match: RouteMatch
    backend: int  # index into GatewayPlan.backends, -1 for none
    route: str  # namespace/name of the HTTPRoute
    policy: WafPolicy | None
    sort_key: tuple[Any, ...]


@dataclass(frozen=True)
class GatewayPlan:
    gateway: str
    listeners: tuple[ListenerPlan, ...]
    backends: tuple[tuple[str, ...] | HboneBackend, ...]  # plain "ip:port" addresses, or HBONE
    entries: tuple[EntryPlan, ...]
    routes: tuple[str, ...]  # namespace/name of every attached HTTPRoute
    warnings: tuple[str, ...] = ()


@dataclass
class Objects:
    gateways: list[Gateway] = field(default_factory=list)
    routes: list[HTTPRoute] = field(default_factory=list)
    policies: list[WafPolicy] = field(default_factory=list)
    services: list[Service] = field(default_factory=list)
    secrets: list[TlsSecret] = field(default_factory=list)
    grants: list[ReferenceGrant] = field(default_factory=list)  # cross-namespace references allowed
    # From the plane: a Service's endpoints by "namespace/name" (files give addresses, not endpoints).
    endpoints: dict[str, tuple[Endpoint, ...]] = field(default_factory=dict)


def load_dir(directory: Path) -> Objects:
    """Every YAML document of *.yaml/*.yml under `directory`, parsed (unknown fields are errors)."""
    load_kinds()
    objs = Objects()
    files = sorted(p for p in directory.iterdir() if p.suffix in (".yaml", ".yml"))
    if not files:
        raise GatewayConfigError(f"{directory}: no .yaml files")
    for path in files:
        try:
            docs = list(yaml.safe_load_all(path.read_text()))
        except yaml.YAMLError as exc:
            raise GatewayConfigError(f"{path}: not YAML: {exc}") from None
        for i, doc in enumerate(d for d in docs if d is not None):
            where = f"{path.name}#{i}"
            try:
                add(objs, parse(doc, where))
            except ResourceError as exc:
                raise GatewayConfigError(str(exc)) from None
    return objs


def add(objs: Objects, res: Any) -> None:
    buckets: tuple[tuple[type, list[Any]], ...] = (
        (Gateway, objs.gateways),
        (HTTPRoute, objs.routes),
        (WafPolicy, objs.policies),
        (Service, objs.services),
        (TlsSecret, objs.secrets),
        (ReferenceGrant, objs.grants),
    )
    for kind, bucket in buckets:
        if isinstance(res, kind):
            bucket.append(res)
            return
    raise GatewayConfigError(f"{res.kind} {res.meta.name}: not a kind the gateway uses")


def host_intersection(listener: str, route: str) -> str | None:
    """The hostname requests must carry to reach `route` through `listener` ("" any); None if none can."""
    if not listener or listener == route:
        return route
    if not route:
        return listener

    def covers(wild: str, name: str) -> bool:
        return wild.startswith("*.") and name.endswith(wild[1:]) and len(name) > len(wild) - 1

    if covers(listener, route):
        return route
    if covers(route, listener):
        return listener
    return None


def _sort_key(
    hostname: str, match: RouteMatch, route: HTTPRoute, rule_i: int, match_i: int
) -> tuple[Any, ...]:
    wildcard = hostname.startswith("*.")
    return (
        -(0 if wildcard else len(hostname)),
        -(len(hostname) if wildcard else 0),
        0 if match.path_exact else 1,
        -len(match.path),
        0 if match.method else 1,
        -len(match.headers),
        route.meta.namespace,
        route.meta.name,
        rule_i,
        match_i,
    )


def certificates(
    gw: Gateway, listener: Listener, objs: Objects, cert_dir: Path | None
) -> tuple[Certificate, ...]:
    certs = []
    for ref in listener.certificate_refs:
        where = f"Gateway {gw.meta.name} listener {listener.name} certificate {ref.name}"
        if ref.kind == "File":
            if cert_dir is None:
                raise GatewayConfigError(f"Gateway {gw.meta.name}: File certificates need a config directory")
            base = cert_dir / ref.name
            try:
                chain, key = base.with_suffix(".crt").read_bytes(), base.with_suffix(".key").read_bytes()
            except OSError as exc:
                raise GatewayConfigError(f"{where}: {exc}") from None
            certs.append(Certificate(_dns_names(chain, where), chain, key))
            continue
        ref_not_permitted(
            objs, Reference("Gateway", gw.meta.namespace, "Secret", ref.namespace, ref.name), where
        )
        found = [s for s in objs.secrets if s.meta.name == ref.name and s.meta.namespace == ref.namespace]
        if not found:
            raise GatewayConfigError(f"{where}: Secret {ref.namespace}/{ref.name} not found")
        chain = found[0].certificate_pem
        certs.append(Certificate(_dns_names(chain, where), chain, found[0].key_pem))
    return tuple(certs)


class RefNotPermitted(GatewayConfigError):
    """A reference to another namespace that no ReferenceGrant there allows (Gateway API's reason)."""


def ref_not_permitted(objs: Objects, ref: Reference, where: str) -> None:
    """Raise RefNotPermitted unless `ref` stays in its namespace or a ReferenceGrant allows it."""
    if not permitted(objs.grants, ref):
        raise RefNotPermitted(
            f"{where}: {ref.to_kind} {ref.to_namespace}/{ref.to_name} is in another namespace and no "
            f"ReferenceGrant there allows {ref.from_kind}s of namespace {ref.from_namespace} to refer to it"
        )


def _policies(objs: Objects, gw: Gateway) -> tuple[WafPolicy | None, dict[tuple[str, str], WafPolicy]]:
    by_target: dict[tuple[str, str, str], WafPolicy] = {}
    for pol in sorted(objs.policies, key=lambda p: (p.meta.namespace, p.meta.name)):
        for ref in pol.target_refs:
            key = (ref.kind, ref.namespace, ref.name)
            if key in by_target:
                other = by_target[key]
                raise GatewayConfigError(
                    f"WafPolicy {pol.meta.namespace}/{pol.meta.name} and {other.meta.namespace}/"
                    f"{other.meta.name} both target {ref.kind} {ref.namespace}/{ref.name}"
                )
            by_target[key] = pol
    gw_policy = by_target.get(("Gateway", gw.meta.namespace, gw.meta.name))
    routes = {(ns, name): p for (kind, ns, name), p in by_target.items() if kind == "HTTPRoute"}
    return gw_policy, routes


def _hbone_backend(svc: Service, authorities: list[str]) -> HboneBackend | str:
    peer = svc.meta.annotations.get(PEER_ANNOTATION, "")
    if not peer.startswith("spiffe://"):
        return f"Service {svc.meta.name}: an HBONE upstream needs {PEER_ANNOTATION}: spiffe://..."
    server = svc.meta.annotations.get(SERVER_ANNOTATION, f"{svc.addresses[0]}:{HBONE_PORT}")
    host, _, port = server.rpartition(":")
    try:
        ipaddress.ip_address(host.strip("[]"))
        port_n = int(port)
    except ValueError:
        return f"Service {svc.meta.name}: {SERVER_ANNOTATION} {server!r} is not ip:port"
    return HboneBackend(tuple(HboneEndpoint((host.strip("[]"), port_n), peer, a) for a in authorities))


def _ip_port(ip: str, port: int) -> str:
    return f"[{ip}]:{port}" if ipaddress.ip_address(ip).version == 6 else f"{ip}:{port}"


def _endpoint_targets(
    endpoints: tuple[Endpoint, ...], target_port: int, weight: int
) -> tuple[list[str], list[HboneEndpoint]]:
    """A Service's endpoints from the plane: plain ip:port addresses and HBONE endpoints, weight times."""
    plain = [_ip_port(e.ip, target_port) for e in endpoints if not e.peer]
    hbone = [
        HboneEndpoint((e.ip, HBONE_PORT), e.peer, _ip_port(e.ip, target_port)) for e in endpoints if e.peer
    ]
    n = min(weight, 16)
    return plain * n, hbone * n


def backend_addresses(objs: Objects, route: HTTPRoute, rule_i: int) -> tuple[str, ...] | HboneBackend | str:
    """The rule's backends as ip:port (weights are honoured by repeating addresses), an HBONE backend (one
    Service), or why not."""
    out: list[str] = []
    hbone: list[Service] = []
    meshed: list[HboneEndpoint] = []
    for ref in route.rules[rule_i].backend_refs:
        cross = Reference("HTTPRoute", route.meta.namespace, "Service", ref.namespace, ref.name)
        try:
            ref_not_permitted(objs, cross, "backend")
        except RefNotPermitted as exc:
            return str(exc)
        svc = next(
            (s for s in objs.services if s.meta.name == ref.name and s.meta.namespace == ref.namespace), None
        )
        if svc is None:
            return f"Service {ref.namespace}/{ref.name} not found"
        port = next((p for p in svc.ports if p.port == ref.port), None)
        if port is None:
            return f"Service {ref.namespace}/{ref.name} has no port {ref.port}"
        mode = svc.meta.annotations.get(UPSTREAM_ANNOTATION, "plain")
        if mode not in ("plain", "hbone"):
            return f"Service {ref.namespace}/{ref.name}: {UPSTREAM_ANNOTATION} must be plain or hbone"
        if mode == "hbone":
            hbone.append(svc)
        elif svc.uid in objs.endpoints:
            plain, via_hbone = _endpoint_targets(objs.endpoints[svc.uid], port.target_port, ref.weight)
            out.extend(plain)
            meshed.extend(via_hbone)
            continue
        for addr in svc.addresses:
            out.extend([_ip_port(addr, port.target_port)] * min(ref.weight, 16))
    if meshed:
        if out or hbone:
            return "endpoints in the mesh and outside it (or annotated HBONE Services) in one rule"
        return HboneBackend(tuple(meshed))
    if hbone:
        if len(route.rules[rule_i].backend_refs) != 1:
            return "an HBONE Service must be the rule's only backend"
        return _hbone_backend(hbone[0], out)
    return tuple(out)


def plan(objs: Objects, gateway: str = "", cert_dir: Path | None = None) -> GatewayPlan:
    """The tables for the Gateway named `gateway` ("namespace/name", or the only one)."""
    gws = [g for g in objs.gateways if not gateway or f"{g.meta.namespace}/{g.meta.name}" == gateway]
    if len(gws) != 1:
        raise GatewayConfigError(
            f"want exactly one Gateway{' ' + gateway if gateway else ''}, found {len(gws)}"
        )
    gw = gws[0]
    warnings: list[str] = []
    bind = gw.addresses[0] if gw.addresses else "0.0.0.0"
    listeners = tuple(
        _listener_plan(gw, i + 1, lst, bind, objs, cert_dir, warnings) for i, lst in enumerate(gw.listeners)
    )
    refused = {lp.listener_id for lp in listeners if lp.refused}
    ports = [lp.port for lp in listeners]
    if len(set(ports)) != len(ports):
        raise GatewayConfigError(f"Gateway {gw.meta.name}: one listener per port (SNI selects certificates)")
    gw_policy, route_policies = _policies(objs, gw)
    backends: list[tuple[str, ...] | HboneBackend] = []
    entries: list[EntryPlan] = []
    attached: list[str] = []
    for route in sorted(objs.routes, key=lambda r: (r.meta.namespace, r.meta.name)):
        rname = f"{route.meta.namespace}/{route.meta.name}"
        targets = [(lid, lst) for lid, lst in attached_listeners(gw, route) if lid not in refused]
        if not targets:
            continue
        attached.append(rname)
        policy = route_policies.get((route.meta.namespace, route.meta.name), gw_policy)
        for rule_i, rule in enumerate(route.rules):
            addrs = backend_addresses(objs, route, rule_i)
            if isinstance(addrs, str):
                warnings.append(f"HTTPRoute {rname} rule {rule_i}: {addrs}; it answers 500")
                backend = -1
            elif not addrs:
                backend = -1
            else:
                backend = len(backends)
                backends.append(addrs)
            for lid, lst in targets:
                hosts = [
                    h
                    for h in (host_intersection(lst.hostname, rh) for rh in route.hostnames or ("",))
                    if h is not None
                ]
                for host in dict.fromkeys(hosts):
                    for match_i, match in enumerate(rule.matches):
                        entries.append(
                            EntryPlan(
                                lid,
                                host,
                                match,
                                backend,
                                rname,
                                policy,
                                _sort_key(host, match, route, rule_i, match_i),
                            )
                        )
    entries.sort(key=lambda e: e.sort_key)
    return GatewayPlan(
        f"{gw.meta.namespace}/{gw.meta.name}",
        listeners,
        tuple(backends),
        tuple(entries),
        tuple(attached),
        tuple(warnings),
    )


def _listener_plan(
    gw: Gateway, lid: int, lst: Listener, bind: str, objs: Objects, cert_dir: Path | None, warnings: list[str]
) -> ListenerPlan:
    """A listener whose certificate is in another namespace without a ReferenceGrant is refused alone
    (Gateway API: the other listeners keep serving); any other certificate problem refuses the config."""
    try:
        return ListenerPlan(lid, lst.name, bind, lst.port, certificates(gw, lst, objs, cert_dir))
    except RefNotPermitted as exc:
        warnings.append(f"{exc}; listener {lst.name} refuses every connection")
        return ListenerPlan(lid, lst.name, bind, lst.port, (), str(exc))


def attached_listeners(gw: Gateway, route: HTTPRoute) -> list[tuple[int, Listener]]:
    out: list[tuple[int, Listener]] = []
    for ref in route.parent_refs:
        if (ref.namespace, ref.name) != (gw.meta.namespace, gw.meta.name):
            continue
        for i, lst in enumerate(gw.listeners):
            if ref.section_name and ref.section_name != lst.name:
                continue
            if ref.port and ref.port != lst.port:
                continue
            if lst.routes_from == "Same" and route.meta.namespace != gw.meta.namespace:
                continue
            if (i + 1, lst) not in out:
                out.append((i + 1, lst))
    return out


def from_objects(items: Iterable[Any]) -> Objects:
    objs = Objects()
    for item in items:
        add(objs, item)
    return objs
