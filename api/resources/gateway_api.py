"""Kubernetes Gateway API kinds the gateway serves (gateway.networking.k8s.io/v1 Gateway and HTTPRoute, the
v1.6 API's field names) and the core v1 Secret that holds listener certificates.

What the gateway does not implement is refused with the reason rather than ignored: RegularExpression path
and header matches, query parameter matches, filters, TLS passthrough, non-HTTP listeners.
"""

from __future__ import annotations

import base64
import binascii
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

from api.resources import Meta, ResourceError, register

GATEWAY_API = "gateway.networking.k8s.io/v1"
GROUP = "gateway.networking.k8s.io"
# The kinds a gateway's configuration is made of: what it subscribes to on the relay (api/relay.proto
# Subscribe.types; gateway/plane.py) and what the plane's gateway scope may send (mgmt/gateway_scope.py).
GATEWAY_KINDS = (
    "Gateway",
    "HTTPRoute",
    "Namespace",
    "ReferenceGrant",
    "Secret",
    "Service",
    "WafPolicy",
    "Workload",
)
# Certificates may also come from files beside the config: certificateRefs {group: ambit.io, kind: File,
# name: edge} reads edge.crt and edge.key from the config directory.
FILE_CERT_GROUP = "ambit.io"


def _fields(raw: Mapping[str, Any], allowed: set[str], where: str) -> None:
    unknown = set(raw) - allowed
    if unknown:
        raise ResourceError(f"{where}: unknown or unsupported field(s): {', '.join(sorted(unknown))}")


def _map(raw: Any, where: str) -> Mapping[str, Any]:
    if not isinstance(raw, dict):
        raise ResourceError(f"{where} must be a mapping")
    return raw


def _list(raw: Any, where: str, required: bool = False) -> list[Any]:
    if raw is None and not required:
        return []
    if not isinstance(raw, list) or (required and not raw):
        raise ResourceError(f"{where} must be a{' non-empty' if required else ''} list")
    return raw


def _name(raw: Any, where: str) -> str:
    if not isinstance(raw, str) or not raw:
        raise ResourceError(f"{where} must be a non-empty string")
    return raw


def _port(raw: Any, where: str) -> int:
    if isinstance(raw, bool) or not isinstance(raw, int) or not 1 <= raw <= 65535:
        raise ResourceError(f"{where} must be a port number (1-65535), got {raw!r}")
    return raw


def _hostname(raw: Any, where: str) -> str:
    if raw is None:
        return ""
    host = _name(raw, where).lower()
    label = host[2:] if host.startswith("*.") else host
    if not label or "*" in label or ":" in label or not all(part for part in label.split(".")):
        raise ResourceError(f"{where}: {raw!r} is not a hostname (a wildcard is a leading '*.' only)")
    return host


# ---- Gateway ----


@dataclass(frozen=True)
class CertificateRef:
    kind: str  # "Secret" or "File"
    name: str
    namespace: str


@dataclass(frozen=True)
class Listener:
    name: str
    port: int
    protocol: str  # HTTP or HTTPS
    hostname: str = ""
    certificate_refs: tuple[CertificateRef, ...] = ()
    routes_from: str = "Same"  # allowedRoutes.namespaces.from: Same or All


@dataclass(frozen=True)
class Gateway:
    meta: Meta
    gateway_class: str
    listeners: tuple[Listener, ...]
    addresses: tuple[str, ...] = ()
    kind: str = "Gateway"


def _cert_refs(raw: Any, where: str, namespace: str) -> tuple[CertificateRef, ...]:
    out = []
    for i, ref in enumerate(_list(raw, where, required=True)):
        w = f"{where}[{i}]"
        ref = _map(ref, w)
        _fields(ref, {"group", "kind", "name", "namespace"}, w)
        group, kind = ref.get("group", ""), ref.get("kind", "Secret")
        if (group, kind) not in (("", "Secret"), (FILE_CERT_GROUP, "File")):
            raise ResourceError(f"{w}: only core Secrets or {FILE_CERT_GROUP} Files hold certificates")
        out.append(CertificateRef(kind, _name(ref.get("name"), f"{w}.name"), ref.get("namespace", namespace)))
    return tuple(out)


def _listener(raw: Any, where: str, namespace: str) -> Listener:
    raw = _map(raw, where)
    _fields(raw, {"name", "hostname", "port", "protocol", "tls", "allowedRoutes"}, where)
    protocol = raw.get("protocol")
    if protocol not in ("HTTP", "HTTPS"):
        raise ResourceError(f"{where}.protocol must be HTTP or HTTPS, got {protocol!r}")
    refs: tuple[CertificateRef, ...] = ()
    tls = raw.get("tls")
    if protocol == "HTTPS":
        tls = _map(tls, f"{where}.tls")
        _fields(tls, {"mode", "certificateRefs", "options"}, f"{where}.tls")
        if tls.get("mode", "Terminate") != "Terminate":
            raise ResourceError(f"{where}.tls.mode: only Terminate is supported")
        refs = _cert_refs(tls.get("certificateRefs"), f"{where}.tls.certificateRefs", namespace)
    elif tls is not None:
        raise ResourceError(f"{where}.tls is only for HTTPS listeners")
    routes_from = "Same"
    allowed = raw.get("allowedRoutes")
    if allowed is not None:
        allowed = _map(allowed, f"{where}.allowedRoutes")
        _fields(allowed, {"namespaces", "kinds"}, f"{where}.allowedRoutes")
        ns = _map(allowed.get("namespaces", {}), f"{where}.allowedRoutes.namespaces")
        _fields(ns, {"from"}, f"{where}.allowedRoutes.namespaces")
        routes_from = ns.get("from", "Same")
        if routes_from not in ("Same", "All"):
            raise ResourceError(f"{where}.allowedRoutes.namespaces.from must be Same or All")
    return Listener(
        _name(raw.get("name"), f"{where}.name"),
        _port(raw.get("port"), f"{where}.port"),
        protocol,
        _hostname(raw.get("hostname"), f"{where}.hostname"),
        refs,
        routes_from,
    )


@register("Gateway", {GATEWAY_API})
def _parse_gateway(meta: Meta, spec: Mapping[str, Any]) -> Gateway:
    _fields(spec, {"gatewayClassName", "listeners", "addresses"}, "spec")
    listeners = tuple(
        _listener(item, f"spec.listeners[{i}]", meta.namespace)
        for i, item in enumerate(_list(spec.get("listeners"), "spec.listeners", required=True))
    )
    names = [lst.name for lst in listeners]
    if len(set(names)) != len(names):
        raise ResourceError("spec.listeners: names must be unique")
    addresses = []
    for i, addr in enumerate(_list(spec.get("addresses"), "spec.addresses")):
        addr = _map(addr, f"spec.addresses[{i}]")
        if addr.get("type", "IPAddress") != "IPAddress":
            raise ResourceError(f"spec.addresses[{i}]: only IPAddress is supported")
        addresses.append(_name(addr.get("value"), f"spec.addresses[{i}].value"))
    return Gateway(
        meta, _name(spec.get("gatewayClassName"), "spec.gatewayClassName"), listeners, tuple(addresses)
    )


# ---- HTTPRoute ----


@dataclass(frozen=True)
class ParentRef:
    name: str
    namespace: str
    section_name: str = ""
    port: int = 0


@dataclass(frozen=True)
class HeaderMatch:
    name: str  # lower case
    value: str


@dataclass(frozen=True)
class RouteMatch:
    path_exact: bool = False
    path: str = "/"
    headers: tuple[HeaderMatch, ...] = ()
    method: str = ""


@dataclass(frozen=True)
class BackendRef:
    name: str
    namespace: str
    port: int
    weight: int = 1


@dataclass(frozen=True)
class RouteRule:
    name: str
    matches: tuple[RouteMatch, ...]
    backend_refs: tuple[BackendRef, ...]


@dataclass(frozen=True)
class HTTPRoute:
    meta: Meta
    parent_refs: tuple[ParentRef, ...]
    hostnames: tuple[str, ...]
    rules: tuple[RouteRule, ...]
    kind: str = "HTTPRoute"


_METHODS = {"GET", "HEAD", "POST", "PUT", "DELETE", "CONNECT", "OPTIONS", "TRACE", "PATCH"}


def _match(raw: Any, where: str) -> RouteMatch:
    raw = _map(raw, where)
    _fields(raw, {"path", "headers", "method"}, where)
    path = _map(raw.get("path", {}), f"{where}.path")
    _fields(path, {"type", "value"}, f"{where}.path")
    ptype = path.get("type", "PathPrefix")
    if ptype not in ("Exact", "PathPrefix"):
        raise ResourceError(f"{where}.path.type: {ptype!r} is not supported (Exact or PathPrefix)")
    value = path.get("value", "/")
    if not isinstance(value, str) or not value.startswith("/") or any(c in value for c in "?#\r\n\0"):
        raise ResourceError(f"{where}.path.value must be an absolute path without query or fragment")
    headers = []
    for i, h in enumerate(_list(raw.get("headers"), f"{where}.headers")):
        h = _map(h, f"{where}.headers[{i}]")
        _fields(h, {"type", "name", "value"}, f"{where}.headers[{i}]")
        if h.get("type", "Exact") != "Exact":
            raise ResourceError(f"{where}.headers[{i}].type: only Exact is supported")
        name = _name(h.get("name"), f"{where}.headers[{i}].name")
        val = h.get("value")
        if not isinstance(val, str) or "\n" in val or "\n" in name:
            raise ResourceError(f"{where}.headers[{i}].value must be a single-line string")
        headers.append(HeaderMatch(name.lower(), val))
    method = raw.get("method", "")
    if method and method not in _METHODS:
        raise ResourceError(f"{where}.method: {method!r} is not an HTTP method")
    return RouteMatch(ptype == "Exact", value, tuple(headers), method)


def _backend(raw: Any, where: str, namespace: str) -> BackendRef:
    raw = _map(raw, where)
    _fields(raw, {"group", "kind", "name", "namespace", "port", "weight"}, where)
    if raw.get("group", "") != "" or raw.get("kind", "Service") != "Service":
        raise ResourceError(f"{where}: only core Services are backends")
    weight = raw.get("weight", 1)
    if isinstance(weight, bool) or not isinstance(weight, int) or not 0 <= weight <= 1_000_000:
        raise ResourceError(f"{where}.weight must be 0-1000000")
    return BackendRef(
        _name(raw.get("name"), f"{where}.name"),
        raw.get("namespace", namespace),
        _port(raw.get("port"), f"{where}.port"),
        weight,
    )


def _rule(raw: Any, where: str, namespace: str) -> RouteRule:
    raw = _map(raw, where)
    _fields(raw, {"name", "matches", "backendRefs"}, where)
    matches = tuple(
        _match(m, f"{where}.matches[{i}]")
        for i, m in enumerate(_list(raw.get("matches"), f"{where}.matches"))
    )
    backends = tuple(
        _backend(b, f"{where}.backendRefs[{i}]", namespace)
        for i, b in enumerate(_list(raw.get("backendRefs"), f"{where}.backendRefs"))
    )
    name = raw.get("name", "")
    if not isinstance(name, str):
        raise ResourceError(f"{where}.name must be a string")
    return RouteRule(name, matches or (RouteMatch(),), backends)


@register("HTTPRoute", {GATEWAY_API})
def _parse_httproute(meta: Meta, spec: Mapping[str, Any]) -> HTTPRoute:
    _fields(spec, {"parentRefs", "hostnames", "rules"}, "spec")
    parents = []
    for i, p in enumerate(_list(spec.get("parentRefs"), "spec.parentRefs", required=True)):
        w = f"spec.parentRefs[{i}]"
        p = _map(p, w)
        _fields(p, {"group", "kind", "name", "namespace", "sectionName", "port"}, w)
        if p.get("group", GROUP) != GROUP or p.get("kind", "Gateway") != "Gateway":
            raise ResourceError(f"{w}: a parent is a {GROUP} Gateway")
        section = p.get("sectionName", "")
        if not isinstance(section, str):
            raise ResourceError(f"{w}.sectionName must be a string")
        port = _port(p["port"], f"{w}.port") if "port" in p else 0
        parents.append(
            ParentRef(_name(p.get("name"), f"{w}.name"), p.get("namespace", meta.namespace), section, port)
        )
    hostnames = tuple(
        _hostname(h, f"spec.hostnames[{i}]")
        for i, h in enumerate(_list(spec.get("hostnames"), "spec.hostnames"))
    )
    rules = tuple(
        _rule(r, f"spec.rules[{i}]", meta.namespace)
        for i, r in enumerate(_list(spec.get("rules"), "spec.rules"))
    )
    return HTTPRoute(meta, tuple(parents), hostnames, rules or (RouteRule("", (RouteMatch(),), ()),))


# ---- Secret (core v1, type kubernetes.io/tls) ----


@dataclass(frozen=True)
class TlsSecret:
    meta: Meta
    certificate_pem: bytes
    key_pem: bytes = field(repr=False)  # never shown
    kind: str = "Secret"


def _secret_value(content: Mapping[str, Any], name: str) -> bytes:
    string = content.get("stringData") or {}
    data = content.get("data") or {}
    if not isinstance(string, dict) or not isinstance(data, dict):
        raise ResourceError("data and stringData must be mappings")
    if name in string and isinstance(string[name], str):
        return string[name].encode()
    if name in data and isinstance(data[name], str):
        try:
            return base64.b64decode(data[name], validate=True)
        except (binascii.Error, ValueError):
            raise ResourceError(f"data.{name} is not base64") from None
    raise ResourceError(f"a kubernetes.io/tls Secret needs {name} in data or stringData")


# Core v1 Secrets keep data/stringData/type at the top level, not under spec. Only TLS Secrets are
# configuration (listener certificates); the relay hands them to gateways only, never to node agents
# (mgmt/scope.py), and error messages never quote their content.
@register("Secret", {"v1"}, top_level=frozenset({"type", "data", "stringData", "immutable"}))
def _parse_secret(meta: Meta, content: Mapping[str, Any]) -> TlsSecret:
    if content.get("type", "kubernetes.io/tls") != "kubernetes.io/tls":
        raise ResourceError("only type kubernetes.io/tls is used by the gateway")
    return TlsSecret(
        Meta(meta.name, meta.namespace), _secret_value(content, "tls.crt"), _secret_value(content, "tls.key")
    )


# ---- ReferenceGrant (gateway.networking.k8s.io/v1beta1; v1 serves the same objects) ----

REFERENCE_GRANT_API = f"{GROUP}/v1beta1"
_GRANT_BOUND = 16  # the CRD's maxItems for from and to


@dataclass(frozen=True)
class GrantFrom:
    group: str
    kind: str
    namespace: str


@dataclass(frozen=True)
class GrantTo:
    group: str
    kind: str
    name: str = ""  # "" every object of the kind in the grant's namespace


@dataclass(frozen=True)
class ReferenceGrant:
    """Lives in the namespace of the referenced objects: lets the `from` kinds of other namespaces refer to
    the `to` kinds (or one object, by name) of this one. Without one, a cross-namespace reference is
    refused."""

    meta: Meta
    from_: tuple[GrantFrom, ...]
    to: tuple[GrantTo, ...]
    kind: str = "ReferenceGrant"


def _grant_entries(raw: Any, where: str, keys: set[str], required: set[str]) -> list[Mapping[str, Any]]:
    items = _list(raw, where, required=True)
    if len(items) > _GRANT_BOUND:
        raise ResourceError(f"{where}: at most {_GRANT_BOUND} entries")
    out = []
    for i, item in enumerate(items):
        item = _map(item, f"{where}[{i}]")
        _fields(item, keys, f"{where}[{i}]")
        for k in sorted(required - {"group"}):
            _name(item.get(k), f"{where}[{i}].{k}")
        if not isinstance(item.get("group"), str):
            raise ResourceError(f'{where}[{i}].group must be a string ("" for the core group)')
        out.append(item)
    return out


@register("ReferenceGrant", {REFERENCE_GRANT_API, GATEWAY_API})
def _parse_reference_grant(meta: Meta, spec: Mapping[str, Any]) -> ReferenceGrant:
    _fields(spec, {"from", "to"}, "spec")
    froms = _grant_entries(
        spec.get("from"), "spec.from", {"group", "kind", "namespace"}, {"group", "kind", "namespace"}
    )
    tos = _grant_entries(spec.get("to"), "spec.to", {"group", "kind", "name"}, {"group", "kind"})
    for i, t in enumerate(tos):
        if "name" in t:
            _name(t["name"], f"spec.to[{i}].name")
    return ReferenceGrant(
        meta,
        tuple(GrantFrom(f["group"], f["kind"], f["namespace"]) for f in froms),
        tuple(GrantTo(t["group"], t["kind"], t.get("name", "")) for t in tos),
    )


@dataclass(frozen=True)
class Reference:
    """One cross-namespace reference: `from_kind` (a Gateway API kind) in `from_namespace` names `to_kind`
    (a core kind: Secret, Service) `to_namespace`/`to_name`."""

    from_kind: str
    from_namespace: str
    to_kind: str
    to_namespace: str
    to_name: str


def granting(grants: Iterable[ReferenceGrant], ref: Reference) -> ReferenceGrant | None:
    """The first grant (by name) that permits `ref`, None if none does. A reference inside one namespace
    needs none; the caller asks only about the others. Exact matches only: group, kind and namespace of
    the referrer, group and kind of the target and, when the grant names one, its name."""
    for g in sorted(grants, key=lambda g: (g.meta.namespace, g.meta.name)):
        if g.meta.namespace != ref.to_namespace:
            continue
        if not any(f == GrantFrom(GROUP, ref.from_kind, ref.from_namespace) for f in g.from_):
            continue
        if any(t.group == "" and t.kind == ref.to_kind and t.name in ("", ref.to_name) for t in g.to):
            return g
    return None


def permitted(grants: Iterable[ReferenceGrant], ref: Reference) -> bool:
    """Same namespace, or a ReferenceGrant in the target's namespace allows it."""
    return ref.from_namespace == ref.to_namespace or granting(grants, ref) is not None
