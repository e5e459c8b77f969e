"""Security policy kinds: Istio's AuthorizationPolicy and PeerAuthentication, RegoPolicy, MeshConfig.

Parsed once into frozen objects; agent/policy compiles them into matchers. ambit enforces at L4, as ztunnel
does, so the parser keeps what ztunnel cannot check instead of rejecting it: L7 attributes (methods, paths,
hosts, request principals, `when` keys such as request.headers[..]) are recorded per source, operation and
condition, and the compiler gives them ztunnel's fail-closed meaning (docs/policy.md, "L7 attributes").
Policies bound to `targetRef(s)` belong to a waypoint: parsed and reported, never enforced by the node.
Every such approximation becomes one of the policy's `warnings`. Istio's `istio.io/dry-run` annotation makes
a policy dry-run, as `spec.dryRun` does.
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
ACTIONS = ("ALLOW", "DENY", "AUDIT", "CUSTOM")
MTLS_MODES = ("STRICT", "PERMISSIVE", "DISABLE")
DEFAULT_ROOT_NAMESPACE = "istio-system"  # Istio's default; MeshConfig.spec.rootNamespace overrides it
DEFAULT_REGO_QUERY = "data.ambit.authz"
DRY_RUN_ANNOTATION = "istio.io/dry-run"
# Go's strconv.ParseBool, which Istio uses for the annotation: anything else is a validation error there too.
_BOOL_TEXT = {"1": True, "t": True, "T": True, "TRUE": True, "true": True, "True": True}
_BOOL_TEXT |= {"0": False, "f": False, "F": False, "FALSE": False, "false": False, "False": False}
MAX_SERVICE_ACCOUNTS = 16  # Istio's CRD bounds for serviceAccounts / notServiceAccounts
MAX_SERVICE_ACCOUNT_LENGTH = 320

SOURCE_FIELDS = {
    "principals": "principals",
    "notPrincipals": "not_principals",
    "namespaces": "namespaces",
    "notNamespaces": "not_namespaces",
    "serviceAccounts": "service_accounts",
    "notServiceAccounts": "not_service_accounts",
    "ipBlocks": "ip_blocks",
    "notIpBlocks": "not_ip_blocks",
}
# Source fields taken from the peer's identity (Istio refuses them in CUSTOM policies).
_PEER_IDENTITY_FIELDS = (
    "principals",
    "notPrincipals",
    "namespaces",
    "notNamespaces",
    "serviceAccounts",
    "notServiceAccounts",
)
L7_SOURCE = ("requestPrincipals", "notRequestPrincipals", "remoteIpBlocks", "notRemoteIpBlocks")
L7_OPERATION = ("hosts", "notHosts", "methods", "notMethods", "paths", "notPaths")
CONDITION_KEYS = ("source.principal", "source.namespace", "source.ip", "destination.port", "destination.ip")
# Istio attributes ztunnel cannot evaluate (they need HTTP, a JWT or Envoy): kept, enforced as L7.
L7_CONDITION_KEYS = (
    "remote.ip",
    "request.auth.principal",
    "request.auth.audiences",
    "request.auth.presenter",
    "connection.sni",
)
L7_CONDITION_MAPS = ("request.headers[", "request.auth.claims[", "experimental.envoy.filters.")
# Keys Istio's own validation refuses, with its reasons.
_REFUSED_CONDITION_KEYS = {
    "destination.namespace": "is replaced by the policy's metadata.namespace",
    "destination.name": "is deprecated (v1alpha1 only)",
    "destination.user": "is deprecated (v1alpha1 only)",
}


@dataclass(frozen=True)
class Source:
    """One `from[].source`: every non-empty field must match (AND); within a field any value (OR)."""

    principals: tuple[str, ...] = ()
    not_principals: tuple[str, ...] = ()
    namespaces: tuple[str, ...] = ()
    not_namespaces: tuple[str, ...] = ()
    service_accounts: tuple[str, ...] = ()  # "<namespace>/<serviceaccount>", normalised
    not_service_accounts: tuple[str, ...] = ()
    ip_blocks: tuple[str, ...] = ()
    not_ip_blocks: tuple[str, ...] = ()
    l7: tuple[str, ...] = ()  # names of the L7 fields set (requestPrincipals, ...): not checkable at L4


@dataclass(frozen=True)
class Operation:
    ports: tuple[int, ...] = ()
    not_ports: tuple[int, ...] = ()
    l7: tuple[str, ...] = ()  # names of the L7 fields set (methods, paths, hosts, ...)


@dataclass(frozen=True)
class Condition:
    key: str
    values: tuple[str, ...] = ()
    not_values: tuple[str, ...] = ()
    l7: bool = False  # a key ztunnel cannot evaluate (request.headers[..], request.auth.*, ...)


@dataclass(frozen=True)
class Rule:
    """Matches when any source, any operation and every condition match (empty lists match anything)."""

    sources: tuple[Source, ...] = ()
    operations: tuple[Operation, ...] = ()
    conditions: tuple[Condition, ...] = ()

    @property
    def l7_attributes(self) -> tuple[str, ...]:
        """The L7 attributes this rule uses, sorted; empty for a pure L4 rule."""
        names = {n for s in self.sources for n in s.l7} | {n for o in self.operations for n in o.l7}
        names |= {c.key for c in self.conditions if c.l7}
        return tuple(sorted(names))


@dataclass(frozen=True)
class TargetRef:
    """A Gateway API policy attachment (a waypoint's Service or Gateway): not the node's to enforce."""

    kind: str
    name: str
    group: str = ""
    namespace: str = ""

    def __str__(self) -> str:
        return f"{self.group + '/' if self.group else ''}{self.kind}/{self.name}"


@dataclass(frozen=True)
class AuthorizationPolicy:
    meta: Meta
    selector: Mapping[str, str] | None  # None: namespace scope (mesh scope in the root namespace)
    action: str
    rules: tuple[Rule, ...]  # empty: matches nothing (an ALLOW policy without rules denies everything)
    dry_run: bool = False
    target_refs: tuple[TargetRef, ...] = ()  # set: bound to a waypoint, not enforced by the node
    provider: str = ""  # CUSTOM only: the extension provider's name
    kind: str = "AuthorizationPolicy"

    @property
    def uid(self) -> str:
        return f"{self.meta.namespace}/{self.meta.name}"

    @property
    def enforced_by_node(self) -> bool:
        return not self.target_refs

    @property
    def warnings(self) -> tuple[str, ...]:
        """What the node enforces differently from the YAML's full (L7, waypoint) meaning."""
        if self.target_refs:
            refs = ", ".join(str(t) for t in self.target_refs)
            return (f"bound to targetRefs ({refs}): enforced by a waypoint, not by the node",)
        out = []
        if self.action == "CUSTOM":
            out.append(
                f"CUSTOM provider {self.provider!r} is not reachable from the node: connections matching "
                "its rules are denied (fail closed, like ext_authz with failOpen: false)"
            )
        l7 = [(i, r.l7_attributes) for i, r in enumerate(self.rules) if r.l7_attributes]
        if l7:
            where = ", ".join(str(i) for i, _ in l7)
            names = ", ".join(sorted({n for _, attrs in l7 for n in attrs}))
            if self.action == "ALLOW":
                effect = "never match at L4 (more restrictive than requested)"
            else:
                effect = "are enforced on their L4 part only (more restrictive than requested)"
            out.append(f"rule(s) {where} use L7 attributes ({names}) and {effect}; use a waypoint for L7")
        return tuple(out)


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


def _fields(raw: Mapping[str, Any], allowed: set[str], where: str) -> None:
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


def _text(raw: Any, where: str) -> str:
    if not isinstance(raw, str) or not raw:
        raise ResourceError(f"{where}: {raw!r} must be a non-empty string")
    return raw


def _pattern(raw: Any, where: str) -> str:
    """Istio string match: exact, prefix `abc*`, suffix `*abc`, or `*` (any)."""
    _text(raw, where)
    if raw != "*" and ("*" in raw[1:-1] or raw.count("*") > 1):
        raise ResourceError(f"{where}: {raw!r}: '*' is only allowed as a whole value, prefix or suffix")
    return str(raw)


def _principal(raw: Any, where: str) -> str:
    """A principal pattern; Istio writes them without the scheme, so `spiffe://...` would never match."""
    value = _pattern(raw, where)
    if value.lower().startswith("spiffe://"):
        raise ResourceError(
            f"{where}: {value!r}: principals are written without 'spiffe://' "
            f"(<trust domain>/ns/<namespace>/sa/<service account>, here {value[9:]!r})"
        )
    return value


def _service_account(raw: Any, where: str, namespace: str) -> str:
    """`<namespace>/<serviceaccount>`, or `<serviceaccount>` in the policy's namespace; no wildcards."""
    value = _text(raw, where)
    if "*" in value:
        raise ResourceError(f"{where}: {value!r}: no wildcards in service accounts (use principals)")
    if len(value) > MAX_SERVICE_ACCOUNT_LENGTH:
        raise ResourceError(f"{where}: longer than {MAX_SERVICE_ACCOUNT_LENGTH} characters")
    ns, slash, sa = value.partition("/")
    if not slash:
        ns, sa = namespace, value
    if not ns or not sa or "/" in sa or value.lower().startswith("spiffe:"):
        raise ResourceError(f"{where}: {value!r} must be <namespace>/<serviceaccount> or <serviceaccount>")
    return f"{ns}/{sa}"


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


def _l7_names(raw: Mapping[str, Any], names: tuple[str, ...], where: str) -> tuple[str, ...]:
    """The L7 fields set in `raw` (their values are checked for shape only: the node never reads them)."""
    found = []
    for name in names:
        items = _list(raw.get(name), f"{where}.{name}")
        for v in items:
            _text(v, f"{where}.{name}")
        if items:
            found.append(name)
    return tuple(found)


def _source(raw: Any, where: str, namespace: str) -> Source:
    src = _mapping(raw, where)
    _fields(src, set(SOURCE_FIELDS) | set(L7_SOURCE), where)
    if not src:
        raise ResourceError(f"{where} must set at least one field")
    out: dict[str, tuple[str, ...]] = {}
    for field_name, attr in SOURCE_FIELDS.items():
        items = _list(src.get(field_name), f"{where}.{field_name}")
        at = f"{where}.{field_name}"
        if field_name in ("ipBlocks", "notIpBlocks"):
            out[attr] = tuple(_cidr(v, at) for v in items)
        elif field_name in ("principals", "notPrincipals"):
            out[attr] = tuple(_principal(v, at) for v in items)
        elif field_name in ("serviceAccounts", "notServiceAccounts"):
            if len(items) > MAX_SERVICE_ACCOUNTS:
                raise ResourceError(f"{at}: at most {MAX_SERVICE_ACCOUNTS} entries")
            out[attr] = tuple(_service_account(v, at, namespace) for v in items)
        else:
            out[attr] = tuple(_pattern(v, at) for v in items)
    if (out["service_accounts"] or out["not_service_accounts"]) and any(
        out[a] for a in ("principals", "not_principals", "namespaces", "not_namespaces")
    ):
        raise ResourceError(f"{where}: serviceAccounts cannot be set with principals or namespaces")
    return Source(**out, l7=_l7_names(src, L7_SOURCE, where))


def _operation(raw: Any, where: str) -> Operation:
    op = _mapping(raw, where)
    _fields(op, {"ports", "notPorts", *L7_OPERATION}, where)
    if not op:
        raise ResourceError(f"{where} must set at least one field")
    ports = tuple(_port(p, f"{where}.ports") for p in _list(op.get("ports"), f"{where}.ports"))
    not_ports = tuple(_port(p, f"{where}.notPorts") for p in _list(op.get("notPorts"), f"{where}.notPorts"))
    return Operation(ports, not_ports, _l7_names(op, L7_OPERATION, where))


def _is_l7_key(key: str) -> bool:
    if key in L7_CONDITION_KEYS:
        return True
    # Map attributes are `name[key]` with a non-empty key, as Istio validates them.
    return key.startswith(L7_CONDITION_MAPS) and key.endswith("]") and 0 < key.find("[") < len(key) - 2


def _condition(raw: Any, where: str) -> Condition:
    cond = _mapping(raw, where)
    _fields(cond, {"key", "values", "notValues"}, where)
    key = cond.get("key")
    if not isinstance(key, str) or not key:
        raise ResourceError(f"{where}.key is required")
    if key in CONDITION_KEYS:
        check: Any = {"source.ip": _cidr, "destination.ip": _cidr, "destination.port": _port}.get(key)
        if check is None:
            check = _principal if key == "source.principal" else _pattern
        l7 = False
    elif _is_l7_key(key):
        check = _cidr if key == "remote.ip" else _text
        l7 = True
    else:
        why = _REFUSED_CONDITION_KEYS.get(key)
        if why is None and key.startswith("destination.labels["):
            why = "is replaced by spec.selector"
        raise ResourceError(
            f"{where}.key {key!r} "
            + (why or "is not an Istio attribute")
            + f" (L4: {', '.join(CONDITION_KEYS)}; L7: request.headers[..], request.auth.*, ...)"
        )

    def values(name: str) -> tuple[str, ...]:
        return tuple(str(check(v, f"{where}.{name}")) for v in _list(cond.get(name), f"{where}.{name}"))

    vals, not_vals = values("values"), values("notValues")
    if not vals and not not_vals:
        raise ResourceError(f"{where} ({key}) must set values or notValues")
    return Condition(key, vals, not_vals, l7)


def _rule(raw: Any, where: str, namespace: str) -> Rule:
    rule = _mapping(raw, where)
    _fields(rule, {"from", "to", "when"}, where)
    sources = []
    for i, item in enumerate(_list(rule.get("from"), f"{where}.from")):
        entry = _mapping(item, f"{where}.from[{i}]")
        _fields(entry, {"source"}, f"{where}.from[{i}]")
        sources.append(_source(entry.get("source"), f"{where}.from[{i}].source", namespace))
    operations = []
    for i, item in enumerate(_list(rule.get("to"), f"{where}.to")):
        entry = _mapping(item, f"{where}.to[{i}]")
        _fields(entry, {"operation"}, f"{where}.to[{i}]")
        operations.append(_operation(entry.get("operation"), f"{where}.to[{i}].operation"))
    conditions = tuple(
        _condition(c, f"{where}.when[{i}]") for i, c in enumerate(_list(rule.get("when"), f"{where}.when"))
    )
    return Rule(tuple(sources), tuple(operations), conditions)


def _target_refs(spec: Mapping[str, Any]) -> tuple[TargetRef, ...]:
    raw: list[tuple[str, Any]] = []
    if spec.get("targetRef") is not None:
        raw.append(("spec.targetRef", spec["targetRef"]))
    raw.extend(
        (f"spec.targetRefs[{i}]", r) for i, r in enumerate(_list(spec.get("targetRefs"), "spec.targetRefs"))
    )
    out = []
    for where, item in raw:
        ref = _mapping(item, where)
        _fields(ref, {"group", "kind", "name", "namespace"}, where)
        group = ref.get("group", "")
        namespace = ref.get("namespace", "")
        if not isinstance(group, str) or not isinstance(namespace, str):
            raise ResourceError(f"{where}: group and namespace must be strings")
        kind, name = _text(ref.get("kind"), f"{where}.kind"), _text(ref.get("name"), f"{where}.name")
        out.append(TargetRef(kind, name, group, namespace))
    return tuple(out)


def _dry_run(meta: Meta, spec: Mapping[str, Any], action: str) -> bool:
    from_spec = _bool(spec.get("dryRun"), "spec.dryRun")
    raw = meta.annotations.get(DRY_RUN_ANNOTATION)
    if raw is None:
        return from_spec
    where = f"metadata.annotations[{DRY_RUN_ANNOTATION}]"
    if raw not in _BOOL_TEXT:
        raise ResourceError(f'{where}: {raw!r} is not a boolean ("true" or "false")')
    if action not in ("ALLOW", "DENY"):
        raise ResourceError(f"{where}: dry-run applies to ALLOW and DENY only (as in Istio), not {action}")
    if "dryRun" in spec and from_spec != _BOOL_TEXT[raw]:
        raise ResourceError(f"{where} and spec.dryRun disagree")
    return _BOOL_TEXT[raw]


def _check_custom(spec: Mapping[str, Any], rules: tuple[Rule, ...]) -> str:
    """The provider name of a CUSTOM policy, after Istio's own checks on CUSTOM rules."""
    if spec.get("rules") is None:
        raise ResourceError("CUSTOM action without rules never triggers: add `rules: [{}]` for every request")
    provider = _mapping(spec.get("provider"), "spec.provider")
    _fields(provider, {"name"}, "spec.provider")
    name = _text(provider.get("name"), "spec.provider.name")
    for i, rule in enumerate(rules):
        for j, src in enumerate(rule.sources):
            used = [f for f in _PEER_IDENTITY_FIELDS if getattr(src, SOURCE_FIELDS[f])]
            used += [f for f in src.l7 if f in ("requestPrincipals", "notRequestPrincipals")]
            if used:
                raise ResourceError(f"spec.rules[{i}].from[{j}].source.{used[0]}: not supported with CUSTOM")
        for c in rule.conditions:
            if c.key in ("source.principal", "source.namespace") or c.key.startswith("request.auth."):
                raise ResourceError(f"spec.rules[{i}].when: {c.key} is not supported with CUSTOM")
    return name


@register("AuthorizationPolicy", ISTIO_APIS)
def _parse_authorization_policy(meta: Meta, spec: Mapping[str, Any]) -> AuthorizationPolicy:
    _fields(spec, {"selector", "action", "rules", "dryRun", "provider", "targetRef", "targetRefs"}, "spec")
    action = spec.get("action", "ALLOW")
    if action not in ACTIONS:
        raise ResourceError(f"spec.action {action!r} must be one of {', '.join(ACTIONS)}")
    rules = tuple(
        _rule(r, f"spec.rules[{i}]", meta.namespace)
        for i, r in enumerate(_list(spec.get("rules"), "spec.rules"))
    )
    provider = ""
    if action == "CUSTOM":
        provider = _check_custom(spec, rules)
    elif spec.get("provider") is not None:
        raise ResourceError("spec.provider is only valid with action CUSTOM")
    target_refs = _target_refs(spec)
    bindings = [b for b in ("selector", "targetRef", "targetRefs") if spec.get(b)]
    if len(bindings) > 1:
        raise ResourceError(f"only one of selector, targetRef, targetRefs may be set: {', '.join(bindings)}")
    return AuthorizationPolicy(
        meta,
        _selector(spec.get("selector")),
        action,
        rules,
        _dry_run(meta, spec, action),
        target_refs,
        provider,
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
