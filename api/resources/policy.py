"""Security policy kinds: Istio's L4 AuthorizationPolicy and PeerAuthentication, RegoPolicy, MeshConfig.

Parsed once into frozen objects; agent/policy compiles them into matchers. L7 attributes (methods, paths,
hosts, request principals) are rejected rather than ignored: at L4 they could only ever widen or narrow a
policy silently. Istio's `istio.io/dry-run` annotation is not carried by Meta, so dry-run is `spec.dryRun`.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from api.resources import Meta, ResourceError, register
from api.spiffe import SpiffeIdError, check_trust_domain

AMBIT_API = "ambit.io/v1"
ISTIO_APIS = {"security.istio.io/v1", "security.istio.io/v1beta1", AMBIT_API}
ACTIONS = ("ALLOW", "DENY", "AUDIT")
MTLS_MODES = ("STRICT", "PERMISSIVE", "DISABLE")
DEFAULT_ROOT_NAMESPACE = "ambit-system"
DEFAULT_REGO_QUERY = "data.ambit.authz"

SOURCE_FIELDS = {
    "principals": "principals",
    "notPrincipals": "not_principals",
    "namespaces": "namespaces",
    "notNamespaces": "not_namespaces",
    "ipBlocks": "ip_blocks",
    "notIpBlocks": "not_ip_blocks",
}
_L7_SOURCE = {"requestPrincipals", "notRequestPrincipals", "remoteIpBlocks", "notRemoteIpBlocks"}
_L7_OPERATION = {"hosts", "notHosts", "methods", "notMethods", "paths", "notPaths"}
CONDITION_KEYS = ("source.principal", "source.namespace", "source.ip", "destination.port", "destination.ip")


@dataclass(frozen=True)
class Source:
    """One `from[].source`: every non-empty field must match (AND); within a field any value (OR)."""

    principals: tuple[str, ...] = ()
    not_principals: tuple[str, ...] = ()
    namespaces: tuple[str, ...] = ()
    not_namespaces: tuple[str, ...] = ()
    ip_blocks: tuple[str, ...] = ()
    not_ip_blocks: tuple[str, ...] = ()


@dataclass(frozen=True)
class Operation:
    ports: tuple[int, ...] = ()
    not_ports: tuple[int, ...] = ()


@dataclass(frozen=True)
class Condition:
    key: str
    values: tuple[str, ...] = ()
    not_values: tuple[str, ...] = ()


@dataclass(frozen=True)
class Rule:
    """Matches when any source, any operation and every condition match (empty lists match anything)."""

    sources: tuple[Source, ...] = ()
    operations: tuple[Operation, ...] = ()
    conditions: tuple[Condition, ...] = ()


@dataclass(frozen=True)
class AuthorizationPolicy:
    meta: Meta
    selector: Mapping[str, str] | None  # None: namespace scope (mesh scope in the root namespace)
    action: str
    rules: tuple[Rule, ...]  # empty: matches nothing (an ALLOW policy without rules denies everything)
    dry_run: bool = False
    kind: str = "AuthorizationPolicy"

    @property
    def uid(self) -> str:
        return f"{self.meta.namespace}/{self.meta.name}"


@dataclass(frozen=True)
class PeerAuthentication:
    meta: Meta
    selector: Mapping[str, str] | None
    mode: str  # STRICT | PERMISSIVE | DISABLE | UNSET (inherit from the parent scope)
    port_modes: Mapping[int, str]
    kind: str = "PeerAuthentication"

    @property
    def uid(self) -> str:
        return f"{self.meta.namespace}/{self.meta.name}"


@dataclass(frozen=True)
class RegoPolicy:
    meta: Meta
    selector: Mapping[str, str] | None
    module: str
    query: str = DEFAULT_REGO_QUERY
    kind: str = "RegoPolicy"

    @property
    def uid(self) -> str:
        return f"{self.meta.namespace}/{self.meta.name}"


@dataclass(frozen=True)
class MeshConfig:
    meta: Meta
    default_deny: bool = False
    root_namespace: str = DEFAULT_ROOT_NAMESPACE
    trust_domain: str | None = None
    default_mtls_mode: str = "PERMISSIVE"
    # Identities of these domains are believed as if they were of this mesh's (api/spiffe.TrustDomains).
    trust_domain_aliases: tuple[str, ...] = ()
    kind: str = "MeshConfig"

    @property
    def uid(self) -> str:
        return self.meta.name


def _fields(
    raw: Mapping[str, Any], allowed: set[str], where: str, l7: frozenset[str] | set[str] = frozenset()
) -> None:
    bad_l7 = sorted(set(raw) & l7)
    if bad_l7:
        raise ResourceError(
            f"{where}: {', '.join(bad_l7)}: L7 attribute(s) not supported (ambit enforces L4)"
        )
    unknown = sorted(set(raw) - allowed)
    if unknown:
        raise ResourceError(
            f"{where}: unknown field(s) {', '.join(unknown)} (allowed: {', '.join(sorted(allowed))})"
        )


def _mapping(raw: Any, where: str) -> Mapping[str, Any]:
    if not isinstance(raw, dict):
        raise ResourceError(f"{where} must be a mapping")
    return raw


def _list(raw: Any, where: str) -> list[Any]:
    if raw is None:
        return []
    if not isinstance(raw, list):
        raise ResourceError(f"{where} must be a list")
    return raw


def _bool(raw: Any, where: str, default: bool = False) -> bool:
    if raw is None:
        return default
    if not isinstance(raw, bool):
        raise ResourceError(f"{where} must be true or false")
    return raw


def _pattern(raw: Any, where: str) -> str:
    """Istio string match: exact, prefix `abc*`, suffix `*abc`, or `*` (any)."""
    if not isinstance(raw, str) or not raw:
        raise ResourceError(f"{where}: {raw!r} must be a non-empty string")
    if raw != "*" and ("*" in raw[1:-1] or raw.count("*") > 1):
        raise ResourceError(f"{where}: {raw!r}: '*' is only allowed as a whole value, prefix or suffix")
    return raw


def _cidr(raw: Any, where: str) -> str:
    try:
        return str(ipaddress.ip_network(raw, strict=False))
    except (ValueError, TypeError):
        raise ResourceError(f"{where}: {raw!r} is not an IP address or CIDR block") from None


def _port(raw: Any, where: str) -> int:
    """Istio writes ports as strings; numbers are accepted too."""
    value = raw
    if isinstance(raw, str) and raw.isdigit():
        value = int(raw)
    if isinstance(value, bool) or not isinstance(value, int) or not 1 <= value <= 65535:
        raise ResourceError(f"{where}: {raw!r} is not a port number (1-65535)")
    return value


def _selector(raw: Any, where: str = "spec.selector") -> Mapping[str, str] | None:
    if raw is None:
        return None
    sel = _mapping(raw, where)
    _fields(sel, {"matchLabels"}, where)
    labels = sel.get("matchLabels") or {}
    if not isinstance(labels, dict) or not all(
        isinstance(k, str) and isinstance(v, str) for k, v in labels.items()
    ):
        raise ResourceError(f"{where}.matchLabels must be a map of strings")
    return dict(labels) or None  # an empty selector selects the whole namespace, as in Istio


def _source(raw: Any, where: str) -> Source:
    src = _mapping(raw, where)
    _fields(src, set(SOURCE_FIELDS), where, _L7_SOURCE)
    if not src:
        raise ResourceError(f"{where} must set at least one field")
    out: dict[str, tuple[str, ...]] = {}
    for field_name, attr in SOURCE_FIELDS.items():
        items = _list(src.get(field_name), f"{where}.{field_name}")
        check = _cidr if field_name in ("ipBlocks", "notIpBlocks") else _pattern
        out[attr] = tuple(check(v, f"{where}.{field_name}") for v in items)
    return Source(**out)


def _operation(raw: Any, where: str) -> Operation:
    op = _mapping(raw, where)
    _fields(op, {"ports", "notPorts"}, where, _L7_OPERATION)
    if not op:
        raise ResourceError(f"{where} must set ports or notPorts")
    ports = tuple(_port(p, f"{where}.ports") for p in _list(op.get("ports"), f"{where}.ports"))
    not_ports = tuple(_port(p, f"{where}.notPorts") for p in _list(op.get("notPorts"), f"{where}.notPorts"))
    return Operation(ports, not_ports)


def _condition(raw: Any, where: str) -> Condition:
    cond = _mapping(raw, where)
    _fields(cond, {"key", "values", "notValues"}, where)
    key = cond.get("key")
    if key not in CONDITION_KEYS:
        raise ResourceError(
            f"{where}.key {key!r} is not supported at L4 (use one of {', '.join(CONDITION_KEYS)})"
        )
    check = {"source.ip": _cidr, "destination.ip": _cidr, "destination.port": _port}.get(key, _pattern)

    def values(name: str) -> tuple[str, ...]:
        return tuple(str(check(v, f"{where}.{name}")) for v in _list(cond.get(name), f"{where}.{name}"))

    vals, not_vals = values("values"), values("notValues")
    if not vals and not not_vals:
        raise ResourceError(f"{where} ({key}) must set values or notValues")
    return Condition(key, vals, not_vals)


def _rule(raw: Any, where: str) -> Rule:
    rule = _mapping(raw, where)
    _fields(rule, {"from", "to", "when"}, where)
    sources = []
    for i, item in enumerate(_list(rule.get("from"), f"{where}.from")):
        entry = _mapping(item, f"{where}.from[{i}]")
        _fields(entry, {"source"}, f"{where}.from[{i}]")
        sources.append(_source(entry.get("source"), f"{where}.from[{i}].source"))
    operations = []
    for i, item in enumerate(_list(rule.get("to"), f"{where}.to")):
        entry = _mapping(item, f"{where}.to[{i}]")
        _fields(entry, {"operation"}, f"{where}.to[{i}]")
        operations.append(_operation(entry.get("operation"), f"{where}.to[{i}].operation"))
    conditions = tuple(
        _condition(c, f"{where}.when[{i}]") for i, c in enumerate(_list(rule.get("when"), f"{where}.when"))
    )
    return Rule(tuple(sources), tuple(operations), conditions)


@register("AuthorizationPolicy", ISTIO_APIS)
def _parse_authorization_policy(meta: Meta, spec: Mapping[str, Any]) -> AuthorizationPolicy:
    if "provider" in spec or spec.get("action") == "CUSTOM":
        raise ResourceError("spec.action CUSTOM (external authorizer) is not supported; use a RegoPolicy")
    _fields(spec, {"selector", "action", "rules", "dryRun"}, "spec")
    action = spec.get("action", "ALLOW")
    if action not in ACTIONS:
        raise ResourceError(f"spec.action {action!r} must be one of {', '.join(ACTIONS)}")
    rules = tuple(_rule(r, f"spec.rules[{i}]") for i, r in enumerate(_list(spec.get("rules"), "spec.rules")))
    return AuthorizationPolicy(
        meta, _selector(spec.get("selector")), action, rules, _bool(spec.get("dryRun"), "spec.dryRun")
    )


def _mtls_mode(raw: Any, where: str) -> str:
    section = _mapping(raw, where)
    _fields(section, {"mode"}, where)
    mode = section.get("mode", "UNSET")
    if mode not in (*MTLS_MODES, "UNSET"):
        raise ResourceError(f"{where}.mode {mode!r} must be one of STRICT, PERMISSIVE, DISABLE, UNSET")
    return str(mode)


@register("PeerAuthentication", ISTIO_APIS)
def _parse_peer_authentication(meta: Meta, spec: Mapping[str, Any]) -> PeerAuthentication:
    _fields(spec, {"selector", "mtls", "portLevelMtls"}, "spec")
    selector = _selector(spec.get("selector"))
    mode = _mtls_mode(spec["mtls"], "spec.mtls") if spec.get("mtls") is not None else "UNSET"
    port_modes: dict[int, str] = {}
    raw_ports = spec.get("portLevelMtls")
    if raw_ports is not None:
        if selector is None:
            raise ResourceError("spec.portLevelMtls requires spec.selector (as in Istio)")
        for key, value in _mapping(raw_ports, "spec.portLevelMtls").items():
            where = f"spec.portLevelMtls[{key}]"
            port_modes[_port(key, where)] = _mtls_mode(value, where)
    return PeerAuthentication(meta, selector, mode, port_modes)


@register("RegoPolicy", {AMBIT_API})
def _parse_rego_policy(meta: Meta, spec: Mapping[str, Any]) -> RegoPolicy:
    _fields(spec, {"selector", "module", "query"}, "spec")
    module = spec.get("module")
    if not isinstance(module, str) or not module.strip():
        raise ResourceError("spec.module must be the Rego source text")
    query = spec.get("query", DEFAULT_REGO_QUERY)
    if not isinstance(query, str) or not query.strip():
        raise ResourceError("spec.query must be a non-empty Rego query such as data.ambit.authz")
    return RegoPolicy(meta, _selector(spec.get("selector")), module, query)


@register("MeshConfig", {AMBIT_API}, namespaced=False)
def _parse_mesh_config(meta: Meta, spec: Mapping[str, Any]) -> MeshConfig:
    known = {"defaultDeny", "rootNamespace", "trustDomain", "trustDomainAliases", "defaultMtlsMode"}
    _fields(spec, known, "spec")
    root = spec.get("rootNamespace", DEFAULT_ROOT_NAMESPACE)
    if not isinstance(root, str) or not root:
        raise ResourceError("spec.rootNamespace must be a non-empty string")
    td = spec.get("trustDomain")
    if td is not None and (not isinstance(td, str) or not td):
        raise ResourceError("spec.trustDomain must be a non-empty string")
    mtls = spec.get("defaultMtlsMode", "PERMISSIVE")
    if mtls not in MTLS_MODES:
        raise ResourceError(f"spec.defaultMtlsMode {mtls!r} must be one of {', '.join(MTLS_MODES)}")
    aliases = spec.get("trustDomainAliases") or []
    if not isinstance(aliases, list) or not all(isinstance(a, str) for a in aliases):
        raise ResourceError("spec.trustDomainAliases must be a list of trust domain names")
    try:
        checked = tuple(check_trust_domain(a) for a in aliases)
    except SpiffeIdError as exc:
        raise ResourceError(f"spec.trustDomainAliases: {exc}") from None
    return MeshConfig(meta, _bool(spec.get("defaultDeny"), "spec.defaultDeny"), root, td, mtls, checked)
